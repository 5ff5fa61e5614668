"""Metrics against values derived by hand (in the comments), and the evaluation summary."""
import csv
import importlib.util
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from dycon.evaluate import evaluate_cases, format_table, summarize, write_report
from dycon.metrics import asd, case_metrics, dice, hd95, jaccard, nnunet_case_metrics, surface_distances

NEEDS_MONAI = pytest.mark.skipif(importlib.util.find_spec("monai") is None,
                                 reason="MONAI is not installed (pip install monai; CI installs it with [dev])")


def cube(shape, start, size):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def ball(shape, centre, radius):
    grid = np.indices(shape)
    return ((grid - np.reshape(centre, (3, 1, 1, 1))) ** 2).sum(0) <= radius ** 2


# A 10^3 cube and the same cube shifted by k = 2 voxels along axis 0, hand-counted:
# surface (6-neighbour erosion) = 10^3 - 8^3 = 488 voxels per cube. From the prediction to the
# ground truth, by x-layer of the prediction (x = 0..9):
#   x = 0 (full face, 100 voxels): the ground truth's nearest surface is its x = 2 face -> 2
#   x = 1 (side ring, 36 voxels): 1 away from the ground truth's x = 2 face -> 1
#   x = 2..8 (side rings): on the ground truth's side faces -> 0
#   x = 9 face: its ring (36) lies on the ground truth's side faces -> 0; its 8x8 interior,
#     at (y, z) in 1..8, is min(2, y, 9 - y, z, 9 - z) away (the x = 11 face or a side face):
#     1 for the 28 voxels with y or z in {1, 8}, 2 for the other 36.
# Sum = 100*2 + 36*1 + 28*1 + 36*2 = 336 -> ASD = 336 / 488 = 42 / 61. The other direction is
# the mirror image (same distances), and 2 is the largest distance and > 5 % of the pooled set,
# so HD95 = 2 under both definitions. Overlap 10*10*8 = 800: Dice 0.8, Jaccard 800/1200.
SHAPE = (16, 16, 16)
PRED_CUBE = cube(SHAPE, (3, 3, 3), 10)
GT_CUBE = cube(SHAPE, (5, 3, 3), 10)


def test_identical_masks():
    mask = ball(SHAPE, (8, 8, 8), 5)
    assert case_metrics(mask, mask) == dict(dice=1.0, jaccard=1.0, hd95=0.0, asd=0.0, empty="")


def test_cube_shifted_by_two_voxels():
    m = case_metrics(PRED_CUBE, GT_CUBE)
    assert m["dice"] == pytest.approx(0.8)
    assert m["jaccard"] == pytest.approx(2 / 3)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["asd"] == pytest.approx(42 / 61)
    assert surface_distances(PRED_CUBE, GT_CUBE).size == 488
    assert surface_distances(PRED_CUBE, GT_CUBE).max() == pytest.approx(2.0)


def test_cube_shifted_in_mm_with_anisotropic_spacing():
    # Spacing (2, 1, 1) mm: the shift is 4 mm. Same layers as above: x = 0 face -> 4 (100
    # voxels), x = 1 ring -> 2 (36), x = 9 interior -> min(4, y, 9-y, z, 9-z) = m, where
    # m = 1, 2, 3, 4 for 28, 20, 12, 4 voxels (8^2-6^2, 6^2-4^2, 4^2-2^2, 2^2).
    # Sum = 400 + 72 + (28 + 40 + 36 + 16) = 592 -> ASD = 592 / 488 = 74 / 61 mm. The largest
    # distance, 4, has 100 + 4 = 104 of 488 values each way (> 5 %) -> HD95 = 4 mm.
    m = case_metrics(PRED_CUBE, GT_CUBE, spacing=(2.0, 1.0, 1.0))
    assert m["hd95"] == pytest.approx(4.0)
    assert m["asd"] == pytest.approx(74 / 61)
    assert m["dice"] == pytest.approx(0.8)   # overlap measures ignore spacing


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_planes_k_apart_spacing_along_the_shift(axis):
    # Two one-voxel-thick planes spanning the whole array (they touch its border), k = 3 apart
    # along `axis`: every voxel is surface and its nearest partner is straight across, so all
    # distances are k * spacing[axis]; no overlap, Dice 0.
    pred, gt = np.zeros((2, 8, 9, 10), bool)
    index = [slice(None)] * 3
    index[axis] = 1
    pred[tuple(index)] = True
    index[axis] = 4
    gt[tuple(index)] = True
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 0.7
    m = case_metrics(pred, gt, spacing=spacing)
    assert m["hd95"] == pytest.approx(3 * 0.7)
    assert m["asd"] == pytest.approx(3 * 0.7)
    assert m["dice"] == 0.0 and m["jaccard"] == 0.0


