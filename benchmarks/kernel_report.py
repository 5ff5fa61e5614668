"""Kernel report: compile every Triton kernel (and the CUDA kernels) for sm_80/86/89/90 on the CPU
and read what the machine code costs: registers, spills, shared memory against the card's limit,
theoretical occupancy, and per similarity pair (FeCL) or voxel (UnCL) the instructions, MUFU
operations and tensor-core instructions of the main loop. How the figures are counted:
docs/kernel_report.md.

    python benchmarks/kernel_report.py [--quick] [-j 2] [--no-cuda] [--name kernel_report]

Writes a table to stdout and benchmarks/results/<name>.csv / .md. Needs no GPU (Triton ships
ptxas and cuobjdump; the CUDA part needs nvcc). Triton's cache (~/.triton/cache) is reused.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

# Per-card limits (CUDA C Programming Guide, "Technical Specifications per Compute Capability"):
# shared memory per block (opt-in) and per SM, registers per SM, max threads and blocks per SM.
CARDS = {
    80: dict(card="A100", smem_block=166912, smem_sm=167936, threads=2048, blocks=32),
    86: dict(card="RTX 3090/A6000", smem_block=101376, smem_sm=102400, threads=1536, blocks=16),
    89: dict(card="RTX 4090/L40", smem_block=101376, smem_sm=102400, threads=1536, blocks=24),
    90: dict(card="H100/H200", smem_block=232448, smem_sm=233472, threads=2048, blocks=32),
}
REGS_PER_SM = 65536
RESERVED_SMEM_PER_BLOCK = 1024  # the driver's per-block reservation (sm_80 and later)

FECL_DIMS = (32, 64, 128, 256, 512)
FECL_DTYPES = ("fp32", "fp16", "bf16")
FECL_PRESETS = ("dycon", "official")
FECL_TOPK = (0, 32)
UNCL_CHANNELS = (2, 4)
TENSOR_OPS = ("HMMA", "HGMMA", "WGMMA", "IMMA", "DMMA")


def _triton_bin(tool: str) -> str:
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / tool)


# ----------------------------------------------------------------------------------------------
# What to compile
# ----------------------------------------------------------------------------------------------

def fecl_cases(quick: bool):
    """(dtype, D, preset, top_k) of the grid; --quick: the issue's target shape and fp32 D = 256."""
    if quick:
        return [("bf16", 256, "dycon", 32), ("fp32", 256, "official", 0)]
    return [(dt, D, p, k) for dt in FECL_DTYPES for D in FECL_DIMS for p in FECL_PRESETS for k in FECL_TOPK]


def fecl_entries(case, cc):
    """[(name, kernel, signature, constexprs, options)] of one FeCL forward + backward call."""
    from dycon_kernels.triton import fecl
    dtype, D, preset, top_k = case
    return fecl.report_configs(dtype, D, preset, top_k, cc)


def uncl_entries(case, cc):
    """UnCL adapter: one forward and one backward launch of uncl.launch_configs(full=True) for
    this dtype and channel count (the first listed, i.e. the plainest flags)."""
    import triton
    from dycon_kernels.triton import uncl
    dtype, C = case
    block_c = triton.next_power_of_2(C)
    picked = {}
    for kernel, sig, ce in uncl.launch_configs(full=True):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        if sig["S"] == f"*{dtype}" and ce.get("BLOCK_C") == block_c and name not in picked:
            picked[name] = (name.replace("uncl_", "").replace("_kernel", ""), kernel, sig, ce, {})
    return list(picked.values())


def uncl_cases(quick: bool):
    return [("fp32", 2)] if quick else [(dt, C) for dt in FECL_DTYPES for C in UNCL_CHANNELS]


OPS = {"fecl": (fecl_cases, fecl_entries), "uncl": (uncl_cases, uncl_entries)}

