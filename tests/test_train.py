"""The trainer: every method and preset runs, resume is exact, checkpoints load safely."""
import copy
import csv
import math
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from dycon import config as C, loop, losses, schedules, train as T
from dycon.data import labelled_split
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


@pytest.mark.parametrize("framework,method,preset", [
    ("mean_teacher", "supervised", "dycon"), ("mean_teacher", "mean_teacher", "dycon"),
    ("mean_teacher", "uamt", "dycon"), ("mean_teacher", "dycon", "dycon"), ("mean_teacher", "dycon", "official"),
    ("co_training", "cps", "dycon"), ("co_training", "dycon", "dycon")])
def test_each_framework_method_and_preset_trains(tmp_path, data_root, framework, method, preset):
    cfg = tiny_config(data_root, framework=framework, method=method, preset=preset, max_iterations=4)
    cfg["model"]["feature_scaler"] = 4   # patches of 4^3 voxels: the tiny crops hold lesion anchors (FeCL > 0)
    result = loop.train(cfg, tmp_path)
    assert result["step"] == 4 and result["skipped"] == 0 and 0 <= result["best_dice"] <= 1
    rows = [r for r in read_metrics(tmp_path) if r["total"]]
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    # every unsupervised term of the method acts at the half-way step (its gradient is not ~0)
    half = rows[1]
    terms = schedules.unsupervised_terms(cfg)
    assert bool(terms) == (method != "supervised")
    log_text = (tmp_path / "train.log").read_text()
    # the released DyCON's extra MSE ramps over 30 000 iterations whatever the run: tiny, and warned
    released_mse = preset == "official" and method == "dycon"
    assert ("consistency ramp (30000 iterations" in log_text) == released_mse
    for term in terms + ([f"{t}_b" for t in terms if t != "cps"] if framework == "co_training" else []):
        assert float(half[f"grad_ratio_{term}"]) > 0, (term, half)
    assert float(half["grad_norm"]) > 0 and half["clipped"] in ("0", "1")
    assert "unsupervised weight" in log_text and "0/25/50/100 %" in log_text or method == "supervised"
    assert ("gradient clipping: norm 1" in log_text) == (method == "dycon")
    co_training = framework == "co_training"
    for row in rows:
        assert math.isfinite(float(row["total"]))
        assert bool(row["fecl"]) == bool(row["uncl"]) == bool(row["anchors"]) == (method == "dycon")
        assert bool(row["mse"]) == (method in ("mean_teacher", "uamt") and not co_training or preset == "official")
        assert bool(row["cps"]) == bool(row["sup_b"]) == co_training
        assert bool(row["fecl_b"]) == (co_training and method == "dycon")
        if row["anchors"]:
            assert 0 <= float(row["lesion_anchors"]) <= float(row["anchors"])
    val_rows = [r for r in read_metrics(tmp_path) if r["val_dice"]]
    assert len(val_rows) == 2   # steps 2 and 4
    for row in val_rows:        # FeCL's pseudo-label quality, where FeCL takes them from predictions
        assert bool(row["val_patch_recall"]) == (method == "dycon" and preset == "dycon")
        if row["val_patch_recall"]:
            assert 0 <= float(row["val_patch_recall"]) <= 1
    assert ("label leakage" in log_text) == (method == "dycon" and preset == "official")
    assert "kernels on cpu: fecl -> cpu (" in log_text and "kernels on cpu: uncl -> cpu (" in log_text
    assert ("validation pseudo-label patches: precision" in log_text) == (method == "dycon" and preset == "dycon")
    assert (tmp_path / "best.pt").exists() and (tmp_path / "latest.pt").exists()


