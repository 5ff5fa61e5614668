"""Run a grid of training runs (variants x seeds x labelled-subset draws) and compare them with intervals.

    python -m dycon.experiment --grid benchmarks/grids/demo_hard.yaml --output runs/grid-demo_hard
    python -m dycon.experiment --config demo --methods supervised mean_teacher dycon --seeds 1 2 3 \\
        --set train.max_iterations=200 --output runs/compare-demo
    python -m dycon.experiment --grid my_grid.yaml --variants supervised dycon --seeds 1 2 3 4 5 ...
    python -m dycon.experiment --grid my_grid.yaml --output runs/g --launcher "torchrun --nproc_per_node 4" \\
        --set train.device=cuda
    python -m dycon.experiment --grid my_grid.yaml --output runs/g --aggregate-only

A *variant* is a name and a dict of dotted config overrides (``{"train.method": "dycon",
"loss.s_beta": 0.5}``), plain data; a *cell* is one variant at one seed and one labelled-subset
draw. Each cell is one ordinary ``dycon.train`` run in ``<output>/<variant>/seed<S>[-draw<D>]``:
its full config (``cell_config.yaml``), log, checkpoints, the test evaluation of its best checkpoint
(``eval_test_student/``, the report ``dycon.evaluate`` writes) and, written last, ``cell.json`` (the cell and its
results). A cell with ``cell.json`` is done and skipped, so an interrupted grid resumes where it
stopped; a cell without it runs again, continued from its ``latest.pt`` when it has one. Every
cell's config is built and checked before the first one runs, so an unknown key fails in seconds.

Grid file (YAML; every key optional, command-line flags override it):

    config: demo_hard                   # trainer config: a name in dycon/configs or a path
    set: {train.max_iterations: 600}    # overrides of every cell
    seeds: [1, 2, 3]                    # values of train.seed
    draws: [null]                       # labelled-subset draws: values of draw_key (null: the config's)
    draw_key: data.label_seed
    reference: supervised               # compared with every other variant (default: the first)
    compare: [[dycon, mean_teacher]]    # further pairs (A, B): A - B
    variants:
      supervised: {train.method: supervised}
      dycon: {train.method: dycon}

Several workers may share one output folder: ``--workers N`` starts N - 1 more processes of the
same command, and a second shell running the same command is just as safe. A worker claims a cell
by creating ``<cell>/cell.lock`` atomically (O_CREAT | O_EXCL) with its pid and host, re-checks
``cell.json`` under the claim, and removes the lock when the cell ends (done or failed); a cell
whose lock is held is skipped; a lock left by a process of this host that no longer runs is
taken over with a notice (one taker at a time). The report covers every cell done, by any worker.

Cells run one after the other: in this process by default, or each as a subprocess
``<launcher> -m dycon.train ...`` with ``--launcher`` (e.g. ``"torchrun --nproc_per_node 4"`` to
train every cell on 4 GPUs; the data are prepared once by the runner, before any cell starts).

Statistics (``aggregate``), for Dice and HD95 of the test list:

- a run's score is its mean over the test cases (classes averaged per case; HD95 NaN left out);
- per variant: mean and sample standard deviation (ddof 1) of the run scores over the seeds x draws;
- per pair (A, B): the differences A - B of the run scores at the same seed and draw, their mean
  and 95 % t-interval (``mean +- t(0.975, n-1) sd / sqrt(n)``, n = number of paired runs);
- per pair: a two-sided Wilcoxon signed-rank test over the test cases (``scipy.stats.wilcoxon``)
  of the per-case scores averaged over the paired runs first (the seeds and draws both variants
  completed), so each case enters once; zero differences are dropped (``zero_method="wilcox"``).
  It asks whether A beats B on the same cases on average over seeds; the t-interval asks whether
  the gain survives the seed-to-seed variation, which is usually the larger one.

Outputs: ``<output>/results.csv`` (one row per run), ``summary.md`` and ``summary.png`` (Dice and
HD95 per variant: one point per run, the mean with its 95 % t-interval over runs); ``--results
STEM`` writes the same three files also as ``STEM.csv``, ``STEM.md``, ``STEM.png``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from dycon import cli, config as C, train as train_cli

log = logging.getLogger("dycon.experiment")

SEED_KEY = "train.seed"
METRICS = ("dice", "hd95")                     # compared and plotted
RESULT_COLUMNS = ["variant", "seed", "draw", "dice", "jaccard", "hd95", "asd", "iterations", "best_val_dice",
                  "wall_s", "kernels"]   # wall_s: of the call that completed the cell (after an interruption: its last part)
DONE = "cell.json"
LOCK = "cell.lock"     # a cell being trained: "<pid> <host>", created atomically by its worker
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")   # variant names are directory names


# ------------------------------------------------------------------------------------- the grid

@dataclass
class Grid:
    config: str = "demo"
    overrides: dict = field(default_factory=dict)       # every cell
    variants: dict = field(default_factory=dict)        # name -> dotted overrides
    seeds: list = field(default_factory=lambda: [1337])
    draws: list = field(default_factory=lambda: [None])
    draw_key: str = "data.label_seed"
    reference: str | None = None
    compare: list = field(default_factory=list)         # extra (A, B) pairs

    def pairs(self) -> list[tuple[str, str]]:
        """Every variant against the reference, then the extra pairs; no pair twice."""
        names = list(self.variants)
        ref = self.reference or names[0]
        pairs = [(name, ref) for name in names if name != ref]
        return pairs + [tuple(p) for p in self.compare if tuple(p) not in pairs]

    def check(self) -> None:
        if not self.variants:
            raise ValueError("the grid has no variant: give --methods, --variant or a grid file with 'variants'")
        bad = [n for n in self.variants if not NAME.match(str(n))]
        if bad:
            raise ValueError(f"variant names must be letters, digits and _.+- (they name directories): {bad}")
        for key, values in (("seeds", self.seeds), ("draws", self.draws)):
            if not values or len(set(map(str, values))) != len(values):
                raise ValueError(f"grid {key} must be a non-empty list without repeats, got {values}")
        for pair in [(self.reference,)] + [tuple(p) for p in self.compare]:
            unknown = [n for n in pair if n is not None and n not in self.variants]
            if unknown or (len(pair) != 1 and len(pair) != 2):
                raise ValueError(f"compare/reference {list(pair)}: need variant names among {list(self.variants)}")


@dataclass(frozen=True)
class Cell:
    variant: str
    seed: int
    draw: object = None

    @property
    def name(self) -> str:
        return f"{self.variant}/seed{self.seed}" + ("" if self.draw is None else f"-draw{self.draw}")

    def overrides(self, grid: Grid) -> dict:
        extra = {SEED_KEY: self.seed} if self.draw is None else {SEED_KEY: self.seed, grid.draw_key: self.draw}
        return {**grid.overrides, **grid.variants[self.variant], **extra}


def cells(grid: Grid) -> list[Cell]:
    """Seed-major order: after an interruption every variant has about as many seeds done."""
    return [Cell(v, s, d) for s in grid.seeds for d in grid.draws for v in grid.variants]


GRID_KEYS = {"config", "set", "variants", "seeds", "draws", "draw_key", "reference", "compare"}


def load_grid(path: str | Path) -> Grid:
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a grid file must be a mapping")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown grid key(s) {unknown} (valid: {sorted(GRID_KEYS)})")
    variants = raw.get("variants") or {}
    if not isinstance(variants, dict) or not all(isinstance(v, dict) or v is None for v in variants.values()):
        raise ValueError(f"{path}: 'variants' must map each name to a mapping of dotted overrides")
    grid = Grid(overrides=dict(raw.get("set") or {}), variants={k: dict(v or {}) for k, v in variants.items()})
    for key in ("config", "seeds", "draws", "draw_key", "reference", "compare"):
        if raw.get(key) is not None:
            setattr(grid, key, raw[key])
    return grid


# ------------------------------------------------------------------------------------ configs

def cell_configs(grid: Grid, selected: list[Cell]) -> dict[Cell, dict]:
    """Every selected cell's full trainer config, all built and checked before anything runs."""
    # the grid's own overrides first, then the cell's: either may name the data set (a draw may
    # be data.demo_set), so each cell's set is prepared after both
    base = C.apply_overrides(C.load_config(grid.config), grid.overrides)
    configs, problems = {}, []
    for cell in selected:
        try:
            cfg = C.apply_overrides(copy.deepcopy(base), cell.overrides(grid))
            C.prepare_demo_data(cfg)     # here, once per set: not by every cell or process at once
            C.check_config(cfg)
            if cfg["data"]["root"] is not None:
                cfg["data"]["root"] = str(Path(cfg["data"]["root"]).resolve())
            configs[cell] = cfg
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"cell {cell.name}: {err}")
    if problems:
        raise ValueError("some cells cannot run (select others with --variants):\n  " + "\n  ".join(problems))
    return configs


