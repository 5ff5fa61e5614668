"""Environment report to paste into an issue: ``python -m dycon_kernels`` (or ``dycon-env``).

Prints the versions, the compiled extension's state, the CPU, and per device the backends that
can run and what ``backend="auto"`` picks. Exit status 0 when fused kernels run both ops on
every device present, 1 otherwise (so that scripts can check an installation).
"""
from __future__ import annotations

import argparse
import platform
import sys
import warnings

import torch

import dycon_kernels
from dycon_kernels import backends
from dycon_kernels.backends import cpu_isa


def cpu_lines() -> list[str]:
    """The CPU, its vector ISA and the variant of the C++ kernels that runs (DYCON_CPU_ISA)."""
    return [cpu_isa.summary()]


def extension_lines(state: backends.ExtensionState) -> list[str]:
    lines = [f"extension dycon_kernels._C: {state.status}" + (f" ({state.path})" if state.path else "")]
    record = state.record
    if record:
        lines.append(f"  built with torch {record.get('torch')} (CUDA {record.get('torch_cuda')}), Python "
                     f"{record.get('python')}, environment {record.get('environment')}, {record.get('built_utc')} UTC")
        lines.append(f"  CUDA kernels built: {'yes, archs ' + str(record.get('cuda_arch_list')) if record.get('cuda_kernels') else 'no'}")
    elif state.path:
        lines.append("  no build record next to it (built before records existed)")
    if state.status == "loaded":
        lines.append(f"  kernels present: CPU {backends.extension_has('CPU')}, CUDA {backends.extension_has('CUDA')}")
    else:
        lines.append(f"  {state.explanation}")
    lines += [f"  another build here (not used): {p.name}" for p in state.others]
    return lines


def devices() -> list[torch.device]:
    return [torch.device("cpu")] + [torch.device("cuda", i) for i in range(torch.cuda.device_count())]


def device_lines(device: torch.device) -> tuple[list[str], bool]:
    """The device's lines, and whether fused kernels run both ops on it."""
    title = "cpu"
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        title = (f"{device}: {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, shared memory per "
                 f"block {p.shared_memory_per_block} B (opt-in {p.shared_memory_per_block_optin} B)")
    info = backends.report(device)
    lines = [title, f"  backends that can run: {backends.available_backends(device)}"]
    lines += [f"  auto: {op} -> {v['backend']} ({v['why']})" for op, v in info["ops"].items()]
    return lines, all(v["backend"] != "reference" for v in info["ops"].values())


def main() -> int:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    with warnings.catch_warnings():   # the report states what the loader's warning would say
        warnings.simplefilter("ignore", backends.KernelsNotBuiltWarning)
        warnings.simplefilter("ignore", backends.KernelsNotLoadableWarning)
        state = backends.extension_state()
    lines = [f"dycon_kernels {dycon_kernels.__version__} ({backends.EXTENSION_DIR})",
             f"Python {platform.python_version()} ({sys.executable}); {platform.platform()}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s) visible); "
             f"triton {triton_version}"]
    lines += cpu_lines() + extension_lines(state)
    usable = True
    for device in devices():
        more, fused = device_lines(device)
        lines += more
        usable &= fused
    lines.append("fused kernels usable on every device: " + ("yes" if usable else "NO (exit status 1)"))
    print("\n".join(lines))
    return 0 if usable else 1


if __name__ == "__main__":
    argparse.ArgumentParser("python -m dycon_kernels", description=__doc__.split("\n\n")[0]).parse_args()
    sys.exit(main())