@NEEDS_MONAI
def test_medpy_and_monai_hd95_differ_as_defined():
    # Ground truth: a 10x10 plane at x = 2. Prediction: that plane plus a 3x3 patch at x = 5.
    # d(pred -> gt): 100 zeros and 9 threes; d(gt -> pred): 100 zeros.
    # MONAI: directed 95th percentiles are 3 (index 0.95 * 108 = 102.6 falls among the threes,
    # sorted positions 100..108) and 0 -> 3. medpy: 209 pooled values, threes at 200..208,
    # index 0.95 * 208 = 197.6 falls among the zeros -> 0. ASD = 27 / 109.
    gt = np.zeros((8, 12, 12), bool)
    gt[2, 1:11, 1:11] = True
    pred = gt.copy()
    pred[5, 4:7, 4:7] = True
    assert hd95(pred, gt) == pytest.approx(0.0)
    assert hd95(pred, gt, definition="monai") == pytest.approx(3.0)
    assert asd(pred, gt) == pytest.approx(27 / 109)
    assert dice(pred, gt) == pytest.approx(200 / 209)
    assert jaccard(pred, gt) == pytest.approx(100 / 109)


def test_concentric_spheres():
    # Radii 8 and 10: Dice ~ 2 * 8^3 / (8^3 + 10^3) = 0.677 (voxelised volumes are close to
    # 4/3 pi r^3), Jaccard ~ 8^3 / 10^3; surface distances ~ 10 - 8 = 2 up to a voxel.
    pred, gt = ball((26, 26, 26), (13, 13, 13), 8), ball((26, 26, 26), (13, 13, 13), 10)
    m = case_metrics(pred, gt)
    assert m["dice"] == pytest.approx(2 * 512 / 1512, abs=0.02)
    assert m["jaccard"] == pytest.approx(0.512, abs=0.02)
    assert 1.0 <= m["hd95"] <= 3.0
    assert 1.5 <= m["asd"] <= 2.5


def brute_force_distances(a, b, spacing):
    """Surface = voxels with a face neighbour outside the mask (or the array); nearest partner by
    exhaustive search. Independent of scipy's erosion and distance transform."""
    def surface(mask):
        padded = np.pad(mask, 1)
        inner = np.ones_like(mask)
        for axis in range(3):
            for step in (-1, 1):
                inner &= np.roll(padded, step, axis)[1:-1, 1:-1, 1:-1]
        return np.argwhere(mask & ~inner) * np.asarray(spacing)
    sa, sb = surface(a), surface(b)
    return np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1)).min(1)


@pytest.mark.parametrize("seed", range(3))
def test_random_shapes_match_brute_force(seed):
    # blobs that touch the array border, to check that cropping and border handling are exact
    rng = np.random.default_rng(seed)
    from scipy import ndimage
    a = ndimage.gaussian_filter(rng.standard_normal((10, 11, 12)), 1.5) > 0.1
    b = ndimage.gaussian_filter(rng.standard_normal((10, 11, 12)), 1.5) > 0.1
    spacing = (1.5, 1.0, 0.8)
    d_ab, d_ba = brute_force_distances(a, b, spacing), brute_force_distances(b, a, spacing)
    m = case_metrics(a, b, spacing=spacing)
    assert m["asd"] == pytest.approx(d_ab.mean())
    assert m["hd95"] == pytest.approx(np.percentile(np.concatenate([d_ab, d_ba]), 95))
    if importlib.util.find_spec("monai") is not None:
        assert hd95(a, b, spacing, "monai") == pytest.approx(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def test_empty_masks_policy():
    full = cube(SHAPE, (4, 4, 4), 4)
    empty = np.zeros(SHAPE, bool)
    # empty prediction: 0 on all four (released test scripts, method.md)
    assert case_metrics(empty, full) == dict(dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0, empty="prediction")
    assert case_metrics(empty, empty) == dict(dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0, empty="both")
    # empty ground truth, non-empty prediction: overlap 0, distances undefined
    m = case_metrics(full, empty)
    assert (m["dice"], m["jaccard"], m["empty"]) == (0.0, 0.0, "ground_truth")
    assert math.isnan(m["hd95"]) and math.isnan(m["asd"])
    # the plain distance functions refuse empty masks, as medpy does
    with pytest.raises(ValueError, match="second mask is empty"):
        hd95(full, empty)
    with pytest.raises(ValueError, match="first mask is empty"):
        asd(empty, full)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"shapes differ: \(16, 16, 16\) vs \(16, 16\)"):
        dice(PRED_CUBE, PRED_CUBE[0])
    with pytest.raises(ValueError, match="spacing must be 3 positive"):
        case_metrics(PRED_CUBE, GT_CUBE, spacing=(1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="hd_definition"):
        case_metrics(PRED_CUBE, GT_CUBE, hd_definition="max")


# ---- against the libraries the numbers are compared with: medpy and MONAI, random masks ----------

def random_mask(seed: int, shape, density: float) -> np.ndarray:
    """Smooth random blobs (touching the border at times); density 0 gives an empty mask."""
    from scipy import ndimage
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), 1.0)
    return noise > np.quantile(noise, 1 - density) if density > 0 else np.zeros(shape, bool)


