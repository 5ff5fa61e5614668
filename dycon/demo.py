"""A small synthetic lesion data set in the BraTS h5 layout, for the demo and the tests.

``ensure_demo_data()`` writes it once (deterministic, a few seconds) and reuses it afterwards:

    <root>/data/case_000.h5 ...   image float32 (X, Y, Z), label uint8 {0, 1}
    <root>/train.txt, val.txt, test.txt

Each volume is an ellipsoid of "tissue" with smooth texture and noise, holding 1-3 irregular,
moderately bright lesions that cover about 1-3 % of the voxels. The test cases are held out
from training and validation. The default root is ``$DYCON_DATA`` or ``data/demo``.
"""
from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
from scipy import ndimage

DEFAULT_SPLITS = {"train": 40, "val": 6, "test": 12}
VERSION = 1   # bump when the generator changes, so stale caches are rebuilt


def default_root() -> Path:
    return Path(os.environ.get("DYCON_DATA", "data/demo"))


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def make_case(rng: np.random.Generator, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair of shape (size, size, size)."""
    shape = (size,) * 3
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"))
    centre = size / 2 + rng.uniform(-2, 2, 3)
    radii = size * rng.uniform(0.36, 0.46, 3)
    tissue = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1

    label = np.zeros(shape, bool)
    target = rng.uniform(0.01, 0.03) * size ** 3          # lesion voxels wanted in total
    n_lesions = rng.integers(1, 4)
    for share in rng.dirichlet(np.ones(n_lesions) * 2) * target:
        radius = (3 * max(share, 60) / (4 * np.pi)) ** (1 / 3)
        inside = np.argwhere(ndimage.binary_erosion(tissue, iterations=int(radius) + 2))
        if len(inside) == 0:
            continue
        c = inside[rng.integers(len(inside))]
        dist = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0)) / radius
        label |= (dist + 0.25 * _smooth_noise(rng, shape, 2.0) < 1) & tissue   # irregular outline

    image = np.where(tissue, 1.0, 0.0) + 0.35 * _smooth_noise(rng, shape, 3.0) * tissue
    image += 0.2 * _smooth_noise(rng, shape, 1.0) * tissue
    lesion_gain = rng.uniform(0.8, 1.3)
    image += label * (lesion_gain + 0.25 * _smooth_noise(rng, shape, 1.5))
    image += 0.25 * rng.standard_normal(shape)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def ensure_demo_data(root: str | os.PathLike | None = None, size: int = 48, seed: int = 2025,
                     splits: dict | None = None) -> Path:
    """Generate the demo data set under ``root`` unless a complete one is already there."""
    root = Path(root) if root is not None else default_root()
    splits = splits or DEFAULT_SPLITS
    stamp = root / "demo_version.txt"
    expected = f"{VERSION} {size} {seed} {sorted(splits.items())}"
    if stamp.exists() and stamp.read_text().strip() == expected:
        return root
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = 0
    for split, count in splits.items():
        ids = [f"case_{index + i:03d}" for i in range(count)]
        index += count
        for case_id in ids:
            image, label = make_case(rng, size)
            # stored (Z, Y, X) like the BraTS h5 files; the loader transposes (2, 1, 0)
            _write_h5(root / "data" / f"{case_id}.h5", image.transpose(2, 1, 0), label.transpose(2, 1, 0))
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    stamp.write_text(expected + "\n")
    return root


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
    os.replace(tmp, path)
