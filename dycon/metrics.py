"""Per-case metrics for binary masks: Dice, Jaccard, HD95, ASD.

The semi-supervised literature (UA-MT, SSL4MIS, DyCON) reports ``medpy.metric.binary`` values;
the defaults here reproduce them without depending on medpy:

- surface of a mask = ``mask XOR binary_erosion(mask)`` with medpy's structuring element,
  ``generate_binary_structure(ndim, 1)`` (face neighbours: 6 in 3D); voxels outside the array
  count as background, so a mask touching the array border has surface there;
- ``d(A -> B)`` = Euclidean distance from each surface voxel of A to the nearest surface voxel of
  B (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``);
- HD95, ``definition='medpy'``: 95th percentile (numpy's linear interpolation) of
  ``d(pred -> gt)`` and ``d(gt -> pred)`` pooled into one set (medpy ``hd95``);
- ASD = mean of ``d(pred -> gt)`` (medpy ``asd``);
- ``definition='monai'`` computes both with MONAI itself (``compute_hausdorff_distance(
  percentile=95)``: the larger of the two directed 95th percentiles; ``compute_average_surface_distance(
  symmetric=False)``); it needs ``pip install monai`` (``dycon[monai]``);
- units: voxels when ``spacing`` is None, else the unit of ``spacing`` (mm for NIfTI).
tests/test_metrics.py checks the medpy definition against medpy and both against MONAI on random
masks and anisotropic spacings.

``hd95`` and ``asd`` raise on an empty mask, as medpy does. ``case_metrics`` applies the
empty-mask policy of the released test scripts instead (``empty_policy``), with an empty
prediction on an empty ground truth scored 0 (``empty_both='zero'``, the released scripts) or
NaN and left out of the means (``'nan'``, nnU-Net). ``nnunet_case_metrics`` gives nnU-Net's own
per-case entry (TP, FP, FN, TN, Dice, IoU) for its ``summary.json`` layout.
"""
from __future__ import annotations

import importlib.util
import math
from typing import Sequence

import numpy as np

# scipy.ndimage (up to half a second to import on a busy machine) is imported by the functions that
# use it: the commands that import this module answer --help and usage errors without it

HD_DEFINITIONS = ("medpy", "monai")
METRICS = ("dice", "jaccard", "hd95", "asd")

EMPTY_BOTH = ("zero", "nan")   # an empty prediction on an empty ground truth: the released scripts', nnU-Net's


def empty_policy(empty_both: str = "zero") -> str:
    """The empty-mask rules ``case_metrics`` applies, in words, for reports."""
    _check_empty_both(empty_both)
    both = ("all four 0, as the released test scripts score it" if empty_both == "zero" else
            "all four NaN, left out of the means and counted, as nnU-Net scores it")
    return ("empty prediction on a non-empty ground truth: Dice = Jaccard = HD95 = ASD = 0 (released test "
            "scripts); non-empty prediction on an empty ground truth: Dice = Jaccard = 0, HD95 and ASD undefined "
            f"(NaN, left out of the means and counted); empty prediction on an empty ground truth: {both}")


def _check_empty_both(empty_both: str) -> None:
    if empty_both not in EMPTY_BOTH:
        raise ValueError(f"empty_both must be one of {EMPTY_BOTH}, got {empty_both!r}")


def _as_bool_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction and ground truth shapes differ: {pred.shape} vs {gt.shape}")
    return pred, gt


def _check_spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...] | None:
    if spacing is None:
        return None
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing must be {ndim} positive numbers (one per array axis), got {spacing}")
    return spacing


def dice(pred, gt) -> float:
    """``2 |P & G| / (|P| + |G|)``; 0 when both masks are empty (medpy ``dc``)."""
    pred, gt = _as_bool_pair(pred, gt)
    total = pred.sum() + gt.sum()
    return float(2.0 * np.logical_and(pred, gt).sum() / total) if total else 0.0


def jaccard(pred, gt) -> float:
    """``|P & G| / |P | G|``; 0 when both masks are empty."""
    pred, gt = _as_bool_pair(pred, gt)
    union = np.logical_or(pred, gt).sum()
    return float(np.logical_and(pred, gt).sum() / union) if union else 0.0


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=structure)


