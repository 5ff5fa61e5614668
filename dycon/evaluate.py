"""Evaluate a trained model on a data split: sliding-window inference, per-case metrics, summary.

    python -m dycon.evaluate --run RUN_DIR | --checkpoint PATH [--split test] [--weights student|teacher]
        [--root_path DATA] [--stride_xy 16 --stride_z 4] [--no-largest-component]
        [--hd monai] [--units mm] [--empty-both nan] [--output DIR] [--device cpu] [--snapshots N]

Strides, post-processing, HD95 definition, units and the score of an empty prediction on an
empty ground truth default to the run's ``test`` config, else to the released test script's
(16, 4, largest component, medpy, voxels, 0).

Writes ``cases.csv`` (one row per case and foreground class), ``summary.json`` and
``summary.txt`` (mean and std, with the metric definitions and units) to the output folder, and
overlay pictures of the first N cases plus a best/worst montage to its ``snapshots/`` (``dycon.viz``).
``summary.json`` also holds nnU-Net's own layout, ``metric_per_case`` / ``mean`` /
``foreground_mean`` (Dice, IoU, TP, FP, FN, TN, n_pred, n_ref as nnU-Net computes them: NaN for a
label in neither mask, left out of the means), so that it reads like an nnU-Net ``summary.json``.
Voxels of a ``dataset.json`` ``ignore`` label are scored by neither. Metric definitions: ``dycon.metrics``.
"""
from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dycon import cli
from dycon.data import list_cases, scored_voxels
from dycon.preprocess import predict_labels
from dycon.metrics import (EMPTY_BOTH, HD_DEFINITIONS, METRICS, NNUNET_METRICS, case_metrics, check_hd_available,
                           empty_policy, nnunet_case_metrics)

if TYPE_CHECKING:
    import torch
# torch (checkpoints, networks) and matplotlib (dycon.viz) are imported by the functions that use
# them, after the arguments are parsed: --help and a usage error answer at once

log = logging.getLogger("dycon.evaluate")
PROG = "python -m dycon.evaluate"

UNITS = ("voxel", "mm")
DEFAULT_SNAPSHOTS = 5   # case overlays an evaluation writes unless told otherwise (dycon.viz.Snapshots)
REQUIRED_KEYS = ("patch_size", "stride_xy", "stride_z", "num_classes")
# the released test script's settings, used when neither a flag nor the run's ``test`` config sets one
RELEASED_TEST = dict(stride_xy=16, stride_z=4, largest_component=True, hd_definition="medpy", units="voxel",
                     empty_both="zero")
# optional eval_cfg keys (device None: the model's)
DEFAULTS = dict({k: RELEASED_TEST[k] for k in ("largest_component", "hd_definition", "units", "empty_both")},
                device=None, batch_size=1, preprocessing=None)   # the run's plan (dycon.preprocess)


def _complete_cfg(eval_cfg: dict) -> dict:
    missing = [k for k in REQUIRED_KEYS if k not in eval_cfg]
    unknown = sorted(set(eval_cfg) - set(REQUIRED_KEYS) - set(DEFAULTS))
    if missing or unknown:
        raise ValueError(f"eval_cfg: missing key(s) {missing}, unknown key(s) {unknown}; "
                         f"required {list(REQUIRED_KEYS)}, optional {DEFAULTS}")
    cfg = {**DEFAULTS, **eval_cfg}
    if cfg["hd_definition"] not in HD_DEFINITIONS:
        raise ValueError(f"eval_cfg['hd_definition'] must be one of {HD_DEFINITIONS}, got {cfg['hd_definition']!r}")
    check_hd_available(cfg["hd_definition"])
    if cfg["units"] not in UNITS:
        raise ValueError(f"eval_cfg['units'] must be one of {UNITS}, got {cfg['units']!r}")
    if cfg["empty_both"] not in EMPTY_BOTH:
        raise ValueError(f"eval_cfg['empty_both'] must be one of {EMPTY_BOTH}, got {cfg['empty_both']!r}")
    return cfg


def metric_definition(hd_definition: str, units: str, empty_both: str = "zero") -> str:
    """One line saying which HD95 / ASD definition, units and empty-mask policy a report uses."""
    hd = ("95th percentile of the surface distances of both directions pooled (medpy)"
          if hd_definition == "medpy" else "max of the two directed 95th percentiles (computed by MONAI)")
    unit = "voxels" if units == "voxel" else "mm (voxel spacing of each case)"
    return (f"HD95 = {hd}; ASD = mean distance from the prediction's surface to the ground truth's; "
            f"distances in {unit}. Empty masks: {empty_policy(empty_both)}.")


