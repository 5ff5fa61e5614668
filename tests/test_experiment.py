"""The experiment runner (a grid resumes after an interruption; statistics against hand-computed
values) and the demo_hard synthetic set."""
import json
import math
import os
import runpy
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import ndimage

from dycon import experiment as E
from dycon.demo import ensure_demo_data, make_case, prepare_demo_set

ROOT = Path(__file__).resolve().parents[1]
T_975_2 = 4.302652729749464      # t quantile 0.975 with 2 degrees of freedom (tables)


# ------------------------------------------------------------------------------ a tiny grid

@pytest.fixture(scope="module")
def grid_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grid")
    root = ensure_demo_data(tmp / "data", size=32, splits={"train": 4, "val": 1, "test": 2})
    config = {
        "name": "tiny",
        "data": {"layout": "demo", "root": str(root), "labelnum": 2, "cache": True},
        "model": {"base_filters": 4, "embed_dim": 16},
        "train": {"patch_size": [32, 32, 32], "batch_size": 2, "labeled_bs": 1, "max_iterations": 2,
                  "device": "cpu", "log_every": 1},
        "val": {"every": 2, "stride_xy": 16, "stride_z": 16},
        "test": {"stride_xy": 16, "stride_z": 16, "largest_component": False},
    }
    (tmp / "tiny.yaml").write_text(yaml.safe_dump(config))
    grid = {"config": str(tmp / "tiny.yaml"), "seeds": [1, 2], "set": {"train.max_iterations": 2},
            "variants": {"supervised": {"train.method": "supervised"},
                         "mean_teacher": {"train.method": "mean_teacher"}}}
    (tmp / "grid.yaml").write_text(yaml.safe_dump(grid, sort_keys=False))   # variant order matters
    return tmp / "grid.yaml"


def markers(output: Path) -> dict:
    return {str(p.relative_to(output)): p.stat().st_mtime_ns for p in output.glob(f"*/*/{E.DONE}")}