@pytest.mark.parametrize("framework", ["mean_teacher", "co_training"])
def test_resume_gives_the_same_weights(tmp_path, data_root, framework):
    cfg = tiny_config(data_root, framework=framework)
    loop.train(cfg, tmp_path / "straight")
    loop.train(cfg, tmp_path / "split", stop_after=2)
    assert load_checkpoint(tmp_path / "split" / "latest.pt")["step"] == 2
    loop.train(cfg, tmp_path / "split", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "latest.pt")
    b = load_checkpoint(tmp_path / "split" / "latest.pt")
    assert a["step"] == b["step"] == 4 and a["best_dice"] == b["best_dice"]
    for key in ("student", "teacher") if framework == "mean_teacher" else ("student", "student_b"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs after resume"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(), strict=True):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    assert [r["step"] for r in read_metrics(tmp_path / "straight")] == \
        [r["step"] for r in read_metrics(tmp_path / "split")]
    if framework == "co_training":   # two students, differently initialised, both trained
        assert not torch.equal(a["student"]["classifier.weight"], a["student_b"]["classifier.weight"])
        assert len(a["optimizer"]["state"]) == 2 * len(list(build_model(cfg["model"]).parameters()))


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
    result = T.main(["--config", str(cfg_path), "--output", str(run), "--labelnum", "50%", "--seed", "3",
                     "--fecl_warmup", "1", "--set", "loss.patch_purity=0.5"])
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["labelnum"] == "50%" and saved["train"]["seed"] == 3
    assert saved["loss"]["fecl_warmup"] == 1 and saved["loss"]["patch_purity"] == 0.5
    assert saved["kernels"]["ops"]["fecl"]["backend"] == "cpu" and saved["kernels"]["extension"] == "loaded"
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                          text=True).stdout.strip() or "unknown"   # the code that trained, as git names it
    assert saved["code"]["commit"].split()[0] == head
    assert 0 <= result["test"]["classes"]["1"]["dice"]["mean"] <= 1
    assert (run / "eval_test_student" / "cases.csv").exists()   # the report dycon.evaluate --run writes
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
    cfg = C.load_config("demo")   # mean_teacher: the ramp spans the run unless told otherwise
    cfg["train"].update(method="mean_teacher", max_iterations=1000)
    assert schedules.consistency_weight(0, cfg) == pytest.approx(0.1 * math.exp(-5))
    assert schedules.consistency_weight(500, cfg) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    assert schedules.consistency_weight(1000, cfg) == pytest.approx(0.1)
    cfg["train"]["consistency_rampup"] = "20%"
    assert schedules.consistency_weight(100, cfg) == pytest.approx(0.1 * math.exp(-5 * 0.25))
    cfg["train"]["consistency_rampup"] = 400
    assert schedules.consistency_weight(200, cfg) == pytest.approx(0.1 * math.exp(-5 * 0.25))
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
    C.apply_overrides(cfg, {"loss.temp": 0.5, "loss.fecl_weight": 0.0, "name": "ablation"})
    assert cfg["loss"]["temp"] == 0.5 and cfg["loss"]["fecl_weight"] == 0.0 and cfg["name"] == "ablation"
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


# ------------------------------------------------------------------------ the method's switches

def step_losses(cfg, seed=0):
    """compute_losses of the first batch, from weights and dropout drawn from ``seed``."""
    from torch.utils.data import default_collate
    from dycon import frameworks
    from dycon.data import list_cases
    from dycon.batches import PatchDataset, TwoStreamBatchSampler
    from dycon.distributed import Context
    sampler = TwoStreamBatchSampler([0, 1], [2, 3, 4, 5], 2, 2, seed=cfg["train"]["seed"])
    dataset = PatchDataset(list_cases(cfg["data"], "train"), cfg["train"]["patch_size"])
    batch = default_collate([dataset[item] for item in sampler.batch(0)])
    torch.manual_seed(seed)
    framework = frameworks.build(cfg, torch.device("cpu"), Context())
    torch.manual_seed(seed + 1)
    return loop.compute_losses(cfg, batch, framework, 0, 0, 10, 0)


