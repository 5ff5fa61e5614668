"""Preprocessing of NIfTI data sets as nnU-Net does it, recorded in the run and inverted for output.

    python -m dycon.preprocess --root_path DATA [--fold K] [--labelnum N|P%] [--target_spacing median|off|X Y Z]

A *fingerprint* is computed once from the labelled training cases (those trained with labels):
their spacings and shapes (in RAS axis order) and, per channel, statistics of the intensities
under the foreground label (mean, std, 0.5 / 99.5 percentiles, from at most 10,000 voxels per
case, as nnU-Net samples them). The *plan* made from it says what training, evaluation and
prediction do to every image, in this order:

1. reorient to RAS (``nibabel.orientations``: axes permuted and flipped, no interpolation; an
   oblique affine goes to its closest RAS axes, as nnU-Net and nibabel's ``as_closest_canonical``);
2. normalise each channel by the scheme its ``channel_names`` entry picks: ``CT`` clips to the
   fingerprint's 0.5 / 99.5 foreground percentiles and subtracts / divides by the foreground mean
   / std; ``noNorm`` leaves it; anything else (MRI) is z-scored over the case's non-zero region
   (voxels outside it are 0). The teacher's input noise (sigma 0.1) is then in units of the
   intensity spread, whatever the scanner's units;
3. resample to the target spacing (default: the median spacing; cubic for images, nearest for
   labels, ``scipy.ndimage.zoom``; on a grid more than 3 times coarser along one axis, that axis
   is resampled apart with nearest neighbours, as nnU-Net's "separate z").

Predictions are mapped back: class probabilities are resampled (linear) to the RAS grid and
reoriented to the input's own axis order, so that the label map has the input's shape and
affine. The h5 layouts are stored preprocessed already and get no plan.

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
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from dycon import cli
from dycon.data import (Case, Volume, channel_names, class_count, dataset_meta, list_cases, record_splits,
                        split_ids, training_cases)
from dycon.inference import probabilities_to_labels, segment, sliding_window_inference

log = logging.getLogger("dycon.preprocess")

PLAN_VERSION = 1
FOREGROUND_SAMPLES = 10_000        # per case, as nnU-Net's fingerprint
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


def _resample(array: np.ndarray, shape, order: int, spacing) -> np.ndarray:
    """Each channel of ``array`` (C, X, Y, Z) resampled to the spatial ``shape``. On an anisotropic
    grid (``spacing`` ratio above ``ANISOTROPY``) the coarse axis is resampled on its own with
    nearest neighbours, as nnU-Net does: interpolating across thick slices invents structure."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    factors = [n / o for n, o in zip(shape, array.shape[1:])]
    coarse = int(np.argmax(spacing)) if max(spacing) > ANISOTROPY * min(spacing) else None
    passes = [(factors, order)] if coarse is None or order == 0 else \
        [([1.0 if a == coarse else f for a, f in enumerate(factors)], order),
         ([f if a == coarse else 1.0 for a, f in enumerate(factors)], 0)]
    for step, step_order in passes:
        array = np.stack([ndimage.zoom(c, step, order=step_order, mode="nearest") for c in array])
    assert array.shape[1:] == tuple(shape), (array.shape, shape)   # zoom rounds shape * factor: exact here
    return array


def resampled_shape(shape, spacing, target_spacing) -> list[int]:
    if target_spacing is None:
        return list(shape)
    return [max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing)]


# ------------------------------------------------------------------------------ fingerprint

def fingerprint(cases: list[Case]) -> dict:
    """Spacings, shapes (RAS order) and per-channel foreground intensity statistics of ``cases``
    (labelled training cases: a case without a label is an error)."""
    if not cases:
        raise ValueError("the fingerprint needs at least one labelled training case")
    spacings, shapes, samples = [], [], None
    for case in cases:
        volume = case.load()
        if volume.label is None:
            raise ValueError(f"case {case.id!r}: the fingerprint is computed from labelled cases only")
        ornt = _orientation(volume, case.id)
        spacings.append(ras_spacing(volume, ornt))
        shapes.append(list(_reorient(volume.label[None], ornt).shape[1:]))
        values = volume.image[:, volume.label > 0]
        if values.shape[1] > FOREGROUND_SAMPLES:
            keep = np.random.default_rng(1234).choice(values.shape[1], FOREGROUND_SAMPLES, replace=False)
            values = values[:, np.sort(keep)]
        samples = values if samples is None else np.concatenate([samples, values], 1)
    if samples.shape[1] == 0:
        raise ValueError(f"no foreground voxel (label > 0) in the {len(cases)} labelled cases")
    return {"cases": [c.id for c in cases], "spacings": spacings, "shapes": shapes,
            "median_spacing": np.median(spacings, 0).tolist(), "median_shape": np.median(shapes, 0).tolist(),
            "foreground_intensity": [_stats(s) for s in samples]}


