"""FeCL, the focal entropy-aware contrastive loss: public function, module and autograd.

The fused backends compute per-anchor statistics in streaming kernels (docs/fecl_kernels.md);
this file validates the inputs, resolves the preset, calls the backend through the
``torch.library`` ops ``dycon::fecl`` / ``dycon::fecl_backward`` and applies the reduction in
plain torch (cheap: ``(B, N)`` maps). The ``reference`` backend is the dense PyTorch code.
The teacher threshold, which the official preset ramps every epoch, enters the ops as a 0-dim
tensor so that a compiled step does not recompile when it changes (``_checks.scalar_tensor``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._prims_common import alert_not_deterministic

from dycon_kernels import _checks, backends, presets, reference

REDUCTIONS = ("mean", "mean_positive", "sum", "none")


@dataclass(frozen=True)
class FeclConfig:
    """What the kernels need to know (attribute names are the backends' contract)."""

    tau: float
    gamma_pos: float
    gamma_neg: float
    top_k: int              # 0 = every negative
    column_shift: bool
    teacher: str            # 'none' | 'topk' | 'threshold'
    teacher_top_k: int
    teacher_threshold: float


# ------------------------------------------------------------------------------------------
# The custom ops. Outputs: (loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx,
# teacher_idx, topk_sim, teacher_sim); only loss and cross are differentiable, the rest are saved
# statistics.

def _config(tau, gamma_pos, gamma_neg, top_k, column_shift, teacher, teacher_top_k, teacher_threshold):
    return FeclConfig(tau, gamma_pos, gamma_neg, top_k, column_shift, teacher, teacher_top_k, teacher_threshold)


def _stat_dtype(z: Tensor) -> torch.dtype:
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _stores_sims(module) -> bool:
    """Whether a backend's forward also returns the selected keys' similarities (topk_sim,
    teacher_sim, empty unless its ``stored_sims(dtype)``) and its backward takes them
    (docs/fecl_kernels.md, "Entry points"): the Triton backend. The C++ one returns 9 outputs."""
    return hasattr(module, "stored_sims")


def _needed_outputs(column_shift: bool, teacher: str, top_k: int, teacher_top_k: int, sims: bool):
    """Which of the 11 outputs carry data for this configuration; the others are empty (0,).
    ``sims``: the backend stores the selected keys' similarities for these embeddings."""
    threshold = teacher == "threshold"
    teacher_topk = teacher == "topk" and teacher_top_k > 0
    return [True, threshold, threshold, True, True, True, column_shift, top_k > 0, teacher_topk,
            top_k > 0 and sims, teacher_topk and sims]


def _backend_sims(module, dtype: torch.dtype) -> bool:
    """Whether this backend module stores the selected keys' similarities for ``dtype``."""
    return _stores_sims(module) and module.stored_sims(dtype)


@torch.library.custom_op("dycon::fecl", mutates_args=())
def _fecl_op(z: Tensor, y: Tensor, zt: Optional[Tensor], yt: Optional[Tensor], u: Optional[Tensor],
             tau: float, gamma_pos: float, gamma_neg: float, top_k: int, column_shift: bool, teacher: str,
             teacher_top_k: int, teacher_threshold: Tensor, backend: str) -> list[Tensor]:
    cfg = _config(tau, gamma_pos, gamma_neg, top_k, column_shift, teacher, teacher_top_k, float(teacher_threshold))
    module = backends.load(backend)
    outs = module.fecl_forward(z, y, zt, yt, u, cfg)
    if not _stores_sims(module):
        outs = (*outs, z.new_empty(0, dtype=_stat_dtype(z)), z.new_empty(0, dtype=_stat_dtype(z)))
    # One convention for every backend (and for the fake impl below): unused outputs are (0,).
    needed = _needed_outputs(column_shift, teacher, top_k, teacher_top_k, _backend_sims(module, z.dtype))
    return [o if need else o.new_empty(0) for o, need in zip(outs, needed)]


@_fecl_op.register_fake
def _(z, y, zt, yt, u, tau, gamma_pos, gamma_neg, top_k, column_shift, teacher, teacher_top_k,
      teacher_threshold, backend):
    selected = [(z.shape[0], z.shape[1], top_k), (z.shape[0], z.shape[1], teacher_top_k)]
    shapes = [z.shape[:2]] * 7 + selected * 2
    dtypes = [_stat_dtype(z)] * 7 + [torch.int64] * 2 + [_stat_dtype(z)] * 2
    needed = _needed_outputs(column_shift, teacher, top_k, teacher_top_k,
                             _backend_sims(backends.load(backend), z.dtype))
    return [z.new_empty(shape if need else (0,), dtype=dtype) for shape, dtype, need in zip(shapes, dtypes, needed)]


def _needs_atomics(backend: str, device_type: str, top_k: int) -> bool:
    """Whether fecl_backward adds the key side of the top-k pairs with atomics, whose float sums
    depend on the order in which GPU threads arrive (docs/fecl_kernels.md, "Determinism"): the
    CUDA backend on a GPU. The Triton backend reads the key side through a transposed index
    instead (no atomics)."""
    return top_k > 0 and backend == "cuda" and device_type == "cuda"


@torch.library.custom_op("dycon::fecl_backward", mutates_args=())
def _fecl_backward_op(grad_loss: Tensor, grad_cross: Tensor, z: Tensor, y: Tensor, zt: Optional[Tensor],
                      yt: Optional[Tensor], u: Optional[Tensor], log_neg: Tensor, r: Tensor, n_pos: Tensor,
                      col_shift: Tensor, topk_idx: Tensor, teacher_idx: Tensor, topk_sim: Tensor,
                      teacher_sim: Tensor, tau: float, gamma_pos: float, gamma_neg: float, top_k: int,
                      column_shift: bool, teacher: str, teacher_top_k: int, teacher_threshold: Tensor,
                      backend: str) -> Tensor:
    if _needs_atomics(backend, z.device.type, top_k):
        alert_not_deterministic(f"dycon::fecl_backward with top_k on the {backend} backend")
    cfg = _config(tau, gamma_pos, gamma_neg, top_k, column_shift, teacher, teacher_top_k, float(teacher_threshold))
    module = backends.load(backend)
    sims = (topk_sim, teacher_sim) if _stores_sims(module) else ()
    return module.fecl_backward(grad_loss.contiguous(), grad_cross.contiguous(), z, y, zt, yt, u, log_neg, r, n_pos,
                                col_shift, topk_idx, teacher_idx, *sims, cfg)


@_fecl_backward_op.register_fake
def _(grad_loss, grad_cross, z, *rest):
    return torch.empty_like(z)


_PARAMS = ("tau", "gamma_pos", "gamma_neg", "top_k", "column_shift", "teacher", "teacher_top_k",
           "teacher_threshold", "backend")


def _setup_context(ctx, inputs, output):
    z, y, zt, yt, u = inputs[:5]
    ctx.params = inputs[5:]
    ctx.save_for_backward(z, y, zt, yt, u, *output[3:])  # log_neg .. teacher_sim
    ctx.mark_non_differentiable(*output[2:])


def _backward(ctx, grads):
    if torch.is_grad_enabled():
        # create_graph=True (a gradient penalty): the fused backward has no derivative of its own,
        # and torch's "no autograd formula" error would not say what to do
        raise RuntimeError("fecl: second-order gradients (create_graph=True) need backend='reference'; the "
                           f"fused {ctx.params[-1]!r} backend's backward cannot be differentiated again")
    grad_loss, grad_cross = grads[0], grads[1]
    z, y, zt, yt, u, *saved = ctx.saved_tensors
    dz = _fecl_backward_op(grad_loss, grad_cross, z, y, zt, yt, u, *saved, *ctx.params)
    return (dz,) + (None,) * (4 + len(_PARAMS))


_fecl_op.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------------------------
# Validation and the public API.

def _check_inputs(z, y, zt, yt, u, params, check_values: bool):
    _checks.float_tensor(z, "embeddings")
    _checks.tensor(y, "labels")
    if z.dim() != 3:
        raise ValueError(f"embeddings must be (B, N, D), got shape {tuple(z.shape)}")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"labels must be an integer tensor (-1 = ignored), got {y.dtype}")
    if tuple(y.shape) != tuple(z.shape[:2]):
        raise ValueError(f"labels must be (B, N) = {tuple(z.shape[:2])}, got {tuple(y.shape)}")
    if zt is not None:
        _checks.float_tensor(zt, "teacher_embeddings")
        if zt.dim() != 3 or zt.shape[0] != z.shape[0] or zt.shape[2] != z.shape[2]:
            raise ValueError(f"teacher_embeddings must be (B, Nt, D) with B = {z.shape[0]}, D = {z.shape[2]}, "
                             f"got {tuple(zt.shape)}")
        if zt.dtype != z.dtype:
            raise ValueError(f"teacher_embeddings is {zt.dtype} but embeddings is {z.dtype}")
        if yt is None and zt.shape[1] != z.shape[1]:
            raise ValueError(f"teacher has Nt = {zt.shape[1]} patches but N = {z.shape[1]}: pass teacher_labels")
    if yt is not None:
        if zt is None:
            raise ValueError("teacher_labels given without teacher_embeddings")
        if yt.is_floating_point() or yt.dtype == torch.bool:
            raise ValueError(f"teacher_labels must be an integer tensor, got {yt.dtype}")
        if tuple(yt.shape) != tuple(zt.shape[:2]):
            raise ValueError(f"teacher_labels must be (B, Nt) = {tuple(zt.shape[:2])}, got {tuple(yt.shape)}")
    if u is not None:
        _checks.float_tensor(u, "anchor_weight")
        if tuple(u.shape) != tuple(z.shape[:2]):
            raise ValueError(f"anchor_weight must be (B, N) = {tuple(z.shape[:2])}, got {tuple(u.shape)}")
    _checks.same_device([("embeddings", z), ("labels", y), ("teacher_embeddings", zt),
                         ("teacher_labels", yt), ("anchor_weight", u)])
    _check_params(params)
    if check_values:  # needs a device sync on the GPU, hence optional
        for name, t in (("embeddings", z), ("teacher_embeddings", zt), ("anchor_weight", u)):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{name} contains NaN or Inf")
        if u is not None and bool((u < 0).any()):
            raise ValueError("anchor_weight must be >= 0")


