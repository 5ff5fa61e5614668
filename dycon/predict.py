"""Segment image files with a trained model.

    python -m dycon.predict --checkpoint PATH | --run RUN_DIR --input FILE_OR_DIR --output DIR
        [--weights student|teacher] [--stride_xy 16 --stride_z 4] [--no-largest-component]
        [--h5] [--device cpu]

Strides and post-processing default to the run's ``test`` config, else to the released test
script's (16, 4, largest component).

Inputs (a file, or every such file in a folder):

- NIfTI (``.nii``, ``.nii.gz``), one 3D file per channel named nnU-Net style
  ``<case>_0000.nii.gz``, ``<case>_0001.nii.gz`` ...; a file without the ``_XXXX`` suffix is a
  single-channel case. Output: ``<case>.nii.gz``, uint8 labels with the input's affine and
  header (same array order, so it overlays the input in any viewer).
- HDF5 (``.h5``) with the key ``image``, ``(X, Y, Z)`` or ``(C, X, Y, Z)``, oriented as the
  training data set stores it (the checkpoint's data layout says whether to transpose, as
  training did). Output: ``<case>.nii.gz`` with an **identity affine** (h5 files carry no
  geometry), or with ``--h5`` ``<case>.h5`` holding the key ``prediction``; either way the
  array has the input's shape.

Images must be preprocessed (intensity normalisation) the way the training data were.
"""
from __future__ import annotations

import argparse
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from dycon.data import H5_LAYOUTS, check_image
from dycon.evaluate import add_model_args, load_model, resolve_checkpoint, run_settings
from dycon.inference import segment

log = logging.getLogger("dycon.predict")

CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass
class InputCase:
    id: str
    kind: str            # 'nifti' or 'h5'
    paths: list[Path]    # NIfTI: one file per channel, in channel order


def _nifti_case_key(path: Path) -> tuple[str, int]:
    """(case id, channel index) of a NIfTI file name."""
    match = CHANNEL_FILE.match(path.name)
    if match:
        return match["case"], int(match["channel"])
    return re.sub(r"\.nii(\.gz)?$", "", path.name), 0


def _is_nifti(path: Path) -> bool:
    return path.name.endswith(NIFTI_SUFFIXES)


def find_inputs(path: str | Path) -> list[InputCase]:
    """The cases in a file (with its sibling channel files) or a folder (not recursive)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        if path.suffix == ".h5":
            return [InputCase(path.name[:-3], "h5", [path])]
        if not _is_nifti(path):
            raise ValueError(f"input {path}: unsupported file type (expected .nii, .nii.gz or .h5)")
        case_id = _nifti_case_key(path)[0]
        files = [p for p in path.parent.iterdir() if _is_nifti(p) and _nifti_case_key(p)[0] == case_id]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and (_is_nifti(p) or p.suffix == ".h5"))
        if not files:
            raise ValueError(f"input folder {path} holds no .nii, .nii.gz or .h5 file")
    return _group(files)


def _group(files: list[Path]) -> list[InputCase]:
    channels: dict[str, dict[int, Path]] = {}
    cases: dict[str, InputCase] = {}
    for f in files:
        case_id, channel = (f.name[:-3], 0) if f.suffix == ".h5" else _nifti_case_key(f)
        if channel in channels.setdefault(case_id, {}):
            raise ValueError(f"case {case_id!r}: both {channels[case_id][channel]} and {f} map to channel {channel}")
        channels[case_id][channel] = f
        kind = "h5" if f.suffix == ".h5" else "nifti"
        if cases.setdefault(case_id, InputCase(case_id, kind, [])).kind != kind:
            raise ValueError(f"case {case_id!r}: both a .h5 and NIfTI files in the input")
    for case_id, found in channels.items():
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"case {case_id!r}: channel files must be numbered _0000 to _{len(found) - 1:04d}, "
                             f"found {sorted(found)} ({[str(p) for p in found.values()]})")
        cases[case_id].paths = [found[c] for c in range(len(found))]
    return [cases[k] for k in sorted(cases)]


def _read_nifti(path: Path):
    import nibabel as nib   # optional dependency, only needed for NIfTI files

    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as err:   # nibabel raises several types for truncated or foreign files
        raise ValueError(f"cannot read NIfTI file {path} ({type(err).__name__}: {err})") from err
    return img, check_image(data, str(path))


def read_nifti_case(case: InputCase):
    """(image (C, X, Y, Z) float32, reference nibabel image of channel 0)."""
    images, reference = [], None
    for path in case.paths:
        img, data = _read_nifti(path)
        if reference is None:
            reference = img
        if data.ndim != 3 or data.shape != reference.shape:
            raise ValueError(f"case {case.id!r}: {path} has shape {data.shape}; every channel must be a 3D "
                             f"volume of shape {reference.shape} (4D files: split the channels into "
                             "<case>_0000.nii.gz, <case>_0001.nii.gz ...)")
        images.append(data)
    return np.stack(images), reference


def read_h5_image(path: Path) -> np.ndarray:
    """The ``image`` array of an h5 file as (C, X, Y, Z) float32, in the file's axis order."""
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise ValueError(f"{path}: no key 'image' (keys: {sorted(f.keys())})")
            image = f["image"][()]
    except OSError as err:   # h5py raises OSError for truncated or non-HDF5 files
        raise ValueError(f"cannot read {path} as HDF5 ({err})") from err
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"{path}: 'image' must be (X, Y, Z) or (C, X, Y, Z), got shape {image.shape}")
    return check_image(image, str(path))


