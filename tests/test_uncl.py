"""UnCL: the dense reference against a per-voxel loop, and every fused backend against the reference."""
import contextlib
import importlib.util
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

import dycon_kernels as dk
from dycon_kernels import backends, reference
from conftest import DEVICE, fused_backends

REPO = Path(__file__).resolve().parents[1]

TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
if DEVICE.type == "cuda":
    TOL[torch.float32] = 2e-3


def random_logits(shape, dtype, seed, scale=3.0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=torch.float64)).to(device=device, dtype=dtype)


def brute_force_uncl(s, t, beta, weight, reduction):
    """losses.md section 1, one voxel at a time, in float64 Python arithmetic."""
    B, C = s.shape[:2]
    s2, t2 = s.reshape(B, C, -1), t.reshape(B, C, -1)
    w2 = weight.reshape(B, -1) if weight is not None else None
    values = []
    for b in range(B):
        for v in range(s2.shape[2]):
            es = [math.exp(x) for x in s2[b, :, v].tolist()]
            et = [math.exp(x) for x in t2[b, :, v].tolist()]
            p = [e / sum(es) for e in es]
            q = [e / sum(et) for e in et]
            hs = -sum(pc * math.log(pc + 1e-6) for pc in p)
            ht = -sum(qc * math.log(qc + 1e-6) for qc in q)
            d = sum((pc - qc) ** 2 for pc, qc in zip(p, q))
            lv = d / (math.exp(beta * hs) + math.exp(beta * ht)) + beta * (hs + ht)
            values.append(lv * (w2[b, v].item() if w2 is not None else 1.0))
    out = torch.tensor(values, dtype=torch.float64)
    if reduction == "none":
        return out.reshape((B,) + tuple(s.shape[2:]))
    if reduction == "sum":
        return out.sum()
    return out.sum() / (w2.sum() if w2 is not None else out.numel())


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.7, 5.0])
def test_reference_matches_per_voxel_loop(reduction, weighted, beta):
    s = random_logits((2, 3, 3, 4, 2), torch.float64, seed=1, device="cpu")
    t = random_logits((2, 3, 3, 4, 2), torch.float64, seed=2, device="cpu")
    w = torch.rand((2, 3, 4, 2), dtype=torch.float64) if weighted else None
    got = reference.uncl(s, t, beta, weight=w, reduction=reduction)
    torch.testing.assert_close(got, brute_force_uncl(s, t, beta, w, reduction), rtol=1e-10, atol=1e-12)


def test_reference_gradcheck():
    s = random_logits((2, 4, 3, 2, 2), torch.float64, seed=3, device="cpu").requires_grad_()
    t = random_logits((2, 4, 3, 2, 2), torch.float64, seed=4, device="cpu").requires_grad_()
    w = torch.rand((2, 3, 2, 2), dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: reference.uncl(a, b, 1.3, weight=w), (s, t))


def _run(fn, s, t, **kw):
    """Loss and gradients of a random projection of it (so 'none' checks every voxel's gradient)."""
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(kw.pop("teacher_grad", True))
    out = fn(s, t, **kw)
    proj = random_logits(out.shape, torch.float64, seed=99, device=out.device).to(out.dtype) if out.dim() else 1.0
    (out * proj).sum().backward()
    return out, s.grad, t.grad


def _assert_close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("C", [2, 4])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_backend_matches_reference(backend, dtype, C, reduction, weighted):
    shape = (2, C, 7, 13, 5)  # odd spatial sizes: partial blocks everywhere
    seed = zlib.crc32(f"{backend}{dtype}{C}{reduction}{weighted}".encode())
    s, t = random_logits(shape, dtype, seed), random_logits(shape, dtype, seed + 1)
    w = torch.rand((2, 7, 13, 5), generator=torch.Generator().manual_seed(seed)).to(DEVICE) if weighted else None
    got = _run(dk.uncl, s, t, beta=1.7, weight=w, reduction=reduction, backend=backend)
    want = _run(reference.uncl, s, t, beta=1.7, weight=w, reduction=reduction)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        _assert_close(g, r, dtype)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("beta", [0.0, 40.0])
