"""A new user's install: a fresh virtual environment, `pip install -e . --no-build-isolation` of a
clean copy of the repository, and every kind of command the README shows runs in it (a two-
iteration training with its test report, an evaluation, a prediction, the smallest case of each
benchmark: UnCL, FeCL, the method comparison, the kernel report), and the dycon-* console scripts
answer --help. It fails when a module that a
default path imports is missing from setup.py.

torch and the packages it requires are linked from this test's own environment instead of
installed (a CUDA build is several GB: minutes of copying for nothing this test checks); every
other dependency comes from `pip install -e .`, through pip's configured index. The kernels are
built with DYCON_SKIP_CUDA=1: CI's own set-up (scripts/setup.sh) already compiles the CUDA sources,
and here nothing could run them; the CPU build takes about a minute on 2 cores.
"""
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import CONSOLE_SCRIPTS

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _torch_distributions() -> list:
    """torch and the installed distributions it requires, transitively (extras left out)."""
    found, todo = {}, ["torch"]
    while todo:
        name = todo.pop().lower().replace("_", "-")
        if name in found:
            continue
        try:
            found[name] = dist = md.distribution(name)
        except md.PackageNotFoundError:   # a requirement for another platform
            continue
        todo += [re.match(r"[A-Za-z0-9_.-]+", r).group() for r in dist.requires or [] if "extra ==" not in r]
    return list(found.values())


def _link_torch(site: Path, env: Path) -> None:
    """Make torch importable in ``env`` (and known to its pip) through symlinks in ``site``."""
    site.mkdir()
    for dist in _torch_distributions():
        top = {Path(f).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for name in top:
            source = Path(dist.locate_file(name))
            if source.exists() and not (site / name).exists():
                (site / name).symlink_to(source)
    purelib = subprocess.run([str(env / "bin" / "python"), "-c",
                              "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "linked_torch.pth").write_text(str(site) + "\n")


def _copy_checkout(dest: Path) -> None:
    """The repository's files as a clean clone has them (tracked, plus new files not ignored)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


def _run(cmd: list, cwd: Path, env: dict, timeout: float) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


TINY = {
    "name": "tiny",
    "data": {"layout": "demo", "root": "data/tiny", "labelnum": 2},
    "model": {"base_filters": 4, "feature_scaler": 2, "embed_dim": 16},
    "train": {"patch_size": [32, 32, 32], "batch_size": 4, "labeled_bs": 2, "max_iterations": 2, "device": "cpu",
              "log_every": 1},
    "val": {"every": 2, "stride_xy": 16, "stride_z": 16},
    "test": {"stride_xy": 16, "stride_z": 16},
}


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="needs a git checkout")
def test_fresh_venv_pip_install_runs_every_command(tmp_path):
    repo, env_dir = tmp_path / "repo", tmp_path / "venv"
    _copy_checkout(repo)
    venv.create(env_dir, with_pip=True)
    _link_torch(tmp_path / "torch-site", env_dir)
    py = str(env_dir / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=f"{env_dir / 'bin'}:{env['PATH']}", DYCON_SKIP_CUDA="1", OMP_NUM_THREADS="1")
    env.pop("DYCON_POISON", None)
    env.pop("TRITON_INTERPRET", None)

    _run([py, "-m", "pip", "install", "-q", "-r", "requirements-build.txt"], repo, env, 600)
    _run([py, "-m", "pip", "install", "-e", ".", "--no-build-isolation"], repo, env, 1200)
    where = _run([py, "-c", "import dycon, torch; print(dycon.__file__)"], tmp_path, env, 120)
    assert str(repo / "dycon") in where
    # the environment report (console script): the editable build loads, with its build record
    assert f"built with torch {torch.__version__}" in _run([str(env_dir / "bin" / "dycon-env")], repo, env, 120)

    _run([py, "-c", "from dycon.demo import ensure_demo_data; "
                    "ensure_demo_data('data/tiny', size=32, splits={'train': 4, 'val': 1, 'test': 1})"], repo, env, 300)
    (repo / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    bin_ = env_dir / "bin"
    for command in CONSOLE_SCRIPTS:   # the console scripts pip made, each answering --help
        assert "usage: " in _run([str(bin_ / f"dycon-{command}"), "--help"], repo, env, 120)
    _run([str(bin_ / "dycon-train"), "--config", "tiny.yaml", "--output", "runs/tiny"], repo, env, 600)
    assert (repo / "runs/tiny/best.pt").exists() or (repo / "runs/tiny/latest.pt").exists()
    _run([py, "-m", "dycon.evaluate", "--run", "runs/tiny", "--output", "report"], repo, env, 300)   # -m too
    assert (repo / "report/summary.json").exists()
    case = next((repo / "data/tiny").rglob("*.h5"))
    _run([str(bin_ / "dycon-predict"), "--run", "runs/tiny", "--input", str(case), "--output", "pred"], repo, env, 300)
    assert list((repo / "pred").glob("*.nii.gz"))

    bench = ["--quick", "--device", "cpu", "--backends", "cpu", "--threads", "1", "--out", "bench"]
    _run([py, "benchmarks/bench_uncl.py", *bench, "--sizes", "1x16"], repo, env, 600)
    _run([py, "benchmarks/bench_fecl.py", *bench, "--batch", "1", "--n", "64", "--d", "16", "--k", "none",
          "--presets", "dycon"], repo, env, 600)
    written = sorted(p.suffix for p in (repo / "bench").iterdir())
    assert written == [".csv", ".csv", ".md", ".md", ".png", ".png"], written
    _run([py, "benchmarks/compare_methods.py", "--config", "tiny.yaml", "--output", "compare"], repo, env, 900)
    _run([py, "benchmarks/kernel_report.py", "--quick", "--ops", "uncl", "--cc", "90", "--no-cuda", "--name", "kr"],
         repo, env, 900)
