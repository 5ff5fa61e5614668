"""What happens when the compiled extension is absent, broken or built for another torch: one
message that says so, 'auto' still runs, explicit backends raise with the same explanation, the
environment report's exit status follows, and 'auto' never starts a dense FeCL that cannot fit
(engineering.md, "Backends and dispatch")."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dycon_kernels as dk
from dycon_kernels import _build, backends, reference

ROOT = Path(__file__).resolve().parents[1]
THIS_BUILD = _build.extension_filename(torch.__version__)

# Runs in a fresh process with the extension looked up in EXTENSION_DIR (argv[1]): both ops with
# backend='auto' (twice: the message comes once), then backend='cpu', which must raise.
PROBE = """
import sys, warnings
from pathlib import Path
import torch
import torch.nn.functional as F
import dycon_kernels as dk
from dycon_kernels import backends
backends.EXTENSION_DIR = Path(sys.argv[1])
warnings.simplefilter("default")
s, t = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
z, y = F.normalize(torch.randn(1, 24, 8), dim=-1), torch.randint(0, 2, (1, 24))
for _ in range(2):
    assert dk.uncl(s, t, 2.0).isfinite() and dk.fecl(z, y, z).isfinite()
print("AUTO RAN", backends.resolve("auto", torch.device("cpu"), "fecl"))
try:
    dk.uncl(s, t, 2.0, backend="cpu")
except ValueError as exc:
    print("EXPLICIT RAISED", exc)
