"""scripts/setup.sh picks the torch build by itself: the CPU one where no NVIDIA driver is found,
pip's default (CUDA) one where one is, with --cuda, and for the test environment (--dev), which
compiles the CUDA kernels wherever nvcc is. Checked with --dry-run, which stops before installing."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_DRIVER = Path("/proc/driver/nvidia/version").exists()


def plan(*flags, path=None):
    env = {**os.environ, "PATH": path or os.environ["PATH"]}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh"), *flags, "--dry-run"], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, (proc.stdout + proc.stderr).strip()


@pytest.fixture
def path_with_nvidia_smi(tmp_path):
    """A PATH whose nvidia-smi lists a GPU, as on a machine with the driver."""
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H100 (UUID: GPU-0)'\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    return f"{tmp_path}:{os.environ['PATH']}"


@pytest.mark.skipif(HAS_DRIVER or shutil.which("nvidia-smi") is not None, reason="this machine has a driver")
def test_no_driver_takes_the_cpu_build_and_says_why():
    assert plan() == (0, "torch: CPU build (no NVIDIA driver found; --cuda for the CUDA build)")


def test_a_driver_or_cuda_or_dev_takes_the_default_build(path_with_nvidia_smi):
    assert plan(path=path_with_nvidia_smi) == (0, "torch: pip's default build (an NVIDIA driver is present)")
    assert plan("--cuda") == (0, "torch: pip's default build (--cuda)")
    code, line = plan("--dev")
    assert code == 0 and line.startswith("torch: pip's default build (")
    assert plan("--dev", "--cpu") == (0, "torch: CPU build (--cpu)")


@pytest.mark.parametrize("flags,message", [(["--gpu"], "unknown argument: --gpu"),
                                           (["--cpu", "--cuda"], "--cpu and --cuda exclude each other")])
def test_bad_arguments_are_one_line_and_status_2(flags, message):
    code, text = plan(*flags)
    assert code == 2 and len(text.splitlines()) == 1 and message in text, text
