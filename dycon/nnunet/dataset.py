"""Write volumes as an nnU-Net raw dataset with an ``imagesUnlabelled/`` folder.

``write_raw_dataset`` takes ``(case, image, label)`` triples (numpy ``(X, Y, Z)`` arrays, one
channel) and writes ``imagesTr/labelsTr`` (labelled), ``imagesUnlabelled`` (their labels are
dropped), ``imagesTs/labelsTs`` (test), and dataset.json. ``python -m dycon.nnunet.dataset
RAW_ROOT`` converts our demo set (dycon.demo: 4 labelled, 36 unlabelled, 12 test volumes) into
``RAW_ROOT/Dataset991_DyconDemo``, the set of benchmarks/results/nnunet_demo.md.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable

import numpy as np

ENDING = ".nii.gz"
DEMO_DATASET = "Dataset991_DyconDemo"


def _write_nifti(array: np.ndarray, path: Path) -> None:
    import SimpleITK as sitk   # an nnunetv2 dependency
    # SimpleITK orders axes (Z, Y, X); our arrays are (X, Y, Z)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


def write_raw_dataset(folder: Path, labelled: Iterable, unlabelled: Iterable = (), test: Iterable = (),
                      labels: dict | None = None) -> Path:
    """``folder`` = ``<nnUNet_raw>/DatasetXXX_Name``; each iterable yields ``(case, image, label)``."""
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
    folder = Path(folder)
    count = 0
    for split, images, label_dir in (("labelled", labelled, "labelsTr"), ("unlabelled", unlabelled, None),
                                     ("test", test, "labelsTs")):
        image_dir = {"labelled": "imagesTr", "unlabelled": "imagesUnlabelled", "test": "imagesTs"}[split]
        for case, image, label in images:
            (folder / image_dir).mkdir(parents=True, exist_ok=True)
            _write_nifti(image.astype(np.float32), folder / image_dir / f"{case}_0000{ENDING}")
            if label_dir:
                (folder / label_dir).mkdir(parents=True, exist_ok=True)
                _write_nifti(label.astype(np.uint8), folder / label_dir / f"{case}{ENDING}")
            count += split == "labelled"
    generate_dataset_json(str(folder), {0: "image"}, labels or {"background": 0, "lesion": 1}, count, ENDING)
    return folder


def demo_to_raw(raw_root: Path, kind: str = "demo", labelnum: int = 4) -> Path:
    """Our demo set as an nnU-Net dataset: the first ``labelnum`` training volumes labelled (as
    our trainer's 10 %), the other training volumes unlabelled, the test volumes as imagesTs."""
    import h5py

    from dycon.demo import prepare_demo_set
    root = prepare_demo_set(None, kind)

    def read(split):
        for case in (root / f"{split}.txt").read_text().split():
            with h5py.File(root / "data" / f"{case}.h5") as f:   # stored (Z, Y, X)
                yield case, f["image"][()].transpose(2, 1, 0), f["label"][()].transpose(2, 1, 0)

    train = list(read("train"))
    return write_raw_dataset(Path(raw_root) / DEMO_DATASET, train[:labelnum], train[labelnum:], read("test"))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("raw_root", help="the nnUNet_raw folder")
    parser.add_argument("--kind", default="demo", help="demo set (dycon.demo KINDS)")
    args = parser.parse_args()
    print(demo_to_raw(Path(args.raw_root), args.kind))
