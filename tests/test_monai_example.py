"""examples/monai_unet_dycon.py runs (one iteration) and reports a test Dice."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("monai", reason="monai is not installed (pip install -e '.[monai]')")

REPO = Path(__file__).resolve().parents[1]


def test_example_trains_and_evaluates(tmp_path):
    env = {**os.environ, "DYCON_DATA": str(tmp_path / "demo"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(REPO / "examples" / "monai_unet_dycon.py"), "1"], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    dice = re.search(r"test Dice \(student, 1 iterations\): ([0-9.]+)", out.stdout)
    assert dice is not None and 0.0 <= float(dice.group(1)) <= 1.0, out.stdout
