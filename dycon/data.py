"""Data: the on-disk layouts of method.md section 4 (training patches and the two-stream sampler:
``dycon.batches``).

    cases = list_cases({"layout": "brats", "root": "data/BraTS2019"}, "train")
    volume = cases[0].load()        # Volume(image (C, X, Y, Z) float32, label (X, Y, Z) uint8, ...)

Axis convention: volumes are ``(X, Y, Z)`` with the through-plane axis last, as in the released
code (patch 112x112x80, ``stride_z`` on the last axis). The BraTS h5 files are stored the other
way round and are transposed (2, 1, 0) on load, as the released training pipeline does; NIfTI
arrays are kept in nibabel's (i, j, k) order so the affine applies unchanged (``dycon.preprocess``
reorients them to RAS for the network and maps results back).

Layouts (``data_cfg["layout"]``):

| layout | image files | split lists |
|---|---|---|
| brats, demo | ``<root>/data/<id>.h5`` (image, label) | ``<root>/{train,val,test}.txt`` |
| la | ``<root>/LA_data/<id>/mri_norm2.h5`` (DyCON; UA-MT: ``2018LA_Seg_Training Set/``), or ``<root>/<id>/mri_norm2.h5`` | ``<root>/{train,val,test}.list``; root may name the data folder |
| pancreas | ``<root>/Pancreas_data/<id>.h5`` (image, label) | ``<root>/{train,val,test}.list`` |
| isles | ``<root>/<id>.h5`` (image, **mask**) | ``<root>/{train,val,test}.list`` |
| nifti | nnU-Net v2: ``imagesTr/<case>_0000<file_ending>`` (+ _0001 ...), ``labelsTr/<case><file_ending>``, ``imagesTs/``, ``labelsTs/``, ``dataset.json``; MSD: ``dataset.json`` ``training``/``test`` lists of 4-D images | ``<root>/<split>.txt``, ``splits_final.json`` with ``fold``, else imagesTr (train) / imagesTs (test) |

NIfTI training images without a label file, and the images of ``imagesUnlabelled/``, form the
unlabelled pool (split ``"unlabelled"``). A ``dataset.json`` ``ignore`` label (nnU-Net v2: the
highest value, unannotated voxels) is no class (``class_count``); its voxels become -1 in training
patches (``dycon.batches.training_label``: no loss) and are left out of every metric (``scored_voxels``). ``.nii`` / ``.nii.gz`` are read with nibabel,
``.nrrd`` / ``.mha`` / ``.mhd`` with SimpleITK (optional extra ``dycon[sitk]``). How the splits
are found, and the check that training never shares a case with val or test: ``split_ids``.

Every problem with a file (unreadable, truncated, missing key, wrong shape, NaN/Inf image, label
not whole numbers in 0..255, or not below ``num_classes`` when given) raises ``DataError``, a
``ValueError`` whose message names the file and the case; a missing file ``FileNotFoundError``.

Data sets released without a validation list (LA, Pancreas) can set ``holdout_val: k`` in the
data config: the last ``k`` ids of the training list become the validation split and leave
the training split, so that model selection never sees the test list; ``fold: k`` picks
fold ``k`` of a 5-fold cross-validation instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import h5py
import numpy as np

from dycon.config import resolve_labelnum

SPLITS = ("train", "val", "test")
UNLABELLED = "unlabelled"
NIFTI_ENDINGS = (".nii.gz", ".nii")
SITK_ENDINGS = (".nrrd", ".nhdr", ".mha", ".mhd")   # read through SimpleITK (optional extra dycon[sitk])

# layout -> (list file name pattern, how an id maps to its file, label key, transpose)
H5_LAYOUTS = {
    "brats": ("{split}.txt", "data/{id}.h5", "label", (2, 1, 0)),
    "demo": ("{split}.txt", "data/{id}.h5", "label", (2, 1, 0)),
    "la": ("{split}.list", "{id}/mri_norm2.h5", "label", None),
    "pancreas": ("{split}.list", "Pancreas_data/{id}.h5", "label", None),
    "isles": ("{split}.list", "{id}.h5", "mask", None),
}
# layouts released with the files one folder down and the lists at the top (LA: DyCON's
# <root>/LA_data/<id>/mri_norm2.h5 or UA-MT's "2018LA_Seg_Training Set", lists in <root>);
# data.root may name either level
H5_SUBFOLDERS = {"la": ("LA_data", "2018LA_Seg_Training Set")}
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
    ignore_label: Optional[int] = None     # label value of unannotated voxels: neither trained nor scored


def scored_voxels(volume) -> Optional[np.ndarray]:
    """The voxels that metrics count: all but those of the volume's ignore label (None: all)."""
    ignore = getattr(volume, "ignore_label", None)
    return None if ignore is None else volume.label != ignore


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
    channels_last: bool = False                          # MSD: one 4-D file, channels on its last axis
    channel_count: Optional[int] = None                  # channels dataset.json names (None: any)
    label_values: Optional[tuple] = None                 # label values dataset.json allows (None: any)
    ignore_label: Optional[int] = None                   # dataset.json's "ignore" label (nnU-Net v2)

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
    """The cases of ``split`` for the config's ``layout`` and ``root``: 'train' (the labelled
    training cases), 'val', 'test', or 'unlabelled' (the unlabelled pool: training images without
    a label file and ``imagesUnlabelled/``; always empty for the h5 layouts)."""
    if split not in SPLITS + (UNLABELLED,):
        raise ValueError(f"split must be one of {SPLITS + (UNLABELLED,)}, got {split!r}")
    layout, root = _layout_and_root(data_cfg)
    ids = split_ids(data_cfg)
    if ids[split] is None:
        raise FileNotFoundError(_no_split_message(layout, root, split))
    if layout == "nifti":
        return [_nifti_case(root, i, split) for i in ids[split]]
    list_dir, data_dir = _h5_dirs(layout, root)
    _, file_pattern, label_key, transpose = H5_LAYOUTS[layout]
    return [Case(i, data_dir / file_pattern.format(id=i), layout, label_key, transpose) for i in ids[split]]


