"""Backend registry: which implementations exist here, and which one runs a given call.

'reference' is the dense PyTorch code of ``dycon_kernels.reference`` with plain autograd. Every
fused backend ('triton', 'cuda', 'cpu') is a module with the same entry points, which the
public ops call from their ``torch.library`` custom ops without looking inside:

UnCL
    ``uncl_forward(s, t, beta, weight, reduce)``: ``s``, ``t`` contiguous ``(B, C, V)`` logits of
    one dtype; ``weight`` a contiguous float32 ``(B, V)`` tensor or None. Returns the 0-dim sum of
    ``weight * l_v`` when ``reduce``, else the ``(B, V)`` map of ``weight * l_v``; float64 for
    float64 inputs, float32 otherwise.

    ``uncl_backward(grad, s, t, beta, weight, need_t_grad)``: ``grad`` is 0-dim (the same upstream
    gradient for every voxel) or ``(B, V)``, in the forward's output dtype. Returns
    ``(ds, dt)`` in the logits' dtype; ``dt`` is None unless ``need_t_grad``.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
from types import ModuleType

import torch

NAMES = ("triton", "cuda", "cpu", "reference")
_MODULES = {
    "triton": "dycon_kernels.triton",
    "cuda": "dycon_kernels.backends.cpp",
    "cpu": "dycon_kernels.backends.cpp",
}


def _extension():
    """The compiled extension, or None when the package was not built."""
    try:
        return importlib.import_module("dycon_kernels._C")
    except ImportError:
        return None


def extension_has(device_type: str) -> bool:
    """Whether dycon_kernels._C was built with kernels for this device type ('CPU' or 'CUDA')."""
    if _extension() is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dycon_C::uncl_forward", device_type)


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def can_run(name: str, device: torch.device) -> bool:
    if name == "reference":
        return True
    if name == "cpu":
        return device.type == "cpu" and extension_has("CPU")
    if name == "cuda":
        return device.type == "cuda" and extension_has("CUDA")
    if name == "triton":
        if not _triton_importable():
            return False
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())
    raise ValueError(f"unknown backend {name!r}; choose one of {list(NAMES) + ['auto']}")


def available_backends(device=None) -> list[str]:
    """Backends that can run on ``device`` (default: on any device of this machine)."""
    if device is not None:
        return [n for n in NAMES if can_run(n, torch.device(device))]
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    return [n for n in NAMES if any(can_run(n, d) for d in devices)]


def implements(name: str, op: str) -> bool:
    """Whether backend ``name`` has fused kernels for ``op`` ('uncl' or 'fecl')."""
    return name == "reference" or hasattr(load(name), f"{op}_forward")


@torch.compiler.assume_constant_result  # torch.compile: a constant, not code to trace
def resolve(backend: str, device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on ``device``: 'auto' picks the fastest one available.

    ``DYCON_BACKEND`` in the environment replaces 'auto'. An explicit backend that cannot run
    on the device is an error, never a silent fallback.
    """
    if backend == "auto":
        backend = os.environ.get("DYCON_BACKEND", "auto")
    if backend == "auto":
        order = ("triton", "cuda", "reference") if device.type == "cuda" else ("cpu", "reference")
        return next(n for n in order if can_run(n, device) and implements(n, op))
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(NAMES) + ['auto']}")
    if not can_run(backend, device):
        raise ValueError(
            f"backend {backend!r} cannot run on {device.type} tensors here "
            f"(available for {device.type}: {available_backends(device)})"
        )
    if not implements(backend, op):
        raise ValueError(f"backend {backend!r} has no {op} kernels in this build")
    return backend


# Shared memory per block (opt-in) of sm_80 (A100), sm_86/sm_89 (RTX 3090/4090, A6000, L40) and
# sm_90 (H100/H200): the cards every Triton launch configuration is checked to fit (tests and
# benchmarks/kernel_report.py); on a GPU the dispatchers read the device's own value.
SMEM_LIMITS = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def device_guard(device: torch.device):
    """Launch on the tensors' GPU, whichever is current (Triton launches on the current one, and
    another GPU's pointers there are an illegal address)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def poison_outputs() -> bool:
    return os.environ.get("DYCON_POISON", "0") == "1"


def new_output(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised kernel output; NaN-filled (or -12345 for integers) under DYCON_POISON=1,
    which the test suite sets so that an element a kernel forgets to write fails the test."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poison_outputs():
        out.fill_(float("nan") if out.is_floating_point() else -12345)
    return out


def load(name: str) -> ModuleType:
    """The module of a fused backend (not 'reference', which the ops call directly)."""
    return importlib.import_module(_MODULES[name])
