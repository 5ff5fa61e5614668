"""Data: the on-disk layouts of method.md section 4, training patches, the two-stream sampler.

    cases = list_cases({"layout": "brats", "root": "data/BraTS2019"}, "train")
    volume = cases[0].load()        # Volume(image (C, X, Y, Z) float32, label (X, Y, Z) uint8, ...)

Axis convention: volumes are ``(X, Y, Z)`` with the through-plane axis last, as in the released
code (patch 112x112x80, ``stride_z`` on the last axis). The BraTS h5 files are stored the other
way round and are transposed (2, 1, 0) on load, as the released training pipeline does; NIfTI
arrays are kept in nibabel's (i, j, k) order so the affine applies unchanged.

Layouts (``data_cfg["layout"]``):

| layout | image files | split lists |
|---|---|---|
| brats, demo | ``<root>/data/<id>.h5`` (image, label) | ``<root>/{train,val,test}.txt`` |
| la | ``<root>/<id>/mri_norm2.h5`` (image, label) | ``<root>/{train,val,test}.list`` |
| pancreas | ``<root>/Pancreas_data/<id>.h5`` (image, label) | ``<root>/{train,val,test}.list`` |
| isles | ``<root>/<id>.h5`` (image, **mask**) | ``<root>/{train,val,test}.list`` |
| nifti | ``imagesTr/<case>_0000.nii.gz`` (+ _0001 ...), ``labelsTr/<case>.nii.gz`` | ``<root>/<split>.txt``, or all of imagesTr (train) / imagesTs (test) |

Every problem with a file (unreadable, truncated, missing key, wrong shape, NaN/Inf image, label
not whole numbers in 0..255, or not below ``num_classes`` when given) raises ``DataError``, a
``ValueError`` whose message names the file and the case; a missing file ``FileNotFoundError``.

Data sets released without a validation list (LA, Pancreas) can set ``holdout_val: k`` in the
data config: the last ``k`` ids of the training list become the validation split and leave
the training split, so that model selection never sees the test list.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

SPLITS = ("train", "val", "test")

# layout -> (list file name pattern, how an id maps to its file, label key, transpose)
H5_LAYOUTS = {
    "brats": ("{split}.txt", "data/{id}.h5", "label", (2, 1, 0)),
    "demo": ("{split}.txt", "data/{id}.h5", "label", (2, 1, 0)),
    "la": ("{split}.list", "{id}/mri_norm2.h5", "label", None),
    "pancreas": ("{split}.list", "Pancreas_data/{id}.h5", "label", None),
    "isles": ("{split}.list", "{id}.h5", "mask", None),
}
LAYOUTS = tuple(H5_LAYOUTS) + ("nifti",)


class DataError(ValueError):
    """A data file that cannot be read or holds arrays unfit for training (message: file, case, problem)."""


@dataclass
class Volume:
    """One case in memory. ``label`` is None for unlabelled test images; ``affine``,
    ``spacing`` and ``header`` are only known for NIfTI inputs."""
    image: np.ndarray                      # float32 (C, X, Y, Z)
    label: Optional[np.ndarray]            # uint8 (X, Y, Z) or None
    affine: Optional[np.ndarray] = None    # 4x4
    spacing: Optional[tuple] = None
    header: Any = None
    path: str = ""


@dataclass
class Case:
    """A case on disk: ``id``, main ``path``, and ``load()`` reading it as a ``Volume``.
    ``layout`` is ``"nifti"`` or the name of an h5 layout (``"h5"`` for a lone h5 file)."""
    id: str
    path: Path
    layout: str
    label_key: Optional[str] = "label"                   # h5 label key (None: unlabelled)
    transpose: Optional[tuple] = None
    channel_paths: list = field(default_factory=list)   # NIfTI: one file per channel
    label_path: Optional[Path] = None                    # NIfTI label (None: unlabelled)

    @property
    def image_files(self) -> list:
        """The files the image is read from."""
        return list(self.channel_paths) if self.layout == "nifti" else [self.path]

    def load(self, num_classes: Optional[int] = None) -> Volume:
        """Read the case; every problem with its files raises ``DataError`` (a ``ValueError``)
        naming the file and the case, a missing file ``FileNotFoundError``. With ``num_classes``
        the label must also lie in ``0 .. num_classes - 1``."""
        if self.layout == "nifti":
            return _load_nifti(self, num_classes)
        return _load_h5(self, num_classes)


# ------------------------------------------------------------------------------- listing cases

def list_cases(data_cfg: dict, split: str) -> list[Case]:
    """The cases of ``split`` ('train' | 'val' | 'test') for the config's ``layout`` and ``root``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    for key in ("layout", "root"):
        if key not in data_cfg:
            raise ValueError(f"data config needs the key {key!r} (got keys {sorted(data_cfg)})")
    layout, root = data_cfg["layout"], Path(data_cfg["root"])
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout must be one of {LAYOUTS}, got {layout!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (data.root / --root_path)")

    holdout = int(data_cfg.get("holdout_val", 0) or 0)
    if holdout and split in ("train", "val"):
        train = _list_ids(layout, root, "train")
        if holdout >= len(train):
            raise ValueError(f"data.holdout_val={holdout} leaves no training case ({len(train)} in the list)")
        ids = train[:-holdout] if split == "train" else train[-holdout:]
    else:
        ids = _list_ids(layout, root, split)
    if layout == "nifti":
        return [_nifti_case(root, i, split) for i in ids]
    _, file_pattern, label_key, transpose = H5_LAYOUTS[layout]
    return [Case(i, root / file_pattern.format(id=i), layout, label_key, transpose) for i in ids]


def _list_ids(layout: str, root: Path, split: str) -> list[str]:
    if layout == "nifti":
        return _nifti_ids(root, split)
    path = root / H5_LAYOUTS[layout][0].format(split=split)
    ids = _read_list(path)
    if layout == "pancreas":   # the released Pancreas lists sometimes carry the extension
        ids = [i[:-3] if i.endswith(".h5") else i for i in ids]
    return ids


def _read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split list {path} is empty")
    return ids


def labelled_split(n_train: int, labelnum: int) -> tuple[list[int], list[int]]:
    """Indices of the labelled (the first ``labelnum``) and unlabelled training cases."""
    if not 1 <= labelnum <= n_train:
        raise ValueError(f"labelnum must be between 1 and the {n_train} training cases, got {labelnum}")
    return list(range(labelnum)), list(range(labelnum, n_train))


# ----------------------------------------------------------------------- checks of loaded arrays
# One small set of checks for both loaders: each is one cheap pass over the array (isfinite, min,
# max), and each error names the file, the case and the problem.

def _where(case: Case, path: Optional[Path] = None) -> str:
    return f"{path if path is not None else case.path} (case {case.id!r})"


def _check_numeric(array: np.ndarray, what: str, where: str) -> None:
    if array.dtype.kind not in "biuf":   # bool, int, uint, float
        raise DataError(f"{where}: {what} has dtype {array.dtype}, expected numbers")
    if array.size == 0:
        raise DataError(f"{where}: {what} is empty (shape {array.shape})")


def _check_image(array: np.ndarray, where: str) -> np.ndarray:
    """``array`` as float32 (integer and float64 images are converted), all values finite."""
    _check_numeric(array, "image", where)
    with np.errstate(over="ignore"):   # float64 beyond the float32 range: reported just below
        image = np.asarray(array, dtype=np.float32)
    finite = np.isfinite(image)
    if not finite.all():
        bad = image.size - int(np.count_nonzero(finite))
        hint = " (values beyond the float32 range)" if array.dtype.kind == "f" and np.isfinite(array).all() else ""
        raise DataError(f"{where}: image has {bad} NaN/Inf value(s) of {image.size}{hint}")
    return image


def _check_label(array: np.ndarray, where: str, num_classes: Optional[int] = None) -> np.ndarray:
    """``array`` as uint8: whole numbers in 0..255 (and below ``num_classes`` when given)."""
    _check_numeric(array, "label", where)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise DataError(f"{where}: label holds {int(np.count_nonzero(bad))} non-integer value(s) "
                            f"(e.g. {array[bad].flat[0]}); labels must be whole class numbers 0, 1, ...")
    low, high = array.min(), array.max()
    if low < 0:
        raise DataError(f"{where}: label has negative values (min {low}); labels must be 0, 1, ...")
    if high > 255:
        raise DataError(f"{where}: label values go up to {high}; at most 255 classes are supported (uint8)")
    if num_classes is not None and high >= num_classes:
        raise DataError(f"{where}: label values go up to {int(high)} but num_classes is {num_classes} "
                        f"(labels must be 0 .. {num_classes - 1}; check model.num_classes)")
    return np.asarray(array, dtype=np.uint8)


# ------------------------------------------------------------------------------------ h5 files

def _load_h5(case: Case, num_classes: Optional[int] = None) -> Volume:
    if not case.path.is_file():
        raise FileNotFoundError(f"case {case.id!r}: file {case.path} does not exist")
    where = _where(case)
    try:
        with h5py.File(case.path, "r") as f:
            image = _read_key(f, "image", where)
            label = _read_key(f, case.label_key, where) if case.label_key else None
    except DataError:
        raise
    except Exception as err:   # OSError for truncated or non-HDF5 files; others for corrupt objects
        raise DataError(f"{where}: cannot read as HDF5 ({type(err).__name__}: {err})") from err
    stored = image.shape
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise DataError(f"{where}: 'image' must be (X, Y, Z) or (C, X, Y, Z), got shape {stored}")
    image = _check_image(image, where)
    if case.transpose:
        image = image.transpose((0,) + tuple(a + 1 for a in case.transpose))
    if label is None:
        return Volume(np.ascontiguousarray(image), None, path=str(case.path))
    if label.ndim != 3 or label.shape != stored[-3:]:
        raise DataError(f"{where}: '{case.label_key}' must be (X, Y, Z) of the image's size; "
                        f"got {label.shape} for image {stored}")
    label = _check_label(label, where, num_classes)
    if case.transpose:
        label = label.transpose(case.transpose)
    return Volume(np.ascontiguousarray(image), np.ascontiguousarray(label), path=str(case.path))


def _read_key(f: h5py.File, key: str, where: str) -> np.ndarray:
    if key not in f:
        raise DataError(f"{where}: missing key {key!r} (keys: {sorted(f.keys())})")
    if not isinstance(f[key], h5py.Dataset):
        raise DataError(f"{where}: {key!r} is a {type(f[key]).__name__}, not an array")
    return np.asarray(f[key][()])


# ------------------------------------------------------------------------------ NIfTI folders

def _nifti_ids(root: Path, split: str) -> list[str]:
    for name in (f"{split}.txt", f"{split}.list"):
        if (root / name).is_file():
            return _read_list(root / name)
    folder = {"train": "imagesTr", "test": "imagesTs"}.get(split)
    if folder is None:
        raise FileNotFoundError(f"no {root / (split + '.txt')}: a NIfTI data set needs a list for the "
                                f"{split!r} split (or data.holdout_val)")
    if not (root / folder).is_dir():
        raise FileNotFoundError(f"no {root / (split + '.txt')} and no folder {root / folder}")
    ids = sorted(p.name[:-len("_0000.nii.gz")] for p in (root / folder).glob("*_0000.nii.gz"))
    if not ids:
        raise ValueError(f"{root / folder} holds no <case>_0000.nii.gz file")
    return ids


def _nifti_case(root: Path, case_id: str, split: str) -> Case:
    folder, label_folder = ("imagesTs", "labelsTs") if split == "test" and (root / "imagesTs").is_dir() \
        else ("imagesTr", "labelsTr")
    channels = _nifti_channel_count(root)
    paths = [root / folder / f"{case_id}_{c:04d}.nii.gz" for c in range(channels)]
    label = root / label_folder / f"{case_id}.nii.gz"
    return Case(case_id, paths[0], "nifti", channel_paths=paths,
                label_path=label if label.exists() or folder == "imagesTr" else None)


def _nifti_channel_count(root: Path) -> int:
    """Channels from dataset.json (``channel_names`` or the older ``modality``), else 1."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return 1
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path} is not valid JSON ({err})") from err
    return len(meta.get("channel_names") or meta.get("modality") or {"0": None})


def _load_nifti(case: Case, num_classes: Optional[int] = None) -> Volume:
    try:
        import nibabel as nib   # optional dependency, only needed for NIfTI data sets
    except ImportError as err:
        raise ImportError(f"case {case.id!r}: reading NIfTI files needs nibabel (pip install nibabel)") from err

    images, first = [], None
    for path in case.channel_paths:
        img, data = _read_nifti(nib, path, case, np.float32)
        where = _where(case, path)
        if data.ndim != 3:
            raise DataError(f"{where}: image must be a 3D volume, got shape {data.shape} (4D files: split the "
                            "channels into <case>_0000.nii.gz, <case>_0001.nii.gz ...)")
        if first is not None and data.shape != images[0].shape:
            raise DataError(f"{where}: channel shape {data.shape} != {images[0].shape} of {case.channel_paths[0]}")
        images.append(_check_image(data, where))
        if first is None:
            first = img
    label = None
    if case.label_path is not None:
        _, label = _read_nifti(nib, case.label_path, case)
        where = _where(case, case.label_path)
        if label.shape != images[0].shape:
            raise DataError(f"{where}: label shape {label.shape} != image shape {images[0].shape}")
        label = _check_label(label, where, num_classes)
    spacing = tuple(float(s) for s in first.header.get_zooms()[:3])
    return Volume(np.stack(images), label, affine=first.affine, spacing=spacing, header=first.header,
                  path=str(case.path))


def _read_nifti(nib, path: Path, case: Case, dtype=None):
    """(nibabel image, its whole data array): the data is read here, so that truncated files fail
    with a clear message (nibabel reads lazily and the first voxels of a cut file still decode)."""
    if not path.is_file():
        raise FileNotFoundError(f"case {case.id!r}: NIfTI file {path} does not exist")
    try:
        img = nib.load(str(path))
        return img, np.asarray(img.dataobj, dtype=dtype)
    except Exception as err:                 # nibabel raises several types for broken files
        raise DataError(f"{_where(case, path)}: cannot read as NIfTI ({type(err).__name__}: {err})") from err


# ---------------------------------------------------------------------------- training patches

def random_crop(image: np.ndarray, label: np.ndarray, patch: tuple, rng: np.random.Generator):
    """A random ``patch``-sized crop; volumes smaller than the patch are zero-padded first
    (as in the released RandomCrop, with a 3-voxel margin so that the lesion can sit anywhere)."""
    pad = [max(p - s, 0) for p, s in zip(patch, label.shape)]
    if any(pad):
        widths = [((w + 6) // 2, (w + 6) - (w + 6) // 2) if w else (0, 0) for w in pad]
        image = np.pad(image, [(0, 0)] + widths)
        label = np.pad(label, widths)
    start = [int(rng.integers(0, s - p + 1)) for s, p in zip(label.shape, patch)]
    window = tuple(slice(s, s + p) for s, p in zip(start, patch))
    return image[(slice(None),) + window], label[window]


def rot_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
    """Random rot90 in the axial (X, Y) plane and one flip along X or Y (the released RandomRotFlip).
    A patch with X != Y turns by 0 or 180 degrees only, so that it keeps its shape (the pair then
    amounts to one flip along X or Y)."""
    k, axis = int(rng.integers(0, 4)), int(rng.integers(0, 2))
    if image.shape[1] != image.shape[2]:
        k = k // 2 * 2   # same draws as a square patch: resumed and square runs see the same stream
    image = np.flip(np.rot90(image, k, axes=(1, 2)), axis=axis + 1)
    label = np.flip(np.rot90(label, k, axes=(0, 1)), axis=axis)
    return image, label


class PatchDataset(Dataset):
    """Random training patches. Items are addressed by ``(case_index, seed)`` pairs (what
    ``TwoStreamBatchSampler`` yields), so the crop and augmentation of every batch depend only
    on the sampler's position: a resumed run sees exactly the same patches."""

    def __init__(self, cases: list[Case], patch_size, augment: bool = True, cache: bool = False,
                 num_classes: Optional[int] = None):
        self.cases, self.patch, self.augment, self.cache = cases, tuple(patch_size), augment, cache
        self.num_classes = num_classes   # when given, every label must lie in 0 .. num_classes - 1
        self._volumes: dict[int, tuple] = {}

    def __len__(self) -> int:
        return len(self.cases)

    def _volume(self, index: int):
        if index in self._volumes:
            return self._volumes[index]
        vol = self.cases[index].load(self.num_classes)
        if vol.label is None:
            raise ValueError(f"training case {self.cases[index].id!r} ({vol.path}) has no label")
        if self.cache:
            self._volumes[index] = (vol.image, vol.label)
        return vol.image, vol.label

    def __getitem__(self, item):
        index, seed = item
        rng = np.random.default_rng(seed)
        image, label = self._volume(index)
        image, label = random_crop(image, label, self.patch, rng)
        if self.augment:
            image, label = rot_flip(image, label, rng)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": torch.from_numpy(np.ascontiguousarray(label)).long()}


class TwoStreamBatchSampler(Sampler):
    """Batches of ``labeled_bs`` labelled then ``unlabeled_bs`` unlabelled indices.

    One iteration (an "epoch") is one pass over a fresh shuffle of the labelled list,
    ``len(labeled) // labeled_bs`` batches; the unlabelled list is shuffled and cycled on its
    own, across epochs. Every batch is a pure function of ``(seed, batch number)``, so the
    state is just the number of batches drawn (``state_dict`` / ``load_state_dict``).
    Each index comes with a per-item seed for the crop and the augmentation.
    """

    def __init__(self, labeled: list[int], unlabeled: list[int], labeled_bs: int, unlabeled_bs: int,
                 seed: int = 0):
        if labeled_bs < 1 or len(labeled) < labeled_bs:
            raise ValueError(f"need at least labeled_bs={labeled_bs} >= 1 labelled cases, got {len(labeled)}")
        if unlabeled_bs < 0 or (unlabeled_bs and len(unlabeled) < unlabeled_bs):
            raise ValueError(f"need at least {unlabeled_bs} unlabelled cases, got {len(unlabeled)}")
        self.labeled, self.unlabeled = list(labeled), list(unlabeled)
        self.labeled_bs, self.unlabeled_bs, self.seed = labeled_bs, unlabeled_bs, seed
        self.batches = 0   # batches drawn so far, over all epochs

    def __len__(self) -> int:
        return len(self.labeled) // self.labeled_bs

    @property
    def epoch(self) -> int:
        return self.batches // len(self)

    def _stream(self, items: list[int], tag: int, start: int, count: int) -> list[int]:
        """``count`` items from position ``start`` of the stream of successive shuffles of ``items``."""
        out = []
        for pos in range(start, start + count):
            shuffle = np.random.default_rng([self.seed, tag, pos // len(items)]).permutation(len(items))
            out.append(items[shuffle[pos % len(items)]])
        return out

    def batch(self, number: int) -> list[tuple[int, int]]:
        """Batch ``number`` (0-based) as ``(index, item_seed)`` pairs."""
        per_epoch = len(self)
        epoch, within = divmod(number, per_epoch)
        # the labelled stream restarts every epoch and drops the incomplete tail, like the released sampler
        lab = self._stream(self.labeled, 0, epoch * len(self.labeled) + within * self.labeled_bs,
                           self.labeled_bs)
        unl = self._stream(self.unlabeled, 1, number * self.unlabeled_bs, self.unlabeled_bs) \
            if self.unlabeled_bs else []
        return [(i, int(np.random.default_rng([self.seed, 2, number, slot]).integers(2 ** 63)))
                for slot, i in enumerate(lab + unl)]

    def __iter__(self):
        """The rest of the current epoch (a whole one when started at an epoch boundary)."""
        end = (self.epoch + 1) * len(self)
        while self.batches < end:
            number = self.batches
            self.batches += 1
            yield self.batch(number)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("seed", self.seed) != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this sampler uses {self.seed}")
        self.batches = int(state["batches"])