# The integer arguments that are multiples of 16 in a launch of each op's cases, so that the
# report compiles what such a launch compiles (tests/triton_aot.launch_attrs; --unspecialized: as
# before issue 10's item 4, no specialisation). FeCL: the grid's D are multiples of 16, top_k and
# teacher_top_k 32, and N, NT are taken as multiples of 16 (the trainer's patch grids: 24^3 = 13 824
# patches of a 96^3 crop). UnCL: no sizes are assumed (pointers only).
DIVISIBLE = {"fecl": ("N", "NT", "NK", "D", "K", "TK"), "uncl": ()}


# ----------------------------------------------------------------------------------------------
# Reading the machine code
# ----------------------------------------------------------------------------------------------

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?);")


def parse_sass(text: str):
    """[(address, opcode, full instruction)] of a cuobjdump -sass listing (predicates dropped)."""
    out = []
    for m in _SASS_LINE.finditer(text):
        instr = m.group(2).strip()
        op = re.sub(r"^@!?U?P[T0-9]+\s+", "", instr).split()[0]
        out.append((int(m.group(1), 16), op, instr))
    return out


def loops(instrs):
    """[(start, end)] address ranges of the loops: a branch to an earlier address closes one (a
    branch to itself, the trailing trap, is skipped)."""
    out = []
    for addr, op, instr in instrs:
        m = re.search(r"0x([0-9a-f]+)", instr)
        if op.startswith("BRA") and m and int(m.group(1), 16) < addr:
            out.append((int(m.group(1), 16), addr))
    return out


def _body(instrs, loop):
    return [op for a, op, _ in instrs if (loop is None or loop[0] <= a <= loop[1]) and op != "NOP"]


def _is_tensor(op: str) -> bool:
    return op.split(".")[0] in TENSOR_OPS


def main_loop(instrs):
    """The main loop: the largest loop with tensor-core instructions (a key-tile loop), else the
    largest loop (a gather loop over stored indices), else None (straight-line code)."""
    ranges = sorted(loops(instrs), key=lambda r: r[1] - r[0], reverse=True)
    tiled = [r for r in ranges if any(_is_tensor(op) for op in _body(instrs, r))]
    return (tiled or ranges or [None])[0]


def loop_counts(instrs):
    """(instructions, MUFU, tensor-core instructions, has_loop) in the main loop (whole kernel
    when there is none); an inner loop's body counts once."""
    loop = main_loop(instrs)
    ops = _body(instrs, loop)
    return len(ops), sum(op.startswith("MUFU") for op in ops), sum(map(_is_tensor, ops)), loop is not None


