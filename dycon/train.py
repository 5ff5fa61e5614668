"""Train DyCON (or a baseline) with the Mean-Teacher loop of method.md section 3.

    python -m dycon.train                                  # the demo: synthetic data, CPU, minutes
    python -m dycon.train --config dycon/configs/brats19.yaml --root_path ../data/BraTS2019
    python -m dycon.train --config brats19 --method mean_teacher --labelnum 50 --device cuda
    python -m dycon.train --config brats19 --preset official      # the released code's quirks
    python -m dycon.train --resume runs/brats19-dycon-20250101-120000
    python -m dycon.train --config brats19 --amp bf16 --compile        # mixed precision, compiled step
    torchrun --nproc_per_node 4 -m dycon.train --config brats19 --output runs/brats19-4gpu
    python -m dycon.train --framework co_training --method dycon           # CT + DyCON on the demo
    python -m dycon.train --config demo --set loss.temp=0.5 --set loss.fecl_weight=0  # any config key

Everything a run needs is one plain dict (the YAML config merged over the defaults, with the
flags and ``--set`` overrides applied, dycon/config.py); it is saved as ``config.yaml`` in the
run directory with the log, ``metrics.csv``, TensorBoard scalars and checkpoints (dycon/loop.py).

Methods: ``supervised`` (labelled batches only, CE + Dice), ``mean_teacher`` (+ MSE between
student and teacher softmax on the unlabelled half, ramped up), ``uamt`` (that MSE where the
teacher is certain), ``dycon`` (+ UnCL and FeCL); each is one objective in dycon/objectives.py.
Frameworks (dycon/frameworks): ``mean_teacher`` (student + EMA teacher) and ``co_training`` (two
students with cross pseudo-labels). FeCL presets: ``dycon`` (default, no label leakage) and
``official`` (the released code).

This module is the command line only: torch and the training modules are imported after the
arguments are parsed, so ``--help`` is fast. Flags take ``-`` or ``_`` (``--labeled-bs``,
``--labeled_bs``); a bad flag, config or data root is one error line (exit status 2), and the run
directory is made only once the config and the data lists have been checked.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import yaml

from dycon import cli
from dycon.config import CONFIG_DIR, DEFAULTS, FRAMEWORKS, METHODS, PRESETS, apply_flags, check_config, \
    load_config, merge_config, prepare_demo_data

PROG = "python -m dycon.train"
# flag -> (type, help) of the SSL4MIS-style numeric flags (config key: config.FLAG_KEYS)
NUMBER_FLAGS = {
    "labeled_bs": (int, "labelled volumes per batch (train.labeled_bs)"),
    "batch_size": (int, "volumes per batch, labelled + unlabelled (train.batch_size)"),
    "max_iterations": (int, "optimiser steps (train.max_iterations)"),
    "seed": (int, "random seed of weights, sampling, crops, noise and dropout (train.seed)"),
    "feature_scaler": (int, "upsampling of the bottleneck features for FeCL (model.feature_scaler)"),
    "base_filters": (int, "filters of the network's first stage (model.base_filters)"),
    "val_every": (int, "validate every N steps, 0 = never (val.every)"),
    "num_workers": (int, "data loader worker processes (train.num_workers)"),
    "checkpoint_every": (int, "write latest.pt every N steps, 0 = only at validations and the end"),
    "threads": (int, "torch CPU threads (default: OMP_NUM_THREADS, else the idle cores; recorded in "
                     "config.yaml, kept on --resume)"),
    "base_lr": (float, "learning rate (train.base_lr)"),
    "ema_decay": (float, "teacher EMA decay (train.ema_decay)"),
    "beta_min": (float, "UnCL beta at the end of training (loss.beta_min)"),
    "beta_max": (float, "UnCL beta at the start of training (loss.beta_max)"),
}


def config_names() -> list[str]:
    """The configs that ship in dycon/configs, by the name --config takes."""
    return sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo",
                   help=f"a YAML file, or one of {', '.join(config_names())} (dycon/configs; default: demo)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest.pt")
    p.add_argument("--output", metavar="RUN_DIR", help="run directory (default runs/<config>-<method>-<time>)")
    p.add_argument("--no-test", dest="test", action="store_false", help="skip the test-set evaluation")
    p.add_argument("--framework", choices=FRAMEWORKS,
                   help="mean_teacher (student + EMA teacher, default) or co_training (two students)")
    p.add_argument("--method", choices=METHODS, help="what the unlabelled data add (default dycon)")
    p.add_argument("--preset", choices=PRESETS, help="FeCL patch labels and loss settings (default dycon)")
    p.add_argument("--root_path", help="data root (must exist; the demo generates into it only with --generate-demo)")
    p.add_argument("--generate-demo", action="store_true",
                   help="demo config: generate the synthetic data set into --root_path when it is not there")
    p.add_argument("--labelnum", help="labelled cases: a count or a share such as 10%%")
    p.add_argument("--layout", help="data layout: brats, la, pancreas, isles, nifti, demo (default: the config's)")
    p.add_argument("--fold", type=int, help="validate on cross-validation fold K (splits_final.json)")
    p.add_argument("--label_seed", type=int, help="draw the labelled cases at random with this seed "
                   "(default: the first labelnum of the training list, as released)")
    for flag, (kind, text) in NUMBER_FLAGS.items():
        p.add_argument(f"--{flag}", type=kind, help=text)
    p.add_argument("--s_beta", type=float, help="a fixed UnCL beta instead of the adaptive schedule")
    p.add_argument("--uncl", choices=("uncl", "mse"), help="mse: replace UnCL by plain MSE consistency")
    for flag, what in (("uncl_weight", "UnCL weight (0.5)"), ("fecl_weight", "FeCL weight (0.5)"),
                       ("temp", "FeCL temperature (0.6)"), ("gamma_pos", "FeCL focal exponent of positives, F+ (2)"),
                       ("gamma_neg", "FeCL focal exponent of negatives, F- (2; 0 = off)"),
                       ("patch_purity", "FeCL patch-label purity threshold (0.6)"),
                       ("teacher_confidence", "FeCL pseudo-label confidence threshold (0.7)")):
        p.add_argument(f"--{flag}", type=float, help=what)
    for flag, what in (("uncl_rampup", "UnCL sigmoid ramp-up, iterations (0 = none)"),
                       ("fecl_rampup", "FeCL sigmoid ramp-up after the warm-up, iterations (0 = none)"),
                       ("fecl_warmup", "iterations without FeCL at the start (0)"),
                       ("teacher_top_k", "FeCL teacher hard negatives per anchor (32; 0 = off)"),
                       ("student_top_k", "FeCL student negatives per anchor (0 = all)"),
                       ("uamt_samples", "UA-MT Monte-Carlo dropout passes (8)")):
        p.add_argument(f"--{flag}", type=int, help=what)
    p.add_argument("--anchor_weight", choices=("entropy", "none"), help="FeCL anchor weight u = 1 + H, or none")
    p.add_argument("--lr_schedule", choices=("constant", "poly"), help="learning-rate schedule (train.lr_schedule)")
    p.add_argument("--patch_size", type=int, nargs=3, metavar=("X", "Y", "Z"), help="training patch (train.patch_size)")
    p.add_argument("--kernel-backend", dest="kernel_backend", choices=("auto", "triton", "cuda", "cpu", "reference"),
                   help="UnCL/FeCL kernels (default auto: Triton on GPU, C++ on CPU)")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1 ... (under torchrun: GPU LOCAL_RANK)")
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision (autocast; fp16 with loss scaling)")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the training step")
    p.add_argument("--deterministic", action="store_true", default=None,
                   help="deterministic algorithms only: two runs give bitwise-identical losses")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", default=[],
                   help="set any config key, e.g. --set loss.temp=0.5 (VALUE read as YAML; repeatable)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_data(cfg: dict, test: bool) -> None:
    """List the cases of every split the run will read and draw the labelled ones, so that a bad
    root, list or ``--labelnum`` fails here."""
    from dycon.data import list_cases, training_cases

    for split in ("train", "val" if cfg["val"]["every"] else None, "test" if test else None):
        if split and not list_cases(cfg["data"], split):
            raise cli.UsageError(f"data root {cfg['data']['root']}: the {split} list is empty")
    training_cases(cfg["data"])


def picture_lines(run_dir: Path) -> list[str]:
    """Where the run's pictures are, for the last lines of the console."""
    snapshots = run_dir / "eval_test_student" / "snapshots"
    lines = [f"curves: {run_dir / 'curves.png'}"] if (run_dir / "curves.png").is_file() else []
    if snapshots.is_dir():
        lines.append(f"test overlays: {snapshots}")
    if (run_dir / "tensorboard").is_dir():
        lines.append(f"uncertainty images: tensorboard --logdir {run_dir / 'tensorboard'}  (IMAGES)")
    return lines


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.resume:
        run_dir = Path(args.resume)
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            raise FileNotFoundError(f"--resume {run_dir}: no config.yaml there (not a run directory?)")
        saved = yaml.safe_load(cfg_path.read_text())
        if isinstance(saved, dict):   # what the last session ran with (dycon.loop.log_kernels)
            saved.pop("code", None)
            saved.pop("kernels", None)
        cfg = merge_config(DEFAULTS, saved, str(cfg_path))
    else:
        cfg = load_config(args.config)
    apply_flags(cfg, args)
    cli.check_device(cfg["train"]["device"])
    prepare_demo_data(cfg, generate=args.generate_demo)
    if cfg["data"]["layout"] == "nifti":   # the preprocessing plan, and the config's 'auto' values from it
        from dycon.preprocess import configure
        configure(cfg)
    check_config(cfg)
    check_data(cfg, args.test)
    cfg["train"]["threads"], threads_note = cli.choose_threads(cfg["train"]["threads"])
    is_main = int(os.environ.get("RANK", "0")) == 0   # under torchrun, only rank 0 writes
    if not (args.resume or args.output) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("several processes need the run directory named: give --output RUN_DIR "
                         "(each process would otherwise make its own time-stamped one)")
    if not args.resume:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = Path(args.output or f"runs/{cfg['name']}-{cfg['train']['method']}-{stamp}")
        if (run_dir / "latest.pt").exists():
            raise FileExistsError(f"{run_dir} already holds a run; use --resume {run_dir} or another --output")
        run_dir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))

    from dycon.loop import log, test_run, train   # torch: only once the arguments are good

    result = train(cfg, run_dir, resume=bool(args.resume), threads_note=threads_note)
    if args.test and is_main:
        result["test"] = test_run(cfg, run_dir)
    log.info("run directory: %s", run_dir)
    for line in picture_lines(run_dir):
        log.info("  %s", line)
    return result


def console_main() -> None:
    """The dycon-train command (setup.py's console scripts)."""
    cli.run(main, PROG)


if __name__ == "__main__":
    console_main()