def _crop_to_union(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union.

    Exact, not an approximation: outside that box both masks are background, which is what
    erosion assumes beyond the array border, and the Euclidean distance transform measures to
    the nearest surface voxel wherever the array ends. It makes full-size volumes cheap.
    """
    from scipy import ndimage

    box = ndimage.find_objects(np.logical_or(pred, gt).astype(np.uint8))[0]
    return pred[box], gt[box]


def _check_not_empty(a: np.ndarray, b: np.ndarray) -> None:
    for name, mask in (("first", a), ("second", b)):
        if not mask.any():
            raise ValueError(f"surface distances need non-empty masks; the {name} mask is empty")


def surface_distances(a, b, spacing: Sequence[float] | None = None) -> np.ndarray:
    """``d(a -> b)``: distance from every surface voxel of ``a`` to the nearest one of ``b``."""
    a, b = _as_bool_pair(a, b)
    _check_not_empty(a, b)
    spacing = _check_spacing(spacing, a.ndim)
    a, b = _crop_to_union(a, b)
    from scipy import ndimage

    # the transform measures distance to the nearest zero, hence the inverted surface of b
    distance_to_b = ndimage.distance_transform_edt(~_surface(b), sampling=spacing)
    return distance_to_b[_surface(a)]


def _check_definition(definition: str) -> None:
    if definition not in HD_DEFINITIONS:
        raise ValueError(f"hd_definition must be one of {HD_DEFINITIONS}, got {definition!r}")


MONAI_MISSING = ("hd_definition='monai' (--hd monai) computes HD95 and ASD with MONAI, which is not installed: "
                 "pip install monai (or dycon[monai]), or use --hd medpy")


def check_hd_available(definition: str) -> None:
    """Fail before any work when ``definition`` needs a library that is not installed."""
    _check_definition(definition)
    if definition == "monai" and importlib.util.find_spec("monai") is None:
        raise ImportError(MONAI_MISSING)


def _monai_distances(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[float, float]:
    """(HD95, ASD) computed by MONAI itself, for ``definition='monai'``."""
    try:
        from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance
    except ImportError as err:
        raise ImportError(MONAI_MISSING) from err
    import torch
    y_pred, y = (torch.from_numpy(np.ascontiguousarray(m))[None, None] for m in (pred, gt))
    kwargs = dict(include_background=True, spacing=None if spacing is None else list(spacing))
    hd = compute_hausdorff_distance(y_pred, y, percentile=95, **kwargs)
    mean = compute_average_surface_distance(y_pred, y, symmetric=False, **kwargs)
    return float(hd.item()), float(mean.item())


def hd95(pred, gt, spacing: Sequence[float] | None = None, definition: str = "medpy") -> float:
    """95th-percentile Hausdorff distance (module docstring: the two definitions)."""
    _check_definition(definition)
    pred, gt = _as_bool_pair(pred, gt)
    if definition == "monai":
        _check_not_empty(pred, gt)
        return _monai_distances(pred, gt, _check_spacing(spacing, pred.ndim))[0]
    return float(np.percentile(np.concatenate([surface_distances(pred, gt, spacing),
                                               surface_distances(gt, pred, spacing)]), 95))


def asd(pred, gt, spacing: Sequence[float] | None = None) -> float:
    """Average surface distance from the prediction to the ground truth (medpy ``asd``)."""
    return float(surface_distances(pred, gt, spacing).mean())


def case_metrics(pred, gt, spacing: Sequence[float] | None = None, hd_definition: str = "medpy",
                 empty_both: str = "zero", scored=None) -> dict:
    """Dice, Jaccard, HD95 and ASD of one case, with the empty-mask policy ``empty_policy(empty_both)``.

    ``scored``: the voxels that count (None: all); an ``ignore`` label's voxels are left out of
    both masks, as nnU-Net leaves them out of its counts. Returns ``{"dice", "jaccard", "hd95",
    "asd", "empty"}`` where ``empty`` is ``""``, ``"prediction"``, ``"ground_truth"`` or
    ``"both"`` so that reports can count those cases.
    """
    pred, gt = _scored_pair(pred, gt, scored)
    _check_definition(hd_definition)
    _check_empty_both(empty_both)
    if not pred.any() and not gt.any():
        value = 0.0 if empty_both == "zero" else math.nan
        return dict(dice=value, jaccard=value, hd95=value, asd=value, empty="both")
    if not pred.any():
        # The released test scripts score a missed case 0 on all four (HD95 = 0 flatters a miss;
        # the "empty" column lets a report show how often it happened).
        return dict(dice=0.0, jaccard=0.0, hd95=0.0, asd=0.0, empty="prediction")
    if not gt.any():
        return dict(dice=0.0, jaccard=0.0, hd95=math.nan, asd=math.nan, empty="ground_truth")
    if hd_definition == "monai":
        distance, mean = _monai_distances(pred, gt, _check_spacing(spacing, pred.ndim))
    else:
        d_pred_gt = surface_distances(pred, gt, spacing)
        distance = float(np.percentile(np.concatenate([d_pred_gt, surface_distances(gt, pred, spacing)]), 95))
        mean = float(d_pred_gt.mean())
    return dict(dice=dice(pred, gt), jaccard=jaccard(pred, gt), hd95=distance, asd=mean, empty="")


def _scored_pair(pred, gt, scored) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = _as_bool_pair(pred, gt)
    if scored is None:
        return pred, gt
    scored = np.asarray(scored, dtype=bool)
    if scored.shape != pred.shape:
        raise ValueError(f"scored mask shape {scored.shape} differs from the masks' {pred.shape}")
    return pred & scored, gt & scored


NNUNET_METRICS = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def nnunet_case_metrics(pred, gt, scored=None) -> dict:
    """nnU-Net's per-case entry for one label (``nnunetv2.evaluation.evaluate_predictions.
    compute_metrics``): voxel counts outside the ignored voxels, Dice and IoU from them, NaN when
    the label is in neither mask (nnU-Net leaves such cases out of its means)."""
    pred, gt = _as_bool_pair(pred, gt)
    use = np.ones_like(gt) if scored is None else np.asarray(scored, dtype=bool)
    tp, fp = int((pred & gt & use).sum()), int((pred & ~gt & use).sum())
    fn, tn = int((~pred & gt & use).sum()), int((~pred & ~gt & use).sum())
    hit = tp + fp + fn
    return {"Dice": 2 * tp / (2 * tp + fp + fn) if hit else math.nan, "IoU": tp / hit if hit else math.nan,
            "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}
