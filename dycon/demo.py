"""Small synthetic lesion data sets in the BraTS h5 layout, for the demo, the benchmarks and the tests.

``ensure_demo_data()`` writes one once (deterministic, seconds) and reuses it afterwards:

    <root>/data/case_000.h5 ...   image float32 (X, Y, Z), label uint8 {0, 1}
    <root>/train.txt, val.txt, test.txt

Two kinds (``KINDS``), each a ``Spec`` of the same generator:

- ``demo`` (the quick start): an ellipsoid of "tissue" with smooth texture and noise, holding
  1-3 irregular, moderately bright lesions (contrast 0.8-1.3) that cover about 1-3 % of the voxels.
- ``demo_hard`` (labels are scarce, benchmark): 1-3 fainter, smaller lesions (contrast 0.45-0.7,
  together 0.6-1.5 % of the voxels, so some are smaller than one 8^3 FeCL patch of the demo's grid),
  noise 0.3, and scanner variation between volumes: a tissue gain and a smooth multiplicative bias
  field drawn per volume.

- ``ssl_bench`` (issue 19: a set where semi-supervision has to show): 2-4 lesions covering 2-5 %
  of the volume (several pure 8^3 FeCL patches per 32^3 crop) and per-volume nuisances that
  z-scoring does not remove: lesion contrast 0.3-1.2 in magnitude, the lesions of half of the
  volumes darker than the tissue, log bias field 0-0.4, noise 0.15-0.3 and blur 0-1.5 voxel
  (``BENCH_RANGES["full"]``). The first 4 training volumes (the labelled ones) come from a
  narrow clear-case slice (``BENCH_RANGES["clear"]``: bright lesions, contrast 1.0-1.2, bias
  <= 0.1, noise <= 0.2, blur <= 0.3); the 36 other training volumes, 6 validation and 24 test
  volumes from the whole range. ``ssl_bench_iid`` is its control: the same volumes except that the first
  4 are drawn from the whole range too (the labelled subset i.i.d. with the rest);
  ``ssl_bench_draw2`` and ``ssl_bench_draw3`` are other draws of the 4 clear labelled volumes.
  Each volume is drawn from its own generator (the set's seed and the volume's index), so these
  sets share every other volume with ``ssl_bench``.

The test cases are held out from training and validation. Default roots: ``$DYCON_DATA`` or
``data/demo``; ``$DYCON_DATA_HARD`` or ``data/demo_hard``; ``data/<kind>`` for the bench sets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import h5py
import numpy as np
from scipy import ndimage

DEFAULT_SPLITS = {"train": 40, "val": 6, "test": 12}
VERSION = 4   # bump when the generator or a Spec changes, so stale caches are rebuilt


@dataclass(frozen=True)
class Spec:
    """One kind of synthetic set. Ranges are (low, high) of uniform draws per volume."""
    seed: int                         # of the whole set
    lesion_share: tuple               # lesion voxels wanted in total, as a share of the volume
    n_lesions: tuple                  # lesions per volume, integers low..high inclusive
    lesion_gain: tuple                # lesion contrast over the tissue
    noise: float                      # white noise std (before normalisation)
    tissue_gain: Optional[tuple] = None   # scanner variation: tissue brightness per volume
    bias: Optional[tuple] = None          # scanner variation: amplitude of log bias field per volume
    env: str = "DYCON_DATA"           # environment variable naming the default root
    root: str = "data/demo"


KINDS = {
    "demo": Spec(seed=2025, lesion_share=(0.01, 0.03), n_lesions=(1, 3), lesion_gain=(0.8, 1.3), noise=0.25),
    "demo_hard": Spec(seed=2026, lesion_share=(0.006, 0.015), n_lesions=(1, 3), lesion_gain=(0.45, 0.7),
                      noise=0.3, tissue_gain=(0.8, 1.2), bias=(0.1, 0.25),
                      env="DYCON_DATA_HARD", root="data/demo_hard"),
}


# issue 19's benchmark: nuisance ranges (low, high) per volume; "clear" for its labelled volumes.
# "dark": the chance that a volume's lesions are darker than the tissue (contrast -gain): the strong
# view's intensity nuisances cannot turn a bright lesion into a dark one, so this is the shift that
# only labels (or unlabelled volumes) can teach (benchmarks/results/grid_ssl_bench.md, the retuning)
BENCH_RANGES = {
    "full": {"lesion_gain": (0.3, 1.2), "bias": (0.0, 0.4), "noise": (0.15, 0.3), "blur": (0.0, 1.5), "dark": 0.5},
    "clear": {"lesion_gain": (1.0, 1.2), "bias": (0.0, 0.1), "noise": (0.15, 0.2), "blur": (0.0, 0.3), "dark": 0.0},
}
BENCH_SPLITS = {"train": 40, "val": 6, "test": 24}
BENCH_CLEAR = 4          # the first training volumes: the labelled ones (data.labelnum 4)


@dataclass(frozen=True)
class BenchKind:
    clear: int               # the first training volumes, drawn from the clear slice
    draw: int = 1            # which draw of those volumes (1: the set as first recorded)


# ssl_bench_drawN: other draws of the labelled subset (the 4 clear volumes), every other volume
# the same as in ssl_bench, so that a second draw changes only what the labels show.
BENCH_KINDS = {"ssl_bench": BenchKind(BENCH_CLEAR), "ssl_bench_iid": BenchKind(0),
               **{f"ssl_bench_draw{d}": BenchKind(BENCH_CLEAR, d) for d in (2, 3)}}
KINDS.update({kind: Spec(seed=2027, lesion_share=(0.02, 0.05), n_lesions=(2, 4), lesion_gain=(0.3, 1.2),
                         noise=0.3, env=f"DYCON_DATA_{kind.upper()}", root=f"data/{kind}") for kind in BENCH_KINDS})


def _spec(kind: str) -> Spec:
    if kind not in KINDS:
        raise ValueError(f"unknown demo set {kind!r} (known: {sorted(KINDS)})")
    return KINDS[kind]


def default_root(kind: str = "demo") -> Path:
    spec = _spec(kind)
    return Path(os.environ.get(spec.env, spec.root))


def _smooth_noise(rng: np.random.Generator, shape, sigma: float) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def make_case(rng: np.random.Generator, size: int = 48, kind: str = "demo") -> tuple[np.ndarray, np.ndarray]:
    """One (image, label) pair of shape (size, size, size)."""
    spec = _spec(kind)
    shape = (size,) * 3
    _, tissue, label = _anatomy(rng, size, spec)
    structure = np.where(tissue, 1.0, 0.0) + 0.35 * _smooth_noise(rng, shape, 3.0) * tissue
    structure += 0.2 * _smooth_noise(rng, shape, 1.0) * tissue
    lesion_gain = rng.uniform(*spec.lesion_gain)
    lesion = label * (lesion_gain + 0.25 * _smooth_noise(rng, shape, 1.5))
    noise = spec.noise * rng.standard_normal(shape)
    if spec.tissue_gain is None:
        image = structure + lesion + noise
    else:   # drawn after the easy demo's draws, which therefore stay as they were
        field = np.exp(rng.uniform(*spec.bias) * _smooth_noise(rng, shape, size / 4))
        image = (rng.uniform(*spec.tissue_gain) * structure + lesion) * field + noise
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def make_bench_case(rng: np.random.Generator, size: int, ranges: dict) -> tuple[np.ndarray, np.ndarray]:
    """One volume of the bench sets: the demo's anatomy, then lesion contrast, a multiplicative
    bias field, blur (of the signal) and noise drawn from ``ranges``; z-scored."""
    spec, shape = KINDS["ssl_bench"], (size,) * 3
    _, tissue, label = _anatomy(rng, size, spec)
    gain, bias, noise, blur = (rng.uniform(*ranges[k]) for k in ("lesion_gain", "bias", "noise", "blur"))
    if rng.random() < ranges["dark"]:
        gain = -gain
    structure = np.where(tissue, 1.0, 0.0) + (0.35 * _smooth_noise(rng, shape, 3.0)
                                              + 0.2 * _smooth_noise(rng, shape, 1.0)) * tissue
    signal = (structure + label * (gain + 0.25 * _smooth_noise(rng, shape, 1.5))) \
        * np.exp(bias * _smooth_noise(rng, shape, size / 4))
    if blur > 0:
        signal = ndimage.gaussian_filter(signal, blur)
    image = signal + noise * rng.standard_normal(shape)
    image = (image - image.mean()) / image.std()
    return image.astype(np.float32), label.astype(np.uint8)


def _anatomy(rng: np.random.Generator, size: int, spec: Spec):
    """The voxel grid, an ellipsoid of tissue and the lesion mask (``spec``'s share and count)."""
    shape = (size,) * 3
    grid = np.stack(np.meshgrid(*[np.arange(size, dtype=np.float32)] * 3, indexing="ij"))
    centre = size / 2 + rng.uniform(-2, 2, 3)
    radii = size * rng.uniform(0.36, 0.46, 3)
    tissue = (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) < 1
    label = np.zeros(shape, bool)
    target = rng.uniform(*spec.lesion_share) * size ** 3          # lesion voxels wanted in total
    n_lesions = rng.integers(spec.n_lesions[0], spec.n_lesions[1] + 1)
    for share in rng.dirichlet(np.ones(n_lesions) * 2) * target:
        radius = (3 * max(share, 60) / (4 * np.pi)) ** (1 / 3)
        inside = np.argwhere(ndimage.binary_erosion(tissue, iterations=int(radius) + 2))
        if len(inside) == 0:
            continue
        c = inside[rng.integers(len(inside))]
        dist = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0)) / radius
        label |= (dist + 0.25 * _smooth_noise(rng, shape, 2.0) < 1) & tissue   # irregular outline
    return grid, tissue, label


