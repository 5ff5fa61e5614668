"""ssl_bench's test Dice split by lesion polarity (issue 19): which methods learn the dark lesions
that the 4 clear labelled volumes (all bright) do not show.

    python benchmarks/ssl_bench_cases.py --output runs/grid-ssl_bench --data data/ssl_bench

Reads each done cell's ``cell.json`` under ``--output`` and the test volumes under ``--data``;
prints a markdown table: per variant, mean test Dice (%) over runs on bright- and dark-lesion cases.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage


def polarity(h5: Path) -> str:
    """'dark' when the lesions are darker than the tissue right around them, else 'bright'."""
    with h5py.File(h5) as f:
        image, label = f["image"][:], f["label"][:] > 0
    ring = ndimage.binary_dilation(label, iterations=2) & ~label
    return "dark" if image[label].mean() < image[ring].mean() else "bright"


def by_polarity(output: Path, data: Path) -> tuple[dict, dict]:
    """variant -> polarity -> one mean Dice per run, and the number of test cases of each polarity."""
    kinds: dict[str, str] = {}
    table: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(output.glob("*/*/cell.json")):
        record = json.loads(path.read_text())
        per_kind = defaultdict(list)
        for case in record["cases"]:
            name = case["case"]
            if name not in kinds:
                kinds[name] = polarity(data / "data" / f"{name}.h5")
            per_kind[kinds[name]].append(case["dice"])
        for kind, dice in per_kind.items():
            table[record["cell"]["variant"]][kind].append(100 * float(np.mean(dice)))
    counts = {k: sum(v == k for v in kinds.values()) for k in ("bright", "dark")}
    return table, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, required=True, help="the grid's output folder")
    parser.add_argument("--data", type=Path, required=True, help="the ssl_bench set the grid ran on")
    args = parser.parse_args()
    table, counts = by_polarity(args.output, args.data)
    print(f"| variant | runs | Dice %, {counts['bright']} bright-lesion cases | Dice %, {counts['dark']} dark-lesion cases |")
    print("|---|---|---|---|")
    for variant, kinds in table.items():
        cells = [f"{np.mean(kinds[k]):.1f} ({' '.join(f'{x:.1f}' for x in kinds[k])})" for k in ("bright", "dark")]
        print(f"| {variant} | {len(kinds['bright'])} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
