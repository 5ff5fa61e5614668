"""Which CPU the C++ kernels run on and which of their vector-ISA variants they use.

The CPU loops of ``dycon_kernels._C`` are compiled once per ISA level (``baseline``, ``avx2`` =
AVX2 + FMA, ``avx512`` = AVX-512 F/DQ/BW/VL; docs/engineering.md, "CPU kernels and the vector
ISA") and the extension picks the best level this CPU runs when a kernel is called. The
environment variable ``DYCON_CPU_ISA`` (``auto`` or one of :func:`runnable`) forces a lower one;
naming a level this CPU cannot run is an error at the next kernel call.
"""
from __future__ import annotations

import os
import platform

ENV = "DYCON_CPU_ISA"
# The features each level needs, as /proc/cpuinfo names them (what the extension checks).
LEVEL_FLAGS = {
    "baseline": (),
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512bw", "avx512vl"),
}


def _ops():
    """torch.ops.dycon_C when the extension is built and loads here, else None (the shared loader
    names the extension file after the torch it was built for, so a plain import cannot find it)."""
    from dycon_kernels import backends
    if backends.extension_state().status != "loaded":
        return None
    import torch
    return torch.ops.dycon_C


def _cpuinfo() -> dict:
    """The first processor's entries of /proc/cpuinfo ({} where there is none)."""
    info = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                info[key.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_model() -> str:
    """The model name, with family and model numbers where a hypervisor shortens the name."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine()
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def cpu_level() -> str:
    """The highest level whose features /proc/cpuinfo lists ('unknown' without /proc/cpuinfo)."""
    flags = set(_cpuinfo().get("flags", "").split())
    if not flags:
        return "unknown"
    return [name for name, need in LEVEL_FLAGS.items() if flags.issuperset(need)][-1]


def runnable() -> list[str]:
    """The kernel variants compiled in that this CPU runs, lowest first ([] without the extension)."""
    ops = _ops()
    return list(ops.cpu_isa_runnable()) if ops is not None else []


def used() -> str:
    """The variant the CPU kernels use now ('not built' without the extension). Raises
    RuntimeError when DYCON_CPU_ISA names a variant this CPU cannot run."""
    ops = _ops()
    return ops.cpu_isa_used() if ops is not None else "not built"


def report() -> dict:
    """CPU model, the CPU's ISA level, the variant the kernels use and the ones it could use."""
    import torch
    try:
        variant = used()
    except RuntimeError as err:  # a bad DYCON_CPU_ISA: report it instead of failing the report
        variant = f"error: {str(err).splitlines()[0]}"
    return {"cpu": cpu_model(), "cpu_isa": cpu_level(), "kernel_variant": variant,
            "kernel_variants_runnable": runnable(), "DYCON_CPU_ISA": os.environ.get(ENV, ""),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def summary() -> str:
    """report() in one line, for benchmark headers and logs."""
    r = report()
    forced = f", forced by {ENV}={r['DYCON_CPU_ISA']}" if r["DYCON_CPU_ISA"] else ""
    return (f"CPU: {r['cpu']}; ISA: {r['cpu_isa']} (torch: {r['torch_cpu_capability']}); dycon CPU kernels: "
            f"{r['kernel_variant']}{forced} (runnable: {', '.join(r['kernel_variants_runnable']) or 'none'})")
