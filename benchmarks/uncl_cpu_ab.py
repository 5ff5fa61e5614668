"""UnCL on the CPU, cases interleaved in one process: the dense reference against the fused C++
kernels at 1 and 2 threads and under each forced ISA variant (DYCON_CPU_ISA). The "kernel" cases
call the fused forward+gradient op alone (no autograd, no backward scaling): what threads do for
the tile loops themselves, against what they do for a whole step.

On a shared machine, wall times move with the load; ratios of cases timed in turn within one
process do not (much), as long as no other process wants a core: the header says how much CPU
other processes used meanwhile, and a 2-thread figure means little unless that is near 0.
bench_uncl.py times each case in a fresh process to measure its memory, which makes the
reference slower than here. The page faults per call say how much of a case's time went to
fresh memory: the fused op's outputs of 2 MiB or more are huge pages (csrc/alloc.h), about 8
faults for the 14 MB gradient when it is fresh, instead of ~3 500, and none when the freed block
of the previous call's gradient is reused. The 2-thread cases are timed right after the 1-thread
ones without warming their second thread; on the idle development VM, warming each case 0.2 s
first gave the same step ratio (1.81x warmed; 1.80x, 1.84x and 1.87x as here, in runs minutes
apart; a re-run at the merge gave 1.62-1.70x: docs/engineering.md, "Threads"; issue 24).
Usage: python benchmarks/uncl_cpu_ab.py [ROUNDS]
"""
import os
import resource
import statistics
import sys
import time

import torch

import dycon_kernels
from _common import OtherCpu
from dycon_kernels.backends import cpu_isa

CASES = [("reference", 1, ""), ("cpu", 1, ""), ("cpu", 2, ""), ("kernel", 1, ""), ("kernel", 2, ""),
         ("cpu", 1, "avx2"), ("cpu", 1, "baseline")]


def step(student, teacher, backend):
    if backend == "kernel":
        torch.ops.dycon_C.uncl_forward_grad(student.detach(), teacher, 2.0, None, "mean", False)
        return
    student.grad = None
    dycon_kernels.uncl(student, teacher, 2.0, backend=backend).backward()


def main(rounds: int) -> None:
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 2, 96, 96, 96, generator=g) * 2).requires_grad_()
    teacher = torch.randn(2, 2, 96, 96, 96, generator=g) * 2
    runnable = cpu_isa.runnable()
    cases = [c for c in CASES if not c[2] or c[2] in runnable]
    times, faults = {c: [] for c in cases}, {c: [] for c in cases}
    with OtherCpu() as other:
        run_rounds(student, teacher, cases, rounds, times, faults)
    os.environ.pop(cpu_isa.ENV)
    print(cpu_isa.summary())
    print(f"UnCL fwd+bwd, B=2, C=2, 96^3, float32, {rounds} interleaved rounds; load average {os.getloadavg()}; "
          f"other processes used {other} meanwhile")
    reference = statistics.median(times[cases[0]])
    for (backend, threads, variant), values in times.items():
        median = statistics.median(values)
        case = (backend, threads, variant)
        print(f"{backend:9s} threads={threads} variant={variant or 'auto':8s} median {median:7.1f} ms "
              f"(min {min(values):7.1f})  reference/this {reference / median:5.2f}x  "
              f"page faults/call {statistics.mean(faults[case]):6.0f}")
    for backend in ("cpu", "kernel"):
        one, two = times[(backend, 1, "")], times[(backend, 2, "")]
        print(f"{backend}: 2 threads / 1 thread {statistics.median(one) / statistics.median(two):.2f}x by the "
              f"medians, {min(one) / min(two):.2f}x by the minima")


def run_rounds(student, teacher, cases, rounds, times, faults) -> None:
    """One untimed round, then ROUNDS timed ones, each case in turn."""
    for warm_up in (True, False):
        for _ in range(1 if warm_up else rounds):
            for case in cases:
                backend, threads, variant = case
                torch.set_num_threads(threads)
                os.environ[cpu_isa.ENV] = variant
                faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                start = time.perf_counter()
                step(student, teacher, backend)
                if not warm_up:
                    times[case].append((time.perf_counter() - start) * 1e3)
                    faults[case].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 10)
