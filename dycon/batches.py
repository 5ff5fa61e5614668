"""Training batches: random patches of the cases (``PatchDataset``) drawn by the two-stream
sampler (``TwoStreamBatchSampler``), as torch's ``Dataset`` and ``Sampler``.

Kept apart from ``dycon.data`` so that reading data sets (a command's checks of its arguments,
prediction, preprocessing) imports no torch; import these names from here.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from dycon.data import Case


def training_label(label: np.ndarray, ignore: Optional[int]) -> torch.Tensor:
    """``label`` as the int64 tensor the losses take: -1 (not trained on) where it is ``ignore``."""
    out = torch.from_numpy(np.ascontiguousarray(label)).long()
    return out if ignore is None else out.masked_fill_(out == ignore, -1)


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
        if self.cache:
            self._volumes[index] = (vol.image, vol.label, vol.ignore_label)
        return vol.image, vol.label, vol.ignore_label

    def __getitem__(self, item):
        index, seed = item
        rng = np.random.default_rng(seed)
        image, label, ignore = self._volume(index)
        unlabelled = label is None   # a case of the unlabelled pool
        if unlabelled:
            label = np.zeros(image.shape[1:], np.uint8)   # cropped and turned along with the image
        image, label = random_crop(image, label, self.patch, rng)
        if self.augment:
            image, label = rot_flip(image, label, rng)
        label = training_label(label, ignore)
        # -1: no label (the whole patch of an unlabelled case, the ignore label's voxels of a labelled one)
        return {"image": torch.from_numpy(np.ascontiguousarray(image)),
                "label": label.fill_(-1) if unlabelled else label}


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