"""


def probe(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", PROBE, str(folder)], capture_output=True, text=True, env=env,
                          timeout=120)


def rebuild_hint() -> str:
    return f"{sys.executable} -m pip install"


def test_a_broken_extension_warns_once_and_auto_still_runs(tmp_path):
    # a stub that cannot be imported where this torch's build belongs, with a record of another torch
    stub = tmp_path / THIS_BUILD
    stub.write_bytes(b"\x7fELF but not really a shared object")
    _build.record_path(stub).write_text(json.dumps({"torch": "2.13.0+cpu", "python": "3.11.7"}))
    out = probe(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("KernelsNotLoadableWarning") == 1, out.stderr
    warning = next(line for line in out.stderr.splitlines() if "KernelsNotLoadableWarning" in line)
    for fact in (str(stub), "ImportError", "built with torch 2.13.0+cpu", f"torch {torch.__version__}",
                 rebuild_hint()):
        assert fact in warning, fact
    assert "AUTO RAN reference" in out.stdout
    explicit = next(line for line in out.stdout.splitlines() if line.startswith("EXPLICIT RAISED"))
    assert "backend 'cpu' cannot run" in explicit and "ImportError" in explicit and rebuild_hint() in explicit


def test_a_build_for_another_torch_only_says_so(tmp_path):
    # what a second environment sharing the checkout leaves behind: its own file, not ours
    other = tmp_path / _build.extension_filename("2.13.0+cpu")
    other.write_bytes(b"never loaded")
    _build.record_path(other).write_text(json.dumps({"torch": "2.13.0+cpu", "python": "3.11.7",
                                                     "environment": "/elsewhere/.venv"}))
    out = probe(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("KernelsNotLoadableWarning") == 1, out.stderr
    for fact in ("torch 2.13.0+cpu", "/elsewhere/.venv", THIS_BUILD, "Several environments share this checkout"):
        assert fact in out.stderr, fact
    assert "AUTO RAN reference" in out.stdout and "EXPLICIT RAISED" in out.stdout


def test_a_missing_extension_gives_one_notice(tmp_path):
    out = probe(tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("KernelsNotBuiltWarning") == 1, out.stderr
    assert "not built" in out.stderr and rebuild_hint() in out.stderr
    assert "KernelsNotLoadableWarning" not in out.stderr
    assert "AUTO RAN reference" in out.stdout and "not built" in out.stdout


def test_this_build_has_a_record_of_its_torch():
    state = backends.extension_state()
    assert state.status == "loaded" and state.path.name == THIS_BUILD
    assert state.record["torch"] == torch.__version__


def test_per_torch_file_names_do_not_collide():
    names = {_build.extension_filename(v) for v in ("2.13.0+cpu", "2.14.1+cu130", "2.14.1+cpu")}
    assert len(names) == 3 and all(n.startswith("_C.torch2_1") for n in names)
    assert _build.record_path(Path("x") / THIS_BUILD).name.endswith(".build.json")


@pytest.fixture
def no_fused_kernels(monkeypatch):
    monkeypatch.setattr(backends, "extension_state", lambda: backends.ExtensionState("absent"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def test_auto_refuses_a_dense_fecl_that_cannot_fit(no_fused_kernels, monkeypatch):
    monkeypatch.setattr(backends, "free_memory", lambda device: 64 << 20)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the dense reference was started")

    monkeypatch.setattr(reference, "fecl", must_not_run)
    z, y = F.normalize(torch.randn(1, 2048, 8), dim=-1), torch.randint(0, 2, (1, 2048))
    # 8 buffers x 2048 x (2048 + 2048) x 4 bytes = 256 MiB > 64 MiB
    with pytest.raises(backends.DenseReferenceTooLarge, match=r"B=1, N=2048, Nt=2048, D=8 .* 0\.2 GiB .* not built"):
        dk.fecl(z, y, z)


def test_auto_runs_the_reference_where_it_fits(no_fused_kernels, monkeypatch):
    monkeypatch.setattr(backends, "free_memory", lambda device: 64 << 20)
    z, y = F.normalize(torch.randn(1, 64, 8), dim=-1), torch.randint(0, 2, (1, 64))
    assert backends.resolve("auto", torch.device("cpu"), "fecl") == "reference"
    torch.testing.assert_close(dk.fecl(z, y, z), reference.fecl(z, y, z))


def test_the_guard_counts_fewer_buffers_than_the_reference_uses():
    # the refusal must be certain: the peak RSS growth of the reference forward+backward, measured
    # in a fresh process, exceeds the estimate. The peak is reset (VmHWM through clear_refs) once
    # the inputs exist: ru_maxrss alone reads 0 when importing torch peaked higher.
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs a writable /proc/self/clear_refs to reset the peak resident set")
    code = ("import re, torch, torch.nn.functional as F; from dycon_kernels import reference;"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024;"
            "z = F.normalize(torch.randn(1, 1500, 8), dim=-1).requires_grad_(); y = torch.randint(0, 3, (1, 1500));"
            "open('/proc/self/clear_refs', 'w').write('5'); r0 = hwm();"
            "reference.fecl(z, y, z.detach()).backward();"
            "print(hwm() - r0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert int(out.stdout) > backends.fecl_reference_bytes(1, 1500, 1500, torch.float32)


def test_free_memory_on_the_cpu_is_the_available_ram():
    free = backends.free_memory(torch.device("cpu"))
    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_environment_report_exits_0_with_the_extension_built(capsys, monkeypatch):
    from dycon_kernels.__main__ import main

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main() == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "CPU: " in out and "fecl -> cpu" in out
    assert f"built with torch {torch.__version__}" in out and "kernels present: CPU True" in out


def test_environment_report_exits_1_without_it(tmp_path):
    code = ("import sys; from pathlib import Path; from dycon_kernels import backends; "
            "backends.EXTENSION_DIR = Path(sys.argv[1]); from dycon_kernels.__main__ import main; sys.exit(main())")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "0"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "extension dycon_kernels._C: absent" in out.stdout and "fecl -> reference" in out.stdout
    assert "Warning" not in out.stderr   # the report says it; no second copy


def test_report_names_the_backend_and_why():
    info = backends.report(torch.device("cpu"))
    assert info["ops"]["fecl"]["backend"] == "cpu" and info["extension"] == "loaded"
    lines = backends.report_lines(info)
    assert lines[1].startswith("kernels on cpu: fecl -> cpu (")
    assert f"built with torch {torch.__version__}" in lines[-1]
