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

A model trained on a NIfTI data set carries its preprocessing plan (``dycon.preprocess``):
inputs are reoriented, normalised and resampled as in training and the result is mapped back to
the input's grid. Inputs to a model trained on an h5 layout must be preprocessed the way that
data set's h5 files were.

Outputs are named after the case id (LA's ``<id>/mri_norm2.h5`` gives ``<id>.nii.gz``); an
existing output is an error unless ``--overwrite``.
"""
from __future__ import annotations

import logging
import re
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np

from dycon import cli
from dycon.data import H5_LAYOUTS, NIFTI_ENDINGS, SITK_ENDINGS, Case, Volume
from dycon.evaluate import add_model_args, load_model_of, run_settings
from dycon.preprocess import predict_labels

log = logging.getLogger("dycon.predict")
PROG = "python -m dycon.predict"

IMAGE_ENDINGS = NIFTI_ENDINGS + SITK_ENDINGS
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
# h5 layouts whose files are named after a folder per case (LA: <id>/mri_norm2.h5)
H5_CASE_FOLDER_FILES = ("mri_norm2.h5",)


def _nifti_case_key(path: Path) -> tuple[str, int]:
    """(case id, channel index) of an image file name (``<case>_0001.nii.gz``; no suffix: channel 0)."""
    stem = next(path.name[:-len(e)] for e in IMAGE_ENDINGS if path.name.endswith(e))
    match = CHANNEL_FILE.match(stem)
    return (match["case"], int(match["channel"])) if match else (stem, 0)


def _is_nifti(path: Path) -> bool:
    """An image file read through ``Case.load`` (NIfTI, or NRRD / MHA with SimpleITK)."""
    return path.name.endswith(IMAGE_ENDINGS)


def find_inputs(path: str | Path) -> list[Case]:
    """The unlabelled cases in a file (with its sibling channel files) or a folder (not recursive):
    layout ``"nifti"`` (one file per channel) or ``"h5"``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        if path.suffix == ".h5":
            return [_h5_case(path)]
        if not _is_nifti(path):
            raise ValueError(f"input {path}: unsupported file type (expected {', '.join(IMAGE_ENDINGS)} or .h5)")
        case_id = _nifti_case_key(path)[0]
        files = [p for p in path.parent.iterdir() if _is_nifti(p) and _nifti_case_key(p)[0] == case_id]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and (_is_nifti(p) or p.suffix == ".h5"))
        # a released LA folder: one sub-folder per case
        files += sorted(p for name in H5_CASE_FOLDER_FILES for p in path.glob(f"*/{name}"))
        if not files:
            raise ValueError(f"input folder {path} holds no {', '.join(IMAGE_ENDINGS)} or .h5 file "
                             f"(nor <case>/{' or '.join(H5_CASE_FOLDER_FILES)})")
    return _group(files)


def _h5_case(path: Path) -> Case:
    """An h5 input; its id is the file's name, or the folder's for LA's ``<id>/mri_norm2.h5``."""
    case_id = path.parent.name if path.name in H5_CASE_FOLDER_FILES else path.name[:-3]
    return Case(case_id, path, "h5", label_key=None)


def _group(files: list[Path]) -> list[Case]:
    channels: dict[str, dict[int, Path]] = {}
    h5_cases: dict[str, Case] = {}
    for f in files:
        if f.suffix == ".h5":
            case = _h5_case(f)
            if case.id in h5_cases:   # predictions are named after the id: one would overwrite the other
                raise ValueError(f"case {case.id!r}: both {h5_cases[case.id].path} and {f} in the input")
            h5_cases[case.id] = case
            continue
        case_id, channel = _nifti_case_key(f)
        if channel in channels.setdefault(case_id, {}):
            raise ValueError(f"case {case_id!r}: both {channels[case_id][channel]} and {f} map to channel {channel}")
        channels[case_id][channel] = f
    cases = dict(h5_cases)
    for case_id, found in channels.items():
        if case_id in h5_cases:
            raise ValueError(f"case {case_id!r}: both a .h5 and NIfTI files in the input")
        if sorted(found) != list(range(len(found))):
            raise ValueError(f"case {case_id!r}: channel files must be numbered _0000 to _{len(found) - 1:04d}, "
                             f"found {sorted(found)} ({[str(p) for p in found.values()]})")
        paths = [found[c] for c in range(len(found))]
        cases[case_id] = Case(case_id, paths[0], "nifti", channel_paths=paths)
    return [cases[k] for k in sorted(cases)]