def _check_params(p):
    if not (isinstance(p["temperature"], (int, float)) and p["temperature"] > 0):
        raise ValueError(f"temperature must be a number > 0, got {p['temperature']!r}")
    for name in ("gamma_pos", "gamma_neg", "teacher_weight"):
        _checks.non_negative(p[name], name)
    for name in ("top_k", "teacher_top_k"):
        k = p[name]
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ValueError(f"{name} must be None or an int >= 1, got {k!r}")
    _checks.choice(p["shift"], "shift", ("exact", "column"))
    _checks.choice(p["teacher"], "teacher", (None, "none", "topk", "threshold"))
    _checks.choice(p["reduction"], "reduction", REDUCTIONS)
    if p["teacher"] == "topk" and p["teacher_top_k"] is None:
        raise ValueError("teacher='topk' needs teacher_top_k")
    if p["teacher"] == "topk" and p["shift"] == "column":
        raise ValueError("shift='column' cannot be combined with teacher='topk' (losses.md)")


def _threshold_tensor(p) -> Tensor:
    """The op's teacher threshold: a 0-dim float64 tensor, 0 when the threshold teacher is off."""
    if p["teacher"] != "threshold":
        return torch.zeros((), dtype=torch.float64)
    if p["teacher_threshold"] is None:
        raise ValueError("teacher='threshold' needs a teacher_threshold (a number or a 0-dim tensor)")
    return _checks.scalar_tensor(p["teacher_threshold"], "teacher_threshold")