def _case_spacing(case, volume, units: str):
    if units == "voxel":
        return None
    if volume.spacing is None:
        raise ValueError(f"case {case.id}: units='mm' needs a voxel spacing, but {volume.path} has none "
                         "(h5 files carry none); use units='voxel'")
    return volume.spacing


def evaluate_cases(model: torch.nn.Module, cases, eval_cfg: dict, on_case=None) -> tuple[list[dict], dict]:
    """Segment and score every case; returns (per-case rows, summary).

    ``eval_cfg``: ``patch_size``, ``stride_xy``, ``stride_z``, ``num_classes`` (required);
    ``largest_component`` (True), ``hd_definition`` ('medpy' | 'monai'), ``units``
    ('voxel' | 'mm'), ``empty_both`` ('zero' | 'nan'), ``device`` (default: the model's), ``batch_size`` (1).
    Each row: ``case``, ``class`` (foreground label), ``dice``, ``jaccard``, ``hd95``, ``asd``,
    ``empty`` (see ``dycon.metrics.case_metrics``) and ``nnunet`` (nnU-Net's entry,
    ``dycon.metrics.nnunet_case_metrics``). Voxels of the case's ignore label are not scored.
    ``on_case(case, volume, pred, case_rows)``, if
    given, is called after each case (e.g. ``dycon.viz.Snapshots``).
    """
    import torch

    cfg = _complete_cfg(eval_cfg)
    device = torch.device(cfg["device"]) if cfg["device"] else next(model.parameters()).device
    model.to(device)
    rows = []
    for case in cases:
        volume = case.load(cfg["num_classes"])
        if volume.label is None:
            raise ValueError(f"case {case.id}: {volume.path} has no label to evaluate against")
        if volume.label.shape != volume.image.shape[1:]:
            raise ValueError(f"case {case.id}: label shape {volume.label.shape} does not match image "
                             f"shape {volume.image.shape} (C, X, Y, Z) in {volume.path}")
        spacing = _case_spacing(case, volume, cfg["units"])
        pred = predict_labels(model, volume, dict(cfg, device=device), case.id)   # on the label's own grid
        case_rows = []
        scored = scored_voxels(volume)
        for c in range(1, cfg["num_classes"]):
            row = {"case": case.id, "class": c,
                   **case_metrics(pred == c, volume.label == c, spacing, cfg["hd_definition"], cfg["empty_both"], scored),
                   "nnunet": nnunet_case_metrics(pred == c, volume.label == c, scored),
                   "reference_file": str(getattr(case, "label_path", None) or volume.path)}
            log.info("%s class %d: Dice %.4f  Jaccard %.4f  HD95 %.2f  ASD %.2f%s", case.id, c, row["dice"],
                     row["jaccard"], row["hd95"], row["asd"], f"  (empty {row['empty']})" if row["empty"] else "")
            case_rows.append(row)
        if on_case is not None:
            on_case(case, volume, pred, case_rows)
        rows += case_rows
    return rows, summarize(rows, cfg)


def _mean_std(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "n": len(finite)}


def summarize(rows: list[dict], eval_cfg: dict) -> dict:
    """Mean and (population) std of each metric per foreground class, with the settings used,
    and (for rows with an ``nnunet`` entry) nnU-Net's ``metric_per_case`` / ``mean`` /
    ``foreground_mean``.

    NaN values (HD95 / ASD of cases with an empty ground truth; all four for two empty masks
    under ``empty_both='nan'``) are left out; ``n`` says how many values each mean covers.
    """
    cfg = _complete_cfg(eval_cfg)
    classes = sorted({r["class"] for r in rows})
    per_class = {}
    for c in classes:
        class_rows = [r for r in rows if r["class"] == c]
        per_class[str(c)] = {
            **{m: _mean_std([r[m] for r in class_rows]) for m in METRICS},
            "empty_prediction": sum(r["empty"] in ("prediction", "both") for r in class_rows),
            "empty_ground_truth": sum(r["empty"] in ("ground_truth", "both") for r in class_rows),
        }
    return {
        "n_cases": len({r["case"] for r in rows}),
        "hd_definition": cfg["hd_definition"],
        "units": cfg["units"],
        "empty_both": cfg["empty_both"],
        "definition": metric_definition(cfg["hd_definition"], cfg["units"], cfg["empty_both"]),
        "largest_component": bool(cfg["largest_component"]),
        "patch_size": list(cfg["patch_size"]),
        "stride_xy": cfg["stride_xy"],
        "stride_z": cfg["stride_z"],
        "classes": per_class,
        **nnunet_summary(rows),
    }


