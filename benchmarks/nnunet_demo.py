"""Supervised nnU-Net vs nnUNetTrainerDyCON on the demo set, with nnU-Net's own commands.

End to end, in a work folder (``--root``): write the raw dataset (``python -m
dycon.nnunet.dataset``: 4 labelled, 36 unlabelled, 12 test volumes), ``nnUNetv2_plan_and_preprocess``
(nnU-Net's plans, unedited), then per seed and trainer ``nnUNetv2_train 991 3d_fullres all``
under the same budget (``DYCON_NNUNET_EPOCHS`` x ``DYCON_NNUNET_ITERATIONS``), ``nnUNetv2_predict``
of ``imagesTs`` from ``checkpoint_final.pth`` (nnU-Net's default) without mirroring
(``--disable_tta``: 8x less CPU time, the same for both trainers), ``nnUNetv2_evaluate_folder``
against ``labelsTs``. Each finished run adds a row to ``<output>.csv``, and ``<output>.md`` is
rewritten: the test Dice per seed, and the paired DyCON - supervised difference with its
t-interval over the seeds. Runs already in the CSV (same seed, trainer and budget) are skipped,
so an interrupted comparison resumes.

Seeds: nnU-Net seeds nothing; ``DYCON_NNUNET_SEED`` (dycon.nnunet.trainers.apply_seed) seeds
Python, numpy and torch before the network is built, and ``nnUNet_n_proc_DA=0`` keeps the
loaders (patch sampling, augmentation) in the seeded process. One torch thread: nnU-Net's
``-device cpu`` sets ``multiprocessing.cpu_count()`` threads, so every nnU-Net command runs
through this file's ``--nnunet`` launcher, which makes that count ``--threads``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import multiprocessing
import os
import platform
import re
import subprocess
import sys
import time
from importlib.metadata import entry_points, version
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))   # this checkout's dycon, also when run as a file
from dycon.nnunet import trainer_folder  # noqa: E402
from dycon.nnunet.dataset import DEMO_DATASET  # noqa: E402

DATASET_ID, CONFIGURATION, FOLD = 991, "3d_fullres", "all"
TRAINERS = ("nnUNetTrainerBudget", "nnUNetTrainerDyCON")
FIELDS = ("seed", "trainer", "epochs", "iterations", "dice", "train_s", "predict_s", "evaluate_s", "terms")
TERMS_LINE = re.compile(r"DyCON: the epoch's mean unsupervised terms \(raw -> weighted\): (.*)$")


# ------------------------------------------------------------------------------ pure parts
def nnunet_env(root: Path, seed: int, epochs: int, iterations: int, threads: int) -> dict:
    """The environment of every nnU-Net command of one seed (its own nnUNet_results)."""
    return {**os.environ,
            "nnUNet_raw": str(root / "raw"), "nnUNet_preprocessed": str(root / "preprocessed"),
            "nnUNet_results": str(root / f"seed{seed}" / "results"), "nnUNet_extTrainer": trainer_folder(),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "nnUNet_n_proc_DA": "0",     # loaders in the (seeded) training process, no workers
            "nnUNet_def_n_proc": "1",    # nnU-Net's export pools: one process
            "nnUNet_compile": "f",
            "DYCON_NNUNET_EPOCHS": str(epochs), "DYCON_NNUNET_ITERATIONS": str(iterations),
            "DYCON_NNUNET_SEED": str(seed)}


def dataset_folders(root: Path) -> tuple[Path, Path]:
    """The demo set's raw and preprocessed folders under the work folder."""
    return root / "raw" / DEMO_DATASET, root / "preprocessed" / DEMO_DATASET


def foreground_dice(summary: dict) -> float:
    """The mean test Dice over the foreground labels, as nnUNetv2_evaluate_folder's summary.json has it."""
    try:
        return float(summary["foreground_mean"]["Dice"])
    except KeyError as missing:
        raise ValueError(f"summary.json has no foreground_mean Dice (missing key {missing})") from None


def last_terms(log: str) -> str:
    """The last epoch's mean unsupervised terms the DyCON trainer logged ('' when it logged none)."""
    found = [m.group(1) for m in map(TERMS_LINE.search, log.splitlines()) if m]
    return found[-1] if found else ""


def paired(rows: list[dict], baseline: str, method: str) -> list[tuple[int, float, float]]:
    """(seed, baseline Dice, method Dice) for the seeds where both finished, by seed."""
    dice = {(int(r["seed"]), r["trainer"]): float(r["dice"]) for r in rows}
    seeds = sorted({s for s, t in dice if t == baseline} & {s for s, t in dice if t == method})
    return [(s, dice[s, baseline], dice[s, method]) for s in seeds]


