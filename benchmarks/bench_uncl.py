"""UnCL benchmark: every available backend against the dense reference.

    python benchmarks/bench_uncl.py                 # GPU when there is one, else the CPU sweep
    python benchmarks/bench_uncl.py --quick         # ~1 minute smoke run
    python benchmarks/bench_uncl.py --device cpu --sizes 2x96 --out /tmp/b

A size ``BxS`` is ``B`` volumes of ``C`` (``--channels``, default 2) channels and ``S^3`` voxels.
The student gets a gradient, the teacher is detached (as in training). Prints a table (median
forward / backward / both, peak memory above the inputs), writes ``uncl_<device>_<dtype>.csv``,
``.png`` and ``.md`` under ``--out``, then the target checks (CPU: C++ vs reference at
B=2, C=2, 96^3; GPU: Triton's fwd+bwd time against the card's copy-bandwidth bound).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as bc  # noqa: E402
import dycon_kernels  # noqa: E402

BETA = 2.0
SIZES = {  # (B, S): B volumes of S^3 voxels
    ("cpu", False): [(1, 32), (2, 32), (1, 64), (2, 64), (1, 96), (2, 96)],
    ("cpu", True): [(1, 32), (2, 96)],
    ("cuda", False): [(1, 32), (2, 64), (2, 96), (4, 96), (8, 64), (8, 96)],
    ("cuda", True): [(2, 64), (8, 96)],
}
CPU_TARGET = dict(B=2, S=96, speed=4.0, memory=5.0)


def make_case(spec: dict, device: torch.device) -> bc.Case:
    """Student logits (with grad) and detached teacher logits of one size, and the loss call."""
    dtype = bc.DTYPES[spec["dtype"]]
    shape = (spec["B"], spec["C"]) + (spec["S"],) * 3
    gen = torch.Generator(device).manual_seed(0)
    student = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(2).requires_grad_()
    teacher = torch.randn(shape, generator=gen, device=device, dtype=dtype).mul_(2)
    backend = spec["backend"]
    return bc.Case(lambda: dycon_kernels.uncl(student, teacher, BETA, backend=backend), [student])


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'2x96,8x64' -> [(2, 96), (8, 64)]."""
    return [tuple(int(v) for v in item.lower().split("x")) for item in text.split(",") if item]


def streamed_bytes(row: dict, elt: int) -> int:
    """fwd reads s and t; bwd reads s and t and writes ds: 5 tensors of B*C*S^3 elements."""
    return 5 * row["B"] * row["C"] * row["S"] ** 3 * elt


def main(argv=None):
    p = bc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--sizes", default=None, help="comma list of BxS, e.g. 2x96,8x96")
    p.add_argument("--channels", type=int, default=2)
    args = p.parse_args(argv)
    device, dtype, timing, cap = bc.setup(args)
    sizes = parse_sizes(args.sizes) if args.sizes else SIZES[(device.type, args.quick)]
    names = bc.backends_to_run(args, device)
    elt = torch.empty(0, dtype=dtype).element_size()

    out = bc.Report()
    extra = [f"backends: {', '.join(names)}; C = {args.channels}, beta = {BETA}, no weight, "
             "reduction='mean', teacher detached"]
    bandwidth = None
    if device.type == "cuda":
        bandwidth = bc.copy_bandwidth(device)
        extra.append(f"copy bandwidth (1 GiB device-to-device copy_, read + write): {bandwidth / 1e9:.0f} GB/s")
    for line in bc.header("UnCL benchmark", device, f"logits {args.dtype}", extra):
        out(line)
    out()

    specs = [dict(backend=name, B=B, C=args.channels, S=S, dtype=args.dtype) for B, S in sizes for name in names]
    rows = bc.run_sweep(specs, make_case, device, timing, out, warm_spec=lambda spec: dict(spec, B=1, S=8),
                        mem_cap=cap, case_timeout=args.case_timeout)
    bc.add_reference_ratios(rows, ["B", "C", "S"])
    for row in rows:
        row["voxels"] = row["B"] * row["S"] ** 3
        if bandwidth and row["full_ms"]:
            row["pct_bw_bound"] = 100 * streamed_bytes(row, elt) / bandwidth / (row["full_ms"] * 1e-3)
    columns = ["B", "C", "S", "backend", "status", "fwd_ms", "bwd_ms", "full_ms", "peak_mib",
               "speedup", "mem_saving"] + (["pct_bw_bound"] if bandwidth else [])
    out("full_ms = fwd+bwd; speedup = reference full_ms / full_ms; mem_saving = reference peak / peak"
        + ("; pct_bw_bound = copy-bandwidth bound of fwd+bwd (5 tensors streamed) / full_ms" if bandwidth else ""))
    for line in bc.results(rows, columns, lambda r: f"B={r['B']} {r['S']}^3 {r['backend']}"):
        out(line)

    out()
    out("## Target checks")
    if device.type == "cpu":
        where = dict(B=CPU_TARGET["B"], S=CPU_TARGET["S"], C=2)
        cpp, ref = bc.find_row(rows, backend="cpu", **where), bc.find_row(rows, backend="reference", **where)
        if cpp and ref and cpp["status"] == ref["status"] == "ok":
            speed, mem = cpp["speedup"], cpp["mem_saving"]
            met = (speed or 0) >= CPU_TARGET["speed"] and (mem or float("inf")) >= CPU_TARGET["memory"]
            verdict = "MET" if met else "NOT MET"
            out(f"C++ at B=2, C=2, 96^3 fwd+bwd: {bc.fmt(speed)}x faster than reference, {bc.fmt(mem)}x less "
                f"extra peak memory (targets {CPU_TARGET['speed']:.0f}x, {CPU_TARGET['memory']:.0f}x): {verdict} "
                f"[{bc.fmt(cpp['full_ms'])} ms vs {bc.fmt(ref['full_ms'])} ms, {bc.fmt(cpp['peak_mib'])} MiB vs "
                f"{bc.fmt(ref['peak_mib'])} MiB]")
        else:
            out("C++ at B=2, C=2, 96^3: not measured in this run (needs the 'cpu' backend and size 2x96)")
    else:
        fused = [r for r in rows if r["backend"] == "triton" and r["status"] == "ok"]
        if fused:
            r = max(fused, key=lambda r: r["voxels"])
            bound_ms = streamed_bytes(r, elt) / bandwidth * 1e3
            out(f"Triton at B={r['B']}, C={r['C']}, {r['S']}^3 fwd+bwd: {bc.fmt(r['full_ms'])} ms; copy-bandwidth "
                f"bound {bc.fmt(bound_ms)} ms ({bc.fmt(streamed_bytes(r, elt) / 1e6)} MB at "
                f"{bandwidth / 1e9:.0f} GB/s) -> {bc.fmt(100 * bound_ms / r['full_ms'])}% of the bound")
        else:
            out("Triton: no successful measurement in this run")

    stem = os.path.join(args.out, f"uncl_{device.type}_{args.dtype}" + ("_quick" if args.quick else ""))
    out.save_all(stem, rows, x="voxels", xlabel="voxels per call (B x S^3)", series=["backend"],
                 metrics=[("full_ms", "fwd+bwd time (ms)"), ("peak_mib", "extra peak memory (MiB)")],
                 title=f"UnCL, C={args.channels}, {args.dtype}, {device.type}")


if __name__ == "__main__":
    main()