@pytest.mark.parametrize("scale", [3.0, 80.0])
def test_beta_extremes_and_extreme_logits(backend, beta, scale):
    shape = (2, 3, 5, 6, 7)
    s, t = random_logits(shape, torch.float32, 11, scale), random_logits(shape, torch.float32, 12, scale)
    got = _run(dk.uncl, s, t, beta=beta, backend=backend)
    want = _run(reference.uncl, s.double(), t.double(), beta=beta)
    for g, r in zip(got, want):
        assert torch.isfinite(g).all()
        _assert_close(g, r.float(), torch.float32)


@pytest.mark.parametrize("backend", fused_backends())
def test_teacher_gets_gradient_only_when_it_asks(backend):
    s = random_logits((1, 2, 4, 4, 4), torch.float32, 5).requires_grad_()
    t = random_logits((1, 2, 4, 4, 4), torch.float32, 6)
    dk.uncl(s, t, 1.0, backend=backend).backward()
    assert t.grad is None and s.grad is not None


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_teacher_only_gradient(backend, reduction):
    """A student without a gradient: the cpu forward saves no unit gradient, and the backward
    computes the teacher's from the logits."""
    s, t = random_logits((2, 3, 4, 5, 3), torch.float32, 23), random_logits((2, 3, 4, 5, 3), torch.float32, 24)
    got = _run(lambda a, b, **kw: dk.uncl(a.detach(), b, **kw), s, t, beta=1.2, reduction=reduction, backend=backend)
    want = _run(lambda a, b, **kw: reference.uncl(a.detach(), b, **kw), s, t, beta=1.2, reduction=reduction)
    assert got[1] is None
    _assert_close(got[0], want[0], torch.float32)
    _assert_close(got[2], want[2], torch.float32)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_second_backward_of_a_retained_graph_gives_the_same_gradients(backend, reduction):
    """The cpu backward scales the unit gradients its forward saved in place, once: a second
    backward of the graph recomputes them with the same kernel, to the same bits."""
    s = random_logits((2, 3, 4, 5, 3), torch.float32, 25).requires_grad_()
    t = random_logits((2, 3, 4, 5, 3), torch.float32, 26).requires_grad_()
    out = dk.uncl(s, t, 0.9, reduction=reduction, backend=backend)
    proj = random_logits(out.shape, torch.float32, 27) if out.dim() else torch.tensor(1.3, device=DEVICE)
    grads = [torch.autograd.grad((out * proj).sum(), (s, t), retain_graph=True) for _ in range(2)]
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_create_graph_gives_gradients_that_differentiate_like_the_reference(backend, teacher_grad):
    """A gradient penalty (create_graph=True) differentiates the gradient again: the fused
    kernels' gradients carry no graph, so that backward must not hand them out as if they did."""
    results, w = {}, random_logits((2, 4, 5, 3), torch.float64, 31, scale=1.0).abs() + 0.1
    for name in (backend, "reference"):
        s = random_logits((2, 3, 4, 5, 3), torch.float64, 28).requires_grad_()
        t = random_logits((2, 3, 4, 5, 3), torch.float64, 29).requires_grad_(teacher_grad)
        inputs = (s, t) if teacher_grad else (s,)
        grads = torch.autograd.grad(dk.uncl(s, t, 0.8, weight=w, backend=name) * 3, inputs, create_graph=True)
        penalty = sum((g * random_logits(g.shape, torch.float64, 30 + i)).square().sum() for i, g in enumerate(grads))
        results[name] = grads + torch.autograd.grad(penalty, inputs)
    for fused, ref in zip(results[backend], results["reference"]):
        torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", fused_backends())
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_eager_calls_skip_the_custom_op_and_give_its_bits(backend, reduction, monkeypatch):
    """Eager calls on plain tensors run the op's code without torch.library's dispatch
    (_EagerUncl); the loss and both gradients are the custom op's, bit for bit. Under a dispatch
    mode (FakeTensorMode, make_fx; here one that passes every op on) the call is the custom op again."""
    uncl_module = sys.modules["dycon_kernels.uncl"]
    w = random_logits((2, 4, 5, 3), torch.float32, 34, scale=1.0).abs()
    results = []
    for eager in (True, False):
        monkeypatch.setattr(uncl_module, "_eager", lambda *tensors, eager=eager: eager)
        s = random_logits((2, 3, 4, 5, 3), torch.float32, 32).requires_grad_()
        t = random_logits((2, 3, 4, 5, 3), torch.float32, 33).requires_grad_()
        out = dk.uncl(s, t, 0.6, weight=w, reduction=reduction, backend=backend)
        assert (out.grad_fn.name() == "_EagerUnclBackward") == eager
        (out * random_logits(out.shape, torch.float32, 35)).sum().backward()
        results.append((out.detach(), s.grad, t.grad))
    for eager, custom_op in zip(*results):
        assert torch.equal(eager, custom_op)
    monkeypatch.undo()
    from torch.utils._python_dispatch import TorchDispatchMode

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Passthrough():
        assert not uncl_module._eager(s, t, None)
    assert uncl_module._eager(s, t, None)


