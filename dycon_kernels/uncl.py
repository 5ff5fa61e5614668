"""UnCL, the uncertainty-aware consistency loss: public function, module and autograd.

The op is registered with ``torch.library`` (``dycon::uncl`` and its backward
``dycon::uncl_backward``) so that ``torch.compile`` traces through it without graph breaks.
``beta`` enters the ops as a 0-dim tensor, so that a compiled step does not recompile when the
schedule changes it (``_checks.scalar_tensor``).
Which backend computes it is decided by ``dycon_kernels.backends.resolve``; the kernels
themselves live in ``csrc/uncl_*`` and ``dycon_kernels/triton/uncl.py``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from dycon_kernels import _checks, backends, reference

_REDUCE = {"mean": True, "sum": True, "none": False}


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _flat(x: Tensor) -> Tensor:
    """(B, C, *spatial) -> contiguous (B, C, V)."""
    return x.reshape(x.shape[0], x.shape[1], -1).contiguous()


def _flat_weight(weight: Optional[Tensor]) -> Optional[Tensor]:
    return None if weight is None else weight.reshape(weight.shape[0], -1).to(torch.float32).contiguous()


def _mean_divisor(student: Tensor, weight: Optional[Tensor]):
    """sum(weight), or the number of voxels: the denominator of reduction='mean'."""
    if weight is None:
        return student.numel() // student.shape[1]
    return weight.sum(dtype=_acc_dtype(student))


@torch.library.custom_op("dycon::uncl", mutates_args=())
def _uncl_op(student: Tensor, teacher: Tensor, beta: Tensor, weight: Optional[Tensor],
             reduction: str, backend: str) -> Tensor:
    be = backends.load(backend)
    out = be.uncl_forward(_flat(student), _flat(teacher), float(beta), _flat_weight(weight), _REDUCE[reduction])
    if reduction == "none":
        out = out.view((student.shape[0],) + tuple(student.shape[2:]))
    elif reduction == "mean":
        out = out / _mean_divisor(student, weight)
    return out.to(student.dtype)


@_uncl_op.register_fake
def _(student, teacher, beta, weight, reduction, backend):
    shape = (student.shape[0],) + tuple(student.shape[2:]) if reduction == "none" else ()
    return student.new_empty(shape)


@torch.library.custom_op("dycon::uncl_backward", mutates_args=())
def _uncl_backward_op(grad: Tensor, student: Tensor, teacher: Tensor, beta: Tensor,
                      weight: Optional[Tensor], reduction: str, need_teacher_grad: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    grad = grad.to(_acc_dtype(student))
    if reduction == "none":
        grad = grad.reshape(student.shape[0], -1).contiguous()
    elif reduction == "mean":
        grad = grad / _mean_divisor(student, weight)
    ds, dt = backends.load(backend).uncl_backward(
        grad, _flat(student), _flat(teacher), float(beta), _flat_weight(weight), need_teacher_grad)
    ds = ds.view(student.shape)
    dt = dt.view(teacher.shape) if need_teacher_grad else teacher.new_empty(0)
    return ds, dt


@_uncl_backward_op.register_fake
def _(grad, student, teacher, beta, weight, reduction, need_teacher_grad, backend):
    return torch.empty_like(student), (torch.empty_like(teacher) if need_teacher_grad else teacher.new_empty(0))


def _setup_context(ctx, inputs, output):
    student, teacher, beta, weight, reduction, backend = inputs
    ctx.save_for_backward(student, teacher, weight)
    ctx.beta, ctx.reduction, ctx.backend = beta, reduction, backend


def _backward(ctx, grad):
    student, teacher, weight = ctx.saved_tensors
    need_t = ctx.needs_input_grad[1]
    ds, dt = _uncl_backward_op(grad, student, teacher, ctx.beta, weight, ctx.reduction, need_t, ctx.backend)
    return ds, (dt if need_t else None), None, None, None, None


_uncl_op.register_autograd(_backward, setup_context=_setup_context)


def uncl(student_logits: Tensor, teacher_logits: Tensor, beta: Union[float, Tensor], *, weight: Optional[Tensor] = None,
         reduction: str = "mean", backend: str = "auto") -> Tensor:
    """Uncertainty-aware consistency loss between student and teacher logits (losses.md section 1).

    Args:
        student_logits, teacher_logits: ``(B, C, *spatial)`` logits, ``C >= 2``, same dtype
            (float16, bfloat16, float32 or float64) and device. The teacher gets a gradient only
            when it requires one.
        beta: entropy weight, ``>= 0``: a number or a 0-dim tensor (pass a tensor when it follows
            a schedule under ``torch.compile``: a changing float recompiles the step).
        weight: optional ``(B, *spatial)`` voxel weights (e.g. a mask of unlabelled voxels).
        reduction: ``"mean"`` (``sum(w l) / sum(w)``), ``"sum"`` or ``"none"`` (the voxel map).
        backend: ``"auto"``, ``"triton"``, ``"cuda"``, ``"cpu"`` or ``"reference"``.
    """
    beta, weight = _checks.check_uncl_inputs(student_logits, teacher_logits, beta, weight, reduction)
    name = backends.resolve(backend, student_logits.device, "uncl")
    if name == "reference":
        return reference.uncl(student_logits, teacher_logits, beta, weight=weight, reduction=reduction)
    return _uncl_op(student_logits, teacher_logits, beta, weight, reduction, name)


class UnCLoss(nn.Module):
    """``nn.Module`` form of :func:`uncl`; ``beta`` is passed per call (it follows a schedule)."""

    def __init__(self, reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        _checks.choice(reduction, "reduction", _checks.REDUCTIONS)
        self.reduction, self.backend = reduction, backend

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, beta: Union[float, Tensor],
                weight: Optional[Tensor] = None) -> Tensor:
        return uncl(student_logits, teacher_logits, beta, weight=weight, reduction=self.reduction,
                    backend=self.backend)