MASKS = dict(seed=st.integers(0, 2 ** 16), shape=st.tuples(*[st.integers(4, 12)] * 3),
             densities=st.tuples(st.sampled_from([0.0, 0.05, 0.2, 0.5]), st.sampled_from([0.0, 0.05, 0.2, 0.5])),
             spacing=st.tuples(*[st.sampled_from([0.4, 0.8, 1.0, 2.5, 5.0])] * 3))


@settings(max_examples=12, deadline=None)
@given(**MASKS)
def test_medpy_agrees_on_random_masks(seed, shape, densities, spacing):
    binary = pytest.importorskip("medpy.metric.binary", reason="medpy is not installed (CI installs it with [dev])")
    pred, gt = random_mask(seed, shape, densities[0]), random_mask(seed + 1, shape, densities[1])
    m = case_metrics(pred, gt, spacing)
    if not pred.any() or not gt.any():
        return   # medpy raises or divides 0 by 0 there; the policy for them: test_empty_masks_against_the_libraries
    assert m["dice"] == pytest.approx(binary.dc(pred, gt))
    assert m["jaccard"] == pytest.approx(binary.jc(pred, gt))
    assert m["hd95"] == pytest.approx(binary.hd95(pred, gt, voxelspacing=spacing))
    assert m["asd"] == pytest.approx(binary.asd(pred, gt, voxelspacing=spacing))


def monai_pair(pred, gt):
    return (torch.from_numpy(m.astype(np.float32))[None, None] for m in (pred, gt))


@NEEDS_MONAI
@settings(max_examples=12, deadline=None)
@given(**MASKS)
def test_monai_agrees_on_random_masks(seed, shape, densities, spacing):
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_iou
    pred, gt = random_mask(seed, shape, densities[0]), random_mask(seed + 1, shape, densities[1])
    m = case_metrics(pred, gt, spacing, hd_definition="monai", empty_both="nan")
    y_pred, y = monai_pair(pred, gt)
    if pred.any() or gt.any():
        assert m["dice"] == pytest.approx(compute_dice(y_pred, y, include_background=True, ignore_empty=False).item())
        assert m["jaccard"] == pytest.approx(compute_iou(y_pred, y, include_background=True, ignore_empty=False).item())
    if not pred.any() or not gt.any():
        return
    # --hd monai is MONAI's own HD95; our surfaces and distances give the same value and ASD
    d_pg, d_gp = surface_distances(pred, gt, spacing), surface_distances(gt, pred, spacing)
    assert m["hd95"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)), rel=1e-5)
    assert m["asd"] == pytest.approx(d_pg.mean(), rel=1e-5)
    assert case_metrics(pred, gt, spacing)["asd"] == pytest.approx(
        compute_average_surface_distance(y_pred, y, include_background=True, spacing=list(spacing)).item(), rel=1e-5)


def test_empty_masks_against_the_libraries():
    """Two empty masks: 0 under 'zero' (the released test scripts test ``pred.sum() > 0`` first),
    NaN under 'nan' (nnU-Net's compute_metrics, MONAI's compute_dice with ignore_empty, medpy 0.5's
    dc, which divides 0 by 0)."""
    empty = np.zeros(SHAPE, bool)
    assert case_metrics(empty, empty) == dict(dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0, empty="both")
    assert all(math.isnan(v) for k, v in case_metrics(empty, empty, empty_both="nan").items() if k != "empty")
    assert math.isnan(nnunet_case_metrics(empty, empty)["Dice"])
    if importlib.util.find_spec("medpy") is not None:
        from medpy.metric.binary import dc
        with np.errstate(invalid="ignore"):
            assert math.isnan(dc(empty, empty))
    if importlib.util.find_spec("monai") is not None:
        from monai.metrics import compute_dice
        assert math.isnan(compute_dice(*monai_pair(empty, empty), include_background=True, ignore_empty=True).item())
    with pytest.raises(ValueError, match="empty_both must be one of"):
        case_metrics(empty, empty, empty_both="one")


