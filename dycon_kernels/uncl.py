"""UnCL, the uncertainty-aware consistency loss: public function, module and autograd.

The op is registered with ``torch.library`` (``dycon::uncl`` and its backward
``dycon::uncl_backward``) so that ``torch.compile`` traces through it without graph breaks.
``beta`` enters the ops as a 0-dim tensor, so that a compiled step does not recompile when the
schedule changes it (``_checks.scalar_tensor``).
Eager calls on plain tensors run the same functions through a plain ``autograd.Function``
(``_EagerUncl``), without the custom op's Python dispatch.
Which backend computes it is decided by ``dycon_kernels.backends.resolve``; the kernels
themselves live in ``csrc/uncl_*`` and ``dycon_kernels/triton/uncl.py``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from torch._subclasses.fake_tensor import is_fake

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


# Backends whose forward can also return the unit gradients (``uncl_forward_grad``, see
# dycon_kernels.backends): on the CPU, recomputing the softmaxes, logs and weights in the backward
# costs more time than keeping the B x C x V gradient; on a GPU the kernels are memory-bound and
# memory is scarcer, so they recompute.
_SAVES_GRAD = frozenset({"cpu"})


def _grads_to_save(backend: str, student: Tensor, teacher: Tensor) -> tuple[bool, bool]:
    """(the student's, the teacher's): whether the forward returns the unit gradients."""
    if backend not in _SAVES_GRAD or not (torch.is_grad_enabled() and student.requires_grad):
        return False, False
    return True, teacher.requires_grad


def _no_grad(x: Tensor) -> Tensor:
    """The placeholder for a unit gradient the forward did not compute."""
    return x.new_empty(0, dtype=_acc_dtype(x))


def _uncl_forward(student: Tensor, teacher: Tensor, beta: Tensor, weight: Optional[Tensor],
                  reduction: str, backend: str, save_grad: bool = False,
                  save_teacher_grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, ds, dt): ds and dt are the unit gradients d(sum_v w_v l_v)/d(logits), over the
    mean's divisor for reduction='mean', in the accumulation dtype when save_grad (dt: and
    save_teacher_grad), else empty."""
    be = backends.load(backend)
    if save_grad:  # the loss finished and the unit gradients scaled by the mean's divisor, in C++
        return be.uncl_forward_grad(student, teacher, float(beta), weight, reduction, save_teacher_grad)
    s, t, w, reduce = _flat(student), _flat(teacher), _flat_weight(weight), _REDUCE[reduction]
    out = be.uncl_forward(s, t, float(beta), w, reduce)
    if reduction == "none":
        out = out.view((student.shape[0],) + tuple(student.shape[2:]))
    elif reduction == "mean":
        out = out / _mean_divisor(student, weight)
    return out.to(student.dtype), _no_grad(student), _no_grad(teacher)


_uncl_op = torch.library.custom_op("dycon::uncl", _uncl_forward, mutates_args=())


@_uncl_op.register_fake
def _(student, teacher, beta, weight, reduction, backend, save_grad=False, save_teacher_grad=False):
    shape = (student.shape[0],) + tuple(student.shape[2:]) if reduction == "none" else ()
    acc = _acc_dtype(student)
    ds = student.new_empty(student.shape, dtype=acc) if save_grad else _no_grad(student)
    dt = teacher.new_empty(teacher.shape, dtype=acc) if save_grad and save_teacher_grad else _no_grad(teacher)
    return student.new_empty(shape), ds, dt


def _voxel_grad(grad: Tensor, student: Tensor, reduction: str) -> Tensor:
    """The loss's grad in the accumulation dtype: 0-dim, or (B, V) for reduction='none'."""
    acc = _acc_dtype(student)
    if grad.dtype != acc:  # each torch call, even a no-op, costs 5-10 us with cold caches
        grad = grad.to(acc)
    return grad.reshape(student.shape[0], -1).contiguous() if reduction == "none" else grad


def _upstream(grad: Tensor, student: Tensor, weight: Optional[Tensor], reduction: str) -> Tensor:
    """The gradient of each voxel's w_v l_v: 0-dim, or (B, V) for reduction='none'."""
    grad = _voxel_grad(grad, student, reduction)
    return grad / _mean_divisor(student, weight) if reduction == "mean" else grad


@torch.library.custom_op("dycon::uncl_backward", mutates_args=())
def _uncl_backward_op(grad: Tensor, student: Tensor, teacher: Tensor, beta: Tensor,
                      weight: Optional[Tensor], reduction: str, need_teacher_grad: bool,
                      backend: str) -> tuple[Tensor, Tensor]:
    ds, dt = backends.load(backend).uncl_backward(
        _upstream(grad, student, weight, reduction), _flat(student), _flat(teacher), float(beta),
        _flat_weight(weight), need_teacher_grad)
    ds = ds.view(student.shape)
    dt = dt.view(teacher.shape) if need_teacher_grad else teacher.new_empty(0)
    return ds, dt


@_uncl_backward_op.register_fake
def _(grad, student, teacher, beta, weight, reduction, need_teacher_grad, backend):
    return torch.empty_like(student), (torch.empty_like(teacher) if need_teacher_grad else teacher.new_empty(0))


