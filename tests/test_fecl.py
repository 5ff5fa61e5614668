"""FeCL through the public API: every fused backend against the dense reference, edge cases,
errors, torch.library registration. (Entry-point tests of each backend: test_fecl_cpp.py,
test_fecl_triton.py; the reference against brute-force loops: test_reference_fecl.py.)"""
import contextlib
import importlib
import zlib

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import dycon_kernels as dk
from dycon_kernels import backends, reference
from conftest import DEVICE, fused_backends

fecl_ops = importlib.import_module("dycon_kernels.fecl")  # the module (dk.fecl is the function)

FECL_BACKENDS = [b for b in fused_backends() if backends.implements(b, "fecl")]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5 if DEVICE.type == "cpu" else 2e-3,
       torch.float16: 2e-2, torch.bfloat16: 2e-2}


def make_inputs(B=2, N=29, D=19, Nt=None, classes=2, dtype=torch.float32, seed=0, ignore=0.1, teacher_labels=False):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, classes, (B, N), generator=g)
    y[torch.rand(B, N, generator=g) < ignore] = -1
    Nt = N if Nt is None else Nt
    zt = F.normalize(torch.randn(B, Nt, D, generator=g, dtype=torch.float64), dim=-1)
    yt = torch.randint(0, classes, (B, Nt), generator=g) if (teacher_labels or Nt != N) else None
    u = 1.0 + torch.rand(B, N, generator=g)
    to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return to(z.to(dtype)), to(y), to(zt.to(dtype)), to(yt), to(u)


def on_device(tensors, device):
    return [t if t is None else t.to(device) for t in tensors]


def seed_of(*parts):
    return zlib.crc32(repr(parts).encode())


def run(fn, z, y, zt, yt, **kw):
    z = z.detach().clone().requires_grad_()
    out = fn(z, y, zt, yt, **kw)
    weights = torch.rand(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    (out * weights.to(out.device, out.dtype)).sum().backward()
    return out, z.grad


def assert_matches_reference(backend, z, y, zt, yt, dtype=torch.float32, **kw):
    got, got_grad = run(dk.fecl, z, y, zt, yt, backend=backend, **kw)
    want, want_grad = run(reference.fecl, z, y, zt, yt, **{k: v for k, v in kw.items() if k != "preset"},
                          **({} if "preset" not in kw else {}))
    tol = TOL[dtype]
    for g, w in ((got, want), (got_grad, want_grad)):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w.double(), rtol=tol, atol=tol * max(1.0, w.abs().max().item()))


def reference_params(preset, **overrides):
    return dk.presets.fecl_params(preset, **overrides)


CASES = {
    "dycon": reference_params("dycon"),
    "official": reference_params("official", teacher_threshold=0.1),
    "no_teacher": reference_params("dycon", teacher=None),
    "gamma_pos0": reference_params("dycon", teacher=None, gamma_pos=0.0),
    "gamma_neg0": reference_params("dycon", teacher=None, gamma_neg=0.0),
    "gamma_neg_odd": reference_params("dycon", teacher=None, gamma_neg=1.5),
    "column": reference_params("dycon", teacher=None, shift="column"),
    "top_k1": reference_params("dycon", teacher=None, top_k=1),
    "top_k5": reference_params("dycon", teacher=None, top_k=5),
    "top_k_all": reference_params("dycon", teacher=None, top_k=500),
    "teacher_k3": reference_params("dycon", teacher_top_k=3),
    "threshold": reference_params("dycon", teacher="threshold", teacher_threshold=0.0, teacher_weight=0.7),
    "tau_small": reference_params("dycon", temperature=0.07),
    "mean_positive": reference_params("dycon", reduction="mean_positive"),
    "sum": reference_params("official", teacher_threshold=0.2, reduction="sum"),
    "none": reference_params("official", teacher_threshold=0.2, reduction="none"),
}