def test_unsupervised_weights_switch_terms_off_exactly(data_root):
    # feature_scaler 4: patches of 4^3 voxels, so that the crops hold lesion patches
    cfg = tiny_config(data_root)
    cfg["model"]["feature_scaler"] = 4
    full = step_losses(cfg)
    assert float(full["fecl"]) > 0.1 and float(full["uncl"]) > 0.1 and full["lesion_anchors"] > 0
    assert float(full["total"]) == pytest.approx(float(full["sup"] + 0.5 * full["fecl"] + 0.5 * full["uncl"]), rel=1e-6)

    no_fecl = step_losses(C.apply_overrides(copy.deepcopy(cfg), {"loss.fecl_weight": 0.0}))
    assert "fecl" not in no_fecl and torch.equal(no_fecl["uncl"], full["uncl"])
    assert torch.equal(no_fecl["total"], no_fecl["sup"] + 0.5 * no_fecl["uncl"])   # exactly MT + UnCL
    no_uncl = step_losses(C.apply_overrides(copy.deepcopy(cfg), {"loss.uncl_weight": 0.0, "loss.fecl_weight": 2.0}))
    assert "uncl" not in no_uncl and torch.equal(no_uncl["fecl"], full["fecl"])
    assert torch.equal(no_uncl["total"], no_uncl["sup"] + 2.0 * no_uncl["fecl"])

    mse = step_losses(C.apply_overrides(copy.deepcopy(cfg), {"loss.uncl": "mse", "loss.fecl_weight": 0.0}))
    assert "uncl" not in mse and 0 < float(mse["uncl_mse"]) < 0.5
    assert torch.equal(mse["total"], mse["sup"] + 0.5 * mse["uncl_mse"])


@pytest.mark.parametrize("overrides,params", [
    ({}, {}),
    ({"loss.gamma_neg": 0.0}, {"gamma_neg": 0.0}),
    ({"loss.gamma_pos": 0.0, "loss.temp": 0.3}, {"gamma_pos": 0.0, "temperature": 0.3}),
    ({"loss.teacher_top_k": 0}, {"teacher": "none"}),
    ({"loss.teacher_top_k": 4, "loss.student_top_k": 3}, {"teacher_top_k": 4, "top_k": 3}),
    ({"loss.anchor_weight": "none"}, {"anchor_weight": None}),
])
def test_fecl_switches_reach_the_loss(overrides, params):
    from dycon.objectives import DyCON
    from dycon_kernels.reference import fecl as reference_fecl
    g = torch.Generator().manual_seed(0)
    logits, t_logits = torch.randn(4, 2, 16, 16, 16, generator=g), torch.randn(4, 2, 16, 16, 16, generator=g)
    z = torch.nn.functional.normalize(torch.randn(4, 64, 8, generator=g), dim=-1)
    zt = torch.nn.functional.normalize(torch.randn(4, 64, 8, generator=g), dim=-1)
    labels = (torch.rand(4, 16, 16, 16, generator=g) < 0.3).long()
    cfg = C.merge_config(C.DEFAULTS, {"model": {"feature_scaler": 4},
                                      "train": {"patch_size": [16, 16, 16], "kernel_backend": "reference"},
                                      "loss": {"patch_purity": 0.0, "teacher_confidence": 0.0}}, "test")
    C.apply_overrides(cfg, overrides)
    got = DyCON().fecl_sums(cfg, (logits, z), (t_logits, zt), labels, 2, {})
    patch = losses.patch_labels_dycon(labels, t_logits.softmax(1), 2, [4, 4, 4], cfg["loss"])
    expected = dict(temperature=0.6, gamma_pos=2.0, gamma_neg=2.0, top_k=None, shift="exact", teacher="topk",
                    teacher_top_k=32, teacher_threshold=None, teacher_weight=1.0, reduction="sum",
                    anchor_weight=losses.anchor_weights(logits, [4, 4, 4]))
    expected.update(params)
    teacher = expected["teacher"] != "none"
    value = reference_fecl(z, patch, zt if teacher else None, patch if teacher else None, **expected)
    torch.testing.assert_close(got["fecl"][0], value.float(), rtol=1e-5, atol=1e-6)
    assert got["fecl"][1] == (patch >= 0).sum() and got["fecl_anchors"].tolist() == \
        [float((patch >= 0).sum()), float((patch == 1).sum())]
    if overrides:   # each switch changes the loss
        default = DyCON().fecl_sums(C.merge_config(cfg, {"loss": dict(C.DEFAULTS["loss"], patch_purity=0.0,
                                                                      teacher_confidence=0.0)}, "d"),
                                    (logits, z), (t_logits, zt), labels, 2, {})
        assert not torch.allclose(default["fecl"][0], got["fecl"][0])


