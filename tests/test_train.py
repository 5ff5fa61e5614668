"""The trainer: every method and preset runs, resume is exact, checkpoints load safely."""
import copy
import csv
import math

import pytest
import torch
import yaml

from dycon import train as T
from dycon.demo import ensure_demo_data
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
    return T.merge_config(T.DEFAULTS, raw, "test")


def read_metrics(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("method,preset", [("supervised", "dycon"), ("mean_teacher", "dycon"),
                                           ("dycon", "dycon"), ("dycon", "official")])
def test_each_method_and_preset_trains(tmp_path, data_root, method, preset):
    cfg = tiny_config(data_root, method=method, preset=preset, max_iterations=3)
    result = T.train(cfg, tmp_path)
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
    T.train(cfg, tmp_path / "straight")
    T.train(cfg, tmp_path / "split", stop_after=2)
    assert T.load_checkpoint(tmp_path / "split" / "latest.pt")["step"] == 2
    T.train(cfg, tmp_path / "split", resume=True)
    a = T.load_checkpoint(tmp_path / "straight" / "latest.pt")
    b = T.load_checkpoint(tmp_path / "split" / "latest.pt")
    assert a["step"] == b["step"] == 4 and a["best_dice"] == b["best_dice"]
    for key in ("student", "teacher"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["step"] for r in read_metrics(tmp_path / "straight")] == \
        [r["step"] for r in read_metrics(tmp_path / "split")]


def test_checkpoint_is_weights_only_and_complete(tmp_path, data_root):
    T.train(tiny_config(data_root, max_iterations=2), tmp_path)
    ckpt = torch.load(tmp_path / "latest.pt", weights_only=True)
    for key in ("student", "teacher", "optimizer", "step", "config", "best_dice", "sampler", "grad_scaler"):
        assert key in ckpt
    model = build_model(ckpt["config"]["model"])
    model.load_state_dict(ckpt["student"])
    assert ckpt["config"]["data"]["layout"] == "demo"


def test_non_finite_steps_are_skipped_and_counted(tmp_path, data_root, monkeypatch):
    real, calls = T.compute_losses, []

    def sometimes_nan(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(T, "compute_losses", sometimes_nan)
    result = T.train(tiny_config(data_root, max_iterations=3), tmp_path)
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
    patch = T.patch_labels_dycon(labels, probs, 1, [2, 2, 2], {"patch_purity": 0.6, "teacher_confidence": 0.7})
    assert patch.shape == (2, 8)
    assert patch[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]          # labelled: ground truth, majority
    assert patch[1].tolist() == [0, 0, 0, 0, 0, 0, 0, -1]         # unlabelled: teacher, unsure -> -1
    official = T.patch_labels_official(labels, [2, 2, 2])
    assert official[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    u = T.anchor_weights(torch.zeros(1, 2, 16, 16, 16), [2, 2, 2])
    torch.testing.assert_close(u, torch.full((1, 8), 2.0), atol=1e-4, rtol=0)   # max entropy -> 1 + 1


def test_schedules_and_ema():
    loss_cfg = {"beta_max": 5.0, "beta_min": 0.5, "s_beta": None}
    assert T.beta_at(0, 10, loss_cfg) == 5.0 and abs(T.beta_at(10, 10, loss_cfg) - 0.5) < 1e-12
    assert T.beta_at(3, 10, {**loss_cfg, "s_beta": 1.5}) == 1.5
    train_cfg = {"consistency": 0.1, "consistency_rampup": 200.0}
    assert T.consistency_weight(0, train_cfg) == pytest.approx(0.1 * math.exp(-5))
    assert T.consistency_weight(150 * 200, train_cfg) == pytest.approx(0.1)
    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    teacher = copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
        student[1].running_mean.fill_(3.0)
    T.ema_update(teacher, student, 0.99, step=0)     # alpha = 0: the teacher becomes the student
    for tp, sp in zip(teacher.state_dict().values(), student.state_dict().values()):
        assert torch.equal(tp, sp)


def test_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_iters: 5\n")
    with pytest.raises(ValueError, match="bad.yaml.*train.max_iters"):
        T.load_config(str(bad))
    with pytest.raises(FileNotFoundError, match="nope"):
        T.load_config("nope")
    cfg = T.load_config("brats19")
    assert cfg["train"]["patch_size"] == [96, 96, 96] and cfg["train"]["max_iterations"] == 20000
    cfg["train"]["method"] = "fixmatch"
    with pytest.raises(ValueError, match="train.method"):
        T.check_config(cfg)
    assert T.resolve_labelnum("10%", 40) == 4 and T.resolve_labelnum(7, 40) == 7