def summary_lines(pairs: list[tuple[int, float, float]], baseline: str, method: str) -> list[str]:
    """The per-seed table and the paired difference (method - baseline) with its 95 % t-interval."""
    from dycon.experiment import mean_sd, t_interval
    lines = [f"| seed | {baseline} | {method} | difference |", "|---|---|---|---|"]
    lines += [f"| {s} | {b:.4f} | {m:.4f} | {m - b:+.4f} |" for s, b, m in pairs]
    if not pairs:
        return lines
    diffs = [m - b for _, b, m in pairs]
    (mb, sb), (mm, sm), (md, sd) = (mean_sd([p[1] for p in pairs]), mean_sd([p[2] for p in pairs]), mean_sd(diffs))
    low, high = t_interval(diffs)
    lines.append(f"| mean (sd) | {mb:.4f} ({sb:.4f}) | {mm:.4f} ({sm:.4f}) | {md:+.4f} ({sd:.4f}) |")
    interval = f"[{low:+.4f}, {high:+.4f}]" if math.isfinite(low) else "n/a (one seed)"
    lines += ["", f"Paired difference {method} - {baseline} over {len(pairs)} seed(s): "
                  f"{md:+.4f}, 95 % t-interval {interval}."]
    return lines


def render(rows: list[dict], meta: dict) -> str:
    lines = ["# nnU-Net on the demo set: supervised vs nnUNetTrainerDyCON", "",
             f"Written by `{meta['command']}` (benchmarks/nnunet_demo.py; docs/nnunet.md).", "",
             "## Setup", ""]
    lines += [f"- {key}: {value}" for key, value in meta["setup"].items()]
    lines += ["", "## Test Dice (nnUNetv2_evaluate_folder, foreground mean over the 12 test volumes)", ""]
    lines += summary_lines(paired(rows, *TRAINERS), *TRAINERS)
    lines += ["", "## Runs", "", "| seed | trainer | Dice | train s | predict s | evaluate s | "
              "last epoch's unsupervised terms (raw -> weighted) |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['seed']} | {r['trainer']} | {float(r['dice']):.4f} | {float(r['train_s']):.0f} | "
              f"{float(r['predict_s']):.0f} | {float(r['evaluate_s']):.0f} | {r['terms'] or '-'} |" for r in rows]
    lines += ["", "## Commands (per seed S and trainer T; environment as in Setup)", "", "```bash"]
    lines += meta["commands"] + ["```", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the runs
def nnunet(name: str, *args, env: dict, log: Path) -> float:
    """Run nnU-Net's console command ``name`` through the one-thread launcher; its wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run([sys.executable, __file__, "--nnunet", name, *map(str, args)],
                              env=env, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(map(str, args))} failed (exit {done.returncode}); see {log}")
    return time.perf_counter() - start


def prepare(root: Path, env: dict) -> None:
    """The raw dataset and nnU-Net's plans and preprocessed data, where not there yet."""
    demo, pre = dataset_folders(root)
    if not (demo / "dataset.json").exists():
        subprocess.run([sys.executable, "-m", "dycon.nnunet.dataset", str(demo.parent)], env=env, check=True)
    if not (pre / "nnUNetPlans.json").exists():
        # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which must not be 0 there
        planner_env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
        nnunet("nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", CONFIGURATION, "-np", 1, "-npfp", 1,
               env=planner_env, log=root / "logs" / "plan_and_preprocess.txt")


def commands(root: Path) -> list[str]:
    """nnU-Net's commands of one run, as written in the results (S, T: the seed and trainer)."""
    demo, pre = dataset_folders(root)
    return [f"python -m dycon.nnunet.dataset {root / 'raw'}",
            f"nnUNetv2_plan_and_preprocess -d {DATASET_ID} -c {CONFIGURATION} -np 1 -npfp 1",
            f"DYCON_NNUNET_SEED=$S nnUNet_results={root}/seed$S/results "
            f"nnUNetv2_train {DATASET_ID} {CONFIGURATION} {FOLD} -tr $T -device cpu",
            f"nnUNetv2_predict -i {demo / 'imagesTs'} -o {root}/seed$S/pred_$T -d {DATASET_ID} -c {CONFIGURATION} "
            f"-f {FOLD} -tr $T -device cpu -npp 1 -nps 1 --disable_tta   # checkpoint_final.pth",
            f"nnUNetv2_evaluate_folder {demo / 'labelsTs'} {root}/seed$S/pred_$T -djfile {pre / 'dataset.json'} "
            f"-pfile {pre / 'nnUNetPlans.json'} -o {root}/seed$S/pred_$T/summary.json -np 1"]


def train(root: Path, seed: int, trainer: str, env: dict) -> float:
    """Train one run; its wall seconds. A run that finished before (its checkpoint_final.pth and
    the seconds it took are there) is not trained again: only prediction and evaluation rerun."""
    timing = root / f"seed{seed}" / "logs" / f"train_{trainer}.json"
    finished = next((Path(env["nnUNet_results"]).glob(f"*/{trainer}__*/fold_{FOLD}/checkpoint_final.pth")), None)
    if finished is not None and timing.exists():
        return json.loads(timing.read_text())["train_s"]
    seconds = nnunet("nnUNetv2_train", DATASET_ID, CONFIGURATION, FOLD, "-tr", trainer, "-device", "cpu",
                     env=env, log=timing.with_suffix(".txt"))
    timing.write_text(json.dumps({"train_s": seconds}))
    return seconds


def train_predict_evaluate(root: Path, seed: int, trainer: str, env: dict) -> dict:
    demo, pre = dataset_folders(root)
    logs, pred = root / f"seed{seed}" / "logs", root / f"seed{seed}" / f"pred_{trainer}"
    train_s = train(root, seed, trainer, env)
    predict_s = nnunet("nnUNetv2_predict", "-i", demo / "imagesTs", "-o", pred, "-d", DATASET_ID,
                       "-c", CONFIGURATION, "-f", FOLD, "-tr", trainer, "-device", "cpu", "-npp", 1, "-nps", 1,
                       "--disable_tta", env=env, log=logs / f"predict_{trainer}.txt")
    evaluate_s = nnunet("nnUNetv2_evaluate_folder", demo / "labelsTs", pred, "-djfile", pre / "dataset.json",
                        "-pfile", pre / "nnUNetPlans.json", "-o", pred / "summary.json", "-np", 1,
                        env=env, log=logs / f"evaluate_{trainer}.txt")
    return {"seed": seed, "trainer": trainer, "epochs": env["DYCON_NNUNET_EPOCHS"],
            "iterations": env["DYCON_NNUNET_ITERATIONS"],
            "dice": foreground_dice(json.loads((pred / "summary.json").read_text())),
            "train_s": f"{train_s:.1f}", "predict_s": f"{predict_s:.1f}", "evaluate_s": f"{evaluate_s:.1f}",
            "terms": last_terms((logs / f"train_{trainer}.txt").read_text())}


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_results(rows: list[dict], meta: dict, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    output.with_suffix(".md").write_text(render(rows, meta))


def setup(args) -> dict:
    import torch
    return {"budget": f"{args.epochs} epochs x {args.iterations} iterations (the same for both trainers); "
                      f"nnU-Net validates max(1, iterations // 5) batches per epoch and, after training, "
                      f"the 4 labelled volumes (fold `all`)",
            "plans": "nnU-Net's, unedited (3d_fullres: PlainConvUNet 32-256, patch 48^3, batch 2; DyCON adds "
                     "2 unlabelled patches per step)",
            "checkpoint": "checkpoint_final.pth (the student, nnUNetv2_predict's default); prediction without "
                          "mirroring (--disable_tta: 8x less CPU time, the same for both trainers)",
            "seeds": f"{' '.join(map(str, args.seeds))} via DYCON_NNUNET_SEED (Python, numpy, torch; "
                     "nnU-Net seeds nothing itself); the same seed gives both trainers the same initial network",
            "threads": f"{args.threads} torch thread(s), nnUNet_n_proc_DA=0, nnUNet_def_n_proc=1, nnUNet_compile=f",
            "versions": f"nnunetv2 {version('nnunetv2')}, torch {torch.__version__}, Python {platform.python_version()}",
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                                     capture_output=True, text=True).stdout.strip()}


def launch_nnunet(name: str, argv: list[str], threads: int) -> None:
    """Run an nnU-Net console command in this process with ``threads`` CPUs as its count."""
    (entry,) = entry_points(group="console_scripts", name=name)
    multiprocessing.cpu_count = lambda: threads   # what nnU-Net's -device cpu gives torch.set_num_threads
    sys.argv = [name, *argv]
    entry.load()()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/nnunet_demo"), help="work folder")
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "nnunet_demo",
                        help="results stem: .csv and .md")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=10, help="iterations per epoch")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nnunet", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)   # the launcher
    args = parser.parse_args(argv)
    if args.nnunet:
        return launch_nnunet(args.nnunet[0], args.nnunet[1:], int(os.environ.get("OMP_NUM_THREADS", args.threads)))
    meta = {"command": "python benchmarks/nnunet_demo.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "setup": setup(args), "commands": commands(args.root)}
    rows = read_rows(args.output.with_suffix(".csv"))
    prepare(args.root, nnunet_env(args.root, args.seeds[0], args.epochs, args.iterations, args.threads))
    for seed in args.seeds:
        for trainer in TRAINERS:
            done = any(int(r["seed"]) == seed and r["trainer"] == trainer and int(r["epochs"]) == args.epochs
                       and int(r["iterations"]) == args.iterations for r in rows)
            if done:
                continue
            env = nnunet_env(args.root, seed, args.epochs, args.iterations, args.threads)
            rows.append(train_predict_evaluate(args.root, seed, trainer, env))
            write_results(rows, meta, args.output)
            print(f"seed {seed} {trainer}: Dice {float(rows[-1]['dice']):.4f}", flush=True)


if __name__ == "__main__":
    main()