def test_ramps_warmup_and_uamt_threshold():
    released = C.load_config("demo")
    assert schedules.unsupervised_weights(released, 0) == (0.5, 0.5)   # released: no ramp
    cfg = C.apply_overrides(copy.deepcopy(released), {"loss.uncl_rampup": 100, "loss.fecl_warmup": "5%",
                                                      "loss.fecl_rampup": 100, "loss.fecl_weight": 1.0,
                                                      "train.max_iterations": 1000, "train.method": "uamt"})
    assert schedules.unsupervised_weights(cfg, 0) == pytest.approx((0.5 * math.exp(-5), 0.0))
    assert schedules.unsupervised_weights(cfg, 49)[1] == 0.0
    assert schedules.unsupervised_weights(cfg, 50)[1] == pytest.approx(math.exp(-5))
    assert schedules.unsupervised_weights(cfg, 150) == pytest.approx((0.5, 1.0))
    assert schedules.uamt_threshold(0, cfg) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))
    assert schedules.uamt_threshold(1000, cfg) == pytest.approx(math.log(2))
    cfg["train"]["consistency_rampup"] = "1 %%"
    with pytest.raises(ValueError, match="train.consistency_rampup"):
        C.check_config({**cfg, "data": {**cfg["data"], "root": "x"}})


def test_uamt_masks_uncertain_voxels():
    from dycon.objectives import UAMT
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(3, 2, 4, 4, 4, generator=g), torch.randn(3, 2, 4, 4, 4, generator=g)
    uncertainty = torch.rand(2, 4, 4, 4, generator=g)
    mse = losses.mse_sums(s[1:], t[1:])
    for thr, expect in ((2.0, mse), (-1.0, torch.tensor([0.0, 0.0]))):   # all certain, all uncertain
        got = UAMT().sums({}, (s, None), (t, None), None, 1, {"uncertainty": uncertainty, "uamt_threshold": torch.tensor(thr)})
        torch.testing.assert_close(got["mse"], expect)
    half = UAMT().sums({}, (s, None), (t, None), None, 1, {"uncertainty": uncertainty, "uamt_threshold": torch.tensor(0.5)})
    assert half["mse"][1] == 2 * (uncertainty < 0.5).sum()


def test_label_seed_draws_the_labelled_cases():
    assert labelled_split(10, 3, None) == ([0, 1, 2], list(range(3, 10)))   # as released
    labeled, unlabeled = labelled_split(10, 3, 7)
    assert len(labeled) == 3 and sorted(labeled + unlabeled) == list(range(10))
    assert labelled_split(10, 3, 7) == (labeled, unlabeled)
    assert {tuple(labelled_split(10, 3, s)[0]) for s in range(5)} != {(0, 1, 2)}


def test_switch_errors_name_the_key():
    cfg = C.load_config("demo")
    cfg["data"]["root"] = "x"
    for key, value in (("loss.uncl", "kl"), ("loss.fecl_weight", -1), ("loss.teacher_top_k", 2.5),
                       ("loss.anchor_weight", "u"), ("train.framework", "fixmatch")):
        bad = C.apply_overrides(copy.deepcopy(cfg), {key: value})
        with pytest.raises(ValueError, match=key):
            C.check_config(bad)
    with pytest.raises(ValueError, match="co_training"):
        C.check_config(C.apply_overrides(copy.deepcopy(cfg), {"train.framework": "co_training", "train.method": "uamt"}))


