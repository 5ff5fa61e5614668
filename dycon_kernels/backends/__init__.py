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

    ``uncl_forward_grad(s, t, beta, weight, reduction, need_t_grad)`` (the ``cpu`` backend only):
    ``s, t`` of shape ``(B, C, *spatial)``, ``weight`` ``(B, *spatial)``; the loss as the public op
    returns it and the unit gradients ``(ds, dt)`` of ``sum_v weight_v l_v`` (over the mean's
    divisor for ``reduction="mean"``) in the logits' shape and the output's dtype (``dt`` empty
    unless ``need_t_grad``), which the backward then only scales (dycon_kernels/uncl.py).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch

from dycon_kernels import _build

NAMES = ("triton", "cuda", "cpu", "reference")
_MODULES = {
    "triton": "dycon_kernels.triton",
    "cuda": "dycon_kernels.backends.cpp",
    "cpu": "dycon_kernels.backends.cpp",
}
# Where the extension files are (the package folder); tests point it elsewhere in a subprocess.
EXTENSION_DIR = Path(__file__).resolve().parents[1]


class KernelsNotBuiltWarning(UserWarning):
    """The compiled extension was never built here: the fused C++/CUDA kernels are absent."""


class KernelsNotLoadableWarning(RuntimeWarning):
    """The compiled extension exists but cannot be loaded by this Python/torch."""


@dataclass(frozen=True)
class ExtensionState:
    """What became of ``dycon_kernels._C`` in this process."""

    status: str                          # 'loaded' | 'absent' (never built) | 'broken' (cannot load)
    path: Optional[Path] = None          # the file loaded or tried (None when absent)
    record: dict = field(default_factory=dict)   # its build record (setup.py), {} when unknown
    error: str = ""                      # why it cannot be loaded ('broken' only)
    others: tuple = ()                   # extension files for other torch builds or Pythons
    module: Optional[ModuleType] = None

    @property
    def explanation(self) -> str:
        """One paragraph for a warning or an error: what happened and the command that fixes it
        ('' once loaded)."""
        if self.status == "loaded":
            return ""
        if self.status == "absent":
            return ("the compiled kernels (dycon_kernels._C) are not built in this installation, so the fused "
                    f"C++/CUDA backends are absent; build them with: {rebuild_command()}")
        return (f"the compiled kernels (dycon_kernels._C) cannot be used here: {self.error}. "
                f"Installed: torch {torch.__version__}, Python {sys.version.split()[0]} ({sys.prefix}). "
                f"Rebuild for this environment with: {rebuild_command()}")


def rebuild_command() -> str:
    """The command that builds the extension for the running Python and torch."""
    checkout = EXTENSION_DIR.parent
    if (checkout / "setup.py").is_file():
        return f"{sys.executable} -m pip install -e {checkout} --no-build-isolation"
    return f"{sys.executable} -m pip install --force-reinstall --no-build-isolation --no-deps dycon"


def _describe_build(path: Path) -> str:
    record = _build.read_record(path)
    if not record:
        return path.name
    return (f"{path.name} (torch {record.get('torch')}, Python {record.get('python')}, "
            f"environment {record.get('environment')})")