def write_nifti(labels: np.ndarray, path: Path, reference=None) -> None:
    """uint8 NIfTI; with ``reference`` (a nibabel image) its affine and header, else identity."""
    import nibabel as nib

    if reference is None:
        img = nib.Nifti1Image(labels.astype(np.uint8), np.eye(4))
    else:
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        # labels are stored as is: no intensity scaling inherited from the image
        header.set_slope_inter(1, 0)
        img = type(reference)(labels.astype(np.uint8), reference.affine, header)
    nib.save(img, str(path))


def _h5_transpose(config: dict):
    """The axis order training applied to h5 volumes of this data layout (None: as stored)."""
    layout = config.get("data", {}).get("layout")
    return H5_LAYOUTS[layout][3] if layout in H5_LAYOUTS else None


def predict_case(model, case: InputCase, output_dir: Path, pred_cfg: dict, h5_out: bool = False) -> Path:
    """Segment one case and write it; returns the output path."""
    reference, transpose = None, None
    if case.kind == "nifti":
        image, reference = read_nifti_case(case)
    else:
        image = read_h5_image(case.paths[0])
        transpose = pred_cfg["h5_transpose"]
        if transpose:
            image = image.transpose((0, *(a + 1 for a in transpose)))
    if image.shape[0] != pred_cfg["in_channels"]:
        raise ValueError(f"case {case.id!r}: {image.shape[0]} channel(s) in {[str(p) for p in case.paths]}, "
                         f"the model takes {pred_cfg['in_channels']}")
    labels = segment(model, image, pred_cfg["patch_size"], pred_cfg["stride_xy"], pred_cfg["stride_z"],
                     pred_cfg["num_classes"], pred_cfg["largest_component"], pred_cfg["device"],
                     pred_cfg["batch_size"])
    if transpose:
        labels = labels.transpose(np.argsort(transpose))   # back to the file's axis order
    return _write_prediction(labels, case, output_dir, reference, h5_out)


def _write_prediction(labels: np.ndarray, case: InputCase, output_dir: Path, reference, h5_out: bool) -> Path:
    out = output_dir / f"{case.id}{'.h5' if h5_out and case.kind == 'h5' else '.nii.gz'}"
    if out.resolve() in {p.resolve() for p in case.paths}:
        raise ValueError(f"output {out} would overwrite its input; choose another --output folder")
    if out.suffix == ".h5":
        with h5py.File(out, "w") as f:
            f.create_dataset("prediction", data=labels.astype(np.uint8), compression="gzip")
    else:
        if case.kind == "h5":
            log.info("%s: h5 input has no geometry; writing %s with an identity affine", case.id, out.name)
        write_nifti(labels, out, reference)
    return out


def _parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dycon.predict", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--input", required=True, help="a .nii/.nii.gz/.h5 file or a folder of them")
    p.add_argument("--output", required=True, help="folder for the predictions")
    p.add_argument("--h5", action="store_true", help="write .h5 (key 'prediction') for .h5 inputs")
    return p.parse_args(argv)


def main(argv=None) -> list[Path]:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cases = find_inputs(args.input)
    model, config = load_model(resolve_checkpoint(args.run, args.checkpoint), args.weights, args.device)
    pred_cfg = dict(run_settings(args, config, ("stride_xy", "stride_z", "largest_component")),
                    in_channels=config["model"]["in_channels"], h5_transpose=_h5_transpose(config))
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        written.append(predict_case(model, case, output_dir, pred_cfg, args.h5))
        log.info("%s -> %s", case.id, written[-1])
    return written


if __name__ == "__main__":
    main()