def nnunet_summary(rows: list[dict]) -> dict:
    """nnU-Net's ``summary.json`` layout (``compute_metrics_on_folder``): one ``metric_per_case``
    entry per case, the NaN-ignoring ``mean`` per label, and ``foreground_mean``, the mean of
    those over the labels. Empty when the rows carry no ``nnunet`` entry."""
    rows = [r for r in rows if "nnunet" in r]
    if not rows:
        return {}
    per_case = {}
    for r in rows:
        entry = per_case.setdefault(r["case"], {"reference_file": r.get("reference_file"),
                                                "prediction_file": None, "metrics": {}})
        entry["metrics"][str(r["class"])] = r["nnunet"]
    labels = sorted({str(r["class"]) for r in rows}, key=int)
    mean = {label: {m: _nanmean([e["metrics"][label][m] for e in per_case.values() if label in e["metrics"]])
                    for m in NNUNET_METRICS} for label in labels}
    return {"metric_per_case": list(per_case.values()), "mean": mean,
            "foreground_mean": {m: float(np.mean([mean[label][m] for label in labels])) for m in NNUNET_METRICS}}


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def format_table(summary: dict) -> str:
    """The summary as a text table (Dice and Jaccard in %, mean +- std), definitions underneath."""
    unit = "vox" if summary["units"] == "voxel" else "mm"
    headers = ["class", "Dice %", "Jaccard %", f"HD95 ({unit})", f"ASD ({unit})", "empty pred", "empty GT"]
    lines = []
    for c, stats in summary["classes"].items():
        scale = {"dice": 100, "jaccard": 100, "hd95": 1, "asd": 1}
        cells = [f"{stats[m]['mean'] * scale[m]:.2f} ± {stats[m]['std'] * scale[m]:.2f}" for m in METRICS]
        lines.append([c, *cells, str(stats["empty_prediction"]), str(stats["empty_ground_truth"])])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    post = "largest component kept" if summary["largest_component"] else "no post-processing"
    source = (f"{summary['checkpoint']} ({summary['weights']} weights), split {summary['split']}: "
              if "checkpoint" in summary else "")
    return "\n".join([
        f"{source}{summary['n_cases']} cases; windows {summary['patch_size']}, stride_xy {summary['stride_xy']}, "
        f"stride_z {summary['stride_z']}; {post}",
        fmt.format(*headers), *(fmt.format(*line) for line in lines),
        summary["definition"], "std = population standard deviation over cases.",
    ])


REPORT_FILES = ("cases.csv", "summary.json", "summary.txt")


def report_dir(run_dir: str | Path, split: str, weights: str) -> Path:
    """Where a run's report on ``split`` goes: training's test report and ``dycon.evaluate --run``'s
    default are the same folder and files."""
    return Path(run_dir) / f"eval_{split}_{weights}"


def write_report(rows: list[dict], summary: dict, output_dir: str | Path) -> Path:
    """Write ``REPORT_FILES``: ``cases.csv``, ``summary.json`` and ``summary.txt`` to ``output_dir``.
    The one report writer: training's test report uses it too."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "cases.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["case", "class", *METRICS, "empty"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.txt").write_text(format_table(summary) + "\n")
    return out


# ---- checkpoints and command-line settings (shared with dycon.predict) -------------------------

def resolve_checkpoint(run: str | None, checkpoint: str | None) -> Path:
    """``--checkpoint PATH`` as given, or the run's ``best.pt`` (``latest.pt`` when it never validated)."""
    if (run is None) == (checkpoint is None):
        raise ValueError("give exactly one of --run RUN_DIR or --checkpoint PATH")
    if checkpoint:
        path = Path(checkpoint)
    else:
        path = Path(run) / "best.pt"
        if not path.is_file() and (Path(run) / "latest.pt").is_file():
            path = Path(run) / "latest.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return path