class ArrayReader:
    """nnU-Net's image reader interface over arrays in memory (read_seg(name) -> (array, properties))."""

    def __init__(self, arrays):
        self.arrays = arrays

    def read_seg(self, name):
        return self.arrays[name][None], {}


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2 ** 16), shape=st.tuples(*[st.integers(3, 9)] * 3), with_ignore=st.booleans())
def test_nnunet_entry_equals_nnunets_compute_metrics(seed, shape, with_ignore):
    evaluation = pytest.importorskip("nnunetv2.evaluation.evaluate_predictions", reason="nnunetv2 is not installed")
    rng = np.random.default_rng(seed)
    gt = rng.integers(0, 4 if with_ignore else 3, shape).astype(np.uint8)   # label 3: ignore
    pred = rng.integers(0, 3, shape).astype(np.uint8)
    pred[..., 0] = 0                                                       # some slices empty in both
    theirs = evaluation.compute_metrics("gt", "pred", ArrayReader({"gt": gt, "pred": pred}), [1, 2],
                                        ignore_label=3 if with_ignore else None)["metrics"]
    scored = gt != 3 if with_ignore else None
    for label in (1, 2):
        ours = nnunet_case_metrics(pred == label, gt == label, scored)
        assert ours.keys() == theirs[label].keys()
        for key, value in theirs[label].items():
            assert (math.isnan(value) and math.isnan(ours[key])) or ours[key] == pytest.approx(value), key


def test_ignored_voxels_are_not_scored():
    gt = cube(SHAPE, (4, 4, 4), 6)
    ignored = cube(SHAPE, (0, 0, 0), 3)
    pred = gt | ignored                           # predicted foreground only where nothing is annotated
    assert case_metrics(pred, gt)["dice"] < 1.0
    assert case_metrics(pred, gt, scored=~ignored) == dict(dice=1.0, jaccard=1.0, hd95=0.0, asd=0.0, empty="")
    assert nnunet_case_metrics(pred, gt, ~ignored)["FP"] == 0


# ---- evaluation of cases -----------------------------------------------------------------------