@pytest.mark.skipif(not backends.can_run("cpu", torch.device("cpu")), reason="dycon_kernels._C not built")
def test_cpu_forward_saves_the_unit_gradients_only_when_a_backward_can_follow():
    """What the op's forward returns besides the loss, per the gradients the call needs."""
    s, t = random_logits((2, 3, 4, 5, 3), torch.float32, 28, device="cpu"), random_logits(
        (2, 3, 4, 5, 3), torch.float32, 29, device="cpu")
    op = torch.ops.dycon.uncl.default
    beta = torch.tensor(1.0, dtype=torch.float64)
    for reduction in ("sum", "mean"):  # d(sum_v l_v)/ds, and for the mean over the voxel count
        _, ds, dt = op(s, t, beta, None, reduction, "cpu", True, True)
        assert ds.shape == s.shape and dt.shape == t.shape
        s_ref, t_ref = s.clone().requires_grad_(), t.clone().requires_grad_()
        reference.uncl(s_ref, t_ref, 1.0, reduction=reduction).backward()
        _assert_close(ds, s_ref.grad, torch.float32)
        _assert_close(dt, t_ref.grad, torch.float32)
    from dycon_kernels.uncl import _grads_to_save
    assert _grads_to_save("cpu", s.requires_grad_(), t) == (True, False)
    assert _grads_to_save("cpu", s, t.requires_grad_()) == (True, True)
    assert _grads_to_save("reference", s, t) == (False, False)
    with torch.no_grad():
        assert _grads_to_save("cpu", s, t) == (False, False)


@pytest.mark.parametrize("backend", fused_backends())
def test_gradcheck_fused(backend):
    s = random_logits((2, 3, 3, 2, 3), torch.float64, 7).requires_grad_()
    t = random_logits((2, 3, 3, 2, 3), torch.float64, 8).requires_grad_()
    w = torch.rand((2, 3, 2, 3), dtype=torch.float64, device=DEVICE)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda a, b: dk.uncl(a, b, 2.5, weight=w, reduction=reduction, backend=backend), (s, t))


