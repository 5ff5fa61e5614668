"""Compile Triton kernels for the GPU without a GPU (Triton ships ptxas): every entry of the
``launch_configs()`` of the given modules, for sm_80 and sm_90.

    python tests/triton_aot.py dycon_kernels.triton.uncl dycon_kernels.triton.fecl [--cc 80 90] [-j 2] [--full]
    python tests/triton_aot.py --fit dycon_kernels.triton.fecl --cc 80 86 89 90 [--full]

Each module's ``launch_configs()`` returns ``(kernel, signature, constexprs)`` triples, e.g.
``(uncl_forward_kernel, {"S": "*fp32", ..., "C": "i32"}, {"BLOCK_V": 256, ...})``, or quadruples
with the compile options (``num_warps``, ``num_stages``) last; the signature lists the runtime
arguments (pointer ``*dtype`` or scalar type) in order, the constexprs every ``tl.constexpr``
argument. A ``launch_configs`` with a ``cc`` parameter is asked per target (its tiles depend on
the card's shared memory). This catches errors that the interpreter accepts
(e.g. ``tl.dot`` with a dimension < 16, unsupported dtype combinations).

Must run WITHOUT ``TRITON_INTERPRET=1``: under it ``@triton.jit`` returns interpreted functions,
which cannot be compiled; the script refuses to start when the variable is set. Exit status 0
when everything compiled, 1 otherwise (the failures are printed).
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __name__ == "__main__":
    # Run as a script from anywhere: the repository root on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def record_launches(monkeypatch, module, names) -> list:
    """Wrap the kernels ``names`` of ``module`` so that each launch still runs and is recorded as
    ``(kernel, args, kwargs)`` in the returned list (to compare with the module's launch_configs)."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in names:
        monkeypatch.setattr(module, name, Recorder(getattr(module, name)))
    return launches


def _describe(kernel, signature, constexprs) -> str:
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    ptrs = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
    flags = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
    return f"{name}[{ptrs}]({flags})"


def launch_attrs(kernel, signature, divisible=()) -> dict:
    """The specialisation a launch gives Triton (JITFunction.run): every pointer 16-byte aligned
    (torch's allocations are) and each integer argument that is a multiple of 16, here those named
    in ``divisible``, marked as such (``tt.divisibility`` 16). It lets Triton vectorise the loads of
    rows of D elements and copy tiles asynchronously; without it every element is a scalar load."""
    names = kernel.arg_names
    return {(names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
            if ty.startswith("*") or name in divisible}


def compile_one(kernel, signature, constexprs, cc: int, options=None, attrs=None):
    """triton.compile one configuration for cuda sm_<cc> (Triton's cache reused), unspecialised
    or with ``attrs`` (launch_attrs); returns the compiled kernel (``.metadata.shared``: bytes of
    shared memory per block)."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def ptxas_resources(ptx: str, cc: int):
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` on a kernel's PTX (Triton
    deletes its own ptxas log)."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        log = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{cc}{'a' if cc >= 90 else ''}", str(path), "-o",
                              str(Path(tmp) / "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return regs, int(spill.group(1)), int(spill.group(2))


_MULI = re.compile(r"(%[\w.]+) = arith\.muli (%[\w.]+), (%[\w.]+) : (\S+)")
_DERIVE = re.compile(r"(%[\w.]+) = (?:tt\.splat|tt\.broadcast|tt\.expand_dims|arith\.addi|arith\.subi|arith\.muli)"
                     r" (.*?) : (\S+)")


def int32_size_products(ttir: str, size_args) -> list[str]:
    """The TTIR lines that multiply a kernel size argument (``size_args``, e.g. N, D, K), or a
    32-bit value derived from one, in 32 bits: offsets such as ``row * D`` that overflow once a
    product of sizes passes 2^31. Products in i64 (a factor cast first) pass."""
    tainted = {f"%{name}" for name in size_args}
    hits = []
    for line in ttir.splitlines():
        m = _MULI.search(line)
        if m and "i32" in m.group(4) and {m.group(2), m.group(3)} & tainted:
            hits.append(line.strip())
        d = _DERIVE.search(line)
        if d and "i32" in d.group(3) and set(re.findall(r"%[\w.]+", d.group(2))) & tainted:
            tainted.add(d.group(1))
    return hits


def configs(module: str, full: bool = False, cc: int = 90):
    """The module's launch_configs() for sm_<cc> as (kernel, signature, constexprs, options);
    full=True asks for its exhaustive list where it has one."""
    fn = importlib.import_module(module).launch_configs
    params = inspect.signature(fn).parameters
    kwargs = dict(full=True) if full and "full" in params else {}
    if "cc" in params:
        kwargs["cc"] = cc
    return [tuple(c) + (None,) * (4 - len(c)) for c in fn(**kwargs)]


def _variants(module, kernel, signature):
    """The specialisations compiled per configuration: none (sizes that are not multiples of 16,
    unaligned pointers) and, for modules that declare their size arguments (SIZE_ARGS), the
    aligned launch with every size a multiple of 16 (what a D = 256 call compiles)."""
    size_args = getattr(importlib.import_module(module), "SIZE_ARGS", ())
    variants = [("", None)]
    if size_args:
        variants.append((" aligned", launch_attrs(kernel, signature, size_args)))
    return size_args, variants


def _job(args):
    module, index, cc, full = args
    kernel, signature, constexprs, options = configs(module, full, cc)[index]
    name = f"{module}: {_describe(kernel, signature, constexprs)} {options or ''} sm_{cc}"
    size_args, variants = _variants(module, kernel, signature)
    for label, attrs in variants:
        try:
            compiled = compile_one(kernel, signature, constexprs, cc, options, attrs)
        except Exception as exc:  # noqa: BLE001  (reported, counted as a failure)
            return name + label, f"{type(exc).__name__}: {exc}"
        # Modules that declare their size arguments promise 64-bit offsets: checked in the TTIR.
        hits = int32_size_products(compiled.asm["ttir"], [a for a in size_args if a in signature])
        if hits:
            return name + label, f"32-bit product of sizes: {hits[0]}"
    return name, None


def compile_modules(modules, ccs=(80, 90), jobs=1, verbose=False, full=False):
    """Compile every launch config of ``modules`` for each cc; returns (count, [(name, error)])."""
    work = []
    for module in modules:
        for cc in ccs:
            work += [(module, i, cc, full) for i in range(len(configs(module, full, cc)))]
    return _run(work, _job, jobs, verbose)


def _fit_job(args):
    """Compile one entry of module.fit_configs(cc, full) and compare it with its bounds."""
    module, index, cc, full = args
    kernel, signature, constexprs, options, bounds = importlib.import_module(module).fit_configs(cc, full)[index]
    name = f"{module}: {_describe(kernel, signature, constexprs)} {options} sm_{cc}"
    over = []
    # By default only the aligned launch (every call pads N, and D = 256 and the largest D are
    # multiples of 16): the unspecialised compile of each entry, which doubled the test's time,
    # runs with --full (DYCON_AOT_FULL=1).
    variants = _variants(module, kernel, signature)[1]
    for label, attrs in (variants if full else variants[-1:]):
        try:
            compiled = compile_one(kernel, signature, constexprs, cc, options, attrs)
        except Exception as exc:  # noqa: BLE001  (e.g. OutOfResources: reported as a failure)
            return name + label, f"{type(exc).__name__}: {exc}"
        used = dict(smem=compiled.metadata.shared)
        # Spills of the launch as compiled (the last variant: aligned, sizes multiples of 16); the
        # unspecialised compile is never launched for the entries bounded so (N is padded).
        if "spill" in bounds and attrs is variants[-1][1]:
            _, stores, loads = ptxas_resources(compiled.asm["ptx"], cc)
            used["spill"] = stores + loads
        over += [f"{key}{label} {used[key.split('_')[0]]} > {key} bound {bound}" for key, bound in bounds.items()
                 if key.split("_")[0] in used and used[key.split("_")[0]] > bound]
    return name, "; ".join(over) or None


def check_fit(modules, ccs, jobs=1, verbose=False, full=False):
    """Compile every entry of each module's fit_configs(cc, full) ``(kernel, signature,
    constexprs, options, bounds)``, bounds e.g. {"smem": card limit, "smem_estimate": the
    dispatcher's estimate, "spill": 0}; returns (count, [(name, what exceeded)])."""
    work = [(m, i, cc, full) for m in modules for cc in ccs
            for i in range(len(importlib.import_module(m).fit_configs(cc, full)))]
    return _run(work, _fit_job, jobs, verbose)


def _run(work, job, jobs, verbose):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for the GPU")
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(job, work, chunksize=1))
    else:
        results = map(job, work)
    failures = []
    count = 0
    for name, error in results:
        count += 1
        if error is not None:
            failures.append((name, error))
            print(f"FAIL {name}\n    {error.splitlines()[0] if error else ''}", flush=True)
        elif verbose:
            print(f"ok   {name}", flush=True)
    return count, failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", help="modules with a launch_configs() function")
    parser.add_argument("--cc", type=int, nargs="+", default=[80, 90], help="compute capabilities")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--full", action="store_true",
                        help="launch_configs(full=True) where a module offers it (exhaustive, slow)")
    parser.add_argument("--fit", action="store_true",
                        help="compile fit_configs() instead and check shared memory / spills against their bounds")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    start = time.time()
    check = check_fit if args.fit else compile_modules
    count, failures = check(args.modules, tuple(args.cc), args.jobs, args.verbose, args.full)
    print(f"compiled {count - len(failures)}/{count} configurations of {', '.join(args.modules)} "
          f"for sm_{'/sm_'.join(map(str, args.cc))} in {time.time() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