def _load(path: Path) -> ModuleType:
    """Import the extension file as dycon_kernels._C (its init function is PyInit__C)."""
    spec = importlib.util.spec_from_file_location("dycon_kernels._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["dycon_kernels._C"] = module
    return module


def _find_extension() -> ExtensionState:
    files = _build.built_files(EXTENSION_DIR)
    mine = EXTENSION_DIR / _build.extension_filename(torch.__version__)
    # before the torch tag in the name: an untagged build for this Python, torch unknown
    legacy = [EXTENSION_DIR / (_build.STEM + s) for s in importlib.machinery.EXTENSION_SUFFIXES]
    candidates = [p for p in [mine] + legacy if p.is_file()]
    others = tuple(p for p in files if p not in candidates)
    if not candidates:
        if not others:
            return ExtensionState("absent")
        return ExtensionState("broken", error=(
            f"it was built for another torch or Python only: {'; '.join(_describe_build(p) for p in others)}, "
            f"and not for this one (expected {mine.name}). Several environments share this checkout, or torch "
            "was replaced after the build; each environment needs its own build"), others=others)
    path = candidates[0]
    record = _build.read_record(path)
    try:
        module = _load(path)
    except Exception as exc:  # noqa: BLE001  (any failure to load is reported, then the process goes on)
        built_with = f"built with torch {record['torch']}" if record else "build record missing"
        return ExtensionState("broken", path, record, f"loading {path} failed ({built_with}): "
                                                       f"{type(exc).__name__}: {exc}", others)
    return ExtensionState("loaded", path, record, others=others, module=module)


@functools.lru_cache(maxsize=None)
def extension_state() -> ExtensionState:
    """Find and load the extension once per process; say once if it is absent or cannot load."""
    state = _find_extension()
    if state.status == "absent":
        warnings.warn(f"dycon_kernels: {state.explanation}. backend='auto' uses the other backends "
                      "meanwhile.", KernelsNotBuiltWarning, stacklevel=2)
    elif state.status == "broken":
        warnings.warn(f"dycon_kernels: {state.explanation}. backend='auto' uses the other backends "
                      "(Triton on GPUs, else the dense reference) meanwhile.", KernelsNotLoadableWarning,
                      stacklevel=2)
    return state


def _extension() -> Optional[ModuleType]:
    """The compiled extension, or None when it was not built or cannot be loaded here."""
    return extension_state().module


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


class DenseReferenceTooLarge(RuntimeError):
    """backend='auto' found no fused backend, and the dense reference would not fit in memory."""


# The dense FeCL reference keeps about 11-12 float32 (B, N, N + Nt) buffers at its peak, forward
# and backward (ru_maxrss at B=1, N=Nt=3000, both presets); the guard counts fewer, so that it
# only refuses what certainly does not fit.
FECL_REFERENCE_BUFFERS = 8


def fecl_reference_bytes(B: int, N: int, Nt: int, dtype: torch.dtype) -> int:
    """A lower bound on the memory of the dense FeCL reference (B anchors x N x (N + Nt) pairs)."""
    itemsize = 8 if dtype == torch.float64 else 4   # it computes in float32, float64 for float64
    return FECL_REFERENCE_BUFFERS * B * N * (N + Nt) * itemsize


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes a new allocation can get on ``device``: the GPU's free memory plus what torch's
    caching allocator holds unused; on the CPU, the available RAM. None when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        return None


def _why_not(name: str, device: torch.device, op: str) -> str:
    """Why a fused backend does not run ``op`` on ``device`` here (for 'auto''s explanation)."""
    if name == "triton":
        if not _triton_importable():
            return "triton is not installed"
        return "triton runs CPU tensors only under TRITON_INTERPRET=1"
    state = extension_state()
    if state.status != "loaded":
        return f"the C++/CUDA extension is {'not built' if state.status == 'absent' else 'not loadable'}"
    if not can_run(name, device):
        return f"the extension was built without {name.upper()} kernels"
    return f"{name} has no {op} kernels in this build"


def _auto(device: torch.device, op: str, dense) -> tuple[str, str]:
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    skipped = []
    for name in order:
        if can_run(name, device) and implements(name, op):
            because = f" ({'; '.join(skipped)})" if skipped else ""
            return name, f"the fastest backend that runs {op} on {device.type} tensors here{because}"
        skipped.append(f"{name}: {_why_not(name, device, op)}")
    missing = "; ".join(skipped)
    if dense is not None:
        need, size = dense
        free = free_memory(device)
        if free is not None and need > free:
            raise DenseReferenceTooLarge(
                f"{op} at {size} needs at least {need / 2**30:.1f} GiB in the dense reference backend, but "
                f"{device.type} has {free / 2**30:.1f} GiB free, and no fused backend runs it here ({missing})"
                + (f"; {extension_state().explanation}" if extension_state().status != "loaded" else ""))
    return "reference", f"no fused backend runs {op} on {device.type} tensors here ({missing})"


def choose(backend: str, device: torch.device, op: str, dense=None) -> tuple[str, str]:
    """``(backend, why)``: the backend that runs ``op`` on ``device`` and the reason.

    ``dense``: ``(bytes, size)`` of the dense reference for this call; 'auto' raises
    :class:`DenseReferenceTooLarge` rather than pick a reference that would not fit.
    """
    why = "asked for"
    if backend == "auto" and os.environ.get("DYCON_BACKEND", "auto") != "auto":
        backend, why = os.environ["DYCON_BACKEND"], "DYCON_BACKEND in the environment"
    if backend == "auto":
        return _auto(device, op, dense)
    if backend not in NAMES:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(NAMES) + ['auto']}")
    if not can_run(backend, device):
        state = extension_state()
        broken = backend in ("cpu", "cuda") and device.type == backend and state.status != "loaded"
        raise ValueError(
            f"backend {backend!r} cannot run on {device.type} tensors here "
            f"(available for {device.type}: {available_backends(device)})"
            + (f": {state.explanation}" if broken else ""))
    if not implements(backend, op):
        raise ValueError(f"backend {backend!r} has no {op} kernels in this build")
    return backend, why