def _layout_and_root(data_cfg: dict) -> tuple[str, Path]:
    for key in ("layout", "root"):
        if data_cfg.get(key) is None:
            raise ValueError(f"data.{key} is not set (config file, or --{'root_path' if key == 'root' else key})")
    layout, root = data_cfg["layout"], Path(data_cfg["root"])
    if layout not in LAYOUTS:
        raise ValueError(f"data.layout must be one of {LAYOUTS}, got {layout!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"data root {root} does not exist (data.root / --root_path)")
    return layout, root


def split_ids(data_cfg: dict) -> dict:
    """The case ids of every split, ``{'train', 'val', 'test', 'unlabelled': list of ids or None}``
    (None: the data set defines no such split). Where they come from, first match wins:

    - test: ``test.txt`` / ``test.list``; NIfTI: ``imagesTs/`` or the MSD ``test`` list.
    - train and val with ``fold: k``: fold ``k`` of ``splits_final.json`` in the root or in
      ``$nnUNet_preprocessed/<data set>/`` (nnU-Net's file), else of nnU-Net's own 5-fold split of
      the sorted labelled training ids (``crossval_folds``): fold k here is fold k there.
    - train and val with ``holdout_val: k``: the last ``k`` ids of the training list are val.
    - val: ``val.txt`` / ``val.list``.
    - train: ``train.txt`` / ``train.list``; NIfTI: every case of ``imagesTr/`` (or the MSD
      ``training`` list) that is not in val or test. NIfTI training cases without a label file
      go to 'unlabelled', with the cases of ``imagesUnlabelled/``.

    Training ids shared with val or test raise ``DataError`` naming them.
    """
    layout, root = _layout_and_root(data_cfg)
    ids = {split: _listed_ids(layout, root, split) for split in SPLITS}
    if layout == "nifti" and ids["test"] is None:
        ids["test"] = _nifti_folder_ids(root, "test")
    fold, holdout = data_cfg.get("fold"), int(data_cfg.get("holdout_val") or 0)
    if fold is not None or holdout:
        if ids["val"] is not None:
            raise ValueError(f"{root}: a val list exists and data.{'fold' if fold is not None else 'holdout_val'} "
                             "is set too; use one of them")
        pool = ids["train"] if ids["train"] is not None else _all_training_ids(layout, root, ids)
        ids["train"], ids["val"] = (_fold_split(layout, root, pool, int(fold)) if fold is not None
                                    else _holdout_split(pool, holdout))
    elif ids["train"] is None and layout == "nifti":
        ids["train"] = _all_training_ids(layout, root, ids)
    _check_disjoint(root, ids)
    ids["unlabelled"] = []
    if layout == "nifti" and ids["train"] is not None:
        labelled = [i for i in ids["train"] if _nifti_label_path(root, i, "train") is not None]
        ids["unlabelled"] = [i for i in ids["train"] if i not in set(labelled)] + _nifti_folder_ids(root, UNLABELLED)
        ids["train"] = labelled
    return ids


def _listed_ids(layout: str, root: Path, split: str) -> Optional[list[str]]:
    """The ids of a split list file, None when there is none."""
    if layout == "nifti":
        names, list_dir = (f"{split}.txt", f"{split}.list"), root
    else:
        names, list_dir = (H5_LAYOUTS[layout][0].format(split=split),), _h5_dirs(layout, root)[0]
    for name in names:
        if (list_dir / name).is_file():
            ids = _read_list(list_dir / name)
            # the released Pancreas lists sometimes carry the extension
            return [i[:-3] if layout == "pancreas" and i.endswith(".h5") else i for i in ids]
    return None


def _h5_dirs(layout: str, root: Path) -> tuple[Path, Path]:
    """(folder of the split lists, folder the file pattern starts from). A layout released with a
    data subfolder (LA: ``<root>/LA_data/<id>/mri_norm2.h5``, lists in ``<root>``) is found with
    ``root`` at either level."""
    if layout not in H5_SUBFOLDERS:
        return root, root
    subs = [root / sub for sub in H5_SUBFOLDERS[layout] if (root / sub).is_dir()]
    has_lists = lambda d: any((d / H5_LAYOUTS[layout][0].format(split=s)).is_file() for s in SPLITS)  # noqa: E731
    list_dir = root if has_lists(root) or not has_lists(root.parent) else root.parent
    return list_dir, subs[0] if subs else root


def _all_training_ids(layout: str, root: Path, ids: dict) -> list[str]:
    """Every training case of a NIfTI folder that is neither in val nor in test."""
    if layout != "nifti":
        raise FileNotFoundError(_no_split_message(layout, root, "train"))
    held_out = set(ids["val"] or []) | set(ids["test"] or [])
    return [i for i in _nifti_folder_ids(root, "train") if i not in held_out]


def _fold_split(layout: str, root: Path, pool: list[str], fold: int) -> tuple[list[str], list[str]]:
    """(train, val) ids of cross-validation fold ``fold``: nnU-Net's ``splits_final.json`` where
    there is one (``splits_file``), else nnU-Net's 5-fold split of the sorted labelled training ids
    (``crossval_folds``); images without a label file stay in every fold's training split."""
    path = splits_file(root)
    if path is not None:
        folds = _read_json(path)
        if not isinstance(folds, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in folds):
            raise ValueError(f"{path}: expected nnU-Net's format, a list of {{'train': [...], 'val': [...]}} per fold")
        source = str(path)
    else:
        labelled = sorted(i for i in pool if layout != "nifti" or _nifti_label_path(root, i, "train") is not None)
        folds = [{"train": [i for i in pool if i not in set(val)], "val": val} for val in
                 (f["val"] for f in crossval_folds(labelled))]
        source = (f"nnU-Net's {len(folds)}-fold split of the {len(labelled)} labelled training cases "
                  f"(no splits_final.json in {root} or {_preprocessed_folder(root)})")
    if not 0 <= fold < len(folds):
        raise ValueError(f"data.fold={fold} but {source} has folds 0 .. {len(folds) - 1}")
    return [str(i) for i in folds[fold]["train"]], [str(i) for i in folds[fold]["val"]]


CROSSVAL_SEED, CROSSVAL_FOLDS = 12345, 5   # nnU-Net's (nnUNetTrainer.do_split)


def crossval_folds(ids: list[str], seed: int = CROSSVAL_SEED, n_folds: int = CROSSVAL_FOLDS) -> list[dict]:
    """nnU-Net's cross-validation split, ``[{'train': [...], 'val': [...]}, ...]``: what
    ``nnunetv2.utilities.crossval_split.generate_crossval_split`` returns for the same ids, i.e.
    sklearn's ``KFold(n_folds, shuffle=True, random_state=seed)``, written out here so that
    neither is needed (tests/test_data_folders.py checks it against both). Fewer ids than folds
    give one fold per id. nnU-Net passes the ids sorted."""
    n = len(ids)
    if n < 2:
        raise ValueError(f"a cross-validation split needs at least 2 labelled training cases, got {n}")
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)   # KFold(shuffle=True): check_random_state(seed).shuffle
    k = min(n_folds, n)
    sizes = np.full(k, n // k)
    sizes[: n % k] += 1                          # KFold: the first n % k folds take one more id
    folds, start = [], 0
    for size in sizes:
        val = set(order[start:start + size].tolist())
        folds.append({"train": [ids[i] for i in range(n) if i not in val],
                      "val": [ids[i] for i in range(n) if i in val]})
        start += size
    return folds


def _preprocessed_folder(root: Path) -> Optional[Path]:
    """``$nnUNet_preprocessed/<data set folder name>``, where nnU-Net writes ``splits_final.json``."""
    base = os.environ.get("nnUNet_preprocessed")
    return Path(base) / Path(root).resolve().name if base else None


def splits_file(root: Path) -> Optional[Path]:
    """The ``splits_final.json`` that folds come from: in the data set folder, else in
    ``$nnUNet_preprocessed/<data set name>/`` where nnU-Net writes it (None: neither)."""
    preprocessed = _preprocessed_folder(root)
    for folder in (Path(root), preprocessed):
        if folder is not None and (folder / "splits_final.json").is_file():
            return folder / "splits_final.json"
    return None


def _holdout_split(pool: list[str], holdout: int) -> tuple[list[str], list[str]]:
    if holdout >= len(pool):
        raise ValueError(f"data.holdout_val={holdout} leaves no training case ({len(pool)} in the list)")
    return pool[:-holdout], pool[-holdout:]


def _check_disjoint(root: Path, ids: dict) -> None:
    for other in ("val", "test"):
        shared = sorted(set(ids["train"] or []) & set(ids[other] or []))
        if shared:
            raise DataError(f"{root}: the training split shares {len(shared)} case(s) with the {other} split: "
                            f"{shared[:10]}{' ...' if len(shared) > 10 else ''}; a case must not be both trained "
                            f"on and used for {'model selection' if other == 'val' else 'testing'} "
                            "(fix the split lists)")


def _no_split_message(layout: str, root: Path, split: str) -> str:
    if layout == "nifti":
        return (f"no {root / (split + '.txt')}: this NIfTI data set has no {split!r} split "
                f"({'no imagesTs/ folder' if split == 'test' else 'set data.fold or data.holdout_val'})")
    list_dir = _h5_dirs(layout, root)[0]
    return f"split list {list_dir / H5_LAYOUTS[layout][0].format(split=split)} does not exist"


def _read_list(path: Path) -> list[str]:
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise ValueError(f"split list {path} is empty")
    return ids


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


def labelled_split(n_train: int, labelnum: int, label_seed=None) -> tuple[list[int], list[int]]:
    """Indices of the labelled and unlabelled training cases: the first ``labelnum`` (as
    released), or with a ``label_seed`` a random draw of ``labelnum`` (the same draw for the same
    seed and list)."""
    if not 1 <= labelnum <= n_train:
        raise ValueError(f"labelnum must be between 1 and the {n_train} training cases, got {labelnum}")
    order = np.arange(n_train) if label_seed is None else np.random.default_rng(int(label_seed)).permutation(n_train)
    return sorted(int(i) for i in order[:labelnum]), sorted(int(i) for i in order[labelnum:])


def training_cases(data_cfg: dict, labelnum=None) -> tuple[list[Case], list[int], list[int]]:
    """(cases, labelled indices, unlabelled indices) for the trainer: ``labelnum`` (default
    ``data_cfg['labelnum']``; a count or a share such as '10%') labelled training cases are
    labelled (the first ones, or a draw by ``data_cfg['label_seed']``); the other labelled training cases (their labels left unused) and the
    unlabelled pool are unlabelled."""
    labelled = list_cases(data_cfg, "train")
    pool = list_cases(data_cfg, UNLABELLED)
    count = resolve_labelnum(data_cfg["labelnum"] if labelnum is None else labelnum, len(labelled))
    lab, unl = labelled_split(len(labelled), count, data_cfg.get("label_seed"))
    return labelled + pool, lab, unl + list(range(len(labelled), len(labelled) + len(pool)))


def record_splits(run_dir: Path, data_cfg: dict, cases: list[Case], labelled: list[int],
                  unlabelled: list[int]) -> Path:
    """Write ``run_dir/splits.json``: the ids trained on with and without labels, and the val and
    test ids, so that a run says exactly which cases it saw."""
    ids = split_ids(data_cfg)
    record = {"layout": data_cfg["layout"], "root": str(data_cfg["root"]), "fold": data_cfg.get("fold"),
              "labelled": [cases[i].id for i in labelled], "unlabelled": [cases[i].id for i in unlabelled],
              "val": ids["val"], "test": ids["test"]}
    path = Path(run_dir) / "splits.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


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


def _check_label(array: np.ndarray, where: str, num_classes: Optional[int] = None,
                 ignore: Optional[int] = None) -> np.ndarray:
    """``array`` as uint8: whole numbers in 0..255 (and below ``num_classes`` when given, the
    ``ignore`` label apart)."""
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
    if ignore is not None and num_classes is not None:
        high = max((v for v in np.unique(array).tolist() if v != ignore), default=0)
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
# nnU-Net v2 raw data sets (dataset.json with channel_names, labels, file_ending; one file per
# channel, <case>_0000<ending>) and Medical Segmentation Decathlon folders (dataset.json with
# training / test lists; one 4-D file per case, channels on the last axis).

FOLDERS = {"train": ("imagesTr", "labelsTr"), "val": ("imagesTr", "labelsTr"), "test": ("imagesTs", "labelsTs"),
           UNLABELLED: ("imagesUnlabelled", None)}


def dataset_meta(root: Path) -> dict:
    """The data set's ``dataset.json`` ({} when there is none)."""
    path = Path(root) / "dataset.json"
    return _read_json(path) if path.is_file() else {}


def channel_names(meta: dict) -> list[str]:
    """Channel names in order (``channel_names``, or MSD's ``modality``); one unnamed channel without."""
    names = meta.get("channel_names") or meta.get("modality") or {"0": "unknown"}
    return [str(names[k]) for k in sorted(names, key=int)]


def label_values(meta: dict) -> Optional[tuple]:
    """The label values ``dataset.json`` allows (None: no ``labels``). nnU-Net v2 maps names to
    values (a region to a list of them), MSD maps values to names."""
    labels = meta.get("labels")
    if not labels:
        return None
    if _is_msd_labels(labels):
        return tuple(sorted(int(k) for k in labels))
    values = set()
    for v in labels.values():
        values.update(v if isinstance(v, list) else [v])
    return tuple(sorted(int(v) for v in values))


def _is_msd_labels(labels: dict) -> bool:
    return all(str(k).isdigit() for k in labels)   # MSD: {"0": "background", "1": "tumour"}


def ignore_label(meta: dict) -> Optional[int]:
    """The value of nnU-Net v2's ``ignore`` label (unannotated voxels: no loss and no metric sees
    them), None without one. nnU-Net requires it to be the highest label value; so does this."""
    labels = meta.get("labels") or {}
    if _is_msd_labels(labels) or "ignore" not in labels:
        return None
    value = labels["ignore"]
    if isinstance(value, list) or not str(value).isdigit():
        raise DataError(f"dataset.json: the 'ignore' label must be one integer value, got {value!r}")
    if int(value) != max(label_values(meta)):
        raise DataError(f"dataset.json: the 'ignore' label ({value}) must be the highest label value, as nnU-Net "
                        f"requires (labels: {labels})")
    return int(value)


def class_count(meta: dict) -> Optional[int]:
    """The classes a network predicts: the labels of ``dataset.json``, its ``ignore`` label apart
    (None: no ``labels``)."""
    values, ignore = label_values(meta), ignore_label(meta)
    return None if values is None else max(v for v in values if v != ignore) + 1


def _is_msd(meta: dict) -> bool:
    return isinstance(meta.get("training"), list)


def _file_ending(root: Path, meta: dict) -> str:
    """``file_ending`` of dataset.json, else the ending of the files in imagesTr / imagesTs."""
    if meta.get("file_ending"):
        return meta["file_ending"]
    for ending in NIFTI_ENDINGS + SITK_ENDINGS:
        if any(any((root / d).glob(f"*_0000{ending}")) for d in ("imagesTr", "imagesTs") if (root / d).is_dir()):
            return ending
    return ".nii.gz"


def _strip(name: str, ending: str) -> str:
    return name[:-len(ending)] if name.endswith(ending) else name


def _nifti_folder_ids(root: Path, split: str) -> Optional[list[str]]:
    """The ids of every case in the split's image folder (None when there is no such folder)."""
    meta = dataset_meta(root)
    if _is_msd(meta) and split in ("train", "test"):
        entries = meta["training"] if split == "train" else meta.get("test") or []
        return [_msd_id(e["image"] if isinstance(e, dict) else e) for e in entries] or None
    folder = root / FOLDERS[split][0]
    if not folder.is_dir():
        if split == "train":
            raise FileNotFoundError(f"{folder} does not exist: a NIfTI data set needs imagesTr/ (or a train.txt)")
        return [] if split == UNLABELLED else None
    ending = _file_ending(root, meta)
    if _is_msd(meta):   # imagesUnlabelled of an MSD folder: one file per case
        return sorted(_strip(p.name, ending) for p in folder.glob(f"*{ending}"))
    ids = sorted(p.name[:-len("_0000" + ending)] for p in folder.glob(f"*_0000{ending}"))
    if not ids and split == "train":
        raise ValueError(f"{folder} holds no <case>_0000{ending} file (file_ending {ending!r})")
    return ids if ids or split == UNLABELLED else None


def _nifti_label_path(root: Path, case_id: str, split: str) -> Optional[Path]:
    """The case's label file, None when it has none."""
    meta = dataset_meta(root)
    if _is_msd(meta) and split != UNLABELLED:
        for e in meta["training"]:
            if isinstance(e, dict) and e.get("label") and _msd_id(e["image"]) == case_id:
                return root / e["label"]
    label_folder = FOLDERS[split][1]
    if label_folder is None:
        return None
    path = root / label_folder / f"{case_id}{_file_ending(root, meta)}"
    return path if path.is_file() else None


def _msd_id(image: str) -> str:
    return Path(image).name.removesuffix(".gz").removesuffix(".nii")


def _msd_image(root: Path, meta: dict, case_id: str, split: str) -> Path:
    """The 4-D image file of an MSD case: as dataset.json lists it, else in the split's folder."""
    for e in meta["training"] + (meta.get("test") or []):
        image = e["image"] if isinstance(e, dict) else e
        if _msd_id(image) == case_id and split != UNLABELLED:
            return root / image
    return root / FOLDERS[split][0] / f"{case_id}{_file_ending(root, meta)}"


def _nifti_case(root: Path, case_id: str, split: str) -> Case:
    """The case's files; a channel file missing raises ``DataError`` naming the case and the files."""
    meta = dataset_meta(root)
    names, allowed = channel_names(meta), label_values(meta)
    ending = _file_ending(root, meta)
    folder = root / FOLDERS[split][0]
    if split == UNLABELLED and (root / "imagesTr" / f"{case_id}_0000{ending}").is_file():
        folder = root / "imagesTr"   # a training image without a label file
    if _is_msd(meta):
        paths = [_msd_image(root, meta, case_id, split)]
    else:
        paths = [folder / f"{case_id}_{c:04d}{ending}" for c in range(len(names))]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"case {case_id!r}: {len(missing)} of its {len(paths)} image file(s) are missing: {missing} "
                        f"(dataset.json names the channels {names})")
    label = _nifti_label_path(root, case_id, split)
    if label is None and split in ("train", "val"):   # val cases need a label; 'train' lists labelled ones
        label = root / FOLDERS[split][1] / f"{case_id}{ending}"
    return Case(case_id, paths[0], "nifti", channel_paths=paths, label_path=label,
                channels_last=_is_msd(meta), channel_count=len(names), label_values=allowed,
                ignore_label=ignore_label(meta))


