"""GPU correctness, the first stage of benchmarks/gpu_check.sh: every fused backend x dtype x size
at the tile sizes the GPU dispatcher picks, against the dense reference, forward and backward;
and launch hygiene (no host-to-device copy or synchronisation per call, the device guard).

Skipped without CUDA. The GPU check's dry run (GPU_CHECK_DRY_RUN=1) runs it on the CPU under the
Triton interpreter at tiny sizes, so that the file cannot rot where there is no GPU."""
import functools
import os

import pytest
import torch

import dycon_kernels as dk
from dycon_kernels import backends, reference
from dycon_kernels.presets import fecl_params
from conftest import DEVICE, fused_backends
from test_fecl import deterministic_algorithms, make_inputs, run
from test_uncl import TOL, _assert_close, _run, random_logits

import fecl_bf16_emulation

DRY = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
GPU = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(not GPU and not DRY, reason="GPU only (GPU_CHECK_DRY_RUN=1: tiny CPU dry run)")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64] if GPU else [torch.float32, torch.bfloat16]
# FeCL: N above one key tile with a partial last tile; D as the issue asks (64, 256) on the GPU.
FECL_SIZES = [(300, 64), (300, 256)] if GPU else [(21, 8)]
# UnCL: several voxel blocks (2048 voxels each for C = 2) and a partial one per volume.
UNCL_SPATIAL = (17, 19, 23) if GPU else (3, 4, 5)


def _backends(op):
    """The fused backends with kernels for ``op``; the dry run exercises the Triton path only."""
    return [b for b in fused_backends() if backends.implements(b, op) and (GPU or b == "triton")]


@pytest.mark.parametrize("backend", _backends("fecl"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N, D", FECL_SIZES)
@pytest.mark.parametrize("preset, top_k", [("dycon", 32), ("official", None)])
def test_fecl_matches_reference(backend, dtype, N, D, preset, top_k):
    """Loss and embedding gradient against the float64 reference on the same (rounded) inputs."""
    z, y, zt, yt, u = make_inputs(B=2, N=N, D=D, dtype=dtype, seed=N + D)
    params = fecl_params(preset, top_k=min(top_k, N // 2) if top_k else None)
    got = run(dk.fecl, z, y, zt, yt, anchor_weight=u, backend=backend, **params)
    want = run(reference.fecl, z.double(), y, zt.double(), yt, anchor_weight=u, **params)
    tol = _fecl_tol(dtype, N, D)
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


@pytest.mark.skipif("triton" not in _backends("fecl"), reason="Triton cannot run here")
def test_triton_topk_backward_is_deterministic():
    """The Triton FeCL backward has no atomics (the key side of the top-k pairs goes through a
    transposed index): under deterministic algorithms it runs without an alert and two runs give
    the same bits."""
    N, D = FECL_SIZES[-1]
    z, y, zt, yt, u = make_inputs(B=2, N=N, D=D, dtype=torch.float32, seed=5)
    params = fecl_params("dycon", top_k=min(32, N // 2))
    with deterministic_algorithms():
        first, second = (run(dk.fecl, z, y, zt, yt, anchor_weight=u, backend="triton", **params) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.skipif(not GPU or "triton" not in _backends("fecl"), reason="GPU only: D = 1024 is slow to interpret")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fecl_d1024_matches_reference(dtype):
    """D = 1024 (the dispatcher's D chunks and the backward's column split) on the card's tiles."""
    z, y, zt, yt, u = make_inputs(B=1, N=300, D=1024, dtype=dtype, seed=1024)
    params = fecl_params("dycon", top_k=32)
    got = run(dk.fecl, z, y, zt, yt, anchor_weight=u, backend="triton", **params)
    want = run(reference.fecl, z.double(), y, zt.double(), yt, anchor_weight=u, **params)
    tol = _fecl_tol(dtype, 300, 1024)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r.double(), rtol=tol, atol=tol * max(1.0, r.abs().max().item()))


@functools.lru_cache(maxsize=None)
def _fecl_tol(dtype, N, D):
    """bfloat16: the loss and dz come back in bfloat16, rounded to half an ulp (2^-9 relative),
    so one ulp, 2^-8, plus 4 x the error of the kernels' bfloat16 arithmetic at this N and D as
    tests/fecl_bf16_emulation.py emulates it (relative to max |dz|; ~3e-6 at N = 300, D = 256).
    Other dtypes: test_uncl's TOL (float32 2e-3 on the GPU: TF32, as test_fecl's)."""
    if dtype != torch.bfloat16:
        return TOL[dtype]
    return 2.0 ** -8 + 4 * fecl_bf16_emulation.emulate(N, D)[0]


@pytest.mark.parametrize("backend", _backends("uncl"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("reduction, weighted", [("mean", False), ("none", True)])
def test_uncl_matches_reference(backend, dtype, C, reduction, weighted):
    shape = (2, C) + UNCL_SPATIAL
    s, t = random_logits(shape, dtype, C), random_logits(shape, dtype, C + 1)
    w = torch.rand((2,) + UNCL_SPATIAL, generator=torch.Generator().manual_seed(C)).to(DEVICE) if weighted else None
    got = _run(dk.uncl, s, t, beta=1.7, weight=w, reduction=reduction, backend=backend)
    want = _run(reference.uncl, s.double(), t.double(), beta=1.7, weight=w, reduction=reduction)
    for g, r in zip(got, want):
        assert g.dtype == dtype
        _assert_close(g, r, dtype)


@pytest.mark.skipif(not GPU, reason="needs the CUDA profiler")
@pytest.mark.parametrize("backend", [b for b in fused_backends() if b != "reference"])
def test_no_copy_or_sync_per_call(backend):
    """A UnCL and a FeCL forward+backward (after a warm-up call) record no host-device copy and
    no synchronisation in the profiler: the calls can overlap the CPU and be captured in graphs."""
    from torch.profiler import ProfilerActivity, profile

    s, t = random_logits((2, 2, 8, 8, 8), torch.float32, 1), random_logits((2, 2, 8, 8, 8), torch.float32, 2)
    z, y, zt, yt, u = make_inputs(B=2, N=64, D=32, seed=3)

    def step():
        dk.uncl(s.detach().requires_grad_(), t, torch.tensor(0.8, dtype=torch.float64), backend=backend).backward()
        if backends.implements(backend, "fecl"):
            dk.fecl(z.detach().requires_grad_(), y, zt, yt, anchor_weight=u, backend=backend,
                    check_inputs=False).backward()

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
    names = {e.name for e in prof.events()}
    bad = sorted(n for n in names if "Memcpy" in n or "Synchronize" in n or "HtoD" in n)
    assert not bad, bad


@pytest.mark.skipif(not GPU or torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", [b for b in fused_backends() if b != "reference"])
def test_inputs_on_another_gpu_than_the_current_one(backend):
    """The device guard: tensors on cuda:1 while cuda:0 is current give the same result as on cuda:0."""
    s, t = random_logits((1, 2, 5, 6, 7), torch.float32, 4), random_logits((1, 2, 5, 6, 7), torch.float32, 5)
    want = _run(dk.uncl, s, t, beta=1.1, backend=backend)
    with torch.cuda.device(0):
        got = _run(dk.uncl, s.to("cuda:1"), t.to("cuda:1"), beta=1.1, backend=backend)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.cpu(), r.cpu())