def write_nifti(labels: np.ndarray, path: Path, like: Volume) -> None:
    """uint8 NIfTI with the affine and header of ``like`` (a NIfTI input), else an identity affine."""
    import nibabel as nib

    labels = labels.astype(np.uint8)
    if like.header is None:   # h5 (no geometry) or SimpleITK input (an affine, no NIfTI header)
        img = nib.Nifti1Image(labels, np.eye(4) if like.affine is None else like.affine)
    else:
        header = like.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)   # labels are stored as is: no intensity scaling inherited from the image
        image_type = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
        img = image_type(labels, like.affine, header)
    nib.save(img, str(path))


def _h5_transpose(config: dict):
    """The axis order training applied to h5 volumes of this data layout (None: as stored)."""
    layout = config.get("data", {}).get("layout")
    return H5_LAYOUTS[layout][3] if layout in H5_LAYOUTS else None


def predict_case(model, case: Case, output_dir: Path, pred_cfg: dict, h5_out: bool = False,
                 overwrite: bool = False) -> Path:
    """Segment one case and write it to ``output_dir/<case id>.nii.gz`` (``.h5``); returns the
    output path. An existing output is an error unless ``overwrite``."""
    out = _output_path(case, output_dir, h5_out)
    if out.resolve() in {p.resolve() for p in case.image_files}:
        raise ValueError(f"output {out} would overwrite its input; choose another --output folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"case {case.id!r}: output {out} exists already (--overwrite replaces it)")
    if case.layout == "h5":
        case = replace(case, transpose=pred_cfg["h5_transpose"])   # the axis order training used
    volume = case.load()
    if volume.image.shape[0] != pred_cfg["in_channels"]:
        raise ValueError(f"case {case.id!r}: {volume.image.shape[0]} channel(s) in "
                         f"{[str(p) for p in case.image_files]}, the model takes {pred_cfg['in_channels']}")
    labels = predict_labels(model, volume, pred_cfg, case.id)   # on the input's grid
    if case.transpose:
        labels = labels.transpose(np.argsort(case.transpose))   # back to the file's axis order
    return _write_prediction(labels, case, volume, out)


def _output_path(case: Case, output_dir: Path, h5_out: bool) -> Path:
    return Path(output_dir) / f"{case.id}{'.h5' if h5_out and case.layout == 'h5' else '.nii.gz'}"


def _write_prediction(labels: np.ndarray, case: Case, volume: Volume, out: Path) -> Path:
    if out.suffix == ".h5":
        with h5py.File(out, "w") as f:
            f.create_dataset("prediction", data=labels.astype(np.uint8), compression="gzip")
    else:
        if case.layout == "h5":
            log.info("%s: h5 input has no geometry; writing %s with an identity affine", case.id, out.name)
        write_nifti(labels, out, volume)
    return out


def build_parser() -> cli.ArgumentParser:
    p = cli.ArgumentParser(PROG, description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--input", required=True, help="an image file (.nii, .nii.gz, .h5; .nrrd, .mha with SimpleITK) "
                                                  "or a folder of them")
    p.add_argument("--output", required=True, help="folder for the predictions")
    p.add_argument("--h5", action="store_true", help="write .h5 (key 'prediction') for .h5 inputs")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: an error)")
    return p


def main(argv=None) -> list[Path]:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cases = find_inputs(args.input)
    _, model, config = load_model_of(args)
    pred_cfg = dict(run_settings(args, config, ("stride_xy", "stride_z", "largest_component")),
                    in_channels=config["model"]["in_channels"], h5_transpose=_h5_transpose(config))
    output_dir = Path(args.output)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for case in cases:
        written.append(predict_case(model, case, output_dir, pred_cfg, args.h5, args.overwrite))
        log.info("%s -> %s", case.id, written[-1])
    return written


def console_main() -> None:
    """The dycon-predict command (setup.py's console scripts)."""
    cli.run(main, PROG)


if __name__ == "__main__":
    console_main()
