"""Benchmark output: the CSV and the Markdown report are written before the optional plot, and a
missing plotting library costs only the PNG; the CPU that other processes used during a timing."""
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _common as bc  # noqa: E402

ROWS = [{"backend": "cpu", "N": 64, "full_ms": 1.5, "peak_mib": 2.0},
        {"backend": "cpu", "N": 128, "full_ms": 5.0, "peak_mib": 7.5}]
PLOT = dict(x="N", xlabel="N", series=["backend"], metrics=[("full_ms", "time (ms)")])


def report():
    out = bc.Report()
    out("| a table |")
    return out


def test_csv_md_and_png_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    report().save_all(str(tmp_path / "b"), ROWS, **PLOT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "b.md", "b.png"]
    assert (tmp_path / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_without_matplotlib_the_table_survives(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib raises ImportError
    report().save_all(str(tmp_path / "b"), ROWS, **PLOT)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.csv", "b.md"]
    assert "| a table |" in (tmp_path / "b.md").read_text()
    assert "1.5" in (tmp_path / "b.csv").read_text()
    assert "no plot" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat")
def test_other_cpu_counts_another_process():
    spin = "import time\nt = time.time()\nwhile time.time() - t < 0.4: pass"
    with bc.OtherCpu() as busy:
        subprocess.run([sys.executable, "-c", spin], check=True)
    assert busy.cores >= 0.4 and str(busy).endswith(" cores")