def _load_nifti(case: Case, num_classes: Optional[int] = None) -> Volume:
    channels, first = [], None
    for path in case.channel_paths:
        data, affine, header = _read_image(path, case, np.float32)
        where = _where(case, path)
        if case.channels_last and data.ndim == 4:   # MSD: all channels in one file
            parts = [data[..., c] for c in range(data.shape[-1])]
        elif data.ndim == 3:
            parts = [data]
        else:
            raise DataError(f"{where}: image must be a 3D volume, got shape {data.shape} (4D files: split the "
                            "channels into <case>_0000.nii.gz, <case>_0001.nii.gz ...)")
        if first is None:
            first = (path, affine, header, parts[0].shape)
        else:
            _check_same_grid(first[0], first[3], first[1], path, parts[0].shape, affine, case, "channel")
        channels += [_check_image(p, where) for p in parts]
    if case.channel_count and len(channels) != case.channel_count:
        raise DataError(f"{_where(case)}: {len(channels)} channel(s) in {[str(p) for p in case.channel_paths]}, "
                        f"dataset.json names {case.channel_count}")
    label = None
    if case.label_path is not None:
        label, affine, _ = _read_image(case.label_path, case)
        _check_same_grid(first[0], first[3], first[1], case.label_path, label.shape, affine, case, "label")
        where = _where(case, case.label_path)
        label = _check_label(label, where, num_classes, case.ignore_label)
        _check_label_values(label, case.label_values, where)
    path, affine, header, _ = first
    return Volume(np.stack(channels), label, affine=affine, spacing=voxel_spacing(affine, header),
                  header=header, path=str(case.path), ignore_label=case.ignore_label)


