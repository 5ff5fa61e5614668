"""benchmarks/gpu_check.sh --dry-run: every stage of the GPU check on the CPU at tiny sizes under the
Triton interpreter, so that the script (and the files it runs) cannot rot where there is no GPU."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
STAGES = ["build", "warm", "tests", "sanitizer", "bench_fecl", "bench_uncl"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check")
def test_gpu_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path / "out"), GPU_CHECK_WORK=str(tmp_path / "work"),
               GPU_CHECK_RESULTS=str(tmp_path / "results"), PYTHON=sys.executable)
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    reports = list((tmp_path / "out").glob("gpu_check-*.md"))
    assert len(reports) == 1, proc.stdout + proc.stderr
    report = reports[0].read_text()
    assert proc.returncode == 0, report
    for stage in STAGES:
        assert f"| {stage} | ok |" in report, report
    sections = {part.split("\n")[0]: part for part in report.split("\n## ")}
    tests = sections["Correctness: tests/test_gpu_kernels.py"]
    assert " passed" in tests and "failed" not in tests, tests
    assert "|  dycon | 4 | 8 | 16 |    triton |     ok |" in sections["FeCL benchmark"], report
    assert "| 1 | 2 | 8 |    triton |     ok |" in sections["UnCL benchmark"], report
    for name in ("tests.log", "sanitizer.log", "bench_fecl.log", "bench_uncl.log"):
        assert (tmp_path / "out" / name).exists()