def load_model(path: str | Path, weights: str = "student", device: str | torch.device = "cpu"):
    """(model in eval mode on ``device``, training config) from a dycon checkpoint."""
    from dycon.checkpoint import load_checkpoint
    from dycon.networks import build_model

    ckpt = load_checkpoint(path, map_location=device)
    missing = [k for k in (weights, "config") if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        found = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {path} lacks key(s) {missing} (found {found})")
    config = ckpt["config"]
    model = build_model(config["model"])
    model.load_state_dict(ckpt[weights])
    return model.to(device).eval(), config


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def add_model_args(p: argparse.ArgumentParser) -> None:
    """Checkpoint, weights, windows, post-processing and device flags."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run folder; uses RUN/best.pt (RUN/latest.pt without one)")
    src.add_argument("--checkpoint", help="checkpoint file (.pt)")
    p.add_argument("--weights", choices=("student", "teacher"), default="student",
                   help="which network of the checkpoint to use (default: student)")
    p.add_argument("--stride_xy", type=int, help="in-plane stride (default: the run's test config, else 16)")
    p.add_argument("--stride_z", type=int, help="through-plane stride (default: the run's test config, else 4)")
    p.add_argument("--largest-component", dest="largest_component", action=argparse.BooleanOptionalAction,
                   help="keep the largest connected component per class (default: the run's test config, else on)")
    p.add_argument("--batch_size", type=int, default=1, help="windows per forward pass")
    p.add_argument("--device", help="auto (default: cuda when torch sees a GPU, else cpu), cpu, cuda, cuda:1 ...")


def load_model_of(args: argparse.Namespace) -> tuple[Path, torch.nn.Module, dict]:
    """(checkpoint, model, training config) that the flags of ``add_model_args`` name. An unset
    ``args.device``, or ``auto`` (as train takes it, and as check_device's error suggests), becomes
    cuda when torch sees a GPU, else cpu: decided here, not while parsing, since asking imports torch."""
    path = resolve_checkpoint(args.run, args.checkpoint)
    args.device = default_device() if args.device in (None, "auto") else args.device
    cli.check_device(args.device)
    return path, *load_model(path, args.weights, args.device)


def run_settings(args: argparse.Namespace, config: dict, keys) -> dict:
    """``keys`` from the flags, else the run's ``test`` config, else the released test's values;
    plus the window size and classes the model was trained with."""
    test_cfg = config.get("test") or {}
    settings = {k: getattr(args, k) if getattr(args, k) is not None else test_cfg.get(k, RELEASED_TEST[k])
                for k in keys}
    return dict(settings, patch_size=config["train"]["patch_size"], num_classes=config["model"]["num_classes"],
                device=args.device, batch_size=args.batch_size,
                preprocessing=config.get("data", {}).get("preprocessing"))


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(PROG, description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--split", default="test", help="data split to evaluate (default: test)")
    p.add_argument("--root_path", help="data root, overriding the one in the checkpoint's config")
    p.add_argument("--hd", dest="hd_definition", choices=HD_DEFINITIONS,
                   help="HD95 definition (default: the run's test config, else medpy)")
    p.add_argument("--units", choices=UNITS, help="distance units (default: the run's test config, else voxel)")
    p.add_argument("--empty-both", dest="empty_both", choices=EMPTY_BOTH,
                   help="score of an empty prediction on an empty ground truth: zero (the released test scripts) "
                        "or nan (nnU-Net: left out of the means) (default: the run's test config, else zero)")
    p.add_argument("--output", help="report folder (default: RUN/eval_<split>_<weights>, or "
                                    "eval_<checkpoint name>_<split>_<weights> beside the checkpoint)")
    p.add_argument("--snapshots", type=int, default=DEFAULT_SNAPSHOTS, metavar="N",
                   help="overlay PNGs of the first N cases and a best/worst montage in OUTPUT/snapshots "
                        f"(default {DEFAULT_SNAPSHOTS}; 0: none)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    path, model, config = load_model_of(args)
    data_cfg = dict(config["data"])
    if args.root_path:
        data_cfg["root"] = args.root_path
    if args.split == "val":
        log.warning("evaluating on 'val', the split used to select the best checkpoint: the numbers are optimistic")
    eval_cfg = run_settings(args, config, RELEASED_TEST)
    default_out = (report_dir(args.run, args.split, args.weights) if args.run
                   else path.parent / f"eval_{path.stem}_{args.split}_{args.weights}")
    out = Path(args.output or default_out)
    from dycon.viz import Snapshots   # matplotlib: once the flags and the checkpoint are good

    snapshots = Snapshots(out / "snapshots", args.snapshots, eval_cfg["units"]) if args.snapshots else None
    rows, summary = evaluate_cases(model, list_cases(data_cfg, args.split), eval_cfg, on_case=snapshots)
    summary.update(checkpoint=str(path), weights=args.weights, split=args.split)
    write_report(rows, summary, out)
    print(format_table(summary))
    print("wrote " + ", ".join(str(out / name) for name in REPORT_FILES))
    if snapshots is not None:
        snapshots.finish()
        print(f"wrote {len(snapshots.written)} picture(s) to {out / 'snapshots'}")
    return summary


def console_main() -> None:
    """The dycon-evaluate command (setup.py's console scripts)."""
    cli.run(main, PROG)


if __name__ == "__main__":
    console_main()
