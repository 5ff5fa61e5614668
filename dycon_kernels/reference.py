"""Dense PyTorch references of the DyCON losses (the contract of ``losses.md``).

These are written for clarity, not speed: every intermediate is a full tensor, with the
released code's memory behaviour. Every fused backend is tested against them, and they are
tested against brute-force loops (tests/test_reference_*.py).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

UNCL_EPS = 1e-6  # inside log(p + eps), as in the released code


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def uncl_voxel_loss(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    """Per-voxel UnCL ``l_v`` of shape ``(B, *spatial)``, in the compute dtype."""
    dtype = _compute_dtype(student_logits)
    p = torch.softmax(student_logits.to(dtype), dim=1)
    q = torch.softmax(teacher_logits.to(dtype), dim=1)
    h_s = -(p * torch.log(p + UNCL_EPS)).sum(dim=1)
    h_t = -(q * torch.log(q + UNCL_EPS)).sum(dim=1)
    # 1 / (exp(beta Hs) + exp(beta Ht)), written so that a large beta cannot overflow.
    weight = torch.exp(-torch.logaddexp(beta * h_s, beta * h_t))
    return ((p - q) ** 2).sum(dim=1) * weight + beta * (h_s + h_t)


def reduce_loss(loss_map: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    """Apply the voxel (or anchor) weights and a reduction: mean is sum(w l) / sum(w)."""
    if weight is not None:
        loss_map = loss_map * weight.to(loss_map.dtype)
    if reduction == "none":
        return loss_map
    total = loss_map.sum()
    if reduction == "sum":
        return total
    if reduction == "mean":
        return total / (weight.to(total.dtype).sum() if weight is not None else loss_map.numel())
    raise ValueError(f"unknown reduction {reduction!r}")


def uncl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float,
    weight: Optional[Tensor] = None,
    reduction: str = "mean",
) -> Tensor:
    """Uncertainty-aware consistency loss (losses.md section 1), dense.

    ``student_logits`` and ``teacher_logits`` are ``(B, C, *spatial)``; ``weight`` is an optional
    ``(B, *spatial)`` voxel weight. The result has the dtype of ``student_logits``.
    """
    loss = reduce_loss(uncl_voxel_loss(student_logits, teacher_logits, beta), weight, reduction)
    return loss.to(student_logits.dtype)