def _setup_context(ctx, inputs, output, traced: Optional[bool] = None):
    """traced: whether the outputs are fake tensors (torch.compile); None: find out."""
    student, teacher, beta, weight, reduction, backend = inputs[:6]
    _, ds_unit, dt_unit = output
    ctx.mark_non_differentiable(ds_unit, dt_unit)  # internal: the backward's input, never a loss
    ctx.set_materialize_grads(False)
    ctx.beta, ctx.reduction, ctx.backend = beta, reduction, backend
    ctx.unit = None
    if not ds_unit.numel() or (is_fake(ds_unit) if traced is None else traced):
        # No unit gradients (empty placeholders), or traced (torch.compile): AOTAutograd needs
        # every tensor the backward reads saved.
        ctx.save_for_backward(student, teacher, weight, ds_unit, dt_unit)
        return
    # Eager: an attribute, not a saved tensor, so that the first backward can scale the unit
    # gradients in place and return them (no second B x C x V buffer at the memory peak) and drop
    # them (_unit_grads). No reference cycle: being non-differentiable, they have no grad_fn.
    ctx.save_for_backward(student, teacher, weight, None, None)
    ctx.unit = (ds_unit, dt_unit)


def _unit_grads(ctx, student: Tensor, teacher: Tensor, weight: Optional[Tensor], need_t: bool):
    """Eager: the unit gradients for the caller to scale in place: the ones the forward kept,
    taken from ctx, or (a backward of a retained graph after the first) the same kernel's again,
    so that every backward gives the same bits. None where the backend computes gradients in its
    backward."""
    unit, ctx.unit = ctx.unit, None
    if unit is not None and (unit[1].numel() or not need_t):
        return unit
    if ctx.backend in _SAVES_GRAD and ctx.needs_input_grad[0]:
        _, ds, dt = _uncl_op(student, teacher, ctx.beta, weight, ctx.reduction, ctx.backend, True, need_t)
        return ds, dt
    return None


def _scaled(unit: Tensor, g: Tensor, like: Tensor, in_place: bool) -> Tensor:
    """unit * g in like's dtype, g 0-dim or (B, V) (one value per voxel, for every channel)."""
    if g.dim():
        g = g.view((g.shape[0], 1) + tuple(unit.shape[2:]))
    out = unit.mul_(g) if in_place else unit * g
    return out if out.dtype == like.dtype else out.to(like.dtype)


def _differentiable_grads(ctx, grad: Tensor, student: Tensor, teacher: Tensor, weight: Optional[Tensor]):
    """create_graph=True (a gradient penalty, a second-order method): the kernels' gradients carry
    no graph, so they come from the reference's autograd instead, which can be differentiated again."""
    ctx.unit = None
    need = [x for x, needed in zip((student, teacher), ctx.needs_input_grad[:2]) if needed]
    loss = reference.uncl(student, teacher, ctx.beta, weight=weight, reduction=ctx.reduction)
    grads = iter(torch.autograd.grad(loss, need, grad, create_graph=True))
    return tuple(next(grads) if needed else None for needed in ctx.needs_input_grad[:2])


def _backward(ctx, grad, _grad_ds_unit, _grad_dt_unit):
    if grad is None:  # grads are not materialised (setup_context): None means zero
        return (None,) * 8
    student, teacher, weight, ds_saved, dt_saved = ctx.saved_tensors
    if torch.is_grad_enabled():
        return (*_differentiable_grads(ctx, grad, student, teacher, weight), None, None, None, None, None, None)
    need_t = ctx.needs_input_grad[1]
    traced = ds_saved is not None and ds_saved.numel() > 0
    unit = (ds_saved, dt_saved) if traced else _unit_grads(ctx, student, teacher, weight, need_t)
    if unit is not None:
        g = _voxel_grad(grad, student, ctx.reduction)  # the unit gradients include the mean's divisor
        ds = _scaled(unit[0], g, student, in_place=not traced)
        dt = _scaled(unit[1], g, teacher, in_place=not traced) if need_t else None
    else:
        ds, dt = _uncl_backward_op(grad, student, teacher, ctx.beta, weight, ctx.reduction, need_t, ctx.backend)
    return ds, (dt if need_t else None), None, None, None, None, None, None


_uncl_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerUncl(torch.autograd.Function):
    """The custom op's forward and autograd without torch.library's dispatch, for eager calls
    on plain tensors: that dispatch (binding the arguments to the schema, the autograd wrapper,
    the wrapper that keeps dynamo out) was 35-45 us of a warm fwd+bwd of 83 us at 2 x 2 x 8^3, in
    the serial part of every step (docs/engineering.md, "Threads"). torch.compile, tensor
    subclasses and dispatch modes (FakeTensorMode, make_fx) get the custom op, which they trace."""

    @staticmethod
    def forward(ctx, *inputs):  # not a separate setup_context: Function.apply then binds arguments with inspect
        output = _uncl_forward(*inputs)
        _setup_context(ctx, inputs, output, traced=False)
        return output

    backward = staticmethod(_backward)


def _eager(*tensors: Optional[Tensor]) -> bool:
    """Whether a call on these tensors can skip the custom op (_EagerUncl)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    return all(x is None or type(x) is Tensor for x in tensors)


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
    op = _EagerUncl.apply if _eager(student_logits, teacher_logits, weight) else _uncl_op
    loss, _, _ = op(student_logits, teacher_logits, beta, weight, reduction, name,
                    *_grads_to_save(name, student_logits, teacher_logits))
    return loss


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