class Threshold(torch.nn.Module):
    """Stand-in network: foreground logit = 20 * (image - 0.5), so the prediction is image > 0.5."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(20.0))

    def forward(self, x):
        fg = self.scale * (x[:, :1] - 0.5)
        return torch.cat([torch.zeros_like(fg), fg], 1), None


def fake_case(case_id, image, label, spacing=None):
    volume = SimpleNamespace(image=image[None].astype(np.float32), label=label.astype(np.uint8),
                             spacing=spacing, affine=None, header=None, path=f"/data/{case_id}.h5")
    return SimpleNamespace(id=case_id, load=lambda num_classes=None: volume)   # Case.load's signature


EVAL_CFG = dict(patch_size=(8, 8, 8), stride_xy=4, stride_z=4, num_classes=2, device="cpu")


def test_evaluate_cases_rows_and_summary(tmp_path):
    with_blob = PRED_CUBE.copy()
    with_blob[14, 14, 14] = True                  # a stray voxel the largest component removes
    cases = [fake_case("shifted", with_blob, GT_CUBE),
             fake_case("missed", np.zeros(SHAPE), GT_CUBE)]
    rows, summary = evaluate_cases(Threshold(), cases, EVAL_CFG)
    assert [r["case"] for r in rows] == ["shifted", "missed"]
    assert rows[0]["dice"] == pytest.approx(0.8) and rows[0]["asd"] == pytest.approx(42 / 61)
    assert {k: rows[1][k] for k in ("case", "class", "dice", "jaccard", "hd95", "asd", "empty")} == dict(
        case="missed", **{"class": 1}, dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0, empty="prediction")
    # nnU-Net's layout beside ours: per-case counts, NaN-ignoring means, foreground mean
    assert [e["metrics"]["1"]["Dice"] for e in summary["metric_per_case"]] == [pytest.approx(0.8), 0.0]
    assert summary["metric_per_case"][1]["metrics"]["1"]["n_ref"] == GT_CUBE.sum()
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.4) == summary["foreground_mean"]["Dice"]
    stats = summary["classes"]["1"]
    assert stats["dice"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.4), "n": 2}
    assert stats["empty_prediction"] == 1 and summary["n_cases"] == 2
    assert summary["hd_definition"] == "medpy" and summary["units"] == "voxel"

    rows, _ = evaluate_cases(Threshold(), cases[:1], {**EVAL_CFG, "largest_component": False})
    assert rows[0]["dice"] == pytest.approx(1600 / 2001)   # the stray voxel counts now

    table = format_table(summary)
    assert "40.00 ± 40.00" in table   # Dice in %, mean ± std
    assert "medpy" in table and "voxels" in table and "Empty masks" in table

    out = write_report(rows, summary, tmp_path / "report")
    with open(out / "cases.csv") as f:
        assert list(csv.DictReader(f))[0]["case"] == "shifted"
    written = json.loads((out / "summary.json").read_text())
    assert written["units"] == "voxel" and written["empty_both"] == "zero"
    assert {"metric_per_case", "mean", "foreground_mean"} <= set(written)
    assert "HD95" in (out / "summary.txt").read_text()


@NEEDS_MONAI
def test_evaluate_cases_in_mm_and_errors():
    case = fake_case("aniso", PRED_CUBE, GT_CUBE, spacing=(2.0, 1.0, 1.0))
    rows, summary = evaluate_cases(Threshold(), [case], {**EVAL_CFG, "units": "mm", "hd_definition": "monai"})
    assert rows[0]["hd95"] == pytest.approx(4.0) and rows[0]["asd"] == pytest.approx(74 / 61)
    assert "mm" in summary["definition"] and "MONAI" in summary["definition"]

    with pytest.raises(ValueError, match=r"case nospacing: units='mm' needs a voxel spacing.*nospacing\.h5"):
        evaluate_cases(Threshold(), [fake_case("nospacing", PRED_CUBE, GT_CUBE)], {**EVAL_CFG, "units": "mm"})
    with pytest.raises(ValueError, match=r"missing key\(s\) \['stride_z'\]"):
        evaluate_cases(Threshold(), [case], {k: v for k, v in EVAL_CFG.items() if k != "stride_z"})
    with pytest.raises(ValueError, match="label shape"):
        evaluate_cases(Threshold(), [fake_case("bad", PRED_CUBE, GT_CUBE[:8])], EVAL_CFG)


def test_empty_both_switch_in_the_summary():
    """Two lesion-free cases predicted empty and one hit: 'zero' averages in the two zeros (as the
    released scripts), 'nan' leaves them out (as nnU-Net, whose mean is the same either way)."""
    empty = np.zeros(SHAPE)
    cases = [fake_case("clean1", empty, empty), fake_case("clean2", empty, empty),
             fake_case("hit", GT_CUBE, GT_CUBE)]
    for policy, expected in (("zero", 1 / 3), ("nan", 1.0)):
        _, summary = evaluate_cases(Threshold(), cases, {**EVAL_CFG, "empty_both": policy})
        assert summary["classes"]["1"]["dice"]["mean"] == pytest.approx(expected)
        assert summary["mean"]["1"]["Dice"] == 1.0          # nnU-Net's own mean ignores them always
        assert summary["empty_both"] == policy and "empty prediction on an empty ground truth" in summary["definition"]
    with pytest.raises(ValueError, match="empty_both"):
        evaluate_cases(Threshold(), cases, {**EVAL_CFG, "empty_both": "skip"})


def test_summary_leaves_out_undefined_distances():
    rows = [dict(case="a", **{"class": 1}, dice=0.5, jaccard=1 / 3, hd95=2.0, asd=1.0, empty=""),
            dict(case="b", **{"class": 1}, dice=0.0, jaccard=0.0, hd95=math.nan, asd=math.nan, empty="ground_truth")]
    stats = summarize(rows, EVAL_CFG)["classes"]["1"]
    assert stats["hd95"] == {"mean": 2.0, "std": 0.0, "n": 1}
    assert stats["dice"]["n"] == 2 and stats["empty_ground_truth"] == 1


def test_nifti_config_keeps_every_lesion_and_scores_as_nnunet():
    """Own data (often multi-focal lesions): no largest-component post-processing unless the
    validation says so, and lesion-free cases scored as nnU-Net scores them."""
    from dycon.config import load_config
    test = load_config("nifti")["test"]
    assert test["largest_component"] is False and test["empty_both"] == "nan"


def test_hd_monai_without_monai_fails_before_any_case(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "monai" else find_spec(name, *a))
    case = SimpleNamespace(id="never", load=lambda num_classes=None: pytest.fail("a case was loaded"))
    with pytest.raises(ImportError, match="pip install monai"):
        evaluate_cases(Threshold(), [case], {**EVAL_CFG, "hd_definition": "monai"})
