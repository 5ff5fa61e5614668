"""FeCL on the CPU, in one process: fused fwd+bwd at 1 and 2 threads, each against one
N x N x D `bmm` at the same thread count (the "GEMM-equivalents" of issue 24), by wall time and by
process CPU time (the A/B measure on a shared machine: other processes' load changes it less),
with the forward and the backward apart.
B=2, N=4096, D=256, float32, labels in {0, 1}; preset `dycon` unless --preset.
Usage: python benchmarks/fecl_cpu_threads.py [ROUNDS] [--preset official] [--top-k 32] [--threads 1]"""
import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F

import dycon_kernels
from _common import OtherCpu
from dycon_kernels.backends import cpu_isa

CLOCKS = (("wall", time.perf_counter), ("cpu", time.process_time))


def timed(fn) -> dict:
    start = {name: clock() for name, clock in CLOCKS}
    fn()
    return {name: clock() - start[name] for name, clock in CLOCKS}


def main(rounds: int, preset: str, top_k: int, thread_counts: list) -> None:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(2, 4096, 256, generator=g), dim=-1).requires_grad_()
    zt = F.normalize(torch.randn(2, 4096, 256, generator=g), dim=-1)
    y = torch.randint(0, 2, (2, 4096), generator=g)
    params = dict(top_k=top_k) if top_k else {}
    loss = None

    def fwd():
        nonlocal loss
        z.grad = None
        loss = dycon_kernels.fecl(z, y, zt, preset=preset, backend="cpu", **params)

    def bwd():
        loss.backward()

    def bmm():
        torch.bmm(z.detach(), z.detach().transpose(1, 2))

    times = {}
    with OtherCpu() as other:
        for warm_up in (True, False):
            for _ in range(1 if warm_up else rounds):
                for threads in thread_counts:
                    torch.set_num_threads(threads)
                    for name, fn in (("fwd", fwd), ("bwd", bwd), ("bmm", bmm)):
                        t = timed(fn)
                        if not warm_up:
                            for clock, seconds in t.items():
                                times.setdefault((name, threads, clock), []).append(seconds)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(cpu_isa.summary())
    print(f"FeCL {preset} fwd+bwd, top_k={top_k or 'none'}, B=2, N=4096, D=256, {rounds} rounds; "
          f"load average {os.getloadavg()}; other processes used {other} meanwhile")
    for threads in thread_counts:
        for clock, _ in CLOCKS:
            f, b, m = (med[name, threads, clock] for name in ("fwd", "bwd", "bmm"))
            print(f"threads={threads}, {clock} time: fecl {f + b:.0f} ms (fwd {f:.0f} + bwd {b:.0f}), "
                  f"bmm {m:.0f} ms, {(f + b) / m:.2f} GEMM-equivalents (fwd {f / m:.2f}, bwd {b / m:.2f})")
    full = {threads: med["fwd", threads, "wall"] + med["bwd", threads, "wall"] for threads in thread_counts}
    if 1 in full and 2 in full:
        print(f"2 threads / 1 thread: {full[1] / full[2]:.2f}x faster")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rounds", nargs="?", type=int, default=3)
    parser.add_argument("--preset", choices=sorted(dycon_kernels.FECL_PRESETS), default="dycon")
    parser.add_argument("--top-k", type=int, default=0, help="student top_k (0: every negative)")
    parser.add_argument("--threads", default="1,2", help="comma list of torch thread counts")
    args = parser.parse_args()
    main(args.rounds, args.preset, args.top_k, [int(t) for t in args.threads.split(",")])