def test_patch_label_quality_of_a_perfect_and_a_blind_labeler():
    from types import SimpleNamespace
    from dycon.data import Volume
    label = torch.zeros(16, 16, 16, dtype=torch.uint8)
    label[:8, :8, :8] = 1                      # one lesion patch of 8^3 (feature_scaler 2)
    label[8:10, 8:10, 8:10] = 1                # too small a share of its patch: not a lesion patch
    case = SimpleNamespace(load=lambda n: Volume(image=label[None].float().numpy(), label=label.numpy()))

    class Sees(torch.nn.Module):               # logits from the image: the lesion where the image is 1
        def __init__(self, gain):
            super().__init__()
            self.gain = gain

        def forward(self, x):
            return torch.cat([-self.gain * x, self.gain * x], 1), None

    cfg = C.merge_config(C.DEFAULTS, {"train": {"patch_size": [16, 16, 16]},
                                      "val": {"stride_xy": 16, "stride_z": 16}}, "test")
    from dycon.distributed import Context
    assert loop.patch_label_quality(Sees(10.0), [case], cfg, torch.device("cpu"), Context()) == (1.0, 1.0)
    precision, recall = loop.patch_label_quality(Sees(0.0), [case], cfg, torch.device("cpu"), Context())
    assert math.isnan(precision) and recall == 0.0   # unsure everywhere: no lesion patch predicted


def test_official_preset_initialises_as_released(data_root):
    from dycon import frameworks
    from dycon.distributed import Context
    for preset, released in (("official", True), ("dycon", False)):
        cfg = tiny_config(data_root, preset=preset)
        student = frameworks.new_network(cfg, torch.device("cpu"), Context())
        bn_weight = student.head.proj[1].weight
        assert torch.equal(bn_weight, torch.ones_like(bn_weight)) != released


def ramp(p):   # the sigmoid ramp-up at a fraction p of its length, written out
    return math.exp(-5 * (1 - min(p, 1.0)) ** 2)


@pytest.mark.parametrize("framework,method,preset,expected", [
    ("mean_teacher", "supervised", "dycon", {}),
    ("mean_teacher", "mean_teacher", "dycon", {"mse": [0.1 * ramp(p) for p in (0, .25, .5, 1)]}),
    ("mean_teacher", "uamt", "dycon", {"mse": [0.1 * ramp(p) for p in (0, .25, .5, 1)]}),
    ("co_training", "cps", "dycon", {"cps": [0.1 * ramp(p) for p in (0, .25, .5, 1)]}),
    ("mean_teacher", "dycon", "dycon", {"uncl": [0.5] * 4, "fecl": [0.5] * 4}),
    # the released DyCON: its extra MSE ramps over 200 blocks of 150 iterations whatever the run
    ("mean_teacher", "dycon", "official", {"mse": [0.1 * ramp(s / 30000) for s in (0, 200, 400, 800)],
                                           "uncl": [0.5] * 4, "fecl": [0.5] * 4}),
    ("co_training", "dycon", "dycon", {"cps": [0.1 * ramp(p) for p in (0, .25, .5, 1)],
                                       "uncl": [0.5] * 4, "fecl": [0.5] * 4})])
def test_each_method_default_schedule_at_0_25_50_100_percent(framework, method, preset, expected):
    cfg = C.apply_overrides(C.load_config("demo"), {"train.framework": framework, "train.method": method,
                                                    "train.preset": preset, "train.max_iterations": 800})
    got = {name: [] for name in schedules.unsupervised_terms(cfg)}
    for step in (0, 200, 400, 800):
        for name, weight in schedules.weights_at(cfg, step).items():
            got[name].append(weight)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-12), name
    lines, warnings = schedules.summary(cfg)
    assert len(lines) == len(expected) + (method == "uamt")
    assert bool(warnings) == (preset == "official" and method == "dycon")   # 30 000 > 800 iterations