def occupancy(cc: int, regs: int, smem: int, warps: int) -> float:
    """Theoretical occupancy (active warps / max warps per SM) from registers, shared memory,
    threads and blocks per SM; register allocation in units of 256 per warp."""
    card = CARDS[cc]
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = REGS_PER_SM // (regs_per_warp * warps)
    by_smem = card["smem_sm"] // (smem + RESERVED_SMEM_PER_BLOCK)
    by_threads = card["threads"] // (32 * warps)
    blocks = min(by_regs, by_smem, by_threads, card["blocks"])
    return blocks * warps / (card["threads"] // 32)


def units_per_iteration(op: str, constexprs: dict, tensor_ops: int) -> int:
    """Similarity pairs (FeCL) or voxels (UnCL) one main-loop iteration handles: a loop with
    tensor-core instructions is a key-tile loop (BLOCK_M x BLOCK_N pairs), one without a gather
    loop over stored indices (one pair per anchor row: BLOCK_M); UnCL programs handle BLOCK_V voxels."""
    if op == "uncl":
        return constexprs["BLOCK_V"]
    if tensor_ops:
        return constexprs["BLOCK_M"] * constexprs["BLOCK_N"]
    return constexprs["BLOCK_M"]


def _analyse(job):
    """Compile one launch for one target and measure it; returns a report row."""
    from tests.triton_aot import compile_one, launch_attrs, ptxas_resources

    op, case, index, cc, specialize = job
    name, kernel, sig, ce, options = OPS[op][1](case, cc)[index]
    row = dict(op=op, case="/".join(map(str, case)), kernel=name, target=f"sm_{cc}")
    attrs = launch_attrs(kernel, sig, DIVISIBLE[op]) if specialize else None
    try:
        compiled = compile_one(kernel, sig, ce, cc, options or None, attrs)
    except Exception as exc:  # noqa: BLE001  (a row saying why, e.g. OutOfResources)
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return row
    md = compiled.metadata
    regs, spill_st, spill_ld = ptxas_resources(compiled.asm["ptx"], cc)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        sass = subprocess.run([_triton_bin("cuobjdump"), "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    n_instr, n_mufu, n_tensor, has_loop = loop_counts(parse_sass(sass))
    units = units_per_iteration(op, ce, n_tensor)
    threads = 32 * md.num_warps
    limit = CARDS[cc]["smem_block"]
    row.update(tiles="x".join(str(ce[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_C", "BLOCK_V")
                              if k in ce),
               warps=md.num_warps, stages=md.num_stages, regs=regs, spill=spill_st + spill_ld, smem=md.shared,
               smem_limit=limit, fits=md.shared <= limit,
               occupancy=round(occupancy(cc, regs, md.shared, md.num_warps), 3) if md.shared <= limit else 0.0,
               loop=("tile" if n_tensor else "gather") if has_loop else "none", units=units,
               # thread-instructions per unit: each warp instruction runs on 32 lanes (docs/kernel_report.md)
               instr_per_unit=round(n_instr * threads / units, 1),
               mufu_per_unit=round(n_mufu * threads / units, 2),
               tensor_per_kunit=round(1000 * n_tensor * md.num_warps / units, 2))
    return row


# ----------------------------------------------------------------------------------------------
# CUDA kernels (csrc/*.cu) through nvcc -Xptxas -v
# ----------------------------------------------------------------------------------------------

def cuda_rows(ccs):
    """Registers, spills and static shared memory of every CUDA kernel, per target."""
    from torch.utils.cpp_extension import include_paths
    rows = []
    gencode = [f"-gencode=arch=compute_{cc},code=sm_{cc}" for cc in ccs]
    # As setup.py builds them: torch's headers, pip's nvidia headers (cuBLAS/cuSPARSE may be
    # missing from the toolkit), C++20 (torch >= 2.10), -O3.
    nvidia = [d for site in sys.path for d in glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include"))]
    incs = [f"-I{p}" for p in [*include_paths(), *nvidia, str(REPO / "csrc")]]
    for cu in sorted((REPO / "csrc").glob("*.cu")):
        with tempfile.TemporaryDirectory() as tmp:
            proc = subprocess.run(["nvcc", "-c", str(cu), "-o", str(Path(tmp) / "k.o"), "-O3", "-std=c++20",
                                   "-DDYCON_WITH_CUDA=1", "-Xptxas", "-v", *gencode, *incs],
                                  capture_output=True, text=True)
        if proc.returncode:
            rows.append(dict(op="cuda", case=cu.name, kernel="-", target="-", error=proc.stderr.strip()[-200:]))
            continue
        rows += _parse_ptxas_log(proc.stderr, cu.name)
    return rows


def _parse_ptxas_log(log: str, source: str):
    rows, current = [], None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)' for 'sm_(\d+)", line)
        if m:
            current = dict(op="cuda", case=source, kernel=_demangle(m.group(1)), target=f"sm_{m.group(2)}")
            rows.append(current)
        elif current is not None:
            spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
            if spill:
                current["spill"] = int(spill.group(1)) + int(spill.group(2))
            used = re.search(r"Used (\d+) registers", line)
            if used:
                current["regs"] = int(used.group(1))
                smem = re.search(r"(\d+) bytes smem", line)
                current["smem"] = int(smem.group(1)) if smem else 0
    return rows


def _demangle(name: str) -> str:
    try:
        # -p: without the parameter list
        out = subprocess.run(["c++filt", "-p", name], capture_output=True, text=True).stdout.strip()
        return out.removeprefix("void ").replace("(anonymous namespace)::", "")
    except OSError:
        return name


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------

COLUMNS = ["op", "case", "kernel", "target", "tiles", "warps", "stages", "regs", "spill", "smem", "smem_limit",
           "fits", "occupancy", "loop", "units", "instr_per_unit", "mufu_per_unit", "tensor_per_kunit", "error"]


def totals(rows):
    """Per (op, case, target): the sum of the per-unit figures over the call's kernels whose main
    loop is a key-tile loop (FeCL: the per-pair cost of the N x N work; gather loops over stored
    top-k indices are per stored pair and listed on their own rows), or over all (UnCL)."""
    out = {}
    for r in rows:
        if r["op"] == "cuda" or "instr_per_unit" not in r or (r["op"] == "fecl" and r["loop"] != "tile"):
            continue
        key = (r["op"], r["case"], r["target"])
        t = out.setdefault(key, dict(op=r["op"], case=r["case"], target=r["target"], kernel="TOTAL tile loops",
                                     instr_per_unit=0.0, mufu_per_unit=0.0, spill=0, fits=True))
        t["instr_per_unit"] = round(t["instr_per_unit"] + r["instr_per_unit"], 1)
        t["mufu_per_unit"] = round(t["mufu_per_unit"] + r["mufu_per_unit"], 2)
        t["spill"] += r["spill"]
        t["fits"] = t["fits"] and r["fits"]
    return list(out.values())


def run(quick: bool, jobs: int, ccs, ops=("fecl", "uncl"), specialize=True):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled for the GPU")
    work = []
    for op in ops:
        cases_fn, entries_fn = OPS[op]
        for case in cases_fn(quick):
            for cc in ccs:
                work += [(op, case, i, cc, specialize) for i in range(len(entries_fn(case, cc)))]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            return list(pool.map(_analyse, work, chunksize=2))
    return [_analyse(w) for w in work]


def main(argv=None) -> int:
    from _common import table, write_csv

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: the target shapes only")
    parser.add_argument("--cc", type=int, nargs="+", default=sorted(CARDS), help="compute capabilities")
    parser.add_argument("-j", "--jobs", type=int, default=1)
    parser.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    parser.add_argument("--ops", nargs="*", default=["fecl", "uncl"], choices=sorted(OPS),
                        help="Triton ops to compile (none: only the CUDA kernels)")
    parser.add_argument("--name", default="kernel_report", help="output name under benchmarks/results/")
    parser.add_argument("--unspecialized", action="store_true",
                        help="compile without a launch's specialisation (aligned pointers, sizes that are multiples "
                             "of 16), as the report did before")
    args = parser.parse_args(argv)
    start = time.time()
    rows = run(args.quick, args.jobs, args.cc, args.ops, not args.unspecialized)
    rows += totals(rows)
    if not args.no_cuda:
        rows += cuda_rows(args.cc)
    compiled = ("compiled without a launch's specialisation (--unspecialized)." if args.unspecialized else
                "compiled as launched: 16-byte-aligned pointers, FeCL's N, D, top_k multiples of 16.")
    lines = [f"# Kernel report ({'quick' if args.quick else 'full grid'}), {time.strftime('%Y-%m-%d')}",
             "", "Counted as described in docs/kernel_report.md; per-unit figures are thread-instructions per "
             "similarity pair (FeCL) or voxel (UnCL) in the main loop; " + compiled, ""] + table(rows, COLUMNS)
    print("\n".join(lines))
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    write_csv(str(out / f"{args.name}.csv"), rows)
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    over = [r for r in rows if r.get("fits") is False or "error" in r]
    print(f"\n{len(rows)} rows in {time.time() - start:.0f} s; {len(over)} over the limit or failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