def voxel_spacing(affine: np.ndarray, header=None) -> tuple:
    """Voxel size along the array axes: the header's zooms for NIfTI, else the affine's column norms."""
    zooms = header.get_zooms()[:3] if header is not None else np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(0))
    return tuple(float(z) for z in zooms)


# an image and its label may differ by rounding in the stored affine; more is a different grid
AFFINE_TOLERANCE = 1e-3


def _check_same_grid(ref_path, ref_shape, ref_affine, path, shape, affine, case: Case, what: str) -> None:
    if ref_shape != shape:
        raise DataError(f"{_where(case, path)}: {what} shape {shape} != image shape {ref_shape} of {ref_path}")
    diff = np.abs(np.asarray(affine) - np.asarray(ref_affine)).max()
    if diff > AFFINE_TOLERANCE:
        raise DataError(f"{_where(case, path)}: {what} affine differs from the image's ({ref_path}) by up to "
                        f"{diff:.4g} (mm): the two are not on the same grid.\n{what} affine:\n{np.round(affine, 4)}\n"
                        f"image affine:\n{np.round(ref_affine, 4)}")


def _check_label_values(label: np.ndarray, allowed: Optional[tuple], where: str) -> None:
    if allowed is None:
        return
    extra = sorted(set(np.unique(label).tolist()) - set(allowed))
    if extra:
        raise DataError(f"{where}: label values {extra} are not among dataset.json's labels {list(allowed)}")