def test_ramp_lengths_in_iterations_or_shares_of_the_run():
    cfg = C.apply_overrides(C.load_config("demo"), {"train.max_iterations": 600, "train.consistency_rampup": "33%",
                                                    "loss.fecl_warmup": 60, "loss.fecl_rampup": "10%",
                                                    "loss.beta_decay": "50%"})
    lengths = schedules.ramp_lengths(cfg)
    assert lengths["consistency"] == pytest.approx(198) and lengths["fecl_warmup"] == 60
    assert lengths["fecl"] == pytest.approx(60) and lengths["beta"] == pytest.approx(300)
    assert schedules.beta_at(0, 9, cfg["loss"], 150, lengths["beta"]) == pytest.approx(5.0 * 0.1 ** 0.5)
    assert schedules.beta_at(0, 9, cfg["loss"], 600, lengths["beta"]) == pytest.approx(0.5)
    cfg["loss"]["fecl_rampup"] = 1000   # from step 60 for 1000 iterations: not done by step 600
    assert any("fecl ramp" in w for w in schedules.summary(cfg)[1])
    for bad in ("ten", -3, "x%", True):
        cfg["loss"]["uncl_rampup"] = bad
        with pytest.raises(ValueError, match="loss.uncl_rampup"):
            schedules.ramp_lengths(cfg)


def test_cps_is_named_and_the_old_spelling_still_works(caplog):
    cfg = C.apply_overrides(C.load_config("demo"), {"data.root": "x", "train.method": "cps"})
    C.check_config(cfg)
    assert cfg["train"]["framework"] == "co_training"
    old = C.apply_overrides(C.load_config("demo"), {"data.root": "x", "train.framework": "co_training",
                                                    "train.method": "mean_teacher"})
    with caplog.at_level("WARNING", logger="dycon.train"):
        C.check_config(old)
    assert old["train"]["method"] == "cps" and "method 'cps'" in caplog.text


def test_clipping_follows_each_reference():
    base = C.load_config("demo")["train"]
    assert loop.clip_norm({**base, "method": "dycon"}) == 1.0
    for method in ("supervised", "mean_teacher", "uamt", "cps"):
        assert loop.clip_norm({**base, "method": method}) == 0.0
    assert loop.clip_norm({**base, "method": "mean_teacher", "grad_clip": 2.0}) == 2.0
    nets = [torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)]
    for scale, net in zip((10.0, 0.1), nets):   # one network's gradient over the bound, one under
        for p in net.parameters():
            p.grad = torch.full_like(p, scale)
    largest, clipped = loop.clip_gradients(nets, 1.0)
    assert clipped and largest == pytest.approx(20.0)   # 4 entries of 10
    norms = [torch.nn.utils.get_total_norm([p.grad for p in n.parameters()]) for n in nets]
    assert norms[0] == pytest.approx(1.0) and norms[1] == pytest.approx(0.2)   # each on its own
    for p in nets[0].parameters():
        p.grad = torch.full_like(p, 10.0)
    largest, clipped = loop.clip_gradients(nets, 0.0)   # off: measured, not scaled
    assert not clipped and largest == pytest.approx(20.0)
    assert torch.nn.utils.get_total_norm([p.grad for p in nets[0].parameters()]) == pytest.approx(20.0)


@pytest.mark.parametrize("method", ["supervised", "uamt", "cps"])
def test_strong_views_train_the_student_and_not_the_teacher(tmp_path, data_root, method, monkeypatch):
    from dycon.frameworks import mean_teacher
    seen = []
    real = mean_teacher.strong_view
    monkeypatch.setattr(mean_teacher, "strong_view", lambda image, *a: seen.append(image.shape) or real(image, *a))
    cfg = tiny_config(data_root, method=method, max_iterations=2)
    cfg["views"]["strong"] = True
    C.check_config(cfg)
    assert loop.train(cfg, tmp_path)["step"] == 2
    # one strong view per step of the whole batch (the labelled volumes alone for supervised)
    assert seen == [(2 if method == "supervised" else 4, 1, 32, 32, 32)] * 2
