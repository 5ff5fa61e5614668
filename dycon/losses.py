"""The building blocks of every objective, written as batch sums.

Every loss is a ratio of sums over the batch: a term's sums are ``tensor([numerator,
denominator])`` (Dice: one row of three sums per class). A framework's ``loss_sums`` returns
this process's sums (the part that ``--compile`` compiles); ``dycon.loop.compute_losses`` adds
them over the processes (dycon.distributed) and forms the ratios, so that K processes give the
loss of the global batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def count(n, like: torch.Tensor) -> torch.Tensor:
    """A denominator ``n`` as a float32 tensor on ``like``'s device."""
    return torch.as_tensor(n, dtype=torch.float32, device=like.device)


def dice_sums(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per foreground class: sum(p y), sum(y^2), sum(p^2) over the batch, shape ``(C-1, 3)``;
    voxels labelled -1 (an ``ignore`` label) are left out, as nnU-Net masks them."""
    rows, scored = [], (labels >= 0).float()
    for c in range(1, num_classes):
        p, y = probs[:, c] * scored, (labels == c).float()
        rows.append(torch.stack([(p * y).sum(), (y * y).sum(), (p * p).sum()]))
    return torch.stack(rows)


def dice_loss(sums: torch.Tensor) -> torch.Tensor:
    """Mean over the foreground classes of 1 - (2 sum(p y) + 1e-5) / (sum(y^2) + sum(p^2) + 1e-5)."""
    inter, y2, p2 = sums.unbind(1)
    return (1 - (2 * inter + 1e-5) / (y2 + p2 + 1e-5)).mean()


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed voxel cross-entropy over the voxels not labelled -1. Written with gather rather
    than F.cross_entropy, whose CUDA kernel has no deterministic mode."""
    scored = labels >= 0
    return -(logits.log_softmax(1).gather(1, labels.clamp_min(0)[:, None])[:, 0] * scored).sum()


def supervised_sums(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """CE and Dice sums of labelled volumes: ``{"ce": (sum, voxels), "dice": (C-1) * 3 sums}``;
    voxels labelled -1 (an ``ignore`` label) count in neither."""
    logits = logits.float()
    return {"ce": torch.stack([cross_entropy_sum(logits, labels), (labels >= 0).sum().float()]),
            "dice": dice_sums(logits.softmax(1), labels, logits.shape[1]).flatten()}


def mse_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, softmax_twice: bool = False) -> torch.Tensor:
    """Mean-Teacher consistency: squared difference of the softmax outputs, ``(sum, elements)``.

    ``softmax_twice``: the released DyCON code applies softmax to the probabilities again."""
    s_probs, t_probs = student_logits.float().softmax(1), teacher_logits.float().softmax(1)
    if softmax_twice:
        s_probs, t_probs = s_probs.softmax(1), t_probs.softmax(1)
    return torch.stack([((s_probs - t_probs) ** 2).sum(), count(s_probs.numel(), s_probs)])


def patch_labels_dycon(labels: torch.Tensor, teacher_probs: torch.Tensor, labeled_bs: int, grid,
                       loss_cfg: dict) -> torch.Tensor:
    """Patch labels without leakage: ground truth for the labelled volumes, the teacher's argmax
    for the others; majority class per patch, -1 where the majority or the teacher's confidence
    is too weak. Voxels labelled -1 (an ``ignore`` label) vote for no class. Returns ``(B, N)``."""
    num_classes = teacher_probs.shape[1]
    voxel = torch.cat([labels[:labeled_bs], teacher_probs[labeled_bs:].argmax(1)])
    block = [s // g for s, g in zip(labels.shape[1:], grid)]
    votes = F.one_hot(voxel.clamp_min(0), num_classes) * (voxel >= 0)[..., None]
    share = F.avg_pool3d(votes.permute(0, 4, 1, 2, 3).float(), block)
    purity, patch = share.max(1)
    confidence = F.avg_pool3d(teacher_probs.max(1).values[:, None].float(), block)[:, 0]
    labelled = torch.arange(len(patch), device=patch.device)[:, None, None, None] < labeled_bs
    unsure = (purity < loss_cfg["patch_purity"]) | (~labelled & (confidence < loss_cfg["teacher_confidence"]))
    return torch.where(unsure, -1, patch).flatten(1)


def patch_labels_official(labels: torch.Tensor, grid) -> torch.Tensor:
    """The released code's patch labels: trilinear downsampling of the (ground-truth) mask > 0.5."""
    small = F.interpolate(labels[:, None].float(), size=tuple(grid), mode="trilinear", align_corners=False)
    return (small[:, 0] > 0.5).long().flatten(1)


def anchor_weights(student_logits: torch.Tensor, grid) -> torch.Tensor:
    """u = 1 + H: the student's softmax entropy pooled to the patch grid, normalised by log C."""
    probs = student_logits.detach().float().softmax(1)
    entropy = -(probs * torch.log(probs + 1e-6)).sum(1, keepdim=True) / math.log(probs.shape[1])
    block = [s // g for s, g in zip(student_logits.shape[2:], grid)]
    return 1.0 + F.avg_pool3d(entropy, block)[:, 0].flatten(1)


def patch_grid(cfg: dict) -> list[int]:
    """FeCL patch grid: the input divided by 16 / feature_scaler, or ``model.patch_grid`` where a
    network of another depth sets it (dycon.nnunet: nnU-Net's plans)."""
    if cfg["model"].get("patch_grid"):
        return list(cfg["model"]["patch_grid"])
    return [int(p) * cfg["model"]["feature_scaler"] // 16 for p in cfg["train"]["patch_size"]]