@pytest.mark.parametrize("backend", fused_backends())
def test_opcheck(backend):
    s = random_logits((2, 3, 4, 5, 3), torch.float32, 21).requires_grad_()
    t = random_logits((2, 3, 4, 5, 3), torch.float32, 22).requires_grad_()
    w = torch.rand((2, 4, 5, 3), device=DEVICE)
    for reduction, weight in (("mean", None), ("sum", w), ("none", w)):
        beta = torch.tensor(1.5, dtype=torch.float64)
        torch.library.opcheck(torch.ops.dycon.uncl.default, (s, t, beta, weight, reduction, backend))
        if backend == "cpu":
            # With the unit gradients: not test_aot_dispatch_dynamic, which compares the op's outputs
            # after a backward, and the eager backward scales those (internal) outputs in place. The
            # compiled tests below check the loss and gradients under AOTAutograd.
            torch.library.opcheck(torch.ops.dycon.uncl.default, (s, t, beta, weight, reduction, backend, True, True),
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_torch_compile_fullgraph():
    backend = fused_backends()[0] if fused_backends() else "reference"

    def step(s, t):
        return dk.uncl(s, t, 2.0, backend=backend) * 0.5

    s = random_logits((1, 2, 4, 4, 4), torch.float32, 31).requires_grad_()
    t = random_logits((1, 2, 4, 4, 4), torch.float32, 32)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(s, t)
    out.backward()
    torch.testing.assert_close(out, step(s, t))


@pytest.mark.parametrize("backend", fused_backends() + ["reference"])
def test_compiled_step_compiles_once_for_a_beta_schedule(backend):
    """beta as a 0-dim tensor is a graph input: four values, one graph, each equal to eager.
    (Counted as unique graphs: dynamo may restart the analysis of the first call once.)"""
    def step(s, t, beta):
        return dk.uncl(s, t, beta, reduction="none", backend=backend)

    torch._dynamo.reset()  # a fresh cache: earlier tests may have compiled ``step`` with another backend
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s, t = random_logits((2, 3, 4, 5, 3), torch.float32, 33), random_logits((2, 3, 4, 5, 3), torch.float32, 34)
    for beta in (0.3, 0.9, 1.7, 4.0):
        got = _run(compiled, s, t, beta=torch.tensor(beta, dtype=torch.float64))
        for g, r in zip(got, _run(step, s, t, beta=beta)):
            _assert_close(g, r, torch.float32)
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", fused_backends() + ["reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tensor_beta_equals_float_beta(backend, reduction):
    s, t = random_logits((2, 3, 4, 5, 3), torch.float32, 35), random_logits((2, 3, 4, 5, 3), torch.float32, 36)
    w = torch.rand((2, 4, 5, 3), generator=torch.Generator().manual_seed(37)).to(DEVICE)
    kw = dict(reduction=reduction, backend=backend)
    beta = torch.tensor(0.8, dtype=torch.float64, device=DEVICE)
    for fn, fn_kw in ((dk.uncl, kw), (dk.UnCLoss(**kw), {})):
        want = _run(fn, s, t, beta=0.8, weight=w, **fn_kw)
        got = _run(fn, s, t, beta=beta, weight=w, **fn_kw)
        for g, r in zip(got, want):
            assert torch.equal(g, r)


@contextlib.contextmanager
def deterministic_algorithms(num_threads):
    """torch.use_deterministic_algorithms(True) and ``num_threads`` CPU threads inside the block;
    the previous settings afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.get_num_threads())
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.set_num_threads(before[2])


@pytest.mark.skipif(not backends.can_run("cpu", torch.device("cpu")), reason="dycon_kernels._C not built")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cpu_backend_is_deterministic(reduction):
    """Bitwise-equal loss and gradients run to run, and with 1 or 2 threads: the kernels write
    fixed 256-voxel tiles (and one partial sum per tile) whichever thread takes them. The sums that
    torch adds on top (the tiles; the weights of 'mean') split their work by the thread count
    above 32768 elements, so thread-count independence holds for problems below that size only."""
    shape = (2, 3, 30, 20, 25)  # 30000 voxels: 118 tiles (a partial one per volume), 2 blocks for 2 threads
    s, t = random_logits(shape, torch.float32, 81, device="cpu"), random_logits(shape, torch.float32, 82, device="cpu")
    w = torch.rand((2,) + shape[2:], generator=torch.Generator().manual_seed(83))
    runs = []
    for num_threads in (2, 2, 1):
        with deterministic_algorithms(num_threads):
            runs.append(_run(dk.uncl, s, t, beta=1.1, weight=w, reduction=reduction, backend="cpu"))
    for run in runs[1:]:
        for g, r in zip(run, runs[0]):
            assert torch.equal(g, r)


@pytest.mark.skipif(not backends.can_run("cpu", torch.device("cpu")), reason="dycon_kernels._C not built")
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cpu_outputs_of_2_mib_in_huge_pages_match_reference(reduction):
    """Outputs of 2 MiB or more (here the logit gradients and the 'none' loss map) come from the
    2 MiB-aligned huge-page allocation of csrc/alloc.h, NaN-filled under DYCON_POISON, and 2 threads
    taking blocks of tiles in turn must write every element of them."""
    shape = (2, 3, 64, 64, 64)  # 2 x 262144 voxels: the loss map is 2 MiB, the gradients 6 MiB
    s, t = random_logits(shape, torch.float32, 91, device="cpu"), random_logits(shape, torch.float32, 92, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = _run(dk.uncl, s, t, beta=0.9, reduction=reduction, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    want = _run(reference.uncl, s, t, beta=0.9, reduction=reduction)
    huge = got[1:] if reduction == "mean" else got
    assert all(x.data_ptr() % (2 << 20) == 0 for x in huge)
    for g, r in zip(got, want):
        _assert_close(g, r, torch.float32)
    # torch's memory profiler sees these allocations, as it sees its own allocator's.
    from test_fecl_cpp import _largest_allocation
    flat = (s.view(2, 3, -1), t.view(2, 3, -1))
    assert _largest_allocation(lambda: torch.ops.dycon_C.uncl_forward_grad(*flat, 0.9, None, "sum", False)) >= 6 << 20


@pytest.mark.skipif(not backends.can_run("cpu", torch.device("cpu")), reason="dycon_kernels._C not built")
def test_cpu_freed_huge_output_is_reused_and_rewritten():
    """A freed output of 2 MiB or more is kept (csrc/alloc.h) and handed to the next output of its
    size, so that a step's gradient does not fault in fresh pages every step. The size is above
    glibc's largest mmap threshold (32 MiB), where glibc itself would unmap the block at free and
    the next call would fault in 18 or more pages (a huge page each at best). The reused block is
    poisoned again and rewritten in full: the second call's gradients are the first's bits."""
    resource = pytest.importorskip("resource")
    shape = (1, 2, 9 << 19)  # the gradient: 36 MiB
    s, t = random_logits(shape, torch.float32, 95, device="cpu"), random_logits(shape, torch.float32, 96, device="cpu")
    first = torch.ops.dycon_C.uncl_forward_grad(s, t, 0.7, None, "sum", False)[1]
    ptr, want = first.data_ptr(), first.clone()
    del first
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = torch.ops.dycon_C.uncl_forward_grad(s, t, 0.7, None, "sum", False)[1]
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    assert again.data_ptr() == ptr
    assert faults < 9, f"{faults} page faults: the freed gradient was not reused"
    assert torch.equal(again, want)


def test_module_form():
    s = random_logits((1, 2, 3, 3, 3), torch.float32, 41)
    t = random_logits((1, 2, 3, 3, 3), torch.float32, 42)
    loss = dk.UnCLoss(reduction="sum")(s, t, 0.5)
    torch.testing.assert_close(loss, reference.uncl(s, t, 0.5, reduction="sum"), rtol=1e-5, atol=1e-5)


def test_weight_with_channel_axis_is_accepted():
    s, t = random_logits((2, 2, 3, 3, 3), torch.float32, 51), random_logits((2, 2, 3, 3, 3), torch.float32, 52)
    w = torch.rand(2, 1, 3, 3, 3, device=DEVICE)
    torch.testing.assert_close(dk.uncl(s, t, 1.0, weight=w), dk.uncl(s, t, 1.0, weight=w[:, 0]))


@pytest.mark.parametrize("make, message", [
    (lambda s, t: dk.uncl(s, t[:, :, :2], 1.0), "same shape"),
    (lambda s, t: dk.uncl(s[:, :1], t[:, :1], 1.0), "C >= 2"),
    (lambda s, t: dk.uncl(s.long(), t.long(), 1.0), "floating-point"),
    (lambda s, t: dk.uncl(s, t.double(), 1.0), "float64"),
    (lambda s, t: dk.uncl(s, t, -0.5), "beta"),
    (lambda s, t: dk.uncl(s, t, float("nan")), "beta"),
    (lambda s, t: dk.uncl(s, t, torch.tensor(-0.5)), "beta"),
    (lambda s, t: dk.uncl(s, t, torch.tensor([1.0, 2.0])), "0-dim"),
    (lambda s, t: dk.uncl(s, t, "1.0"), "beta"),
    (lambda s, t: dk.uncl(s, t, 1.0, reduction="avg"), "reduction"),
    (lambda s, t: dk.uncl(s, t, 1.0, weight=torch.ones(2, 3, 3)), "weight"),
    (lambda s, t: dk.uncl(s, t.to("meta"), 1.0), "meta"),
    (lambda s, t: dk.uncl(s, t, 1.0, backend="warp"), "unknown backend"),
    (lambda s, t: dk.uncl(s.flatten(), t.flatten(), 1.0), "spatial"),
])
def test_bad_input_raises_value_error(make, message):
    s, t = random_logits((2, 2, 3, 3, 3), torch.float32, 61), random_logits((2, 2, 3, 3, 3), torch.float32, 62)
    with pytest.raises(ValueError, match=message):
        make(s, t)


def test_beta_tensors_made_from_numbers_keep_value_and_sign():
    """scalar_tensor reuses the tensors of the last few numbers (a torch call saved per step):
    every answer is still the number's own float64, -0.0 included, across more numbers than it keeps."""
    from dycon_kernels._checks import scalar_tensor
    values = [0.0, -0.0, 0.7, 2, 1e-300] + [0.1 * k for k in range(12)] + [0.0, -0.0, 0.7]
    for value in values:
        got = scalar_tensor(value, "beta")
        assert got.dtype == torch.float64 and got.dim() == 0 and not got.requires_grad
        assert got.item() == float(value) and math.copysign(1, got.item()) == math.copysign(1, value)


def test_explicit_backend_that_cannot_run_is_an_error():
    other = "cpu" if DEVICE.type == "cuda" else "cuda"
    s = random_logits((1, 2, 3, 3, 3), torch.float32, 71)
    with pytest.raises(ValueError, match=f"backend '{other}' cannot run"):
        dk.uncl(s, s, 1.0, backend=other)


def test_available_backends_lists_reference():
    assert "reference" in dk.available_backends()


def _triton_aot(*args):
    """tests/triton_aot.py on dycon_kernels.triton.uncl in a subprocess without TRITON_INTERPRET
    (under it @triton.jit returns interpreted functions, which cannot be compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(REPO / "tests" / "triton_aot.py"), "dycon_kernels.triton.uncl", "-j", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_compile_for_sm80_and_sm90():
    """Compile every launched UnCL configuration for the GPU (no GPU needed): catches what the
    interpreter accepts but the compiler does not, and (SIZE_ARGS) any 32-bit product of sizes."""
    _triton_aot()


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_fit_the_shared_memory_of_every_card():
    """fit_configs(): the kernels' shared memory against sm_80/86/89/90's per-block limits."""
    _triton_aot("--fit", "--cc", "80", "86", "89", "90")


def _edge_logits(dtype, seed):
    """(2, 2, 6, 7) C = 2 logits whose differences cover 0 exactly, both signs, |d| up to 40 (p
    within 1e-17 of 0 or 1) and the usual range, so both branches of the closed form's selects
    (p1 = sigmoid(d) for d >= 0, e^d / (1 + e^d) below) and of share_s (bs >= bt or not) run."""
    g = torch.Generator().manual_seed(seed)
    x0 = 3 * torch.randn((2, 1, 6, 7), generator=g, dtype=torch.float64)
    d = torch.cat([torch.zeros(2, 1, 1, 7, dtype=torch.float64),
                   40 * torch.rand((2, 1, 2, 7), generator=g, dtype=torch.float64) - 20,
                   torch.tensor([-40.0, -12.0, -1e-3, 1e-3, 12.0, 40.0, 0.5], dtype=torch.float64).expand(2, 1, 1, 7),
                   3 * torch.randn((2, 1, 2, 7), generator=g, dtype=torch.float64)], dim=2)
    return torch.cat([x0, x0 + d], dim=1).to(DEVICE, dtype)


@pytest.mark.parametrize("backend", [b for b in fused_backends() if b == "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("beta", [0.0, 0.6, 9.0])
def test_two_class_closed_form_matches_reference(backend, dtype, weighted, teacher_grad, beta):
    """C = 2 runs the closed form (sigmoid, one Jacobian product): loss map and both gradients
    against the float64 reference at logits near the closed form's branch points."""
    s, t = _edge_logits(dtype, 91), _edge_logits(dtype, 92)
    w = torch.rand((2, 6, 7), generator=torch.Generator().manual_seed(93)).to(DEVICE) if weighted else None
    got = _run(dk.uncl, s, t, beta=beta, weight=w, reduction="none", backend=backend, teacher_grad=teacher_grad)
    want = _run(reference.uncl, s.double(), t.double(), beta=beta, weight=w, reduction="none",
                teacher_grad=teacher_grad)
    assert (got[2] is None) == (not teacher_grad)
    for g, r in zip(got, want):
        if r is not None:
            _assert_close(g, r.to(dtype), dtype)


@pytest.mark.skipif(not backends.can_run("triton", DEVICE), reason="triton cannot run here")
@pytest.mark.parametrize("C", [2, 3])
def test_triton_offsets_past_2_31(monkeypatch, C):
    """Element offsets c * stride_c + b * stride_b past 2^31 (int32 would wrap to a negative
    address): logits as a strided view into a ~4 GiB storage that is allocated but never
    touched beyond the viewed elements, through the kernels' own stride arguments."""
    from dycon_kernels.triton import uncl as tuncl

    monkeypatch.setenv("DYCON_POISON", "0")  # NaN-filling the outputs would touch the whole span
    B, V = 2, 40
    stride_c = 2**31 // (C - 1) + 64  # (C - 1) * stride_c > 2^31 but stride_c < 2^31: typed int32
    stride_b = 128
    storage = torch.empty((C - 1) * stride_c + stride_b * B + 256, dtype=torch.float16, device=DEVICE)
    s = storage.as_strided((B, C, V), (stride_b, stride_c, 1))
    t = storage.as_strided((B, C, V), (stride_b, stride_c, 1), storage_offset=64)
    s.copy_(random_logits((B, C, V), torch.float16, 95))
    t.copy_(random_logits((B, C, V), torch.float16, 96))
    grad = random_logits((B, V), torch.float32, 97)
    got_map = tuncl.uncl_forward(s, t, 1.3, None, False)
    got_ds, got_dt = tuncl.uncl_backward(grad, s, t, 1.3, None, True)
    sc, tc = s.contiguous(), t.contiguous()
    want_map = tuncl.uncl_forward(sc, tc, 1.3, None, False)
    want_ds, want_dt = tuncl.uncl_backward(grad, sc, tc, 1.3, None, True)
    assert torch.equal(got_map, want_map)
    assert torch.equal(got_ds, want_ds) and torch.equal(got_dt, want_dt)
    _assert_close(want_map, reference.uncl(sc.double(), tc.double(), 1.3, reduction="none"), torch.float16)


@pytest.mark.skipif(not backends.can_run("triton", DEVICE), reason="triton cannot run here")
def test_triton_launch_configs_cover_launches(monkeypatch):
    """Every UnCL kernel launch (signature and flags) is in launch_configs(), which the GPU-compile
    test compiles. beta's type is what Triton gives it: its annotation (float64) over the value's."""
    import inspect

    from dycon_kernels.triton import uncl as tuncl
    from triton_aot import record_launches

    configs = tuncl.launch_configs(full=True)  # before the kernels are wrapped
    launches = record_launches(monkeypatch, tuncl, ["uncl_forward_kernel", "uncl_backward_kernel"])
    short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    for dtype, C in ((torch.float32, 2), (torch.float32, 5), (torch.bfloat16, 2), (torch.float64, 2)):
        s, t = random_logits((2, C, 3, 4, 5), dtype, 98), random_logits((2, C, 3, 4, 5), dtype, 99)
        w = torch.rand((2, 3, 4, 5), device=DEVICE)
        for reduction, weight, teacher_grad in (("mean", w, True), ("none", None, False)):
            _run(dk.uncl, s, t, beta=0.9, weight=weight, reduction=reduction, backend="triton",
                 teacher_grad=teacher_grad)
    assert len(launches) == 16
    for kernel, args, kwargs in launches:
        params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        runtime = [(n, p) for n, p in params.items() if "constexpr" not in str(p.annotation)]
        assert len(runtime) == len(args)
        sig = {}
        for (name, param), arg in zip(runtime, args):
            if arg is None:  # an absent optional tensor (W, DT): Triton makes it a constexpr None
                continue
            if isinstance(arg, torch.Tensor):
                sig[name] = f"*{short[arg.dtype]}"
            elif param.annotation is not inspect.Parameter.empty:
                sig[name] = str(param.annotation)
            else:
                sig[name] = "i32" if isinstance(arg, int) else "fp32"
        assert sig["beta"] == "fp64"
        loose = ("BLOCK_C", "BLOCK_V")
        flags = {k: v for k, v in kwargs.items() if k not in loose}
        assert any(c[0] is kernel and {k: v for k, v in c[1].items() if k in sig} == sig
                   and {k: v for k, v in c[2].items() if k not in loose} == flags
                   for c in configs), (kernel, sig, flags)
