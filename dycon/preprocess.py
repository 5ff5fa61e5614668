"""Preprocessing of NIfTI data sets as nnU-Net v2 does it, recorded in the run and inverted for output.

    python -m dycon.preprocess --root_path DATA [--fold K] [--labelnum N|P%] [--target_spacing nnunet|median|off|X Y Z]

A *fingerprint* is computed once from the labelled training cases (those trained with labels),
as nnU-Net's ``DatasetFingerprintExtractor``: their spacings and shapes (in RAS axis order), the
shapes after cropping to the non-zero region (``nonzero_box``) and the median share of the image
that crop keeps, and per channel statistics of foreground intensities (mean, std, 0.5 / 99.5
percentiles of 10^8 / cases voxels a case, drawn with replacement, ``foreground_samples``). The
*plan* made from it says what training, evaluation and prediction do to every image, in this order:

1. reorient to RAS (``nibabel.orientations``: axes permuted and flipped, no interpolation; an
   oblique affine goes to its closest RAS axes, as nnU-Net and nibabel's ``as_closest_canonical``);
2. normalise each channel by the scheme its ``channel_names`` entry picks (``normalize``):
   ``CT`` clips to the fingerprint's 0.5 / 99.5 foreground percentiles and subtracts / divides by
   the foreground mean / std; ``noNorm`` leaves it; anything else (MRI) is z-scored, inside the
   non-zero region only (the rest 0) when cropping to it keeps less than 3/4 of the median
   image, else over the whole crop box, as nnU-Net's planner decides. The teacher's input noise
   (sigma 0.1) is then in units of the intensity spread, whatever the scanner's units;
3. resample to the target spacing (default ``nnunet``: the median spacing, but the 10th
   percentile for an axis much coarser than the others, ``target_spacing``), with nnU-Net's
   resampling (``resample``): cubic for images, each label linearly then the largest for labels,
   and on a grid more than 3 times coarser along one axis that axis apart with nearest neighbours.

Where nnunetv2 is installed, its own functions do the resampling, the foreground sampling and
the target spacing; elsewhere ours, which tests/test_nnunet_preprocessing.py checks to give the
same numbers. What still differs from nnU-Net: docs/nnunet_conventions.md.

Predictions are mapped back: class probabilities are resampled (linear, as nnU-Net exports them)
to the RAS grid and reoriented to the input's own axis order, so that the label map has the
input's shape and affine. The h5 layouts are stored preprocessed already and get no plan.

The fingerprint and plan are written to the run folder (``fingerprint.json``,
``preprocessing.json``) and kept in the run's config (``data.preprocessing``), so that
evaluation and prediction apply the same plan. Preprocessed arrays are cached under
``data.cache_dir`` (default ``<root>/dycon_preprocessed``), one folder per plan.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from dycon import cli
from dycon.data import (Case, Volume, channel_names, class_count, dataset_meta, list_cases, record_splits,
                        split_ids, training_cases)

# scipy.ndimage (up to half a second to import on a busy machine) is imported by the functions that
# use it: the commands that import this module answer --help and usage errors without it

log = logging.getLogger("dycon.preprocess")

PLAN_VERSION = 2                   # 2: nnU-Net's resampling, target spacing and z-score region (issue 22)
FOREGROUND_SAMPLES = 10e7          # nnU-Net's foreground intensities of a fingerprint, shared out over the cases
PATCH_BUDGET = 112 * 112 * 80      # voxels of a patch chosen to fit: the released LA patch
PATCH_MAX = 128                    # largest patch side chosen to fit
PATCH_MIN = 32                     # smallest: the bottleneck keeps 2 voxels a side (instance norm needs > 1)
NET_STRIDE = 16                    # the networks halve the input four times
ANISOTROPY = 3.0                   # spacing ratio above which nnU-Net resamples the coarse axis apart


# ------------------------------------------------------------------------------- geometry

def _orientation(volume: Volume, case_id: str) -> np.ndarray:
    """nibabel orientation taking the volume's array axes to RAS."""
    from nibabel.orientations import io_orientation
    if volume.affine is None:
        raise ValueError(f"case {case_id!r} ({volume.path}): this model's preprocessing reorients by the "
                         "image's affine, which h5 files do not have; give the NIfTI image")
    return io_orientation(volume.affine)