def _reduce(loss, cross, cross_count, n_pos, y, teacher_weight, reduction):
    """losses.md reductions of the per-anchor maps, plus the threshold teacher term (when active:
    otherwise ``cross`` is empty)."""
    cross_share = teacher_weight * cross / cross_count.sum().clamp_min(1) if cross.numel() else None
    if reduction == "none":
        return loss if cross_share is None else loss + cross_share
    total = loss.sum()
    if reduction == "mean":
        total = total / (y >= 0).sum().clamp_min(1)
    elif reduction == "mean_positive":
        total = total / (n_pos > 0).sum().clamp_min(1)
    return total if cross_share is None else total + cross_share.sum()


def _dense_size(z: Tensor, zt: Optional[Tensor], p) -> tuple[int, str]:
    """(bytes, description) of the dense reference's buffers, for 'auto' to refuse what cannot fit."""
    (B, N, D), Nt = z.shape, (zt.shape[1] if zt is not None and p["teacher"] not in (None, "none") else 0)
    return (backends.fecl_reference_bytes(B, N, Nt, z.dtype),
            f"B={B}, N={N}, Nt={Nt}, D={D} ({str(z.dtype).replace('torch.', '')})")


def fecl(embeddings: Tensor, labels: Tensor, teacher_embeddings: Optional[Tensor] = None,
         teacher_labels: Optional[Tensor] = None, *, anchor_weight: Optional[Tensor] = None,
         preset: str = "dycon", backend: str = "auto", check_inputs: bool = True, **params) -> Tensor:
    """Focal entropy-aware contrastive loss (losses.md section 2).

    Args:
        embeddings: ``(B, N, D)`` student patch embeddings, L2-normalised along ``D``
            (:class:`FeCLoss` normalises for you).
        labels: ``(B, N)`` integer patch labels, ``-1`` = ignored.
        teacher_embeddings, teacher_labels: optional ``(B, Nt, D)`` / ``(B, Nt)`` teacher side
            (no gradient; labels default to ``labels``). Without them the teacher term is absent.
        anchor_weight: optional ``(B, N)`` weights ``u >= 0`` (no gradient).
        preset: ``"dycon"`` (default) or ``"official"`` (the released code, quirks included).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.
        check_inputs: also check values (finite embeddings, ``u >= 0``); costs a device sync,
            and is skipped inside ``torch.compile``.
        **params: any of ``temperature, gamma_pos, gamma_neg, top_k, shift, teacher,
            teacher_top_k, teacher_threshold, teacher_weight, reduction``, overriding the preset.
            ``teacher_threshold`` may be a number or a 0-dim tensor (pass a tensor when it follows
            a schedule under ``torch.compile``: a changing float recompiles the step).
    """
    p = presets.fecl_params(preset, **params)
    # Value checks read tensor contents: skipped inside torch.compile, where they would break the graph.
    check_values = check_inputs and not torch.compiler.is_compiling()
    _check_inputs(embeddings, labels, teacher_embeddings, teacher_labels, anchor_weight, p, check_values)
    p["teacher_threshold"] = _threshold_tensor(p)
    name = backends.resolve(backend, embeddings.device, "fecl", dense=_dense_size(embeddings, teacher_embeddings, p))
    if name == "reference":
        return reference.fecl(embeddings, labels, teacher_embeddings, teacher_labels, anchor_weight=anchor_weight, **p)

    teacher = p["teacher"] if (teacher_embeddings is not None and p["teacher"] not in (None, "none")) else "none"
    zt = teacher_embeddings.detach().contiguous() if teacher != "none" else None
    yt = None
    if zt is not None:
        yt = (labels if teacher_labels is None else teacher_labels).long().contiguous()
    N = embeddings.shape[1]
    # k beyond the number of candidates selects them all: cap it so the index buffers stay small.
    top_k = min(p["top_k"], max(N - 1, 1)) if p["top_k"] else 0
    teacher_top_k = min(p["teacher_top_k"], zt.shape[1]) if teacher == "topk" else 0
    u = anchor_weight.detach().float().contiguous() if anchor_weight is not None else None
    outs = _fecl_op(embeddings.contiguous(), labels.long().contiguous(), zt, yt, u, float(p["temperature"]),
                    float(p["gamma_pos"]), float(p["gamma_neg"]), top_k, p["shift"] == "column", teacher,
                    teacher_top_k, p["teacher_threshold"], name)
    loss, cross, cross_count, n_pos = outs[0], outs[1], outs[2], outs[5]
    out = _reduce(loss, cross, cross_count, n_pos, labels, float(p["teacher_weight"]), p["reduction"])
    return out.to(embeddings.dtype)


class FeCLoss(nn.Module):
    """``nn.Module`` form of :func:`fecl` that L2-normalises both embeddings along the last axis.

    Parameters given here (preset and overrides) apply to every call; ``forward`` also accepts
    per-call overrides such as the official preset's ramped ``teacher_threshold``.
    """

    def __init__(self, preset: str = "dycon", backend: str = "auto", **params):
        super().__init__()
        presets.fecl_params(preset, **params)  # fail early on unknown names
        self.preset, self.backend, self.params = preset, backend, params

    def forward(self, embeddings: Tensor, labels: Tensor, teacher_embeddings: Optional[Tensor] = None,
                teacher_labels: Optional[Tensor] = None, anchor_weight: Optional[Tensor] = None,
                **overrides) -> Tensor:
        z = F.normalize(embeddings, dim=-1)
        zt = F.normalize(teacher_embeddings, dim=-1) if teacher_embeddings is not None else None
        return fecl(z, labels, zt, teacher_labels, anchor_weight=anchor_weight, preset=self.preset,
                    backend=self.backend, **{**self.params, **overrides})