def _read_image(path: Path, case: Case, dtype=None) -> tuple:
    """(whole data array, 4x4 RAS affine, NIfTI header or None) of one image file. The data is read
    here, so that truncated files fail with a clear message (nibabel reads lazily and the first
    voxels of a cut file still decode)."""
    if not path.is_file():
        raise FileNotFoundError(f"case {case.id!r}: image file {path} does not exist")
    if path.name.endswith(NIFTI_ENDINGS):
        try:
            import nibabel as nib   # optional dependency, only needed for NIfTI data sets
        except ImportError as err:
            raise ImportError(f"case {case.id!r}: reading NIfTI files needs nibabel (pip install nibabel)") from err
        try:
            img = nib.load(str(path))
            return np.asarray(img.dataobj, dtype=dtype), img.affine, img.header
        except Exception as err:                 # nibabel raises several types for broken files
            raise DataError(f"{_where(case, path)}: cannot read as NIfTI ({type(err).__name__}: {err})") from err
    if path.name.endswith(SITK_ENDINGS):
        return _read_sitk(path, case, dtype)
    raise DataError(f"{_where(case, path)}: unsupported file type (expected {NIFTI_ENDINGS + SITK_ENDINGS})")


def _read_sitk(path: Path, case: Case, dtype=None) -> tuple:
    try:
        import SimpleITK as sitk
    except ImportError as err:
        raise ImportError(f"case {case.id!r}: reading {path.name} needs SimpleITK, an optional extra: "
                          "pip install dycon[sitk] (or convert the files to NIfTI)") from err
    try:
        img = sitk.ReadImage(str(path))
        data = sitk.GetArrayFromImage(img)   # (z, y, x) or (z, y, x, components)
    except Exception as err:
        raise DataError(f"{_where(case, path)}: cannot read with SimpleITK ({type(err).__name__}: {err})") from err
    data = np.moveaxis(data, (0, 1, 2), (2, 1, 0)) if data.ndim >= 3 else data
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(img.GetDirection()).reshape(3, 3) @ np.diag(img.GetSpacing())
    affine[:3, 3] = img.GetOrigin()
    # ITK's physical space is LPS, NIfTI's RAS
    return np.asarray(data, dtype=dtype), np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine, None
