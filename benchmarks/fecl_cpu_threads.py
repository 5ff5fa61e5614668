"""FeCL `dycon` on the CPU, in one process: fused fwd+bwd at 1 and 2 threads, each against one
N x N x D `bmm` at the same thread count (the "GEMM-equivalents" of issue 24).
B=2, N=4096, D=256, float32. Usage: python benchmarks/fecl_cpu_threads.py [ROUNDS]"""
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import dycon_kernels
from dycon_kernels.backends import cpu_isa


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(2, 4096, 256, generator=g), dim=-1).requires_grad_()
    zt = F.normalize(torch.randn(2, 4096, 256, generator=g), dim=-1)
    y = torch.randint(0, 2, (2, 4096), generator=g)

    def fecl():
        z.grad = None
        dycon_kernels.fecl(z, y, zt, preset="dycon", backend="cpu").backward()

    def bmm():
        torch.bmm(z.detach(), z.detach().transpose(1, 2))

    times = {}
    for warm_up in (True, False):
        for _ in range(1 if warm_up else rounds):
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for name, fn in (("fecl", fecl), ("bmm", bmm)):
                    t = timed(fn)
                    if not warm_up:
                        times.setdefault((name, threads), []).append(t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(cpu_isa.summary())
    print(f"FeCL dycon fwd+bwd, B=2, N=4096, D=256, {rounds} rounds; load average {os.getloadavg()}")
    for threads in (1, 2):
        print(f"threads={threads}: fecl {med['fecl', threads]:.0f} ms, bmm {med['bmm', threads]:.0f} ms, "
              f"{med['fecl', threads] / med['bmm', threads]:.2f} GEMM-equivalents")
    print(f"2 threads / 1 thread: {med['fecl', 1] / med['fecl', 2]:.2f}x faster")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