def _reorient(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """``array`` (C, X, Y, Z) with its spatial axes reoriented by ``ornt``."""
    from nibabel.orientations import apply_orientation
    return np.ascontiguousarray(np.moveaxis(apply_orientation(np.moveaxis(array, 0, -1), ornt), -1, 0))


def _undo_orientation(array: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    from nibabel.orientations import axcodes2ornt, ornt_transform
    return _reorient(array, ornt_transform(axcodes2ornt("RAS"), ornt))


def ras_spacing(volume: Volume, ornt: np.ndarray) -> list[float]:
    """The voxel spacing along the RAS-reoriented array's axes."""
    spacing = [0.0] * 3
    for axis, (target, _) in enumerate(ornt):
        spacing[int(target)] = float(volume.spacing[axis])
    return spacing


def resampled_shape(shape, spacing, target_spacing) -> list[int]:
    """nnU-Net's ``compute_new_shape``: ``round(spacing / target * n)`` per axis."""
    if target_spacing is None:
        return list(shape)
    return [max(1, int(round(s / t * n))) for n, s, t in zip(shape, spacing, target_spacing)]


# ---------------------------------------------------------------------- nnU-Net's resampling
# nnU-Net's default plans: images cubic, labels linear per label then argmax, probabilities
# linear; on an anisotropic grid the coarse axis is resampled apart with nearest neighbours.
# Where nnunetv2 is installed its own function runs; elsewhere ours, which tests/
# test_nnunet_preprocessing.py checks to be equal to it.

def _nnunet_resampling():
    try:
        from nnunetv2.preprocessing.resampling import default_resampling
    except ImportError:
        return None
    return default_resampling


def resample(array: np.ndarray, shape, spacing, new_spacing, is_seg: bool, order: int) -> np.ndarray:
    """``array`` (C, X, Y, Z) to the spatial ``shape`` as nnU-Net's ``resample_data_or_seg_to_shape``
    (``order_z=0``, ``force_separate_z=None``) does it; the output keeps the input's dtype."""
    nnunet = _nnunet_resampling()
    if nnunet is not None:
        return nnunet.resample_data_or_seg_to_shape(array, shape, spacing, new_spacing, is_seg=is_seg, order=order,
                                                    order_z=0, force_separate_z=None)
    return resample_like_nnunet(array, shape, spacing, new_spacing, is_seg, order)


def separate_z_axis(spacing, new_spacing) -> Optional[int]:
    """nnU-Net's ``determine_do_sep_z_and_axis`` (``force_separate_z=None``): the axis resampled
    apart, the one coarsest axis of the first grid (old, else new) more than ``ANISOTROPY`` times
    coarser than its finest; None when neither grid is that anisotropic or two axes tie."""
    for grid in (np.asarray(spacing, float), np.asarray(new_spacing, float)):
        if grid.max() / grid.min() > ANISOTROPY:
            coarse = np.where(grid.max() / grid == 1)[0]
            return int(coarse[0]) if len(coarse) == 1 else None
    return None


def resample_like_nnunet(array: np.ndarray, shape, spacing, new_spacing, is_seg: bool, order: int) -> np.ndarray:
    """nnU-Net's resampling written with scipy alone (skimage's ``resize`` is ``ndimage.zoom`` in
    grid mode, clipped to the input's range)."""
    from scipy import ndimage

    shape = tuple(int(n) for n in shape)
    if tuple(array.shape[1:]) == shape:
        return array
    axis = separate_z_axis(spacing, new_spacing)
    resize = _resize_segmentation if is_seg else _resize
    out = np.zeros((array.shape[0], *shape), dtype=array.dtype)
    for c, channel in enumerate(array.astype(float)):
        if axis is None:
            out[c] = resize(channel, shape, order)
            continue
        in_plane = [n for a, n in enumerate(shape) if a != axis]
        slices = [resize(np.take(channel, i, axis), in_plane, order) for i in range(channel.shape[axis])]
        stacked = np.stack(slices, axis)
        # the coarse axis: nearest neighbour at nnU-Net's sample points (align_corners=False)
        coords = np.mgrid[tuple(slice(0, n) for n in shape)].astype(float)
        for a in range(3):
            coords[a] = stacked.shape[a] / shape[a] * (coords[a] + 0.5) - 0.5
        out[c] = ndimage.map_coordinates(stacked, coords, order=0, mode="nearest")
    return out


def _resize(x: np.ndarray, shape, order: int) -> np.ndarray:
    """skimage ``resize(x, shape, order, mode='edge', anti_aliasing=False)`` (clip=True)."""
    from scipy import ndimage

    factors = [1 / (o / n) for o, n in zip(x.shape, shape)]   # as skimage computes them
    out = ndimage.zoom(x, factors, order=order, mode="nearest", grid_mode=True)
    return np.clip(out, x.min(), x.max(), out=out)


def _resize_segmentation(seg: np.ndarray, shape, order: int) -> np.ndarray:
    """batchgenerators' ``resize_segmentation``: each label's indicator resized, then the label
    with the largest value; a tie goes to the nearest-neighbour label where it is among the tied
    ones, else to the lowest tied label."""
    if order == 0:
        return _resize(seg, shape, 0)
    labels = np.unique(seg)
    if len(labels) == 1:
        return np.full(shape, labels[0], dtype=seg.dtype)
    scores = np.stack([_resize((seg == c).astype(float), shape, order) for c in labels])
    best, winner = scores.max(0), scores.argmax(0)
    nearest = np.searchsorted(labels, _resize(seg, shape, 0))
    nearest_score = np.take_along_axis(scores, nearest[None], 0)[0]
    winner = np.where((nearest_score == best) & (nearest_score > 0), nearest, winner)
    return labels[winner].astype(seg.dtype)


# ------------------------------------------------------------------------------ fingerprint

def nonzero_box(image: np.ndarray) -> tuple[np.ndarray, tuple]:
    """nnU-Net's ``crop_to_nonzero``: the non-zero voxels of any channel with holes filled, and
    their bounding box (slices; the whole image when it is all zero)."""
    from scipy import ndimage

    mask = ndimage.binary_fill_holes((image != 0).any(0))
    box = ndimage.find_objects(mask.astype(np.uint8))
    return mask, box[0] if box else tuple(slice(0, n) for n in mask.shape)


def foreground_samples(label: np.ndarray, image: np.ndarray, count: int) -> list[np.ndarray]:
    """Per channel, ``count`` intensities drawn with replacement from the voxels with label > 0, as
    nnU-Net's ``DatasetFingerprintExtractor.collect_foreground_intensities`` draws them (its own
    function where nnunetv2 is installed)."""
    try:
        from nnunetv2.experiment_planning.dataset_fingerprint.fingerprint_extractor import \
            DatasetFingerprintExtractor
    except ImportError:
        return _foreground_samples_like_nnunet(label, image, count)
    samples, _ = DatasetFingerprintExtractor.collect_foreground_intensities(label[None], image, num_samples=count)
    return [np.asarray(s, dtype=image.dtype) for s in samples]


def _foreground_samples_like_nnunet(label: np.ndarray, image: np.ndarray, count: int) -> list[np.ndarray]:
    rs, mask = np.random.RandomState(1234), label > 0   # one generator for all channels, as nnU-Net's
    return [rs.choice(channel[mask], count, replace=True) if mask.any() else np.empty(0, channel.dtype)
            for channel in image]


def foreground_sample_count() -> float:
    """``FOREGROUND_SAMPLES``, or ``$DYCON_FOREGROUND_SAMPLES`` where set (less memory: 4 bytes a
    draw and channel; the statistics then differ from nnU-Net's by sampling noise)."""
    value = os.environ.get("DYCON_FOREGROUND_SAMPLES")
    try:
        return FOREGROUND_SAMPLES if value is None else float(value)
    except ValueError:
        raise ValueError(f"DYCON_FOREGROUND_SAMPLES must be a number, got {value!r}") from None


def fingerprint(cases: list[Case]) -> dict:
    """nnU-Net's data set fingerprint of ``cases`` (labelled training cases: a case without a
    label is an error): spacings and shapes (RAS axis order), shapes after cropping to the
    non-zero region and the median share of the image that crop keeps, and per channel the
    statistics of ``foreground_sample_count()`` foreground intensities, shared out over the cases."""
    if not cases:
        raise ValueError("the fingerprint needs at least one labelled training case")
    spacings, shapes, cropped, samples = [], [], [], []
    for case in cases:
        volume = case.load()
        if volume.label is None:
            raise ValueError(f"case {case.id!r}: the fingerprint is computed from labelled cases only")
        ornt = _orientation(volume, case.id)
        image, label = _reorient(volume.image, ornt), _reorient(volume.label[None], ornt)[0]
        spacings.append(ras_spacing(volume, ornt))
        shapes.append(list(label.shape))
        _, box = nonzero_box(image)
        cropped.append([s.stop - s.start for s in box])
        samples.append(foreground_samples(label, image, int(foreground_sample_count() // len(cases))))
    per_channel = [np.concatenate([case[c] for case in samples]) for c in range(len(samples[0]))]
    if per_channel[0].size == 0:
        raise ValueError(f"no foreground voxel (label > 0) in the {len(cases)} labelled cases")
    return {"cases": [c.id for c in cases], "spacings": spacings, "shapes": shapes, "shapes_after_crop": cropped,
            "median_relative_size_after_cropping": float(np.median([np.prod(c) / np.prod(s)
                                                                    for c, s in zip(cropped, shapes)])),
            "median_spacing": np.median(spacings, 0).tolist(), "median_shape": np.median(shapes, 0).tolist(),
            "foreground_intensity": [_stats(s) for s in per_channel]}


def _stats(values: np.ndarray) -> dict:
    """nnU-Net's intensity statistics of a channel's samples (computed in their own dtype, as there)."""
    low, median, high = np.percentile(values, (0.5, 50.0, 99.5))
    return {"mean": float(np.mean(values)), "median": float(median), "std": float(np.std(values)),
            "min": float(np.min(values)), "max": float(np.max(values)),
            "percentile_99_5": float(high), "percentile_00_5": float(low)}


def target_spacing(fp: dict) -> list[float]:
    """nnU-Net's full-resolution target spacing (``ExperimentPlanner.determine_fullres_target_spacing``,
    its own where nnunetv2 is installed): the median spacing, except that an axis both more than
    ``ANISOTROPY`` times coarser than the others and with that many times fewer voxels takes the
    10th percentile of its spacings (but not finer than the other axes)."""
    try:
        from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    except ImportError:
        return _target_spacing_like_nnunet(fp)
    planner = SimpleNamespace(overwrite_target_spacing=None, anisotropy_threshold=ANISOTROPY,
                              dataset_fingerprint={k: fp[k] for k in ("spacings", "shapes_after_crop")})
    return [float(t) for t in ExperimentPlanner.determine_fullres_target_spacing(planner)]


def _target_spacing_like_nnunet(fp: dict) -> list[float]:
    spacings = np.vstack(fp["spacings"])
    target, size = np.percentile(spacings, 50, 0), np.percentile(np.vstack(fp["shapes_after_crop"]), 50, 0)
    worst = int(np.argmax(target))
    others = [a for a in range(len(target)) if a != worst]
    other_spacing, other_size = max(target[a] for a in others), min(size[a] for a in others)
    if target[worst] > ANISOTROPY * other_spacing and size[worst] * ANISOTROPY < other_size:
        coarse = np.percentile(spacings[:, worst], 10)
        target[worst] = max(other_spacing, coarse) + 1e-5 if coarse < other_spacing else coarse
    return [float(t) for t in target]


TARGET_SPACINGS = ("nnunet", "median")


def make_plan(fp: dict, meta: dict, target="nnunet") -> dict:
    """The plan (see the module doc) from a fingerprint and the data set's ``dataset.json``.
    ``target``: ``"nnunet"`` (``target_spacing``), ``"median"``, None (no resampling) or three
    spacings in RAS order. Z-scored channels are standardised inside the non-zero region only
    when cropping to it keeps less than 3/4 of the median image, as nnU-Net decides it."""
    names = channel_names(meta)
    if len(names) != len(fp["foreground_intensity"]):
        raise ValueError(f"dataset.json names {len(names)} channels, the images have {len(fp['foreground_intensity'])}")
    spacing = _resolve_target(fp, target)
    median_shape = resampled_shape(fp["median_shape"], fp["median_spacing"], spacing)
    use_mask = fp.get("median_relative_size_after_cropping", 1.0) < 3 / 4
    return {"version": PLAN_VERSION, "orientation": "RAS",
            "target_spacing": None if spacing is None else [float(t) for t in spacing],
            "normalization": [_scheme(n, s, use_mask) for n, s in zip(names, fp["foreground_intensity"])],
            "channel_names": names, "in_channels": len(names), "num_classes": class_count(meta),
            "patch_size": suggest_patch_size(median_shape)}


def _resolve_target(fp: dict, target) -> Optional[list]:
    if target is None:
        return None
    if target in TARGET_SPACINGS:
        return target_spacing(fp) if target == "nnunet" else fp["median_spacing"]
    if isinstance(target, str) or len(target) != 3 or min(target) <= 0:
        raise ValueError(f"target_spacing must be one of {TARGET_SPACINGS}, null or three positive numbers, "
                         f"got {target!r}")
    return list(target)


def _scheme(name: str, stats: dict, use_mask: bool) -> dict:
    if name.lower() == "ct":
        return {"scheme": "ct", "lower": stats["percentile_00_5"], "upper": stats["percentile_99_5"],
                "mean": stats["mean"], "std": stats["std"]}
    return {"scheme": "none"} if name.lower() == "nonorm" else {"scheme": "zscore", "use_mask": use_mask}


def suggest_patch_size(median_shape) -> list[int]:
    """A patch covering the median case (sides multiples of 16, 32 to 128) within
    ``PATCH_BUDGET`` voxels: the longest side shrinks first."""
    patch = [min(PATCH_MAX, max(PATCH_MIN, -(-int(s) // NET_STRIDE) * NET_STRIDE)) for s in median_shape]
    while np.prod(patch) > PATCH_BUDGET and max(patch) > PATCH_MIN:
        patch[int(np.argmax(patch))] -= NET_STRIDE
    return patch


def plan_key(plan: dict) -> str:
    """Short hash naming a plan's cache folder (what is done to the images, not the fingerprint)."""
    return hashlib.sha1(json.dumps(_without_fingerprint(plan), sort_keys=True).encode()).hexdigest()[:12]


# ----------------------------------------------------------------------------- applying a plan

def normalize(image: np.ndarray, schemes: list[dict], label: Optional[np.ndarray] = None) -> np.ndarray:
    """Each channel of ``image`` (C, X, Y, Z) normalised by its scheme as nnU-Net's normalisation
    classes do it, in float32: ``ct`` clipped and standardised by the fingerprint's statistics;
    ``zscore`` standardised by the mean and std of the non-zero region (``use_mask``: there only,
    the rest left 0) or of the box cropping to it (else, applied to the whole image); ``none`` as
    it is. ``label`` (training) adds its labelled voxels to the region, as nnU-Net's ``seg >= 0``."""
    if len(schemes) != image.shape[0]:
        raise ValueError(f"the plan normalises {len(schemes)} channel(s), the image has {image.shape[0]}")
    mask, box = nonzero_box(image)
    if label is not None:
        inside = np.zeros_like(mask)
        inside[box] = True
        mask = mask | ((label != 0) & inside)
    out = np.array(image, dtype=np.float32)
    for x, scheme in zip(out, schemes):
        if scheme["scheme"] == "ct":
            np.clip(x, scheme["lower"], scheme["upper"], out=x)
            x -= scheme["mean"]
            x /= max(scheme["std"], 1e-8)
        elif scheme["scheme"] == "zscore" and scheme.get("use_mask", True):
            values = x[mask]
            x[mask] = (values - values.mean()) / max(values.std(), 1e-8)
        elif scheme["scheme"] == "zscore":
            region = x[box]
            mean, std = region.mean(), region.std()
            x -= mean
            x /= max(std, 1e-8)
    return out


def apply_plan(volume: Volume, plan: dict, case_id: str = "") -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """(image, label or None, geometry) preprocessed by ``plan``; ``geometry`` is what
    ``to_input_grid`` needs to map a result back."""
    ornt = _orientation(volume, case_id)
    label = None if volume.label is None else _reorient(volume.label[None], ornt)
    image = normalize(_reorient(volume.image, ornt), plan["normalization"], None if label is None else label[0])
    spacing = ras_spacing(volume, ornt)
    target = plan["target_spacing"] or spacing
    shape = resampled_shape(image.shape[1:], spacing, target)
    if label is not None:   # nnU-Net's label resampling: each label linearly, then the largest
        label = resample(label, shape, spacing, target, is_seg=True, order=1)[0]
    geometry = {"ornt": ornt.tolist(), "ras_shape": list(image.shape[1:]), "ras_spacing": spacing,
                "target_spacing": list(target)}
    return resample(image, shape, spacing, target, is_seg=False, order=3).astype(np.float32), label, geometry


def to_input_grid(probs: np.ndarray, geometry: dict) -> np.ndarray:
    """Class probabilities (K, ...) on the preprocessed grid, back on the input's grid."""
    # nnU-Net's export: probabilities resampled linearly from the plan's spacing to the case's
    target = geometry.get("target_spacing", geometry["ras_spacing"])
    probs = resample(probs, geometry["ras_shape"], target, geometry["ras_spacing"], is_seg=False, order=1)
    return _undo_orientation(probs, np.asarray(geometry["ornt"]))


def predict_labels(model, volume: Volume, settings: dict, case_id: str = "") -> np.ndarray:
    """The label map of ``volume`` on its own grid: preprocessed by ``settings['preprocessing']``
    (None: as it is), sliding-window inference, probabilities mapped back, thresholded.
    ``settings``: patch_size, stride_xy, stride_z, num_classes, largest_component, device, batch_size."""
    import torch   # here: the commands that import this module parse their arguments without torch

    from dycon.inference import probabilities_to_labels, segment, sliding_window_inference

    s, plan = settings, settings.get("preprocessing")
    if plan is None:
        return segment(model, volume.image, s["patch_size"], s["stride_xy"], s["stride_z"], s["num_classes"],
                       s["largest_component"], s["device"], s["batch_size"])
    image, _, geometry = apply_plan(volume, plan, case_id)
    tensor = torch.from_numpy(image)[None].to(s["device"])
    probs = sliding_window_inference(model, tensor, s["patch_size"], s["stride_xy"], s["stride_z"],
                                     s["num_classes"], s["batch_size"])
    probs = to_input_grid(probs.cpu().numpy(), geometry)
    return probabilities_to_labels(torch.from_numpy(probs), s["largest_component"])


class PreprocessedCase:
    """A ``Case`` whose ``load()`` gives the preprocessed volume, cached as ``<cache>/<id>.npz``
    (recomputed when a source file changed)."""

    def __init__(self, case: Case, plan: dict, cache_dir: Optional[Path]):
        self.case, self.plan, self.id, self.path = case, plan, case.id, case.path
        self.cache = None if cache_dir is None else Path(cache_dir) / f"{case.id}.npz"

    def _signature(self) -> str:
        files = list(self.case.image_files) + ([self.case.label_path] if self.case.label_path else [])
        return json.dumps([[str(f), f.stat().st_mtime_ns, f.stat().st_size] for f in files])

    def load(self, num_classes: Optional[int] = None) -> Volume:
        signature = self._signature()
        if self.cache is not None and self.cache.is_file():
            with np.load(self.cache) as f:
                if str(f["signature"]) == signature:
                    label = f["label"] if f["labelled"] else None
                    ignore = self.case.ignore_label
                    if label is not None and num_classes is not None and label[label != ignore].max(initial=0) >= num_classes:
                        return self._fresh(num_classes, signature)   # raises the loader's error
                    return Volume(f["image"], label, path=str(self.path), ignore_label=ignore)
        return self._fresh(num_classes, signature)

    def _fresh(self, num_classes, signature: str) -> Volume:
        image, label, _ = apply_plan(self.case.load(num_classes), self.plan, self.id)
        if self.cache is not None:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            # written whole, then renamed: never half a file, also with several processes at it
            tmp = self.cache.with_name(f"{self.id}.{os.getpid()}.tmp.npz")
            np.savez(tmp, image=image, label=label if label is not None else np.zeros(0, np.uint8),
                     labelled=label is not None, signature=signature)
            tmp.replace(self.cache)
        return Volume(image, label, path=str(self.path), ignore_label=self.case.ignore_label)


# ------------------------------------------------------------------------ the run's plan

def prepare(data_cfg: dict, labelled: list[Case], run_dir: Optional[Path] = None) -> Optional[dict]:
    """The plan for this data set, made once: from ``data_cfg['preprocessing']`` (a resumed run,
    a checkpoint's config) or from a fingerprint of the ``labelled`` cases, which the plan keeps
    under ``fingerprint``. Stores the plan in ``data_cfg['preprocessing']`` and writes it to
    ``run_dir`` (``write_record``). None for the h5 layouts (preprocessed already)."""
    if data_cfg["layout"] != "nifti":
        return None
    if data_cfg.get("preprocessing") is None:
        fp = fingerprint(labelled)
        plan = make_plan(fp, dataset_meta(Path(data_cfg["root"])), data_cfg.get("target_spacing", "nnunet"))
        data_cfg["preprocessing"] = dict(plan, fingerprint=fp)
    if run_dir is not None:
        write_record(run_dir, data_cfg["preprocessing"])
    return data_cfg["preprocessing"]


def _without_fingerprint(plan: dict) -> dict:
    return {k: v for k, v in plan.items() if k != "fingerprint"}


def write_record(folder: Path, plan: dict) -> None:
    """``fingerprint.json`` and ``preprocessing.json`` (the plan) in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if "fingerprint" in plan:
        (folder / "fingerprint.json").write_text(json.dumps(plan["fingerprint"], indent=1) + "\n")
    (folder / "preprocessing.json").write_text(json.dumps(_without_fingerprint(plan), indent=1) + "\n")


def configure(cfg: dict) -> None:
    """Before training: for a NIfTI data set, the plan from the labelled training cases (kept in
    ``cfg['data']['preprocessing']``, so that the run's config.yaml and checkpoints carry it), then
    the config's ``auto`` values from it."""
    if cfg["data"]["layout"] == "nifti" and cfg["data"].get("preprocessing") is None:
        cases, labelled, _ = training_cases(cfg["data"])
        prepare(cfg["data"], [cases[i] for i in labelled])
    apply_auto(cfg, cfg["data"].get("preprocessing"))


def training_data(cfg: dict, run_dir: Optional[Path]) -> tuple[list, list[int], list[int]]:
    """The trainer's (cases, labelled indices, unlabelled indices), preprocessed by the plan;
    the splits (``splits.json``) and the plan are recorded in ``run_dir`` (None: not written)."""
    cases, labelled, unlabelled = training_cases(cfg["data"])
    pool = [cases[i].id for i in unlabelled if cases[i].label_path is None and cases[i].layout == "nifti"]
    if pool and cfg["train"]["preset"] == "official" and cfg["train"]["method"] == "dycon":
        raise ValueError(f"preset 'official' takes the FeCL patch labels of unlabelled volumes from their ground "
                         f"truth, which the {len(pool)} images without a label file ({pool[:5]} ...) do not "
                         "have; use --preset dycon")
    if run_dir is not None:
        record_splits(run_dir, cfg["data"], cases, labelled, unlabelled)
        prepare(cfg["data"], [cases[i] for i in labelled], run_dir)
    return wrap(cases, cfg["data"]), labelled, unlabelled


def cache_dir(data_cfg: dict, plan: dict) -> Path:
    base = data_cfg.get("cache_dir") or Path(data_cfg["root"]) / "dycon_preprocessed"
    return Path(base) / plan_key(plan)


def wrap(cases: list[Case], data_cfg: dict) -> list:
    """``cases`` preprocessed by the config's plan (as they are without one)."""
    plan = data_cfg.get("preprocessing")
    if plan is None:
        return cases
    return [PreprocessedCase(c, plan, cache_dir(data_cfg, plan)) for c in cases]


def apply_auto(cfg: dict, plan: Optional[dict]) -> None:
    """Config values ``auto`` from the plan: model.in_channels, model.num_classes, train.patch_size;
    then val / test stride_xy and stride_z (half the patch, so that windows overlap)."""
    for section, key in (("model", "in_channels"), ("model", "num_classes"), ("train", "patch_size")):
        if cfg[section].get(key) != "auto":
            continue
        value = None if plan is None else plan.get(key)
        if value is None:
            raise ValueError(f"{section}.{key} is 'auto' but the data set does not say it "
                             "(NIfTI data sets with a dataset.json do; set it in the config)")
        cfg[section][key] = value
    patch = cfg["train"]["patch_size"]
    halves = {"stride_xy": max(1, min(patch[:2]) // 2), "stride_z": max(1, patch[2] // 2)}
    for section in ("val", "test"):
        for key, value in halves.items():
            if cfg.get(section, {}).get(key) == "auto":
                cfg[section][key] = value


# ------------------------------------------------------------------------------ command line

PROG = "python -m dycon.preprocess"


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(PROG, description=__doc__.split("\n")[0])
    p.add_argument("--root_path", required=True, help="NIfTI data set folder (nnU-Net or MSD)")
    p.add_argument("--fold", type=int, help="cross-validation fold (splits_final.json, else nnU-Net's 5-fold split)")
    p.add_argument("--labelnum", default="100%",
                   help="labelled cases, a count or a share such as 20%% (default: all with a label file); "
                        "the training run's --labelnum and --fold give its plan, so that it finds this cache")
    p.add_argument("--target_spacing", nargs="+", default=["nnunet"],
                   help="'nnunet' (nnU-Net's rule), 'median', 'off' or three spacings")
    p.add_argument("--cache_dir", help="default: ROOT/dycon_preprocessed")
    p.add_argument("--output", help="folder for fingerprint.json and preprocessing.json (default: the cache)")
    return p


def _target(values: list[str]):
    if len(values) == 1 and values[0] in TARGET_SPACINGS + ("off",):
        return None if values[0] == "off" else values[0]
    return [float(v) for v in values]


def main(argv=None) -> Path:
    """Compute the plan and cache every training, unlabelled and validation case."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data_cfg = {"layout": "nifti", "root": args.root_path, "fold": args.fold, "cache_dir": args.cache_dir,
                "target_spacing": _target(args.target_spacing), "labelnum": args.labelnum}
    cases, lab, _ = training_cases(data_cfg)
    plan = prepare(data_cfg, [cases[i] for i in lab])
    folder = cache_dir(data_cfg, plan)
    write_record(args.output or folder, plan)
    val = list_cases(data_cfg, "val") if split_ids(data_cfg)["val"] is not None else []
    for case in wrap(cases + val, data_cfg):
        case.load()
        log.info("%s -> %s", case.id, case.cache)
    log.info("plan %s: %s", folder.name, json.dumps(_without_fingerprint(plan)))
    return folder


def console_main() -> None:
    """The dycon-preprocess command (setup.py's console scripts)."""
    cli.run(main, PROG)


if __name__ == "__main__":
    console_main()