def test_grid_resumes_after_interruption(tmp_path, grid_file, caplog, monkeypatch):
    out = tmp_path / "out"
    argv = ["--grid", str(grid_file), "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "dycon.experiment", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # seed-major order: supervised/seed1, mean_teacher/seed1, supervised/seed2, mean_teacher/seed2;
    # kill the grid as soon as the third cell starts
    deadline = time.time() + 600
    while not (out / "supervised" / "seed2").exists():
        assert proc.poll() is None and time.time() < deadline, "the grid ended before its third cell"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = markers(out)
    assert sorted(before) == [f"mean_teacher/seed1/{E.DONE}", f"supervised/seed1/{E.DONE}"]
    assert not (out / "summary.md").exists()

    caplog.set_level("INFO", logger="dycon.experiment")
    agg = E.main(argv)
    after = markers(out)
    assert len(after) == 4 and all(after[k] == v for k, v in before.items())   # done cells not rerun
    skipped = [r.getMessage() for r in caplog.records if "done, skipped" in r.getMessage()]
    assert len(skipped) == 2 and all("seed1" in m for m in skipped)
    for run in after:
        record = json.loads((out / run).read_text())
        assert record["iterations"] == 2 and len(record["cases"]) == 2
    assert agg["variants"]["supervised"]["runs"] == agg["variants"]["mean_teacher"]["runs"] == 2
    (pair,) = agg["pairs"]
    assert (pair["a"], pair["b"], pair["paired_runs"]) == ("mean_teacher", "supervised", 2)
    rows = (out / "summary.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("variant,seed,draw,dice")
    assert all(row.endswith(",uncl=cpu fecl=cpu") for row in rows[1:])   # the kernels each cell ran on
    assert "Kernels (backend per op, as each run's trainer resolved it): `uncl=cpu fecl=cpu` (all runs)" \
        in (out / "summary.md").read_text()
    assert (out / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "mean_teacher − supervised" in (out / "summary.md").read_text()

    # the compare_methods wrapper: the runner with supervised, mean_teacher and dycon as variants
    wrapper_argv = ["compare_methods.py", *argv, "--aggregate-only", "--results", str(tmp_path / "cm_{config}")]
    monkeypatch.setattr(sys, "argv", wrapper_argv)
    runpy.run_path(str(ROOT / "benchmarks" / "compare_methods.py"), run_name="__main__")
    text = (tmp_path / "cm_tiny.md").read_text()
    assert "2 not done (dycon/seed1, dycon/seed2)" in text and (tmp_path / "cm_tiny.png").exists()


def test_unknown_override_fails_before_training(tmp_path, grid_file):
    with pytest.raises(ValueError, match="train.no_such_switch"):
        E.main(["--grid", str(grid_file), "--output", str(tmp_path), "--variant", "typo", "train.no_such_switch=1"])
    assert not any(tmp_path.iterdir())


def test_changed_cell_config_is_refused(tmp_path, grid_file):
    grid = E.load_grid(grid_file)
    grid.variants = {"supervised": grid.variants["supervised"]}
    grid.seeds = [1]
    E.run_grid(grid, tmp_path)
    grid.overrides["train.base_lr"] = 0.5
    with pytest.raises(ValueError, match="another config"):
        E.run_grid(grid, tmp_path)


# ------------------------------------------------------------------------------ statistics

def record(variant, seed, dice, hd95):
    return {"cell": {"variant": variant, "seed": seed, "draw": None},
            "cases": [{"case": f"c{k}", "class": 1.0, "dice": d, "hd95": h}
                      for k, (d, h) in enumerate(zip(dice, hd95))]}


def test_mean_sd_and_t_interval_by_hand():
    mean, sd = E.mean_sd([0.80, 0.84, 0.88])
    assert mean == pytest.approx(0.84, abs=1e-12) and sd == pytest.approx(0.04, abs=1e-12)
    lo, hi = E.t_interval([0.01, 0.03, 0.05])
    half = T_975_2 * 0.02 / math.sqrt(3)
    assert (lo, hi) == (pytest.approx(0.03 - half, abs=1e-12), pytest.approx(0.03 + half, abs=1e-12))
    assert all(math.isnan(x) for x in E.t_interval([0.5]))


def test_wilcoxon_exact_p_by_hand():
    # six distinct differences: 2^6 equally likely sign patterns under the null
    a = {f"c{k}": 1.0 for k in range(6)}
    assert E.wilcoxon_p(a, {c: 1.0 - (k + 1) / 10 for k, c in enumerate(a)}) == (pytest.approx(2 / 64), 6)
    # one negative difference of rank 3: W- = 3; sign patterns with W- <= 3: {}, {1}, {2}, {3}, {1,2}
    b = {c: 1.0 - d for c, d in zip(a, [0.1, 0.2, -0.3, 0.4, 0.5, 0.6])}
    assert E.wilcoxon_p(a, b) == (pytest.approx(2 * 5 / 64), 6)
    assert math.isnan(E.wilcoxon_p(a, dict(a))[0])


def test_aggregate_on_a_fixed_table():
    # A's Dice at seed s and case k: 0.5 + 0.01 k + 0.01 (s - 2); B's: 0.5 everywhere
    a = [record("A", s, [0.5 + 0.01 * k + 0.01 * (s - 2) for k in range(1, 7)], [2.0] * 6) for s in (1, 2, 3)]
    b = [record("B", s, [0.5] * 6, [3.0] * 5 + [math.nan if s == 1 else 3.0]) for s in (1, 2, 3)]
    agg = E.aggregate(a + b, [("A", "B")])
    va = agg["variants"]["A"]["dice"]
    assert va["values"] == pytest.approx([0.525, 0.535, 0.545])
    assert va["mean_sd"] == pytest.approx((0.535, 0.01))
    (pair,) = agg["pairs"]
    d = pair["dice"]
    assert d["diffs"] == pytest.approx([0.025, 0.035, 0.045]) and d["mean"] == pytest.approx(0.035)
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert d["ci"] == pytest.approx((0.035 - half, 0.035 + half))
    # per-case means over the seeds: A - B = 0.01 k, all positive and distinct
    assert (d["wilcoxon_p"], d["cases"]) == (pytest.approx(2 / 64), 6)
    h = pair["hd95"]
    assert h["diffs"] == pytest.approx([-1.0] * 3) and h["cases"] == 6   # NaN of seed 1 left out
    # a pair without a seed both completed is left out, not reported from nothing
    assert E.aggregate(a[:1] + b[1:], [("A", "B")])["pairs"] == []


def test_grid_file_and_flags(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({"variants": {"x": {"train.method": "supervised"}, "y": None},
                                    "compare": [["y", "x"]], "seeds": [3]}))
    args = E.build_parser().parse_args(["--grid", str(path), "--output", "o", "--methods", "dycon",
                                        "--variant", "z", "loss.s_beta=0.5", "train.patch_size=[16, 16, 16]",
                                        "--seeds", "1", "2", "--reference", "dycon"])
    grid = E.grid_from_args(args)
    assert grid.variants == {"x": {"train.method": "supervised"}, "y": {}, "dycon": {"train.method": "dycon"},
                             "z": {"loss.s_beta": 0.5, "train.patch_size": [16, 16, 16]}}
    assert grid.seeds == [1, 2]
    assert grid.pairs() == [("x", "dycon"), ("y", "dycon"), ("z", "dycon"), ("y", "x")]
    assert [c.name for c in E.cells(grid)][:5] == ["x/seed1", "y/seed1", "dycon/seed1", "z/seed1", "x/seed2"]
    drawn = E.grid_from_args(E.build_parser().parse_args(["--grid", str(path), "--output", "o", "--draws", "4", "5"]))
    assert [c.name for c in E.cells(drawn)][:3] == ["x/seed3-draw4", "y/seed3-draw4", "x/seed3-draw5"]
    assert E.Cell("x", 3, 5).overrides(drawn) == {"train.method": "supervised", "train.seed": 3, "data.label_seed": 5}
    args = E.build_parser().parse_args(["--grid", str(path), "--output", "o", "--variants", "x", "y"])
    subset = E.grid_from_args(args)
    assert list(subset.variants) == ["x", "y"] and subset.pairs() == [("y", "x")]
    with pytest.raises(ValueError, match="compare/reference"):
        E.grid_from_args(E.build_parser().parse_args(["--grid", str(path), "--output", "o", "--reference", "typo"]))
    path.write_text(yaml.safe_dump({"variants": {"bad name": {}}}))
    with pytest.raises(ValueError, match="variant names"):
        E.grid_from_args(E.build_parser().parse_args(["--grid", str(path), "--output", "o"]))


def test_shipped_grid_names_the_paper_ablations_and_every_cell_builds(tmp_path):
    grid = E.load_grid(ROOT / "benchmarks" / "grids" / "demo_hard.yaml")
    grid.check()
    root = ensure_demo_data(tmp_path, size=32, splits={"train": 2, "val": 1, "test": 1}, kind="demo_hard")
    grid.overrides["data.root"] = str(root)
    assert len(E.cell_configs(grid, E.cells(grid))) == len(grid.variants) * len(grid.seeds)   # keys all known
    for name in ("supervised", "mean_teacher", "uamt", "dycon", "dycon_official", "co_training",
                 "co_training_dycon", "uncl_only", "fecl_only", "fixed_beta", "scaler4", "scaler8"):
        assert name in grid.variants
    assert len(grid.seeds) >= 3


@pytest.mark.parametrize("demo_set", ["ssl_bench", "ssl_bench_iid"])
def test_ssl_bench_grid_builds_every_cell_with_the_methods_references(tmp_path, demo_set):
    grid = E.load_grid(ROOT / "benchmarks" / "grids" / "ssl_bench.yaml")
    grid.check()
    root = ensure_demo_data(tmp_path, size=32, splits={"train": 5, "val": 1, "test": 1}, kind=demo_set)
    grid.overrides.update({"data.root": str(root), "data.demo_set": demo_set})
    configs = E.cell_configs(grid, E.cells(grid))
    assert len(configs) == len(grid.variants) * len(grid.seeds) and len(grid.seeds) >= 3
    by_variant = {cell.variant: cfg for cell, cfg in configs.items()}
    assert {"supervised", "supervised_all40", "mean_teacher", "uamt", "cps", "dycon", "dycon_official",
            "uncl_only", "fecl_only"} <= set(by_variant)
    assert by_variant["cps"]["train"]["framework"] == "co_training"
    assert all(cfg["views"]["strong"] and cfg["test"]["checkpoint"] == "last" for cfg in configs.values())


def test_a_draw_over_the_demo_set_prepares_each_cells_own_set(tmp_path, monkeypatch):
    """--draw_key data.demo_set: every cell trains on its draw's set, in its own default folder
    (the base set's folder holds another set, which the trainer would refuse)."""
    small = {"train": 5, "val": 1, "test": 1}
    for kind in ("ssl_bench", "ssl_bench_draw2"):
        ensure_demo_data(tmp_path / kind, size=32, splits=small, kind=kind)
        monkeypatch.setenv(f"DYCON_DATA_{kind.upper()}", str(tmp_path / kind))
    grid = E.load_grid(ROOT / "benchmarks" / "grids" / "ssl_bench.yaml")
    grid.seeds, grid.draw_key, grid.draws = [1], "data.demo_set", [None, "ssl_bench_draw2"]
    configs = E.cell_configs(grid, [c for c in E.cells(grid) if c.variant == "supervised"])
    roots = {cfg["data"]["demo_set"]: cfg["data"]["root"] for cfg in configs.values()}
    assert roots == {kind: str((tmp_path / kind).resolve()) for kind in ("ssl_bench", "ssl_bench_draw2")}

    # one named root cannot hold both draws: the error names the cell and the set it holds
    grid.overrides["data.root"] = str(tmp_path / "ssl_bench_draw2")
    with pytest.raises(ValueError, match=r"cell supervised/seed1: .*holds the demo set 'ssl_bench_draw2'"):
        E.cell_configs(grid, [c for c in E.cells(grid) if c.variant == "supervised"])
    grid.draws = ["ssl_bench_draw2"]                      # the draw alone in its named root: runs
    assert len(E.cell_configs(grid, [c for c in E.cells(grid) if c.variant == "supervised"])) == 1


# ------------------------------------------------------------------------------ demo_hard

def test_demo_hard_is_deterministic_faint_and_small():
    a = make_case(np.random.default_rng(3), 32, "demo_hard")
    b = make_case(np.random.default_rng(3), 32, "demo_hard")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    totals, contrasts, sizes = {}, {}, {}
    for kind in ("demo", "demo_hard"):
        rng = np.random.default_rng(11)
        cases = [make_case(rng, 48, kind) for _ in range(3)]
        # lesion over the tissue right around it, in units of the volume's std (images are normalised)
        rings = [ndimage.binary_dilation(label > 0, iterations=2) & (label == 0) for _, label in cases]
        contrasts[kind] = np.mean([image[label > 0].mean() - image[ring].mean()
                                   for (image, label), ring in zip(cases, rings)])
        totals[kind] = sum(int(label.sum()) for _, label in cases)
        sizes[kind] = np.concatenate([np.bincount(ndimage.label(label)[0].ravel())[1:] for _, label in cases])
    assert contrasts["demo_hard"] < 0.6 * contrasts["demo"]
    assert totals["demo_hard"] < 0.75 * totals["demo"]
    # some lesions are smaller than one FeCL patch of the demo's grid (8^3 voxels of a 32^3 crop at
    # feature_scaler 2) but several 4^3 patches (feature_scaler 4): a finer grid has more to find
    assert ((sizes["demo_hard"] > 64) & (sizes["demo_hard"] < 512)).sum() >= 2


def test_prepare_demo_set_refuses_another_kind(tmp_path):
    ensure_demo_data(tmp_path, size=32, splits={"train": 1, "val": 1, "test": 1}, kind="demo_hard")
    assert prepare_demo_set(tmp_path, "demo_hard") == tmp_path          # any size of the right kind
    with pytest.raises(ValueError, match="holds the demo set 'demo_hard', not 'demo'"):
        prepare_demo_set(tmp_path, "demo")


def test_prepare_demo_set_regenerates_an_older_version_of_its_kind(tmp_path, monkeypatch):
    from dycon import demo
    ensure_demo_data(tmp_path, size=32, splits={"train": 1, "val": 1, "test": 1}, kind="demo_hard")
    before = (tmp_path / "data" / "case_000.h5").read_bytes()
    monkeypatch.setattr(demo, "VERSION", demo.VERSION + 1)        # the generator changed since
    monkeypatch.setattr(demo, "DEFAULT_SPLITS", {"train": 1, "val": 1, "test": 1})
    assert prepare_demo_set(tmp_path, "demo_hard") == tmp_path
    assert (tmp_path / "demo_version.txt").read_text().split()[:3] == ["demo_hard", str(demo.VERSION), "48"]
    assert (tmp_path / "data" / "case_000.h5").read_bytes() != before


def test_demo_hard_config_prepares_its_own_set(tmp_path):
    from dycon import config as C

    cfg = C.load_config("demo_hard")
    assert cfg["data"]["demo_set"] == "demo_hard" and cfg["data"]["labelnum"] == 2
    cfg["data"]["root"] = str(tmp_path / "hard")
    ensure_demo_data(cfg["data"]["root"], size=32, splits={"train": 2, "val": 1, "test": 1}, kind="demo_hard")
    C.prepare_demo_data(cfg)                        # the small set is reused, not regenerated
    assert len(list((tmp_path / "hard" / "data").iterdir())) == 4
    ensure_demo_data(tmp_path / "easy", size=32, splits={"train": 2, "val": 1, "test": 1})
    cfg["data"]["root"] = str(tmp_path / "easy")
    with pytest.raises(ValueError, match="not 'demo_hard'"):
        C.prepare_demo_data(cfg)


def test_interrupted_cell_continues_from_its_checkpoint_in_a_launched_process(tmp_path, grid_file):
    from dycon import loop

    grid = E.load_grid(grid_file)
    grid.variants, grid.seeds = {"supervised": grid.variants["supervised"]}, [1]
    (cell,) = E.cells(grid)
    cfg = E.cell_configs(grid, [cell])[cell]
    run_dir = tmp_path / cell.name
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))      # as the trainer's CLI writes it
    loop.train(cfg, run_dir, stop_after=1)                            # a cell killed after step 1
    (record,) = E.run_grid(grid, tmp_path, launcher=shlex.quote(sys.executable))
    assert record["iterations"] == 2 and (run_dir / E.DONE).exists()
    assert "resumed" in (run_dir / "train.log").read_text()


# ------------------------------------------------------------------------------ lock files

def _fake_cell(cell, cfg, run_dir, launcher):
    """Stands in for training: notes who ran the cell, takes a moment, writes the marker."""
    with open(run_dir.parent.parent / "trace.txt", "a") as f:
        f.write(f"{cell.name} {os.getpid()}\n")
    time.sleep(0.3)
    record = {"cell": {"variant": cell.variant, "seed": cell.seed, "draw": cell.draw},
              "config": json.loads(json.dumps(cfg, default=str))}
    (run_dir / E.DONE).write_text(json.dumps(record))
    return record


def _race(grid_path, out):
    E.run_cell = _fake_cell   # in the forked child only
    E.run_grid(E.load_grid(grid_path), out)


def test_two_workers_racing_on_one_grid_never_run_a_cell_twice(tmp_path, grid_file):
    import multiprocessing
    grid = yaml.safe_load(grid_file.read_text())
    grid["seeds"] = [1, 2, 3]
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))
    out = tmp_path / "out"
    ctx = multiprocessing.get_context("fork")
    workers = [ctx.Process(target=_race, args=(path, out)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
        assert w.exitcode == 0
    ran = (out / "trace.txt").read_text().split("\n")[:-1]
    names = [line.split()[0] for line in ran]
    assert sorted(names) == sorted(c.name for c in E.cells(E.load_grid(path)))   # each cell once
    assert not list(out.glob(f"*/*/{E.LOCK}*"))                                    # locks released


def test_a_live_lock_is_respected_and_a_dead_ones_taken_over(tmp_path, caplog):
    import socket
    host = socket.gethostname()
    live = tmp_path / "live"
    live.mkdir()
    (live / E.LOCK).write_text(f"{os.getppid()} {host}\n")
    assert not E.claim(live)
    other_host = tmp_path / "other"
    other_host.mkdir()
    (other_host / E.LOCK).write_text(f"1 not-{host}\n")
    assert not E.claim(other_host)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()   # a pid that no longer runs
    dead = tmp_path / "dead"
    dead.mkdir()
    (dead / E.LOCK).write_text(f"{gone.pid} {host}\n")
    with caplog.at_level("WARNING", logger="dycon.experiment"):
        assert E.claim(dead)
    assert "taking over the lock" in caplog.text
    assert (dead / E.LOCK).read_text().split() == [str(os.getpid()), host]
    assert not E.claim(dead)   # now ours: a second claim (another worker) fails
    E.release(dead)
    assert E.claim(dead)


def test_ssl_bench_labelled_volumes_are_clear_cases_and_the_control_and_draws_share_the_rest(tmp_path):
    import h5py
    splits = {"train": 8, "val": 1, "test": 3}
    sets = {kind: ensure_demo_data(tmp_path / kind, size=32, splits=splits, kind=kind)
            for kind in ("ssl_bench", "ssl_bench_iid", "ssl_bench_draw2")}

    def case(kind, i):
        with h5py.File(sets[kind] / "data" / f"case_{i:03d}.h5") as f:
            return f["image"][:], f["label"][:]

    def contrast(image, label):
        ring = ndimage.binary_dilation(label > 0, iterations=2) & (label == 0)   # the tissue around the lesions
        return image[label > 0].mean() - image[ring].mean()

    contrasts, draw2 = [], []
    for i in range(12):
        (a, la), (b, lb), (c, lc) = case("ssl_bench", i), case("ssl_bench_iid", i), case("ssl_bench_draw2", i)
        assert 0.01 < la.mean() < 0.07                         # lesions: a few % of the volume
        assert np.array_equal(a, b) == (i >= 4)                # only the labelled 4 differ
        assert np.array_equal(a, c) == (i >= 4)
        contrasts.append(contrast(a, la))
        draw2.append(contrast(c, lc))
    # the clear-case slice: bright lesions (contrast 1.0-1.2, little noise); outside it some volumes
    # have lesions darker than the tissue, which no intensity view of a clear case shows
    assert min(contrasts[:4]) > 1.0 > np.mean(contrasts[4:])
    assert min(contrasts[4:]) < 0
    assert min(draw2[:4]) > 1.0                                # another draw from the same clear slice
    assert (sets["ssl_bench"] / "train.txt").read_text().split() == [f"case_{i:03d}" for i in range(8)]


def test_the_report_carries_each_terms_gradient_ratio():
    rows = [{"step": "10", "grad_ratio_mse": "0.01", "grad_ratio_fecl": ""},
            {"step": "20", "grad_ratio_mse": "0.03", "grad_ratio_fecl": ""}, {"step": "20", "grad_ratio_mse": ""}]
    assert E.grad_ratios(rows) == pytest.approx({"mse": 0.02})
    records = [{"cell": {"variant": "mean_teacher"}, "grad_ratios": {"mse": 0.02}},
               {"cell": {"variant": "mean_teacher"}, "grad_ratios": {"mse": 0.04}}, {"cell": {"variant": "supervised"}}]
    assert "| mean_teacher | mse: 0.03 |" in E._ratio_table(records)
