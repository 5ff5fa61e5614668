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


# ---------------------------------------------------------------------------------------------
# FeCL (losses.md section 2)
# ---------------------------------------------------------------------------------------------

FECL_SHIFTS = ("exact", "column")
FECL_TEACHERS = (None, "topk", "threshold")
FECL_REDUCTIONS = ("mean", "mean_positive", "sum", "none")
CROSS_EPS = 1e-18  # inside -log(1 - c + eps) of the threshold teacher term, as in the released code


def _topk_mask(scores: Tensor, candidates: Tensor, k: int) -> Tensor:
    """Boolean mask of the ``k`` largest ``scores`` among ``candidates`` along the last axis
    (all candidates when there are fewer than ``k``). Selection is not differentiable."""
    masked = scores.detach().masked_fill(~candidates, float("-inf"))
    values, index = masked.topk(min(k, scores.shape[-1]), dim=-1)
    # A -inf value means the row ran out of candidates: that slot selects nothing.
    return torch.zeros_like(candidates).scatter(-1, index, values > float("-inf"))


def fecl(
    embeddings: Tensor,
    labels: Tensor,
    teacher_embeddings: Optional[Tensor] = None,
    teacher_labels: Optional[Tensor] = None,
    *,
    anchor_weight: Optional[Tensor] = None,
    temperature: float = 0.6,
    gamma_pos: float = 2.0,
    gamma_neg: float = 2.0,
    top_k: Optional[int] = None,
    shift: str = "exact",
    teacher: Optional[str] = "topk",
    teacher_top_k: Optional[int] = 32,
    teacher_threshold: Optional[float] = None,
    teacher_weight: float = 1.0,
    reduction: str = "mean",
) -> Tensor:
    """Focal entropy-aware contrastive loss (losses.md section 2), dense ``(B, N, N)``.

    ``embeddings`` ``(B, N, D)`` are assumed L2-normalised (not normalised here); ``labels``
    ``(B, N)`` integer, ``-1`` = ignored. ``teacher_embeddings`` ``(B, Nt, D)`` (no gradient) with
    ``teacher_labels`` ``(B, Nt)`` (default: ``labels``, which needs ``Nt == N``); ignored teacher
    patches (label -1) are never teacher negatives. ``anchor_weight`` ``(B, N)`` is ``u`` (no
    gradient). Computed in float32 (float64 for float64 input); returned in the input dtype.

    Choices where the spec leaves room (shared with docs/fecl_kernels.md):

    - ``teacher`` set but ``teacher_embeddings`` None: the teacher term is simply absent (so a
      preset can be used with or without a teacher). ``shift="column"`` with an active ``topk``
      teacher is an error.
    - ``shift="column"``: ``c_j = max(0, max l_ij)`` over *valid* anchors ``i != j`` (the
      released code has no ignored patches; by symmetry this is a row max for the kernels).
    - ``reduction="none"``: the ``(B, N)`` map of ``L_i``; with the threshold teacher term, each
      anchor also gets its share ``teacher_weight * cross_i / |M|``, so that the map sums to the
      ``sum``-reduced total.
    - Negatives whose focal base ``(1 + cos)/2`` is ``<= 0`` (exactly antipodal, or below by
      rounding) have ``w = 0`` (with ``gamma_neg > 0``): they drop out, with no gradient.
    - The threshold term uses ``-log(max(1 - c, 0) + 1e-18)`` so that rounding (``c > 1``) cannot
      give NaN.
    """
    if shift not in FECL_SHIFTS:
        raise ValueError(f"unknown shift {shift!r}; choose one of {FECL_SHIFTS}")
    if teacher == "none":
        teacher = None
    if teacher not in FECL_TEACHERS:
        raise ValueError(f"unknown teacher mode {teacher!r}; choose one of {FECL_TEACHERS}")
    if reduction not in FECL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {FECL_REDUCTIONS}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")
    if embeddings.dim() != 3 or labels.shape != embeddings.shape[:2]:
        raise ValueError(f"expected embeddings (B, N, D) and labels (B, N), got "
                         f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
    use_teacher = teacher if teacher_embeddings is not None else None
    if use_teacher == "topk":
        if shift == "column":
            raise ValueError("shift='column' cannot be combined with teacher='topk'")
        if teacher_top_k is None or teacher_top_k < 1:
            raise ValueError(f"teacher='topk' needs teacher_top_k >= 1, got {teacher_top_k}")
    if use_teacher == "threshold" and teacher_threshold is None:
        raise ValueError("teacher='threshold' needs teacher_threshold")

    for name, lab in (("labels", labels), ("teacher_labels", teacher_labels)):
        if lab is not None and (lab.is_floating_point() or lab.is_complex()):
            raise ValueError(f"{name} must be an integer tensor, got {lab.dtype}")

    dtype = _compute_dtype(embeddings)
    tau = float(temperature)
    z = embeddings.to(dtype)
    y = labels.long()
    B, N, _ = z.shape
    valid = y >= 0
    eye = torch.eye(N, dtype=torch.bool, device=z.device)
    both_valid = valid[:, :, None] & valid[:, None, :]
    same = y[:, :, None] == y[:, None, :]
    pos = both_valid & same & ~eye                      # P(i) along the last axis
    neg = both_valid & ~same                            # Q(i) (the diagonal is "same")

    cos = z @ z.transpose(1, 2)
    logits = cos / tau                                  # l_ij (the diagonal is never used)

    # Key offset c_j, detached. Column mode: max over valid anchors i != j (axis 1), floor 0.
    if shift == "column":
        anchors = valid[:, :, None] & ~eye
        col_max = logits.detach().masked_fill(~anchors, float("-inf")).amax(dim=1)
        offset = col_max.clamp_min(0.0)[:, None, :]     # broadcast over anchors: c_j of key j
    else:
        offset = torch.zeros((), dtype=dtype, device=z.device)

    # log of every term of Neg_i: log w_iq + l_iq - c_q over H(i), then the teacher's l^t_ik over
    # T(i). Unselected entries are -inf, filled *after* the arithmetic so that their gradient is
    # exactly 0 (never 0 * inf).
    selected = neg if top_k is None else _topk_mask(logits, neg, top_k)
    neg_terms = logits - offset
    if gamma_neg != 0:
        base = (1.0 + cos) / 2.0                        # (1 + tau l)/2, in [0, 1] up to rounding
        selected = selected & (base > 0)                # w = 0: the term vanishes
        safe_base = torch.where(selected, base, torch.ones_like(base))  # keep log() finite
        neg_terms = neg_terms + gamma_neg * torch.log(safe_base)
    terms = [neg_terms.masked_fill(~selected, float("-inf"))]
    if use_teacher is not None:
        zt = teacher_embeddings.detach().to(dtype)
        yt = (labels if teacher_labels is None else teacher_labels).long()
        if yt.shape != zt.shape[:2] or zt.shape[0] != B:
            raise ValueError(f"teacher labels {tuple(yt.shape)} do not match teacher embeddings "
                             f"{tuple(zt.shape)} (pass teacher_labels when Nt != N)")
        cross_cos = z @ zt.transpose(1, 2)              # c_ik = <z_i, zt_k>, (B, N, Nt)
        cross_neg = valid[:, :, None] & (yt >= 0)[:, None, :] & (y[:, :, None] != yt[:, None, :])
    if use_teacher == "topk":
        teacher_logits = cross_cos / tau                # no key offset
        chosen = _topk_mask(teacher_logits, cross_neg, teacher_top_k)
        terms.append(teacher_logits.masked_fill(~chosen, float("-inf")))
    terms = torch.cat(terms, dim=-1)

    # log Neg_i by log-sum-exp with a detached row max; rows without any negative get a finite
    # placeholder and are masked out below (their L_i is exactly 0: S = 1).
    row_max = terms.detach().amax(dim=-1, keepdim=True)
    has_neg = row_max > float("-inf")
    row_max = torch.where(has_neg, row_max, torch.zeros_like(row_max))
    scaled_sum = torch.exp(terms - row_max).sum(dim=-1, keepdim=True)
    log_neg = row_max + torch.log(torch.where(has_neg, scaled_sum, torch.ones_like(scaled_sum)))

    # S_ij = e_ij / (e_ij + Neg_i) = sigmoid(x_ij): log S and 1 - S in log form, so nothing
    # overflows for small tau and saturated pairs keep a zero (not NaN) gradient.
    active = pos & has_neg
    x = logits - offset - log_neg
    log_s = torch.nn.functional.logsigmoid(x)
    if gamma_pos != 0:  # (1 - S)^gamma_pos = exp(gamma_pos * log sigmoid(-x)), differentiated
        log_s = torch.exp(gamma_pos * torch.nn.functional.logsigmoid(-x)) * log_s
    pair_sum = torch.where(active, log_s, torch.zeros_like(log_s)).sum(dim=-1)

    n_pos = pos.sum(dim=-1).to(dtype)
    loss = -pair_sum / n_pos.clamp_min(1.0)             # L_i = 0 without positives
    if anchor_weight is not None:
        u = anchor_weight.detach().to(dtype)
        loss = loss * torch.where(valid, u, torch.zeros_like(u))  # no NaN from ignored anchors

    # Threshold teacher term over the whole batch: sum_M -log(1 - c_ik + eps) / |M|.
    cross_share = None
    if use_teacher == "threshold":
        in_m = cross_neg & (cross_cos > teacher_threshold)
        # Clamped: rounding can give c > 1 (e.g. a teacher patch equal to the anchor).
        cross_pair = -torch.log((1.0 - cross_cos).clamp_min(0.0) + CROSS_EPS)
        cross = torch.where(in_m, cross_pair, torch.zeros_like(cross_pair)).sum(dim=-1)
        cross_share = teacher_weight * cross / in_m.sum().clamp_min(1).to(dtype)  # (B, N)

    if reduction == "none":
        out = loss if cross_share is None else loss + cross_share
    else:
        out = loss.sum()
        if reduction == "mean":
            out = out / valid.sum().clamp_min(1).to(dtype)
        elif reduction == "mean_positive":
            out = out / (n_pos > 0).sum().clamp_min(1).to(dtype)
        if cross_share is not None:
            out = out + cross_share.sum()
    return out.to(embeddings.dtype)