# ----------------------------------------------------------------------------------- running

def run_cell(cell: Cell, cfg: dict, run_dir: Path, launcher: str | None) -> dict:
    """Train and test one cell (continuing an interrupted one), then write its marker last."""
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "cell_config.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    # the trainer's own resume: latest.pt carries the step, weights, optimiser and sampler
    argv = (["--resume", str(run_dir)] if (run_dir / "latest.pt").exists()
            else ["--config", str(config_path), "--output", str(run_dir)])
    start = time.time()
    if launcher:
        subprocess.run([*shlex.split(launcher), "-m", "dycon.train", *argv], check=True)
    else:
        train_cli.main(argv)
    record = {"cell": {"variant": cell.variant, "seed": cell.seed, "draw": cell.draw}, "config": cfg,
              "wall_s": round(time.time() - start, 1), **read_run(run_dir)}
    tmp = run_dir / (DONE + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    os.replace(tmp, run_dir / DONE)
    return record


def read_run(run_dir: Path) -> dict:
    """A finished trainer run's per-case test scores and its training figures."""
    from dycon.evaluate import report_dir   # torch: not before the flags are parsed

    report = report_dir(run_dir, "test", "student")
    if not (report / "cases.csv").is_file():
        raise FileNotFoundError(f"{run_dir}: the trainer ended without {report / 'cases.csv'} "
                                "(trained with --no-test?)")
    with open(report / "cases.csv") as f:
        rows = [{k: v if k in ("case", "empty") else float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    summary = json.loads((report / "summary.json").read_text())
    with open(run_dir / "metrics.csv") as f:
        metrics = list(csv.DictReader(f))
    trained = [r for r in metrics if r["total"]]
    val = [float(r["val_dice"]) for r in metrics if r["val_dice"]]
    # the code and what the kernels ran on, as dycon.loop.log_kernels recorded them in config.yaml
    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    kernels = saved.get("kernels", {})
    return {"cases": rows, "definition": summary["definition"], "kernels": kernels_text(kernels),
            "commit": saved.get("code", {}).get("commit", "unknown"),
            "iterations": int(trained[-1]["step"]) if trained else 0, "best_val_dice": max(val, default=math.nan),
            "grad_ratios": grad_ratios(metrics)}


def grad_ratios(metrics: list[dict]) -> dict:
    """Per unsupervised term, the mean over the logged steps of its gradient norm / the supervised
    one (metrics.csv ``grad_ratio_<term>``): whether the term acted at all."""
    out = {}
    for name in (metrics[0].keys() if metrics else []):
        values = [float(r[name]) for r in metrics if name.startswith("grad_ratio_") and r.get(name)]
        if values:
            out[name[len("grad_ratio_"):]] = float(np.mean(values))
    return out


def kernels_text(kernels: dict) -> str:
    """'uncl=cpu fecl=cpu' from a run's recorded kernels ('?' for runs without the record)."""
    return " ".join(f"{op}={v['backend']}" for op, v in kernels.get("ops", {}).items()) or "?"


def check_done(cell: Cell, cfg: dict, run_dir: Path) -> dict | None:
    """The cell's record when it is done with this very config; None when it still has to run."""
    path = run_dir / DONE
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record["config"] != json.loads(json.dumps(cfg, default=str)):
        raise ValueError(f"{run_dir} holds cell {cell.name} run with another config than this grid's "
                         f"(changed overrides?): use another --output, or delete that run")
    return record


def run_grid(grid: Grid, output: Path, launcher: str | None = None) -> list[dict]:
    """Run every cell not done yet and not claimed by another worker; returns the records of the
    cells done (by this process or found done)."""
    selected = cells(grid)
    configs = cell_configs(grid, selected)
    records = []
    for i, cell in enumerate(selected):
        run_dir, where = output / cell.name, f"[{i + 1}/{len(selected)}] {cell.name}"
        record = check_done(cell, configs[cell], run_dir)
        if record is None:
            if not claim(run_dir):
                log.info("%s: claimed by another worker (%s), skipped", where, (run_dir / LOCK).read_text().strip())
                continue
            try:   # another worker may have finished it between the check and the claim
                record = check_done(cell, configs[cell], run_dir)
                if record is None:
                    log.info("%s: running in %s", where, run_dir)
                    record = run_cell(cell, configs[cell], run_dir, launcher)
            finally:
                release(run_dir)
        else:
            log.info("%s: done, skipped", where)
        records.append(record)
    return records


def claim(run_dir: Path) -> bool:
    """Claim a cell for this process: create ``cell.lock`` atomically (O_EXCL) holding our pid and
    host. A lock left by a dead process of this host is taken over, with a notice; a lock of a
    live process, or of another host (whose processes we cannot see), is respected."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    if _create(path):
        return True
    if not _stale(path):
        return False
    # one taker at a time: the takeover is itself claimed atomically, and the lock re-checked under it
    guard = run_dir / (LOCK + ".takeover")
    if not _create(guard):
        return False
    try:
        if not _stale(path):
            return False
        log.warning("%s: taking over the lock of a process that is gone (%s)", run_dir, path.read_text().strip())
        path.unlink()
        return _create(path)
    finally:
        guard.unlink()


def release(run_dir: Path) -> None:
    (run_dir / LOCK).unlink(missing_ok=True)


def _holder() -> str:
    return f"{os.getpid()} {socket.gethostname()}"


def _create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(_holder() + "\n")
    return True


def _stale(path: Path) -> bool:
    """Whether the lock at ``path`` was left by a process of this host that no longer runs (a lock
    being written, still empty, is live)."""
    try:
        pid, host = path.read_text().split()
    except (FileNotFoundError, ValueError):
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:   # alive, another user's
        return False
    return False


def done_records(grid: Grid, output: Path) -> list[dict]:
    """The grid's cells completed under ``output`` (for --aggregate-only)."""
    records = []
    for cell in cells(grid):
        path = output / cell.name / DONE
        if path.exists():
            record = json.loads(path.read_text())
            if "grad_ratios" not in record:   # a cell.json written before the ratios were recorded
                with open(path.parent / "metrics.csv") as f:
                    record["grad_ratios"] = grad_ratios(list(csv.DictReader(f)))
            records.append(record)
    return records


# ------------------------------------------------------------------------------------ statistics

def case_scores(record: dict, metric: str) -> dict[str, float]:
    """Per test case: the metric averaged over its foreground classes (NaN classes left out)."""
    by_case: dict[str, list[float]] = {}
    for row in record["cases"]:
        by_case.setdefault(row["case"], []).append(row[metric])
    return {case: _nanmean(values) for case, values in by_case.items()}


def _nanmean(values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if finite else math.nan


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; NaN for one value)."""
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else math.nan


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """The two-sided t-interval of the mean of ``values`` (NaN for fewer than two)."""
    from scipy import stats   # here, not at the top: half a second, which --help need not wait for

    mean, sd = mean_sd(values)
    if len(values) < 2:
        return math.nan, math.nan
    half = stats.t.ppf(0.5 + level / 2, len(values) - 1) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def wilcoxon_p(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p over the cases both score (finite), and that count.
    NaN when no case differs."""
    cases = [c for c in a if c in b and math.isfinite(a[c]) and math.isfinite(b[c])]
    diffs = [a[c] - b[c] for c in cases]
    if not any(diffs):
        return math.nan, len(cases)
    from scipy import stats   # see t_interval

    return float(stats.wilcoxon(diffs, zero_method="wilcox", alternative="two-sided").pvalue), len(cases)


def unit(record: dict) -> tuple:
    return record["cell"]["seed"], str(record["cell"]["draw"])


def aggregate(records: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """Per-variant and paired statistics of Dice and HD95 (see the module docstring)."""
    by_variant: dict[str, dict[tuple, dict]] = {}
    for r in records:
        by_variant.setdefault(r["cell"]["variant"], {})[unit(r)] = r
    variants = {}
    for name, runs in by_variant.items():
        entry = {"runs": len(runs), "units": list(runs)}
        for m in METRICS:
            scores = [_nanmean(case_scores(r, m).values()) for r in runs.values()]
            entry[m] = {"values": scores, "mean_sd": mean_sd(scores), "ci": t_interval(scores)}
        variants[name] = entry
    compared = []
    for a, b in pairs:
        if a not in by_variant or b not in by_variant:
            continue
        shared = [u for u in by_variant[a] if u in by_variant[b]]
        if not shared:
            continue
        entry = {"a": a, "b": b, "paired_runs": len(shared)}
        for m in METRICS:
            per_case = [{u: case_scores(by_variant[v][u], m) for u in shared} for v in (a, b)]
            diffs = [_nanmean(per_case[0][u].values()) - _nanmean(per_case[1][u].values()) for u in shared]
            averaged = [_average_cases(pc) for pc in per_case]
            p, n_cases = wilcoxon_p(*averaged)
            entry[m] = {"diffs": diffs, "mean": float(np.mean(diffs)), "ci": t_interval(diffs),
                        "wilcoxon_p": p, "cases": n_cases}
        compared.append(entry)
    return {"variants": variants, "pairs": compared}


def _average_cases(per_run: dict[tuple, dict[str, float]]) -> dict[str, float]:
    """Per case, the mean of its scores over the runs (NaN runs left out)."""
    cases = next(iter(per_run.values())).keys()
    return {c: _nanmean([scores[c] for scores in per_run.values()]) for c in cases}


# ------------------------------------------------------------------------------------- reports

def _pm(mean_sd_pair, scale: float, digits: int) -> str:
    mean, sd = mean_sd_pair
    text = f"{mean * scale:.{digits}f}"
    return f"{text} ± {sd * scale:.{digits}f}" if math.isfinite(sd) else text


def _ci(interval, scale: float, digits: int) -> str:
    lo, hi = interval
    return f"[{lo * scale:+.{digits}f}, {hi * scale:+.{digits}f}]" if math.isfinite(lo) else "n/a (one run)"


def markdown(agg: dict, grid: Grid, records: list[dict], missing: list[str], command: str) -> str:
    import torch

    from dycon.loop import pick_device

    device = pick_device(records[0]["config"]["train"]["device"]) if records else "?"
    lines = [
        f"# Experiment grid — config `{grid.config}`",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {len(records)} runs done"
        + (f", {len(missing)} not done ({', '.join(missing)})" if missing else "")
        + f"; device {device} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
          f" in the runner); torch {torch.__version__}; seeds {grid.seeds}"
        + (f"; labelled-subset draws {grid.draws} (`{grid.draw_key}`)" if grid.draws != [None] else "")
        + f"; overrides of every run: `{grid.overrides}`.",
        "",
        f"Test-set Dice (%) and HD95 of each run's {_tested(records)} checkpoint; mean ± sample sd over runs "
        "(seeds x draws), each run scored by its mean over the test cases.",
        "",
        "| variant | overrides | runs | Dice % | HD95 | Dice % per run |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in agg["variants"].items():
        per_run = " ".join(f"{x * 100:.1f}" for x in v["dice"]["values"])
        lines.append(f"| {name} | `{_flat(grid.variants.get(name, {}))}` | {v['runs']} | "
                     f"{_pm(v['dice']['mean_sd'], 100, 1)} | {_pm(v['hd95']['mean_sd'], 1, 2)} | {per_run} |")
    lines += ["", *_ratio_table(records)]
    if agg["pairs"]:
        lines += ["", *_pair_table(agg["pairs"])]
    definition = records[0]["definition"] if records else ""
    lines += ["", f"Dice as a percentage. {definition}", "", _kernels_line(records), "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def _kernels_line(records: list[dict]) -> str:
    """Which backend each op ran on, per run (the CSV's ``kernels`` column), grouped."""
    runs = {}
    for r in records:
        runs.setdefault(r.get("kernels", "?"), []).append(f"{r['cell']['variant']} seed {r['cell']['seed']}")
    groups = [f"`{k}` ({'all runs' if len(runs) == 1 else ', '.join(v)})" for k, v in runs.items()]
    return "Kernels (backend per op, as each run's trainer resolved it): " + "; ".join(groups) + "."


def _ratio_table(records: list[dict]) -> list[str]:
    """Per variant and unsupervised term: its gradient norm / the supervised one, mean over the
    logged steps of a run, then over the runs (a term near 0 did not act)."""
    by_variant: dict[str, dict[str, list[float]]] = {}
    for r in records:
        for term, value in (r.get("grad_ratios") or {}).items():
            by_variant.setdefault(r["cell"]["variant"], {}).setdefault(term, []).append(value)
    if not by_variant:
        return []
    lines = ["Gradient norm of each weighted unsupervised term / that of the weighted supervised loss "
             "(metrics.csv `grad_ratio_<term>`), mean over the logged steps of a run, then over its runs.",
             "", "| variant | term: gradient ratio |", "|---|---|"]
    for name, terms in by_variant.items():
        lines.append(f"| {name} | " + ", ".join(f"{t}: {np.mean(v):.3g}" for t, v in terms.items()) + " |")
    return lines


def _tested(records: list[dict]) -> str:
    kinds = {r["config"]["test"].get("checkpoint", "best") for r in records}
    return " or ".join({"best": "best-validation", "last": "last"}[k] for k in sorted(kinds))


def _pair_table(pairs: list[dict]) -> list[str]:
    lines = [
        "Paired differences A − B over the runs both completed (same seed and draw): mean and 95 % "
        "t-interval; Wilcoxon signed-rank p (two-sided) over the test cases, each case's score first "
        "averaged over those runs.",
        "",
        "| A − B | runs | Δ Dice (pp) | 95 % t-interval | Wilcoxon p (cases) | Δ HD95 | 95 % t-interval "
        "| Wilcoxon p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pr in pairs:
        d, h = pr["dice"], pr["hd95"]
        lines.append(f"| {pr['a']} − {pr['b']} | {pr['paired_runs']} | {d['mean'] * 100:+.2f} | "
                     f"{_ci(d['ci'], 100, 2)} | {d['wilcoxon_p']:.3g} ({d['cases']}) | {h['mean']:+.2f} | "
                     f"{_ci(h['ci'], 1, 2)} | {h['wilcoxon_p']:.3g} |")
    return lines


def _flat(overrides: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(config as is)"


def plot(agg: dict, path: Path, title: str, hd_unit: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(agg["variants"])
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 0.6 * len(names) + 3), 4.2), constrained_layout=True)
    panels = (("dice", "test Dice (%)", 100), ("hd95", f"test HD95 ({hd_unit})", 1))
    for ax, (metric, label, scale) in zip(axes, panels):
        for x, name in enumerate(names):
            entry = agg["variants"][name][metric]
            values = np.asarray(entry["values"]) * scale
            offsets = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [0.0]
            ax.scatter(x + np.asarray(offsets), values, s=14, color="0.55", zorder=2)
            mean = entry["mean_sd"][0] * scale
            lo, hi = (np.asarray(entry["ci"]) * scale) if math.isfinite(entry["ci"][0]) else (mean, mean)
            ax.errorbar([x + 0.3], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", color="C0", capsize=3, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"{title}: grey = one run (seed), blue = mean and 95 % t-interval over runs", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(agg: dict, grid: Grid, records: list[dict], missing: list[str], stems: list[Path],
                  command: str) -> None:
    text = markdown(agg, grid, records, missing, command)
    for stem in stems:
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".md").write_text(text)
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            writer = csv.DictWriter(f, RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(result_row(r) for r in records)
        plot(agg, stem.with_suffix(".png"), f"config {grid.config}", records[0]["config"]["test"]["units"])


def result_row(record: dict) -> dict:
    scores = {m: _nanmean(case_scores(record, m).values()) for m in ("dice", "jaccard", "hd95", "asd")}
    return {**{k: record["cell"][k] for k in ("variant", "seed", "draw")},
            **{m: round(v, 4) for m, v in scores.items()}, "iterations": record["iterations"],
            "best_val_dice": round(record["best_val_dice"], 4), "wall_s": record["wall_s"],
            "kernels": record.get("kernels", "?")}


# ----------------------------------------------------------------------------------------- CLI

def overrides_of(items: list[str]) -> dict:
    """``KEY=VALUE`` strings (VALUE read as YAML, as the trainer's ``--set``) as a dict."""
    return dict(C.parse_override(text) for text in items)


PROG = "python -m dycon.experiment"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", help="grid YAML file (config, set, variants, seeds, draws, ...)")
    p.add_argument("--config", help=f"trainer config: a YAML file, or one of {', '.join(train_cli.config_names())} "
                                    "(default: the grid's, else demo)")
    p.add_argument("--methods", nargs="+", metavar="METHOD", help="add one variant per method: {train.method: METHOD}")
    p.add_argument("--variant", nargs="+", action="append", default=[], metavar=("NAME", "KEY=VALUE"),
                   help="add a variant: a name and its dotted overrides (repeatable)")
    p.add_argument("--variants", nargs="+", metavar="NAME", help="run (and report) only these variants")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every cell, e.g. train.max_iterations=200 (repeatable)")
    p.add_argument("--seeds", nargs="+", type=int, help="training seeds of every variant (default: the grid's)")
    p.add_argument("--draws", nargs="+", type=yaml.safe_load, help="labelled-subset draws (values of --draw_key)")
    p.add_argument("--draw_key", help="config key the draw sets (default data.label_seed)")
    p.add_argument("--reference", help="variant every other is compared with (default: the first)")
    p.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"), help="also compare A - B")
    p.add_argument("--output", required=True, help="grid directory: one run directory per cell, and the reports")
    p.add_argument("--launcher", help='run each cell as "<launcher> -m dycon.train ..." (e.g. "torchrun '
                                      '--nproc_per_node 4", or "python"); default: in this process')
    p.add_argument("--aggregate-only", action="store_true", help="report the cells done; train nothing")
    p.add_argument("--workers", type=int, default=1, help="train the grid in N processes of this command "
                   "(cells are claimed with lock files; so is a second shell running the same command)")
    p.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)   # a --workers child
    p.add_argument("--results", help="also write the reports as RESULTS.md/.csv/.png ({config} is replaced)")
    return p


def grid_from_args(args: argparse.Namespace) -> Grid:
    grid = load_grid(args.grid) if args.grid else Grid()
    if args.config:
        grid.config = args.config
    grid.overrides.update(overrides_of(args.overrides))
    for method in args.methods or []:
        grid.variants[method] = {"train.method": method}
    for name, *assignments in args.variant:
        grid.variants[name] = overrides_of(assignments)
    for key in ("seeds", "draws", "draw_key", "reference"):
        if getattr(args, key) is not None:
            setattr(grid, key, getattr(args, key))
    grid.compare = [*grid.compare, *args.compare]
    grid.check()
    if args.variants:   # a subset: the comparisons that involve variants left out are left out too
        unknown = sorted(set(args.variants) - set(grid.variants))
        if unknown:
            raise ValueError(f"--variants {unknown}: not in the grid (variants: {list(grid.variants)})")
        grid.variants = {n: grid.variants[n] for n in args.variants}
        grid.reference = grid.reference if grid.reference in grid.variants else None
        grid.compare = [p for p in grid.compare if all(n in grid.variants for n in p)]
    return grid


def main(argv=None, **defaults) -> dict:
    """The command line; ``defaults`` replace the parser's (the compare_methods wrapper's)."""
    parser = build_parser()
    parser.set_defaults(**defaults)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    grid = grid_from_args(args)
    output = Path(args.output)
    if args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if not args.aggregate_only:
        argv = sys.argv[1:] if argv is None else list(argv)
        children = [subprocess.Popen([sys.executable, "-m", "dycon.experiment", *argv, "--workers", "1",
                                      "--no-report"]) for _ in range(args.workers - 1)]
        run_grid(grid, output, args.launcher)
        failed = [c.args for c in children if c.wait() != 0]
        if failed:
            raise RuntimeError(f"{len(failed)} worker(s) failed; the cells they held run again on the next call")
    if args.no_report:
        return {}
    records = done_records(grid, output)   # every worker's cells
    done = {(r["cell"]["variant"], r["cell"]["seed"], str(r["cell"]["draw"])) for r in records}
    missing = [c.name for c in cells(grid) if (c.variant, c.seed, str(c.draw)) not in done]
    if not records:
        raise ValueError(f"no completed cell of this grid under {output}")
    agg = aggregate(records, grid.pairs())
    stems = [output / "summary"] + ([Path(args.results.format(config=Path(grid.config).stem))] if args.results else [])
    command = "python -m dycon.experiment " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    write_reports(agg, grid, records, missing, stems, command)
    print(stems[0].with_suffix(".md").read_text())
    return agg


def console_main() -> None:
    """The dycon-experiment command (setup.py's console scripts)."""
    cli.run(main, PROG)


if __name__ == "__main__":
    console_main()