def _bench_case_rng(bench: BenchKind, seed: int, index: int, train: bool) -> tuple[np.random.Generator, bool]:
    """Volume ``index``'s own generator, and whether it is a clear case. The streams of draw 1
    are those of the recorded set; a later draw re-seeds only its clear (labelled) volumes."""
    clear = train and index < bench.clear
    key = [seed, index, int(clear)] + ([bench.draw] if clear and bench.draw > 1 else [])
    return np.random.default_rng(key), clear


def _stamp(kind: str, size: int, seed: int, splits: dict) -> str:
    return f"{kind} {VERSION} {size} {seed} {sorted(splits.items())}"


def ensure_demo_data(root: str | os.PathLike | None = None, size: int = 48, seed: int | None = None,
                     splits: dict | None = None, kind: str = "demo") -> Path:
    """Generate the ``kind`` set under ``root`` unless a complete one is already there."""
    spec = _spec(kind)
    root = Path(root) if root is not None else default_root(kind)
    splits = splits or (BENCH_SPLITS if kind in BENCH_KINDS else DEFAULT_SPLITS)
    seed = spec.seed if seed is None else seed
    stamp = root / "demo_version.txt"
    expected = _stamp(kind, size, seed, splits)
    if stamp.exists() and stamp.read_text().strip() == expected:
        return root
    (root / "data").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    index = 0
    for split, count in splits.items():
        ids = [f"case_{index + i:03d}" for i in range(count)]
        index += count
        for i, case_id in enumerate(ids):
            if kind in BENCH_KINDS:   # its own generator per volume: the bench sets share them
                case_rng, clear = _bench_case_rng(BENCH_KINDS[kind], seed, index - count + i, split == "train")
                image, label = make_bench_case(case_rng, size, BENCH_RANGES["clear" if clear else "full"])
            else:
                image, label = make_case(rng, size, kind)
            # stored (Z, Y, X) like the BraTS h5 files; the loader transposes (2, 1, 0)
            _write_h5(root / "data" / f"{case_id}.h5", image.transpose(2, 1, 0), label.transpose(2, 1, 0))
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
    stamp.write_text(expected + "\n")
    return root


def prepare_demo_set(root: str | os.PathLike | None, kind: str = "demo") -> Path:
    """The trainer's entry: reuse a ``kind`` set of any size under ``root`` (the tests write small
    ones), refuse a set of another kind there, else generate the default ``kind`` set."""
    root = Path(root) if root is not None else default_root(kind)
    stamp = root / "demo_version.txt"
    if stamp.exists():
        found = stamp.read_text().split()
        if found[:2] == [kind, str(VERSION)]:
            return root
        if found and found[0] in KINDS and found[0] != kind:   # an older version is regenerated
            raise ValueError(f"{root} holds the demo set {found[0]!r}, not {kind!r}: give another data root")
    return ensure_demo_data(root, kind=kind)


def _write_h5(path: Path, image: np.ndarray, label: np.ndarray) -> None:
    tmp = path.with_suffix(".h5.tmp")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("image", data=image, compression="gzip")
        f.create_dataset("label", data=label, compression="gzip")
    os.replace(tmp, path)
