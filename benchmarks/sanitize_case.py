"""One small FeCL and one UnCL forward+backward per fused backend: what benchmarks/gpu_check.sh runs
under compute-sanitizer (memcheck, racecheck). Sizes leave partial tiles everywhere, so an
unmasked load or store past a tensor's end is an error the sanitizer reports.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py [--device cuda]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dycon_kernels as dk  # noqa: E402
from dycon_kernels import backends  # noqa: E402


def run(device: torch.device, backend: str) -> None:
    gen = torch.Generator(device).manual_seed(0)
    s = torch.randn(2, 2, 9, 10, 11, generator=gen, device=device).requires_grad_()
    t = torch.randn(2, 2, 9, 10, 11, generator=gen, device=device).requires_grad_()
    dk.uncl(s, t, 1.5, weight=torch.rand(2, 9, 10, 11, generator=gen, device=device), backend=backend).backward()
    if backends.implements(backend, "fecl"):
        z = torch.nn.functional.normalize(torch.randn(2, 77, 40, generator=gen, device=device), dim=-1)
        z = z.to(torch.bfloat16 if device.type == "cuda" else torch.float32).requires_grad_()
        y = torch.randint(0, 2, (2, 77), generator=gen, device=device)
        y[:, ::9] = -1
        zt = torch.nn.functional.normalize(torch.randn(2, 77, 40, generator=gen, device=device), dim=-1).to(z.dtype)
        dk.fecl(z, y, zt, top_k=5, backend=backend).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    print(f"{backend}: ok")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default=None, help="comma list (default: every fused backend available)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    names = args.backends.split(",") if args.backends else [b for b in dk.available_backends(device)
                                                              if b != "reference"]
    for name in names:
        run(device, name)


if __name__ == "__main__":
    main()
