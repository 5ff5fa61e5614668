"""The strong view of a batch (``views.strong``): the same crop, flip and rotation as the weak one
(the batch as sampled), with the intensities changed: gamma, contrast, a smooth bias field, blur
and noise, each drawn per volume from the ranges of the config's ``views`` section.

With it the student (and the supervised baseline, on its labelled volumes) trains on the strong
view while the teacher or the pseudo-labeller sees the weak one (FixMatch's recipe in 3D): the
unlabelled volumes then teach the student invariance to exactly the nuisances a new scanner
brings. Only intensities change, so the labels and the teacher's predictions stay aligned voxel
for voxel. The draws are keyed by the seed, the batch number and the volume's slot in the global
batch (as the teacher's noise), so a resumed or multi-process run draws the same views.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dycon import distributed

VIEW_STREAM = 7   # derived_seed stream of the strong views (3: teacher noise, 4: dropout)


@torch.no_grad()
def strong_view(image: torch.Tensor, views: dict, seed: int, number: int, slots: list[int]) -> torch.Tensor:
    """The strong view of ``image`` (N, C, X, Y, Z), volume ``i`` drawn from slot ``slots[i]`` of
    global batch ``number``."""
    out = torch.empty_like(image)
    for i, slot in enumerate(slots):
        g = torch.Generator(image.device).manual_seed(distributed.derived_seed(seed, VIEW_STREAM, number, slot))
        out[i] = strong_volume(image[i], views, g)
    return out


def strong_volume(x: torch.Tensor, views: dict, g: torch.Generator) -> torch.Tensor:
    """One volume (C, X, Y, Z): gamma on [0, 1]-rescaled intensities, contrast around the mean, a
    smooth multiplicative bias field above the minimum, Gaussian blur, Gaussian noise."""
    def draw(key):
        low, high = views[key]
        return low + (high - low) * float(torch.rand((), generator=g, device=x.device))

    gamma, contrast, bias, sigma, noise = (draw(k) for k in ("gamma", "contrast", "bias_field", "blur", "noise"))
    low, span = x.amin(), (x.amax() - x.amin()).clamp_min(1e-6)
    y = ((x - low) / span) ** gamma * span + low
    mean = y.mean()
    y = (y - mean) * contrast + mean
    y = (y - low) * torch.exp(bias * smooth_field(x.shape[1:], g, x.device)) + low
    y = gaussian_blur(y, sigma)
    return y + noise * torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)


def smooth_field(shape, g: torch.Generator, device) -> torch.Tensor:
    """A smooth random field of unit standard deviation: 4^3 Gaussian control values, trilinear."""
    coarse = torch.randn(1, 1, 4, 4, 4, generator=g, device=device)
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)[0]
    return (field - field.mean()) / field.std().clamp_min(1e-6)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (C, X, Y, Z) with edge replication; sigma below 0.1 voxel: none."""
    if sigma < 0.1:
        return x
    radius = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    y = x[:, None]   # (C, 1, X, Y, Z): each channel on its own
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = kernel.numel()
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius
        y = F.conv3d(F.pad(y, pad, mode="replicate"), kernel.view(shape))
    return y[:, 0]
