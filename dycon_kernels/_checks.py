"""Input validation shared by the public ops: every problem becomes a ValueError that names it."""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def tensor(x, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def float_tensor(x, name: str) -> Tensor:
    tensor(x, name)
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be a floating-point tensor (float16/bfloat16/float32/float64), got {x.dtype}")
    return x


def same_device(named: Sequence[tuple[str, Optional[Tensor]]]) -> torch.device:
    present = [(n, t) for n, t in named if t is not None]
    first_name, first = present[0]
    for name, t in present[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; move them to one device")
    return first.device


def choice(value, name: str, allowed: Sequence) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


def non_negative(value, name: str) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value}")
    return value


# The last few numbers scalar_tensor made tensors of (eager only): creating a 0-dim tensor is a
# torch call of ~3 us with warm caches, in the serial part of every step. The tensors are the
# ops' inputs only, never handed to the caller, so sharing them is safe. Keyed with the sign, so
# that -0.0 keeps its own.
_SCALARS: dict = {}
_SCALARS_KEPT = 8


def _float64_tensor(value: float) -> Tensor:
    if torch.compiler.is_compiling():  # a cache read under dynamo would be a guard
        return torch.tensor(value, dtype=torch.float64)
    key = (value, math.copysign(1.0, value))
    out = _SCALARS.get(key)
    if out is None:
        if len(_SCALARS) >= _SCALARS_KEPT:
            _SCALARS.clear()
        out = _SCALARS[key] = torch.tensor(value, dtype=torch.float64)
    return out


def scalar_tensor(value, name: str) -> Tensor:
    """A number or a 0-dim real tensor as a 0-dim CPU float64 tensor without gradient.

    The custom ops take scheduled scalars (UnCL's beta, FeCL's teacher threshold) in this form:
    torch.compile specialises on Python floats, so a float that changes every epoch would
    recompile every epoch, while a tensor is a graph input. A float32 tensor keeps its rounded
    value (``torch.tensor(0.7)`` is 0.699999988...)."""
    if isinstance(value, Tensor):
        if value.dim() != 0 or value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"{name} must be a number or a 0-dim real tensor, got a {value.dtype} tensor "
                             f"of shape {tuple(value.shape)}")
        return value.detach().to("cpu", torch.float64)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number or a 0-dim tensor, got {value!r}")
    return _float64_tensor(float(value))


def non_negative_scalar(value, name: str) -> Tensor:
    """:func:`scalar_tensor` of a value that must be finite and >= 0. The value of a tensor is
    not checked inside torch.compile: reading it there would break the graph."""
    out = scalar_tensor(value, name)
    if not (isinstance(value, Tensor) and torch.compiler.is_compiling()):
        non_negative(value, name)
    return out


def check_uncl_inputs(student: Tensor, teacher: Tensor, beta, weight: Optional[Tensor], reduction: str):
    """Validate UnCL inputs; return ``beta`` as a 0-dim float64 CPU tensor (:func:`scalar_tensor`)
    and ``weight`` reshaped to ``(B, *spatial)``."""
    float_tensor(student, "student_logits")
    float_tensor(teacher, "teacher_logits")
    if student.dtype != teacher.dtype:
        raise ValueError(f"student_logits is {student.dtype} but teacher_logits is {teacher.dtype}")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} must have the same shape"
        )
    if student.dim() < 3:
        raise ValueError(f"logits must be (B, C, *spatial) with at least one spatial axis, got {tuple(student.shape)}")
    if student.shape[1] < 2:
        raise ValueError(f"logits need C >= 2 classes along dim 1, got C = {student.shape[1]}")
    beta = non_negative_scalar(beta, "beta")
    choice(reduction, "reduction", REDUCTIONS)
    if weight is not None:
        float_tensor(weight, "weight")
        want = (student.shape[0],) + tuple(student.shape[2:])
        if tuple(weight.shape) == (student.shape[0], 1) + want[1:]:
            weight = weight.squeeze(1)
        if tuple(weight.shape) != want:
            raise ValueError(f"weight must be (B, *spatial) = {want}, got {tuple(weight.shape)}")
    device = student.device
    if teacher.device != device or (weight is not None and weight.device != device):
        same_device([("student_logits", student), ("teacher_logits", teacher), ("weight", weight)])
    return beta, weight
