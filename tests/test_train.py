"""The trainer: every method and preset runs, resume is exact, checkpoints load safely."""
import copy
import csv
import math

import pytest
import torch
import yaml

from dycon import config as C, loop, losses, schedules, train as T
from dycon.checkpoint import load_checkpoint
from dycon.demo import ensure_demo_data
from dycon.frameworks.mean_teacher import ema_update
from dycon.networks import build_model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), size=32, splits={"train": 6, "val": 1, "test": 2})


def tiny_config(root, **train):
    raw = {
        "name": "tiny",
        "data": {"layout": "demo", "root": str(root), "labelnum": 2, "cache": True},
        "model": {"arch": "unet3d", "in_channels": 1, "num_classes": 2, "base_filters": 4,
                  "feature_scaler": 2, "embed_dim": 16},
        "train": {"patch_size": [32, 32, 32], "batch_size": 4, "labeled_bs": 2, "max_iterations": 4,
                  "device": "cpu", "seed": 5, "log_every": 1, **train},
        "val": {"every": 2, "stride_xy": 16, "stride_z": 16},
        "test": {"stride_xy": 16, "stride_z": 16, "largest_component": False},
    }
    return C.merge_config(C.DEFAULTS, raw, "test")


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method,preset", [("supervised", "dycon"), ("mean_teacher", "dycon"),
                                           ("dycon", "dycon"), ("dycon", "official")])