# resolve's answers without a memory guard (dense=None), keyed on everything they depend on that
# can change in a process: the environment variables read, and extension_state (tests replace it).
# Deciding costs ~5 us with warm caches (the extension's dispatch table, the environment), paid
# on every call of an op and in its serial part.
_RESOLVED: dict = {}


def _resolve_key(backend: str, device: torch.device, op: str) -> tuple:
    env = os.environ
    return (backend, device.type, op, env.get("DYCON_BACKEND"), env.get("TRITON_INTERPRET"), extension_state)


@torch.compiler.assume_constant_result  # torch.compile: a constant, not code to trace
def resolve(backend: str, device: torch.device, op: str, dense=None) -> str:
    """The backend that runs ``op`` on ``device``: 'auto' picks the fastest one available.

    ``DYCON_BACKEND`` in the environment replaces 'auto'. An explicit backend that cannot run
    on the device is an error, never a silent fallback. See :func:`choose` for ``dense``.
    """
    if dense is not None:  # the guard reads the free memory of the moment
        return choose(backend, device, op, dense)[0]
    key = _resolve_key(backend, device, op)
    name = _RESOLVED.get(key)
    if name is None:
        name = _RESOLVED[key] = choose(backend, device, op)[0]
    return name


def report(device: torch.device, backend: str = "auto") -> dict:
    """What ``backend`` (default 'auto') runs on ``device``, per op, and why; with the extension's
    build (for train.log, config.yaml, the experiment report and the benchmarks' header)."""
    state = extension_state()
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    ops = {}
    for op in ("uncl", "fecl"):
        name, why = choose(backend, device, op)
        ops[op] = {"backend": name, "why": why}
    return {"device": device.type, "ops": ops, "extension": state.status,
            "extension_torch": state.record.get("torch"), "extension_cuda_archs": state.record.get("cuda_arch_list"),
            "torch": str(torch.__version__), "triton": triton_version}


def report_lines(info: dict) -> list[str]:
    """:func:`report` as log lines."""
    ext = info["extension"]
    if ext == "loaded":
        ext += f", built with torch {info['extension_torch'] or '? (no build record)'}"
        ext += f", CUDA archs {info['extension_cuda_archs']}" if info["extension_cuda_archs"] else ", CPU kernels only"
    lines = [f"kernels on {info['device']}: {op} -> {v['backend']} ({v['why']})" for op, v in info["ops"].items()]
    return lines + [f"kernels: extension {ext}; torch {info['torch']}; triton {info['triton'] or 'not installed'}"]


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
    module = sys.modules.get(_MODULES[name])  # import_module costs ~3 us even when imported
    return module if module is not None else importlib.import_module(_MODULES[name])