@pytest.mark.parametrize("backend", FECL_BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("weighted", [False, True])
def test_backend_matches_reference(backend, case, weighted):
    z, y, zt, yt, u = make_inputs(seed=seed_of(backend, case, weighted))
    assert_matches_reference(backend, z, y, zt, yt, anchor_weight=u if weighted else None, **CASES[case])


@pytest.mark.parametrize("backend", FECL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["dycon", "official"])
def test_half_inputs(backend, dtype, case):
    z, y, zt, yt, _ = make_inputs(dtype=dtype, seed=seed_of(backend, dtype, case))
    got, _ = run(dk.fecl, z, y, zt, yt, backend=backend, **CASES[case])
    want, _ = run(reference.fecl, z.float(), y, zt.float(), yt, **CASES[case])
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", FECL_BACKENDS)
def test_teacher_with_other_patch_count_and_labels(backend):
    z, y, zt, yt, u = make_inputs(Nt=17, seed=seed_of(backend, "nt"))
    assert_matches_reference(backend, z, y, zt, yt, anchor_weight=u, **CASES["dycon"])
    assert_matches_reference(backend, z, y, zt, yt, **CASES["official"])


@pytest.mark.parametrize("backend", FECL_BACKENDS)
def test_non_contiguous_inputs(backend):
    z, y, zt, yt, u = make_inputs(N=24, D=32, seed=seed_of(backend, "nc"))
    # Same values, transposed memory layout.
    strided = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    z_nc, y_nc, zt_nc, u_nc = strided(z), strided(y), strided(zt), strided(u)
    assert not (z_nc.is_contiguous() or y_nc.is_contiguous() or zt_nc.is_contiguous())
    assert_matches_reference(backend, z_nc, y_nc, zt_nc, None, anchor_weight=u_nc, **CASES["dycon"])


EDGE_LABELS = {
    "one_class": lambda B, N: torch.zeros(B, N, dtype=torch.long),
    "all_ignored": lambda B, N: torch.full((B, N), -1, dtype=torch.long),
    "one_valid_patch": lambda B, N: torch.tensor([[-1] * (N - 1) + [0]] * B),
    "no_positives": lambda B, N: torch.arange(B * N).reshape(B, N),
}


@pytest.mark.parametrize("backend", FECL_BACKENDS + ["reference"])
@pytest.mark.parametrize("edge", sorted(EDGE_LABELS))
@pytest.mark.parametrize("case", ["dycon", "official", "top_k5", "column"])
def test_edge_cases_are_finite_and_zero_where_the_spec_says(backend, edge, case):
    z, _, zt, _, _ = make_inputs(N=9, seed=seed_of(backend, edge, case))
    y = EDGE_LABELS[edge](2, 9).to(DEVICE)
    out, grad = run(dk.fecl, z, y, zt, None, backend=backend, **CASES[case])
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    if CASES[case]["teacher"] != "threshold" or edge == "all_ignored":
        # No pair of different labels with a positive: every L_i is 0 (no NaN), zero gradient.
        assert out.abs().max() == 0 and grad.abs().max() == 0


@pytest.mark.parametrize("backend", FECL_BACKENDS + ["reference"])
@pytest.mark.parametrize("N", [1, 2])
def test_tiny_n(backend, N):
    z, y, zt, _, _ = make_inputs(N=N, seed=seed_of(backend, N), ignore=0.0)
    out, grad = run(dk.fecl, z, y, zt, None, backend=backend, **CASES["dycon"])
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


# Not the column shift: its offset c_j is detached by definition, so finite differences (which
# see c_j move) disagree with the specified gradient; test_backend_matches_reference covers it.
@pytest.mark.parametrize("backend", [b for b in FECL_BACKENDS if b != "triton"])
@pytest.mark.parametrize("case", ["dycon", "top_k5", "threshold", "gamma_neg_odd"])
def test_gradcheck_fused(backend, case):
    z, y, zt, _, u = make_inputs(B=2, N=11, D=5, dtype=torch.float64, seed=seed_of(backend, case))
    z.requires_grad_()
    params = {**CASES[case], "reduction": "mean"}
    assert torch.autograd.gradcheck(
        lambda a: dk.fecl(F.normalize(a, dim=-1), y, zt, anchor_weight=u, backend=backend, **params), (z,))


@pytest.mark.parametrize("backend", FECL_BACKENDS)
@pytest.mark.parametrize("case", ["dycon", "official", "top_k5"])
def test_opcheck(backend, case):
    z, y, zt, yt, u = make_inputs(N=16, D=16, seed=seed_of(backend, case, "op"))
    p = CASES[case]
    teacher = p["teacher"] or "none"
    args = (z.requires_grad_(), y, zt, y if teacher != "none" else None, u, p["temperature"], p["gamma_pos"],
            p["gamma_neg"], p["top_k"] or 0, p["shift"] == "column", teacher,
            p["teacher_top_k"] if teacher == "topk" else 0,
            torch.tensor(float(p["teacher_threshold"] or 0.0), dtype=torch.float64), backend)
    torch.library.opcheck(torch.ops.dycon.fecl.default, args)


def test_torch_compile_fullgraph():
    backend = FECL_BACKENDS[0] if FECL_BACKENDS else "reference"
    z, y, zt, _, _ = make_inputs(N=16, D=16, seed=3)

    def step(z, y, zt):
        return dk.fecl(z, y, zt, backend=backend) * 2.0

    z.requires_grad_()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(z, y, zt)
    out.backward()
    torch.testing.assert_close(out, step(z, y, zt))


@pytest.mark.parametrize("backend", FECL_BACKENDS)
def test_create_graph_on_a_fused_backend_names_the_way_out(backend):
    """A gradient penalty through FeCL: one error saying which backend differentiates twice."""
    z, y, zt, _, _ = make_inputs(N=16, D=16, seed=5)
    z.requires_grad_()
    with pytest.raises(RuntimeError, match=f"create_graph=True.*backend='reference'.*'{backend}'"):
        torch.autograd.grad(dk.fecl(z, y, zt, backend=backend), z, create_graph=True)
    grad, = torch.autograd.grad(dk.fecl(z, y, zt, backend="reference"), z, create_graph=True)
    assert grad.requires_grad                        # the reference's gradient differentiates again


def _official_step(backend):
    def step(z, y, zt, teacher_threshold):
        return dk.fecl(z, y, zt, preset="official", teacher_threshold=teacher_threshold, reduction="none",
                       backend=backend)
    return step


@pytest.mark.parametrize("backend", FECL_BACKENDS + ["reference"])
def test_compiled_step_compiles_once_for_a_threshold_ramp(backend):
    """The official teacher threshold as a 0-dim tensor is a graph input: four values, one graph,
    each equal to eager. (Counted as unique graphs: dynamo may restart the analysis of the first
    call once.)"""
    z, y, zt, _, _ = make_inputs(N=16, D=16, seed=seed_of(backend, "ramp"))
    step = _official_step(backend)
    torch._dynamo.reset()  # a fresh cache: earlier tests may have compiled ``step`` with another backend
    counters.clear()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for threshold in (0.0, 0.1, 0.2, 0.3):
        got = run(compiled, z, y, zt, torch.tensor(threshold, dtype=torch.float64))
        want = run(step, z, y, zt, threshold)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=TOL[torch.float32], atol=TOL[torch.float32])
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("backend", FECL_BACKENDS + ["reference"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tensor_threshold_equals_float_threshold(backend, reduction):
    z, y, zt, _, _ = make_inputs(seed=seed_of(backend, reduction, "thr"))
    kw = dict(preset="official", reduction=reduction, backend=backend)
    threshold = torch.tensor(0.15, dtype=torch.float64, device=DEVICE)
    for fn, fn_kw in ((dk.fecl, kw), (dk.FeCLoss(**kw), {})):
        want = run(fn, z, y, zt, None, teacher_threshold=0.15, **fn_kw)
        got = run(fn, z, y, zt, None, teacher_threshold=threshold, **fn_kw)
        for g, w in zip(got, want):
            assert torch.equal(g, w)


@contextlib.contextmanager
def deterministic_algorithms(warn_only=False):
    """torch.use_deterministic_algorithms(True) inside the block; the previous mode afterwards."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True, warn_only=warn_only)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


@pytest.mark.skipif(not backends.can_run("cpu", torch.device("cpu")), reason="dycon_kernels._C not built")
@pytest.mark.parametrize("preset", ["dycon", "official"])
@pytest.mark.parametrize("top_k", [None, 5])
def test_cpu_backend_is_deterministic(preset, top_k):
    """Two runs under use_deterministic_algorithms(True) give the same bits: each forward tile writes
    its own rows, the backward's strips are added per thread in a fixed order, and the top-k scatter
    goes through a transposed index built serially. Not asserted across thread counts: the tile and
    strip heights, and the grouping of the backward's sums, depend on the thread count."""
    # N = 300: tiles and strips of a few dozen rows (csrc/fecl_cpu.cpp, tile_rows), several for each
    # of 2 threads: the forward's tiles go to whichever thread asks, the backward's strips in a fixed order.
    z, y, zt, yt, u = on_device(make_inputs(N=300, D=16, seed=seed_of(preset, top_k)), "cpu")
    params = dict(preset=preset, top_k=top_k, **({"teacher_threshold": 0.1} if preset == "official" else {}))
    with deterministic_algorithms():
        first, second = (run(dk.fecl, z, y, zt, yt, anchor_weight=u, backend="cpu", **params) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_only_the_gpu_top_k_backward_needs_atomics():
    """Without a GPU the alert cannot fire for real; this is the rule that decides it."""
    assert fecl_ops._needs_atomics("cuda", "cuda", 5)
    assert not fecl_ops._needs_atomics("cuda", "cuda", 0)
    assert not fecl_ops._needs_atomics("triton", "cuda", 5)  # the key side through a transposed index
    assert not fecl_ops._needs_atomics("cpu", "cpu", 5)
    assert not fecl_ops._needs_atomics("triton", "cpu", 5)


ALERT = "dycon::fecl_backward with top_k on the {} backend does not have a deterministic implementation"


def _top_k_loss(backend, device):
    z, y, zt, yt, _ = on_device(make_inputs(N=16, D=8, seed=seed_of(backend, "alert")), device)
    z.requires_grad_()
    return z, dk.fecl(z, y, zt, yt, backend=backend, top_k=3)


@pytest.mark.parametrize("backend", [b for b in FECL_BACKENDS if fecl_ops._needs_atomics(b, DEVICE.type, 3)])
def test_atomic_backward_raises_in_deterministic_mode(backend):
    with deterministic_algorithms():
        _, loss = _top_k_loss(backend, DEVICE)  # the forward has no atomics
        with pytest.raises(RuntimeError, match=ALERT.format(backend)):
            loss.backward()


@pytest.mark.skipif(not backends.can_run("cpu", torch.device("cpu")), reason="dycon_kernels._C not built")
@pytest.mark.parametrize("warn_only", [False, True])
def test_alert_reaches_the_caller(monkeypatch, warn_only):
    """The alert path of dycon::fecl_backward on this machine: the CPU backend is made to claim
    atomics. Deterministic mode raises; warn_only=True warns and computes the gradient."""
    monkeypatch.setattr(fecl_ops, "_needs_atomics", lambda backend, device_type, top_k: top_k > 0)
    with deterministic_algorithms(warn_only=warn_only):
        z, loss = _top_k_loss("cpu", "cpu")
        if warn_only:
            with pytest.warns(UserWarning, match=ALERT.format("cpu")):
                loss.backward()
            assert torch.isfinite(z.grad).all()
        else:
            with pytest.raises(RuntimeError, match=ALERT.format("cpu")):
                loss.backward()


def test_module_normalises_its_inputs():
    z, y, zt, _, _ = make_inputs(seed=5)
    loss = dk.FeCLoss(preset="official", teacher_threshold=0.2)(3.0 * z, y, 0.5 * zt)
    torch.testing.assert_close(loss, dk.fecl(z, y, zt, preset="official", teacher_threshold=0.2))


def test_presets_differ_where_the_spec_says():
    z, y, zt, _, _ = make_inputs(seed=6)
    official = dk.fecl(z, y, zt, preset="official", teacher_threshold=0.2)
    assert not torch.allclose(official, dk.fecl(z, y, zt, preset="dycon"))
    assert torch.allclose(official, dk.fecl(z, y, zt, preset="dycon", gamma_neg=0.0, shift="column",
                                            teacher="threshold", teacher_threshold=0.2))


@pytest.mark.parametrize("make, message", [
    (lambda z, y, zt: dk.fecl(z[0], y, zt), r"\(B, N, D\)"),
    (lambda z, y, zt: dk.fecl(z, y.float(), zt), "integer"),
    (lambda z, y, zt: dk.fecl(z, y[:, :3], zt), "labels must be"),
    (lambda z, y, zt: dk.fecl(z.long(), y, zt), "floating-point"),
    (lambda z, y, zt: dk.fecl(z, y, zt[:, :, :4]), "teacher_embeddings must be"),
    (lambda z, y, zt: dk.fecl(z, y, zt[:, :5]), "teacher_labels"),
    (lambda z, y, zt: dk.fecl(z, y, zt.double()), "float64"),
    (lambda z, y, zt: dk.fecl(z, y, zt.to("meta")), "meta"),
    (lambda z, y, zt: dk.fecl(z * float("nan"), y, zt), "NaN"),
    (lambda z, y, zt: dk.fecl(z, y, zt, anchor_weight=-torch.ones_like(y, dtype=z.dtype)), ">= 0"),
    (lambda z, y, zt: dk.fecl(z, y, zt, temperature=0.0), "temperature"),
    (lambda z, y, zt: dk.fecl(z, y, zt, top_k=0), "top_k"),
    (lambda z, y, zt: dk.fecl(z, y, zt, shift="row"), "shift"),
    (lambda z, y, zt: dk.fecl(z, y, zt, shift="column"), "column"),
    (lambda z, y, zt: dk.fecl(z, y, zt, teacher="threshold"), "teacher_threshold"),
    (lambda z, y, zt: dk.fecl(z, y, zt, preset="official", teacher_threshold="0.3"), "teacher_threshold"),
    (lambda z, y, zt: dk.fecl(z, y, zt, preset="official", teacher_threshold=torch.ones(2)), "0-dim"),
    (lambda z, y, zt: dk.fecl(z, y, zt, reduction="avg"), "reduction"),
    (lambda z, y, zt: dk.fecl(z, y, zt, preset="paper"), "preset"),
    (lambda z, y, zt: dk.fecl(z, y, zt, tau=0.1), "unknown FeCL parameter"),
])
def test_bad_input_raises_value_error(make, message):
    z, y, zt, _, _ = make_inputs(seed=8)
    with pytest.raises(ValueError, match=message):
        make(z, y, zt)