def test_each_method_and_preset_trains(tmp_path, data_root, method, preset):
    cfg = tiny_config(data_root, method=method, preset=preset, max_iterations=3)
    result = loop.train(cfg, tmp_path)
    assert result["step"] == 3 and result["skipped"] == 0 and 0 <= result["best_dice"] <= 1
    rows = [r for r in read_metrics(tmp_path) if r["total"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    for row in rows:
        assert math.isfinite(float(row["total"]))
        assert bool(row["fecl"]) == bool(row["uncl"]) == (method == "dycon")
        assert bool(row["mse"]) == (method == "mean_teacher" or preset == "official")
    log_text = (tmp_path / "train.log").read_text()
    assert ("label leakage" in log_text) == (method == "dycon" and preset == "official")
    assert (tmp_path / "best.pt").exists() and (tmp_path / "latest.pt").exists()


def test_resume_gives_the_same_weights(tmp_path, data_root):
    cfg = tiny_config(data_root)
    loop.train(cfg, tmp_path / "straight")
    loop.train(cfg, tmp_path / "split", stop_after=2)
    assert load_checkpoint(tmp_path / "split" / "latest.pt")["step"] == 2
    loop.train(cfg, tmp_path / "split", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "latest.pt")
    b = load_checkpoint(tmp_path / "split" / "latest.pt")
    assert a["step"] == b["step"] == 4 and a["best_dice"] == b["best_dice"]
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["step"] for r in read_metrics(tmp_path / "straight")] == \
        [r["step"] for r in read_metrics(tmp_path / "split")]


def test_checkpoint_is_weights_only_and_complete(tmp_path, data_root):
    loop.train(tiny_config(data_root, max_iterations=2), tmp_path)
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    for key in ("student", "teacher", "optimizer", "step", "config", "best_dice", "sampler", "grad_scaler"):
        assert key in ckpt
    model = build_model(ckpt["config"]["model"])
    model.load_state_dict(ckpt["student"])
    assert ckpt["config"]["data"]["layout"] == "demo"


def test_non_finite_steps_are_skipped_and_counted(tmp_path, data_root, monkeypatch):
    real, calls = loop.compute_losses, []

    def sometimes_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(loop, "compute_losses", sometimes_nan)
    result = loop.train(tiny_config(data_root, max_iterations=3), tmp_path)
    assert result["step"] == 3 and result["skipped"] == 1 and len(calls) == 4
    assert [r["skipped"] for r in read_metrics(tmp_path) if r["total"]] == ["0", "1", "1"]
    assert "step 1: non-finite loss" in (tmp_path / "train.log").read_text()


def test_cli_runs_tests_and_resumes(tmp_path, data_root):
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(data_root, max_iterations=2)))
    run = tmp_path / "run"
    result = T.main(["--config", str(cfg_path), "--output", str(run), "--labelnum", "50%", "--seed", "3"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["labelnum"] == "50%" and saved["train"]["seed"] == 3
    assert 0 <= result["test"]["classes"]["1"]["dice"]["mean"] <= 1
    assert (run / "test_cases.csv").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        T.main(["--config", str(cfg_path), "--output", str(run)])
    result = T.main(["--resume", str(run), "--max_iterations", "3", "--no-test"])
    assert result["step"] == 3


def test_patch_labels_and_anchor_weights():
    labels = torch.zeros(2, 16, 16, 16, dtype=torch.long)
    labels[:, :8, :8, :8] = 1                  # one full foreground block of 8^3
    labels[:, 8:11, :8, :8] = 1                # a block 3/8 foreground: majority 0.625
    probs = torch.zeros(2, 2, 16, 16, 16)
    probs[:, 0] = 0.9                          # a confident teacher that sees only background
    probs[:, 1] = 0.1
    probs[1, :, 8:, 8:, 8:] = 0.5              # and one unsure block in the unlabelled volume
    patch = losses.patch_labels_dycon(labels, probs, 1, [2, 2, 2], {"patch_purity": 0.6, "teacher_confidence": 0.7})
    assert patch.shape == (2, 8)
    assert patch[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]          # labelled: ground truth, majority
    assert patch[1].tolist() == [0, 0, 0, 0, 0, 0, 0, -1]         # unlabelled: teacher, unsure -> -1
    official = losses.patch_labels_official(labels, [2, 2, 2])
    assert official[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    u = losses.anchor_weights(torch.zeros(1, 2, 16, 16, 16), [2, 2, 2])
    torch.testing.assert_close(u, torch.full((1, 8), 2.0), atol=1e-4, rtol=0)   # max entropy -> 1 + 1


def test_schedules_and_ema():
    loss_cfg = {"beta_max": 5.0, "beta_min": 0.5, "s_beta": None}
    assert schedules.beta_at(0, 10, loss_cfg) == 5.0 and abs(schedules.beta_at(10, 10, loss_cfg) - 0.5) < 1e-12
    assert schedules.beta_at(3, 10, {**loss_cfg, "s_beta": 1.5}) == 1.5
    train_cfg = {"consistency": 0.1, "consistency_rampup": 200.0}
    assert schedules.consistency_weight(0, train_cfg) == pytest.approx(0.1 * math.exp(-5))
    assert schedules.consistency_weight(150 * 200, train_cfg) == pytest.approx(0.1)
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    ema_update(teacher, student, 0.99, step=0)     # alpha = 0: the teacher becomes the student
    for tp, sp in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(tp, sp)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_iters: 5\n")
    with pytest.raises(ValueError, match="bad.yaml.*train.max_iters"):
        C.load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="nope"):
        C.load_config("nope")
    cfg = C.load_config("brats19")
    assert cfg["train"]["patch_size"] == [96, 96, 96] and cfg["train"]["max_iterations"] == 20000
    cfg["train"]["method"] = "fixmatch"
    with pytest.raises(ValueError, match="train.method"):
        C.check_config(cfg)
    assert C.resolve_labelnum("10%", 40) == 4 and C.resolve_labelnum(7, 40) == 7


def test_overrides_set_dotted_keys_and_name_unknown_ones():
    cfg = C.load_config("demo")
    C.apply_overrides(cfg, {"loss.temp": 0.5, "train.u_weight": 0.0, "name": "ablation"})
    assert cfg["loss"]["temp"] == 0.5 and cfg["train"]["u_weight"] == 0.0 and cfg["name"] == "ablation"
    for bad in ("loss.tmp", "nope.temp", "loss", "loss.temp.x"):
        with pytest.raises(ValueError, match=f"unknown config key '{bad}'"):
            C.apply_overrides(cfg, {bad: 1})
    assert C.parse_override("train.patch_size=[64, 64, 32]") == ("train.patch_size", [64, 64, 32])
    assert C.parse_override("loss.s_beta=null") == ("loss.s_beta", None)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        C.parse_override("loss.temp")
    args = T.parse_args(["--temp", "0.3", "--set", "loss.temp=0.4", "--set", "train.preset=official"])
    C.apply_flags(cfg, args)
    assert cfg["loss"]["temp"] == 0.4 and cfg["train"]["preset"] == "official"   # --set comes last


def test_help_does_not_import_torch():
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import sys; from dycon import train; train.parse_args(['--method', 'dycon']); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root,
                         env={**os.environ, "PYTHONPATH": root})
    assert out.stdout.strip() == "False"
