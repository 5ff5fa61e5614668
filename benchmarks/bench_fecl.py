"""FeCL benchmark: every available backend against the dense reference, over N, D, top_k, preset.

    python benchmarks/bench_fecl.py                  # GPU when there is one, else the CPU sweep
    python benchmarks/bench_fecl.py --quick          # ~1 minute smoke run
    python benchmarks/bench_fecl.py --check          # only the CPU target case (B=2, N=4096, D=256, official)
    python benchmarks/bench_fecl.py --n 1024,4096 --d 256 --k none --presets official

Inputs: ``B`` (``--batch``, default 2) volumes of ``N`` patches, L2-normalised float embeddings
``(B, N, D)`` clustered around one direction per label (labels in {0, 1}, 5% ignored = -1), and
detached teacher embeddings (the student's plus noise, re-normalised). ``k`` is the student
``top_k`` override (``none`` = all negatives); each preset keeps its own teacher mode
(official: threshold 0.3 + column shift; dycon: top-32 teacher negatives).

The dense reference needs about ``12 x B x N^2 x 4`` bytes; above the memory available it is
skipped and shown as ``skipped (est. X GB)``. On a GPU the table also gives an *estimate* of the
achieved fraction of the card's tensor-core rate (measured with a large matmul) and exp rate
(nominal), counting 2*D flops and one exp per pair per pass, passes as in docs/fecl_kernels.md.
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as bc  # noqa: E402
import dycon_kernels  # noqa: E402
from dycon_kernels import backends as _backends  # noqa: E402
from dycon_kernels.presets import fecl_params  # noqa: E402

SWEEPS = {  # (device, quick) -> N, D, k, presets
    ("cpu", False): dict(n=[512, 1024, 2048, 4096, 8192, 16384], d=[64, 256], k=[None, 32],
                         presets=["official", "dycon"]),
    ("cpu", True): dict(n=[512, 1024], d=[64], k=[None, 32], presets=["official", "dycon"]),
    ("cuda", False): dict(n=[512, 2048, 8192, 32768, 110592], d=[64, 256], k=[None, 32],
                          presets=["official", "dycon"]),
    ("cuda", True): dict(n=[512, 8192, 110592], d=[256], k=[None], presets=["official", "dycon"]),
}
CPU_TARGET = dict(B=2, N=4096, D=256, k=None, preset="official", memory=20.0, time=1.0)
CPU_GEMM_EQUIV_TARGET = 4.0  # dycon preset fwd+bwd, in one N x N x D bmm's time (issue 24)
REF_BYTES_PER_PAIR = 12 * 4  # the reference's (B, N, N) buffers, ~12 float32 matrices


def fecl_entry():
    """The public op when it exists; until then the dense reference with the preset expanded."""
    if hasattr(dycon_kernels, "fecl"):
        return dycon_kernels.fecl, "dycon_kernels.fecl"

    def via_reference(z, y, zt=None, yt=None, *, anchor_weight=None, preset="dycon", backend="reference", **kw):
        if backend != "reference":
            raise NotImplementedError("no public dycon_kernels.fecl yet: only the reference runs")
        return dycon_kernels.reference.fecl(z, y, zt, yt, anchor_weight=anchor_weight, **fecl_params(preset, **kw))
    return via_reference, "dycon_kernels.reference.fecl (STAND-IN: the public dycon_kernels.fecl is missing)"


def make_case(spec: dict, device: torch.device) -> bc.Case:
    """Clustered unit embeddings with grad, detached teacher embeddings, labels; the loss call."""
    dtype = bc.DTYPES[spec["dtype"]]
    B, N, D = spec["B"], spec["N"], spec["D"]
    gen = torch.Generator(device).manual_seed(0)
    labels = torch.randint(0, 2, (B, N), generator=gen, device=device)
    labels[torch.rand(B, N, generator=gen, device=device) < 0.05] = -1
    centers = torch.nn.functional.normalize(torch.randn(2, D, generator=gen, device=device), dim=-1)
    z = centers[labels.clamp_min(0)] + 1.5 * torch.randn(B, N, D, generator=gen, device=device) / D ** 0.5
    z = torch.nn.functional.normalize(z, dim=-1)
    zt = torch.nn.functional.normalize(z + 0.5 * torch.randn(B, N, D, generator=gen, device=device) / D ** 0.5,
                                       dim=-1)
    z, zt = z.to(dtype).requires_grad_(), zt.to(dtype)
    op, _ = fecl_entry()
    kwargs = dict(preset=spec["preset"], top_k=spec["k"], backend=spec["backend"])
    return bc.Case(lambda: op(z, labels, zt, **kwargs), [z])


def passes(preset: str, k) -> tuple[int, int]:
    """(forward, backward) passes over all B x N x N pairs (teacher pairs count as N x N too),
    after docs/fecl_kernels.md: forward = column max (column shift) + top-k selection or dense
    log-sum-exp + positives + teacher (top-k selection, or the threshold term); backward =
    recompute l + accumulate g z for the dense part, and the same for the threshold teacher.
    Sparse work (top-k gathers and scatters) is left out."""
    p = fecl_params(preset, top_k=k)
    fwd = (p["shift"] == "column") + 1 + 1 + (p["teacher"] in ("topk", "threshold"))
    bwd = 2 + 2 * (p["teacher"] == "threshold")
    return fwd, bwd


SHORT_DTYPE = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64"}
ISSUE_PER_EXP = 8  # 128 thread-instructions per SM per clock against the 16 exp/clk/SM of bc.exp_rate


def kernel_report_instr(path: str, device: torch.device) -> dict:
    """{(dtype, D, preset, k, N): thread-instructions per pair, the whole fwd+bwd call} of this
    card's target from benchmarks/kernel_report.py's CSV (its 'WHOLE CALL' rows); {} when the file
    is missing."""
    import csv

    major, minor = torch.cuda.get_device_capability(device)
    target = f"sm_{major}{minor}"
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row.get("op") == "fecl" and row.get("target") == target and row.get("kernel") == "WHOLE CALL":
                dt, D, preset, k, N = row["case"].split("/")
                out[(dt, int(D), preset, "none" if k == "0" else int(k), int(N))] = float(row["instr_per_pair"])
    return out


def bmm_ms(B: int, N: int, D: int, dtype: torch.dtype, device: torch.device, timing) -> float:
    """One (B, N, D) x (B, D, N) torch.bmm, the unit of the CPU's GEMM-equivalents."""
    z = torch.randn(B, N, D, generator=torch.Generator(device).manual_seed(0), device=device).to(dtype)
    zt = z.transpose(1, 2)
    return bc.median_ms(lambda: torch.bmm(z, zt), device, timing)


