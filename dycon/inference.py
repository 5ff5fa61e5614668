"""Sliding-window inference and post-processing, as in the released DyCON / SSL4MIS test.

Axis convention (the released ``test_single_case``): the volume is used in the axis order it is
stored in, ``(X, Y, Z)`` with the through-plane axis last; ``patch_size[i]`` is the window along
spatial axis ``i``; ``stride_xy`` steps along the first two spatial axes and ``stride_z`` along
the last. Feed volumes in the orientation the network was trained on.
"""
from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets covering ``size``; the last window is shifted back to end at the border."""
    n = math.ceil((size - window) / stride) + 1
    return [min(i * stride, size - window) for i in range(n)]


def _logits(output) -> torch.Tensor:
    # the DyCON networks return (logits, embeddings); plain segmentation models return logits
    return output[0] if isinstance(output, (tuple, list)) else output


def sliding_window_inference(model: torch.nn.Module, image: torch.Tensor, patch_size: Sequence[int],
                             stride_xy: int, stride_z: int, num_classes: int,
                             batch_size: int = 1) -> torch.Tensor:
    """Softmax probabilities of ``model`` over a whole volume, averaged where windows overlap.

    ``image``: ``(1, C, X, Y, Z)`` float tensor on the model's device. A volume smaller than the
    window along an axis is zero-padded (evenly on both sides, as released) and the result is
    cropped back. Runs under ``torch.no_grad`` with ``model.eval()``; the model's train/eval
    mode is restored afterwards. Returns ``(num_classes, X, Y, Z)`` float32 on ``image``'s device.
    """
    if image.dim() != 5 or image.shape[0] != 1:
        raise ValueError(f"image must be (1, C, X, Y, Z), got {tuple(image.shape)}")
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise ValueError(f"patch_size must be three positive ints, got {patch_size}")
    if stride_xy < 1 or stride_z < 1 or batch_size < 1:
        raise ValueError(f"stride_xy, stride_z and batch_size must be >= 1, got {stride_xy}, {stride_z}, {batch_size}")

    spatial = tuple(image.shape[2:])
    pads = [max(p - s, 0) for p, s in zip(patch_size, spatial)]
    pad_arg = [n for p in reversed(pads) for n in (p // 2, p - p // 2)]  # F.pad lists the last axis first
    padded = F.pad(image, pad_arg)
    starts = [_window_starts(size, p, stride)
              for size, p, stride in zip(padded.shape[2:], patch_size, (stride_xy, stride_xy, stride_z))]
    windows = [tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in itertools.product(*starts)]

    probs = torch.zeros((num_classes, *padded.shape[2:]), dtype=torch.float32, device=image.device)
    counts = torch.zeros(padded.shape[2:], dtype=torch.float32, device=image.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(windows), batch_size):
                group = windows[i:i + batch_size]
                batch = torch.stack([padded[0][(slice(None), *w)] for w in group])
                logits = _logits(model(batch))
                if tuple(logits.shape) != (len(group), num_classes, *patch_size):
                    raise ValueError(f"model output {tuple(logits.shape)} does not match "
                                     f"(batch, num_classes={num_classes}, *patch_size={patch_size})")
                for w, p in zip(group, torch.softmax(logits.float(), dim=1).to(image.device)):
                    probs[(slice(None), *w)] += p
                    counts[w] += 1
    finally:
        model.train(was_training)
    probs /= counts
    crop = tuple(slice(p // 2, p // 2 + s) for p, s in zip(pads, spatial))
    return probs[(slice(None), *crop)]


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest connected component of a binary mask (same shape and dtype).

    Components are 26-connected in 3D (full connectivity), as skimage's ``label`` default in the
    released ``getLargestCC``; ties go to the first component in C order. An empty mask is
    returned as is.
    """
    mask = np.asarray(mask)
    labels, n = ndimage.label(mask, structure=ndimage.generate_binary_structure(mask.ndim, mask.ndim))
    if n == 0:
        return mask.copy()
    largest = np.bincount(labels.ravel())[1:].argmax() + 1
    return (labels == largest).astype(mask.dtype)


def probabilities_to_labels(probs: torch.Tensor, largest_component: bool = True) -> np.ndarray:
    """Label map (uint8, spatial shape) from ``(num_classes, ...)`` probabilities.

    Two classes: foreground where ``P(foreground) > 0.5`` (method.md); more: argmax. With
    ``largest_component``, each foreground class keeps only its largest connected component.
    """
    if probs.shape[0] < 2:
        raise ValueError(f"need probabilities of at least 2 classes, got shape {tuple(probs.shape)}")
    if probs.shape[0] == 2:
        labels = (probs[1] > 0.5).to(torch.uint8)
    else:
        labels = probs.argmax(0).to(torch.uint8)
    labels = labels.cpu().numpy()
    if largest_component:
        for c in range(1, probs.shape[0]):
            labels[(labels == c) & ~keep_largest_component(labels == c)] = 0
    return labels


def segment(model: torch.nn.Module, image: np.ndarray, patch_size: Sequence[int], stride_xy: int,
            stride_z: int, num_classes: int, largest_component: bool = True,
            device: str | torch.device = "cpu", batch_size: int = 1) -> np.ndarray:
    """Label map (uint8, ``(X, Y, Z)``) of a ``(C, X, Y, Z)`` numpy volume; ``model`` must be on ``device``."""
    if image.ndim != 4:
        raise ValueError(f"image must be (C, X, Y, Z), got shape {image.shape}")
    tensor = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None].to(device)
    probs = sliding_window_inference(model, tensor, patch_size, stride_xy, stride_z, num_classes, batch_size)
    return probabilities_to_labels(probs, largest_component)
