"""Compile Triton kernels for the GPU without a GPU (Triton ships ptxas): every entry of the
``launch_configs()`` of the given modules, for sm_80 and sm_90.

    python tests/triton_aot.py dycon_kernels.triton.uncl dycon_kernels.triton.fecl [--cc 80 90] [-j 2] [--full]

Each module's ``launch_configs()`` returns ``(kernel, signature, constexprs)`` triples, e.g.
``(uncl_forward_kernel, {"S": "*fp32", ..., "C": "i32"}, {"BLOCK_V": 256, ...})``; the
signature lists the runtime arguments (pointer ``*dtype`` or scalar type) in order, the
constexprs every ``tl.constexpr`` argument. This catches errors that the interpreter accepts
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
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __name__ == "__main__":
    # Run as a script from anywhere: the repository root on the path.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _describe(kernel, signature, constexprs) -> str:
    name = getattr(kernel, "__name__", None) or kernel.fn.__name__
    ptrs = ",".join(sorted({t for t in signature.values() if t.startswith("*")}))
    flags = ", ".join(f"{k}={getattr(v, 'name', v)}" for k, v in constexprs.items())
    return f"{name}[{ptrs}]({flags})"


def compile_one(kernel, signature, constexprs, cc: int):
    """triton.compile one configuration for cuda sm_<cc>; returns the compiled kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32))


def _configs(module: str, full: bool):
    """The module's launch_configs(); full=True asks for its exhaustive list where it has one."""
    fn = importlib.import_module(module).launch_configs
    return fn(full=True) if full and "full" in inspect.signature(fn).parameters else fn()


def _job(args):
    module, index, cc, full = args
    kernel, signature, constexprs = _configs(module, full)[index]
    name = f"{module}: {_describe(kernel, signature, constexprs)} sm_{cc}"
    try:
        compile_one(kernel, signature, constexprs, cc)
        return name, None
    except Exception as exc:  # noqa: BLE001  (reported, counted as a failure)
        return name, f"{type(exc).__name__}: {exc}"


def compile_modules(modules, ccs=(80, 90), jobs=1, verbose=False, full=False):
    """Compile every launch config of ``modules`` for each cc; returns (count, [(name, error)])."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for the GPU")
    work = []
    for module in modules:
        n = len(_configs(module, full))
        work += [(module, i, cc, full) for i in range(n) for cc in ccs]
    failures = []
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_job, work, chunksize=4))
    else:
        results = map(_job, work)
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
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    start = time.time()
    count, failures = compile_modules(args.modules, tuple(args.cc), args.jobs, args.verbose, args.full)
    print(f"compiled {count - len(failures)}/{count} configurations of {', '.join(args.modules)} "
          f"for sm_{'/sm_'.join(map(str, args.cc))} in {time.time() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