def parse_list(text: str, cast):
    return [None if v.strip().lower() == "none" else cast(v) for v in text.split(",") if v.strip()]


def main(argv=None):
    p = bc.base_parser(__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--n", default=None, help="comma list of N (patches per volume)")
    p.add_argument("--d", default=None, help="comma list of D (embedding size)")
    p.add_argument("--k", default=None, help="comma list of student top_k, 'none' = all negatives")
    p.add_argument("--presets", default=None, help="comma list: official, dycon")
    p.add_argument("--check", action="store_true", help="only the CPU target case")
    p.add_argument("--ref-max-n", type=int, default=None, help="skip the reference above this N (saves time)")
    p.add_argument("--cuda-max-n", type=int, default=None,
                   help="skip the 'cuda' backend above this N (its time at N = 110592 exceeds a GPU check's budget)")
    p.add_argument("--kernel-report", default=None,
                   help="benchmarks/kernel_report.py's CSV: adds the instruction-issue bound of each row "
                        "(its thread-instructions per pair on this card's target)")
    args = p.parse_args(argv)
    device, dtype, timing, cap = bc.setup(args)
    sweep = dict(SWEEPS[(device.type, args.quick)])
    if args.check:
        sweep = dict(n=[CPU_TARGET["N"]], d=[CPU_TARGET["D"]], k=[CPU_TARGET["k"]], presets=[CPU_TARGET["preset"]])
        args.batch = CPU_TARGET["B"]
    for key, cast in (("n", int), ("d", int), ("k", int), ("presets", str)):
        if getattr(args, key):
            sweep[key] = parse_list(getattr(args, key), cast)

    op_name = fecl_entry()[1]
    names = bc.backends_to_run(args, device)
    if hasattr(_backends, "implements"):
        left_out = [n for n in names if n != "reference" and not _backends.implements(n, "fecl")]
        names = [n for n in names if n not in left_out]
    else:
        left_out = []
    if not hasattr(dycon_kernels, "fecl"):
        left_out += [n for n in names if n != "reference"]
        names = ["reference"]
    budget = bc.available_memory(device, cap)
    ref_elt = 8 if dtype == torch.float64 else 4
    elt = torch.empty(0, dtype=dtype).element_size()

    out = bc.Report()
    extra = [f"op: {op_name}; backends: {', '.join(names)}"
             + (f" (no FeCL kernels yet: {', '.join(left_out)})" if left_out else ""),
             f"B = {args.batch}, labels in {{0, 1}} with 5% ignored, teacher embeddings detached, "
             "presets with their own teacher mode (official: threshold 0.3; dycon: top-32)",
             f"reference skipped where 12 x B x N^2 x {ref_elt} bytes > {budget / bc.GiB:.1f} GiB available"]
    mma = exp = None
    instr = {}
    if device.type == "cuda":
        # One yardstick for every dtype: the card's bf16 tensor-core rate.
        mma = bc.matmul_rate(device, torch.bfloat16)
        exp, exp_how = bc.exp_rate(device)
        extra += [f"rates for the estimate: bf16 matmul {mma / 1e12:.0f} TFLOP/s (measured, 8192^3), "
                  f"exp {exp / 1e12:.2f} Texp/s ({exp_how}); instruction issue {ISSUE_PER_EXP * exp / 1e12:.1f} "
                  "T thread-instructions/s (4 schedulers x 32 lanes per SM per clock)"]
        if args.kernel_report:
            instr = kernel_report_instr(args.kernel_report, device)
            extra.append(f"instructions per pair: {args.kernel_report} ({len(instr)} cases for this card)")
    for line in bc.header("FeCL benchmark", device, f"embeddings {args.dtype}, labels int64", extra):
        out(line)
    out()

    def skip(spec):
        if spec["backend"] == "cuda" and args.cuda_max_n and spec["N"] > args.cuda_max_n:
            return f"skipped (N > --cuda-max-n {args.cuda_max_n}: over this run's time budget)"
        if spec["backend"] != "reference":
            return None
        if args.ref_max_n and spec["N"] > args.ref_max_n:
            return f"skipped (N > --ref-max-n {args.ref_max_n})"
        need = REF_BYTES_PER_PAIR // 4 * ref_elt * spec["B"] * spec["N"] ** 2
        return f"skipped (est. {need / 1e9:.1f} GB)" if need > budget else None

    # Small N first, so that a run cut short (Ctrl-C, `timeout -s INT`) still covers every config.
    specs = [dict(backend=name, preset=preset, k=k, D=D, N=N, B=args.batch, dtype=args.dtype)
             for N in sweep["n"] for preset in sweep["presets"] for k in sweep["k"] for D in sweep["d"]
             for name in names]
    rows = bc.run_sweep(specs, make_case, device, timing, out, skip=skip, mem_cap=cap,
                        warm_spec=lambda spec: dict(spec, B=1, N=min(64, spec["N"])), case_timeout=args.case_timeout)
    order = {v: i for i, v in enumerate(sweep["presets"] + sweep["k"])}
    rows.sort(key=lambda r: (order[r["preset"]], order[r["k"]], r["D"], r["N"]))
    bc.add_reference_ratios(rows, ["preset", "k", "D", "N", "B"])
    for row in rows:
        row["k"] = "none" if row["k"] is None else row["k"]
        if mma and row["full_ms"] and row["backend"] != "reference":
            fwd, bwd = passes(row["preset"], None if row["k"] == "none" else row["k"])
            pairs = row["B"] * row["N"] ** 2
            seconds = row["full_ms"] * 1e-3
            row["est_tflops"] = (fwd + bwd) * 2 * row["D"] * pairs / seconds / 1e12
            row["est_pct_mma"] = 100 * row["est_tflops"] * 1e12 / mma
            row["est_pct_exp"] = 100 * (fwd + bwd) * pairs / seconds / exp
            per_pair = instr.get((SHORT_DTYPE[row["dtype"]], row["D"], row["preset"], row["k"], row["N"]))
            if per_pair and row["backend"] == "triton":
                row["issue_bound_ms"] = per_pair * pairs / (ISSUE_PER_EXP * exp) * 1e3
                row["pct_issue_bound"] = 100 * row["issue_bound_ms"] / row["full_ms"]
    gemm = {}
    if device.type == "cpu":  # fwd+bwd in units of one N x N x D bmm, measured in this process
        for row in rows:
            if row["backend"] != "reference" and row["full_ms"]:
                key = (row["B"], row["N"], row["D"])
                if key not in gemm:
                    gemm[key] = bmm_ms(*key, dtype, device, timing)
                row["bmm_ms"] = gemm[key]
                row["gemm_equiv"] = row["full_ms"] / gemm[key]
    columns = ["preset", "k", "D", "N", "backend", "status", "fwd_ms", "bwd_ms", "full_ms", "peak_mib",
               "speedup", "mem_saving"] + (["est_tflops", "est_pct_mma", "est_pct_exp"] if mma else []) \
        + (["issue_bound_ms", "pct_issue_bound"] if instr else []) + (["bmm_ms", "gemm_equiv"] if gemm else [])
    out("full_ms = fwd+bwd; speedup = reference full_ms / full_ms; mem_saving = reference peak / peak"
        + ("; bmm_ms = one (B, N, D) x (B, D, N) torch.bmm, gemm_equiv = full_ms / bmm_ms" if gemm else ""))
    if mma:
        out("est_* = ESTIMATE from a pass count (2*D flops and 1 exp per pair per pass; fwd/bwd passes: "
            + ", ".join(f"{pr} k={k}: {'/'.join(map(str, passes(pr, k)))}" for pr in sweep["presets"]
                        for k in sweep["k"]) + "), not a hardware counter; est_pct_mma is against the bf16 rate")
    if instr:
        out("issue_bound_ms = B N^2 pairs x the kernel report's thread-instructions per pair (fwd+bwd) / the "
            "card's issue rate: the time if every instruction issued at full rate; pct_issue_bound = it / full_ms")
    for line in bc.results(rows, columns, lambda r: f"{r['preset']} k={r['k']} D={r['D']} N={r['N']} {r['backend']}"):
        out(line)

    out()
    out("## Target checks")
    if device.type == "cpu":
        where = dict(B=CPU_TARGET["B"], N=CPU_TARGET["N"], D=CPU_TARGET["D"], k="none", preset=CPU_TARGET["preset"])
        cpu, ref = bc.find_row(rows, backend="cpu", **where), bc.find_row(rows, backend="reference", **where)
        if cpu and ref and cpu["status"] == ref["status"] == "ok":
            mem, t = cpu["mem_saving"], bc.ratio(cpu["full_ms"], ref["full_ms"])
            met = (mem is None or mem >= CPU_TARGET["memory"]) and t <= CPU_TARGET["time"]
            out(f"cpu backend at B=2, N=4096, D=256, official, fwd+bwd: {bc.fmt(mem)}x less peak memory than "
                f"reference, time ratio {bc.fmt(t)} (targets >= {CPU_TARGET['memory']:.0f}x, <= "
                f"{CPU_TARGET['time']:.1f}): {'MET' if met else 'NOT MET'} [{bc.fmt(cpu['peak_mib'])} MiB vs "
                f"{bc.fmt(ref['peak_mib'])} MiB, {bc.fmt(cpu['full_ms'])} ms vs {bc.fmt(ref['full_ms'])} ms]")
        else:
            got = {n: (r["status"] if r else "not run") for n, r in (("cpu", cpu), ("reference", ref))}
            out(f"cpu backend at B=2, N=4096, D=256, official: not measured in this run ({got}); "
                "run with --check or without --quick")
        dycon = bc.find_row(rows, backend="cpu", **dict(where, preset="dycon"))
        if dycon and dycon.get("gemm_equiv"):
            out(f"cpu backend at B=2, N=4096, D=256, dycon, fwd+bwd: {bc.fmt(dycon['gemm_equiv'])} GEMM-equivalents "
                f"(target <= {CPU_GEMM_EQUIV_TARGET:.0f}): "
                f"{'MET' if dycon['gemm_equiv'] <= CPU_GEMM_EQUIV_TARGET else 'NOT MET'} "
                f"[{bc.fmt(dycon['full_ms'])} ms vs one bmm {bc.fmt(dycon['bmm_ms'])} ms]")
    else:
        fused = [r for r in rows if r["backend"] in ("triton", "cuda") and r["status"] == "ok"]
        for name in ("triton", "cuda"):
            for preset in sweep["presets"]:
                mine = [r for r in fused if r["backend"] == name and r["preset"] == preset]
                if mine:  # the largest size, all negatives (k=none) first
                    r = max(mine, key=lambda r: (r["N"], r["D"], r["k"] == "none"))
                    out(f"{name} at B={r['B']}, N={r['N']}, D={r['D']}, {preset}, k={r['k']}, fwd+bwd "
                        f"{bc.fmt(r['full_ms'])} ms: ESTIMATED {bc.fmt(r['est_tflops'])} TFLOP/s = "
                        f"{bc.fmt(r['est_pct_mma'])}% of the measured matmul rate, {bc.fmt(r['est_pct_exp'])}% "
                        "of the nominal exp rate")
        if not fused:
            out("no fused GPU backend measured successfully in this run")

    suffix = "_check" if args.check else "_quick" if args.quick else ""
    stem = os.path.join(args.out, f"fecl_{device.type}_{args.dtype}{suffix}")
    out.save_all(stem, rows, x="N", xlabel="N (patches per volume)", series=["backend", "D"],
                 panels=["preset", "k"], metrics=[("full_ms", "fwd+bwd time (ms)"),
                                                  ("peak_mib", "extra peak memory (MiB)")],
                 title=f"FeCL, B={args.batch}, {args.dtype}, {device.type}")


if __name__ == "__main__":
    main()
