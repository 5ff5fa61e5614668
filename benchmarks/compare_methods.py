"""Train supervised, Mean-Teacher and DyCON on the same data, seed and budget; compare on the test list.

    python benchmarks/compare_methods.py                        # the demo config, its full budget
    python benchmarks/compare_methods.py --max_iterations 200 --methods supervised dycon
    python benchmarks/compare_methods.py --config brats19 --root_path ../data/BraTS2019 --device cuda

Each method is an ordinary ``dycon.train`` run (run directories under ``--output``); the test
metrics of each run's best checkpoint go to ``benchmarks/results/compare_methods_<config>.md``
and ``.csv``. Runs one method after the other, never in parallel.
"""
from __future__ import annotations

import argparse
import csv
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from dycon import config as C, loop  # noqa: E402
from dycon.data import list_cases  # noqa: E402

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["method", "labelled", "iterations", "best_val_dice", "dice", "jaccard", "hd95", "asd", "train_s"]


def run_method(cfg: dict, method: str, run_dir: Path) -> dict:
    cfg = {**cfg, "train": {**cfg["train"], "method": method}}
    n_train = len(list_cases(cfg["data"], "train"))
    result = loop.train(cfg, run_dir)
    summary = loop.test_run(cfg, run_dir)
    stats = summary["classes"]["1"]
    return {"method": method, "labelled": f"{C.resolve_labelnum(cfg['data']['labelnum'], n_train)}/{n_train}",
            "iterations": result["step"], "best_val_dice": round(result["best_dice"], 4),
            **{m: round(stats[m]["mean"], 4) for m in ("dice", "jaccard", "hd95", "asd")},
            "train_s": round(result["seconds"])}, summary


def write_results(rows: list[dict], cfg: dict, args, definition: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"compare_methods_{cfg['name']}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    device = loop.pick_device(cfg["train"]["device"])
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    lines = [
        f"# supervised vs Mean Teacher vs DyCON — config `{cfg['name']}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; device {device} ({card}, "
        f"{torch.get_num_threads()} threads); torch {torch.__version__}; seed {cfg['train']['seed']}; "
        f"{cfg['train']['max_iterations']} iterations each; FeCL preset `{cfg['train']['preset']}`; "
        f"patch {cfg['train']['patch_size']}; test list of `{cfg['data']['root']}` "
        f"(best-validation student checkpoint).",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows),
        "",
        f"Dice and Jaccard as fractions. {definition}",
        "",
        f"Command: `python benchmarks/compare_methods.py {' '.join(sys.argv[1:])}`",
        "",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines))
    return stem


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo")
    p.add_argument("--methods", nargs="+", default=list(C.METHODS), choices=C.METHODS)
    p.add_argument("--output", default=f"benchmarks/out/compare-{time.strftime('%Y%m%d-%H%M%S')}")
    p.add_argument("--root_path")
    p.add_argument("--max_iterations", type=int)
    p.add_argument("--val_every", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device")
    args = p.parse_args(argv)

    cfg = C.load_config(args.config)
    C.apply_flags(cfg, argparse.Namespace(**{k: getattr(args, k, None) for k in C.FLAG_KEYS}))
    C.prepare_demo_data(cfg)
    C.check_config(cfg)

    rows, summary = [], None
    for method in args.methods:
        row, summary = run_method(cfg, method, Path(args.output) / method)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    stem = write_results(rows, cfg, args, summary["definition"])
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