def _stats(values: np.ndarray) -> dict:
    values = values.astype(np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), "median": float(np.median(values)),
            "percentile_00_5": float(np.percentile(values, 0.5)),
            "percentile_99_5": float(np.percentile(values, 99.5))}


def make_plan(fp: dict, meta: dict, target_spacing="median") -> dict:
    """The plan (see the module doc) from a fingerprint and the data set's ``dataset.json``.
    ``target_spacing``: ``"median"``, None (no resampling) or three spacings in RAS order."""
    names = channel_names(meta)
    if len(names) != len(fp["foreground_intensity"]):
        raise ValueError(f"dataset.json names {len(names)} channels, the images have {len(fp['foreground_intensity'])}")
    target = fp["median_spacing"] if target_spacing == "median" else target_spacing
    if target is not None and (len(target) != 3 or min(target) <= 0):
        raise ValueError(f"target_spacing must be 'median', null or three positive numbers, got {target_spacing!r}")
    median_shape = resampled_shape(fp["median_shape"], fp["median_spacing"], target)
    return {"version": PLAN_VERSION, "orientation": "RAS",
            "target_spacing": None if target is None else [float(t) for t in target],
            "normalization": [_scheme(n, s) for n, s in zip(names, fp["foreground_intensity"])],
            "channel_names": names, "in_channels": len(names),
            "num_classes": class_count(meta),
            "patch_size": suggest_patch_size(median_shape)}


def _scheme(name: str, stats: dict) -> dict:
    if name.lower() == "ct":
        return {"scheme": "ct", "lower": stats["percentile_00_5"], "upper": stats["percentile_99_5"],
                "mean": stats["mean"], "std": stats["std"]}
    return {"scheme": "none" if name.lower() == "nonorm" else "zscore"}


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

def normalize(image: np.ndarray, schemes: list[dict]) -> np.ndarray:
    """Each channel of ``image`` (C, X, Y, Z) normalised by its scheme (see the module doc)."""
    if len(schemes) != image.shape[0]:
        raise ValueError(f"the plan normalises {len(schemes)} channel(s), the image has {image.shape[0]}")
    nonzero = (image != 0).any(0)
    region = nonzero if nonzero.any() else np.ones_like(nonzero)
    out = np.empty_like(image, dtype=np.float32)
    for c, scheme in enumerate(schemes):
        x = image[c].astype(np.float64)
        if scheme["scheme"] == "ct":
            x = (np.clip(x, scheme["lower"], scheme["upper"]) - scheme["mean"]) / max(scheme["std"], 1e-8)
        elif scheme["scheme"] == "zscore":
            values = x[region]
            x = np.where(region, (x - values.mean()) / max(values.std(), 1e-8), 0.0)
        out[c] = x
    return out


def apply_plan(volume: Volume, plan: dict, case_id: str = "") -> tuple[np.ndarray, Optional[np.ndarray], dict]:
    """(image, label or None, geometry) preprocessed by ``plan``; ``geometry`` is what
    ``to_input_grid`` needs to map a result back."""
    ornt = _orientation(volume, case_id)
    image = normalize(_reorient(volume.image, ornt), plan["normalization"])
    spacing = ras_spacing(volume, ornt)
    shape = resampled_shape(image.shape[1:], spacing, plan["target_spacing"])
    label = None
    if volume.label is not None:
        label = _resample(_reorient(volume.label[None], ornt), shape, 0, spacing)[0]
    geometry = {"ornt": ornt.tolist(), "ras_shape": list(image.shape[1:]), "ras_spacing": spacing}
    return _resample(image, shape, 3, spacing).astype(np.float32), label, geometry


def to_input_grid(probs: np.ndarray, geometry: dict) -> np.ndarray:
    """Class probabilities (K, ...) on the preprocessed grid, back on the input's grid."""
    probs = _resample(probs, geometry["ras_shape"], 1, geometry["ras_spacing"])
    return _undo_orientation(probs, np.asarray(geometry["ornt"]))


def predict_labels(model, volume: Volume, settings: dict, case_id: str = "") -> np.ndarray:
    """The label map of ``volume`` on its own grid: preprocessed by ``settings['preprocessing']``
    (None: as it is), sliding-window inference, probabilities mapped back, thresholded.
    ``settings``: patch_size, stride_xy, stride_z, num_classes, largest_component, device, batch_size."""
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
        plan = make_plan(fp, dataset_meta(Path(data_cfg["root"])), data_cfg.get("target_spacing", "median"))
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
    p.add_argument("--target_spacing", nargs="+", default=["median"], help="'median', 'off' or three spacings")
    p.add_argument("--cache_dir", help="default: ROOT/dycon_preprocessed")
    p.add_argument("--output", help="folder for fingerprint.json and preprocessing.json (default: the cache)")
    return p


def _target(values: list[str]):
    if values in (["median"], ["off"]):
        return "median" if values == ["median"] else None
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


if __name__ == "__main__":
    cli.run(main, PROG)
