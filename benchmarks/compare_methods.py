"""Supervised vs Mean Teacher vs DyCON over seeds: ``python -m dycon.experiment`` with the three
methods as its variants and the report also written to ``benchmarks/results/compare_methods_<config>``.

    python benchmarks/compare_methods.py --output benchmarks/out/compare-demo       # the demo config, seed 1337
    python benchmarks/compare_methods.py --output runs/cmp --seeds 1 2 3 --set train.max_iterations=200
    python benchmarks/compare_methods.py --config brats19 --set data.root=../data/BraTS2019 --set train.device=cuda \\
        --seeds 1 2 3 --output runs/cmp-brats

Every flag of ``dycon.experiment`` works here (``--grid``, ``--variant``, ``--launcher``, ...);
rerunning the same command skips the runs already done. For ablations and more baselines use a grid
file, e.g. ``benchmarks/grids/demo_hard.yaml``.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from dycon import experiment  # noqa: E402

RESULTS = Path(__file__).parent / "results"

if __name__ == "__main__":
    experiment.main(methods=["supervised", "mean_teacher", "dycon"],
                    results=str(RESULTS / "compare_methods_{config}"))
