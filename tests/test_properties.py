"""Property-based tests (hypothesis): both losses on every CPU-capable fused backend against the
reference, over random shapes, label patterns, parameters and dtypes."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import dycon_kernels as dk
from dycon_kernels import backends, reference

CPU = torch.device("cpu")
UNCL_BACKENDS = [b for b in backends.available_backends(CPU) if b != "reference"]
FECL_BACKENDS = [b for b in UNCL_BACKENDS if backends.implements(b, "fecl")]
TOL = {torch.float32: 1e-4, torch.float64: 1e-9}   # half inputs: half_close
# The dtype is a pytest parameter rather than a strategy, so that every dtype runs max_examples.
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = [str(d).removeprefix("torch.") for d in DTYPES]
HALF = (torch.bfloat16, torch.float16)
SETTINGS = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Unit roundoff: the largest relative error of rounding a value to the nearest in that dtype.
UNIT_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-24,
                 torch.float64: 2.0**-53}


def half_rounding(backend, dtype):
    """Largest relative error of the kernel's final rounding of a float32 result to half ``dtype``.

    Round to nearest: UNIT_ROUNDOFF[dtype]. Except that the Triton *interpreter* (CPU, no GPU)
    converts float32 -> bfloat16 by truncation (triton/runtime/interpreter.py, ``cast_impl`` calls
    ``_convert_float`` without a rounding mode), i.e. with an error up to one ulp, 2 * 2^-8; on a GPU
    the Triton kernel's ``.to(bfloat16)`` rounds to nearest. (The loss is cast by torch: round to
    nearest on every backend; the 2x only matters for gradients, which the Triton kernels store.)"""
    if backend == "triton" and dtype == torch.bfloat16 and backends.triton_interpreted():
        return 2 * UNIT_ROUNDOFF[dtype]
    return UNIT_ROUNDOFF[dtype]


def half_close(got, want, dtype, rounding):
    """``got``: a kernel result for half ``dtype`` inputs; ``want``: the reference on the same input
    values upcast to float64. The kernels read the half values and compute in float32, so they may
    differ by float32's error (TOL[float32], as in the float32 tests) plus one final rounding to
    ``dtype`` (``rounding``: ``half_rounding(backend, dtype)``) and nothing else."""
    tol32 = TOL[torch.float32]
    torch.testing.assert_close(got.double(), want.double(), rtol=rounding + tol32,
                               atol=tol32 * max(1.0, want.abs().max().item()))


def close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol * max(1.0, want.abs().max().item()))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", UNCL_BACKENDS)
@SETTINGS
@given(B=st.integers(1, 3), C=st.integers(2, 6), spatial=st.lists(st.integers(1, 7), min_size=1, max_size=3),
       beta=st.floats(0.0, 10.0), scale=st.floats(0.1, 30.0), seed=st.integers(0, 2**31 - 1),
       reduction=st.sampled_from(["mean", "sum", "none"]), weighted=st.booleans())
def test_uncl_property(backend, dtype, B, C, spatial, beta, scale, seed, reduction, weighted):
    g = torch.Generator().manual_seed(seed)
    shape = (B, C, *spatial)
    s = (scale * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    t = (scale * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    w = torch.rand((B, *spatial), generator=g) if weighted else None
    got = dk.uncl(s, t, beta, weight=w, reduction=reduction, backend=backend)
    got_grads = torch.autograd.grad(got.sum(), (s, t))
    half = dtype in HALF
    # Half inputs: the truth is the reference on the same values upcast to float64 (half_close).
    s_ref, t_ref = (x.detach().double().requires_grad_() for x in (s, t)) if half else (s, t)
    want = reference.uncl(s_ref, t_ref, beta, weight=w, reduction=reduction)
    want_grads = torch.autograd.grad(want.sum(), (s_ref, t_ref))
    for a, b in zip((got, *got_grads), (want, *want_grads)):
        assert a.dtype == dtype
        assert torch.isfinite(a).all()
        if half:
            half_close(a, b, dtype, half_rounding(backend, dtype))
        else:
            close(a, b, dtype)


label_patterns = st.sampled_from(["random", "one_class", "all_ignored", "single_patch", "many_classes"])


def labels_for(pattern, B, N, g):
    if pattern == "one_class":
        return torch.zeros(B, N, dtype=torch.long)
    if pattern == "all_ignored":
        return torch.full((B, N), -1, dtype=torch.long)
    if pattern == "single_patch":
        y = torch.full((B, N), -1, dtype=torch.long)
        y[:, 0] = 1
        return y
    classes = 5 if pattern == "many_classes" else 2
    y = torch.randint(0, classes, (B, N), generator=g)
    y[torch.rand(B, N, generator=g) < 0.15] = -1
    return y


# ---- FeCL: what the comparison tolerates -------------------------------------------------------
# float32 / float64 inputs are compared with the reference on the same inputs (same precision),
# to TOL[dtype]. Half inputs (float16, bfloat16): the kernels read the half values and compute in
# float32, so the truth is the reference on the same values upcast to float64, and what separates
# a kernel result from it is
#   - the float32 computation: allowed what the float32 test allows (TOL[float32], relative and
#     w.r.t. the largest magnitude);
#   - one rounding of the float32 result to the half dtype (loss, and dz): at most
#     UNIT_ROUNDOFF[dtype] * |value| (below the float32 atol when the value is subnormal in fp16).
# Nothing else: rtol = UNIT_ROUNDOFF[dtype] + TOL[float32], atol = TOL[float32] * scale
# (bf16: rtol 0.0040; fp16: rtol 0.00059), except for the Triton interpreter's bfloat16 cast
# (see half_rounding).
#
# Two things are not rounding errors; they are handled explicitly, for every dtype, rather than by
# a wider tolerance. Both come from the rounding error `err` of a similarity in the compute
# precision (dot_error), which the kernel and the reference incur differently.
#   - Near-ties at a top-k selection boundary (the spec lets ties go either way). Half inputs are
#     quantised, so exact ties (e.g. two identical key vectors) are far more likely than with
#     float32 inputs. A swap of two near-tied negatives q, q' of anchor i changes the loss only by
#     the (tiny) difference of their terms, but moves gradient between rows i, q and q' of dz.
#     The loss is always compared; the dz rows that a near-tie can move are left out of the
#     comparison, every other row is compared in full.
#   - The threshold teacher term (official preset) where the rounding of c = <z_i, zt_k> is
#     amplified: membership of M flips when c is within err of the threshold, and -log(1 - c) and
#     its gradient zt_k / (1 - c) change by a relative err / (1 - c), unbounded as c -> 1 (with
#     half-rounded, not-quite-unit vectors even c > 1 happens, where the spec's clamp jumps).
#     Two float32 computations of such a draw cannot agree to float32 accuracy, so such draws are
#     rejected (assume): |c - threshold| > err and 1 - c > 2 err / TOL for every teacher negative
#     pair. In float32 that is 1 - c > 0.019 (D = 2) to 0.1 (D = 24), so it rejects official-preset
#     draws with a teacher patch within ~0.2 rad of an anchor of another label, i.e. mostly D <= 3
#     (2-15% of all draws in test runs).

def dot_error(D, compute):
    """Bound on the rounding error of <a, b> in precision ``compute`` for vectors of norm ~1 (a
    D-term sum rounds at most D + 1 times counting the products, plus a division by tau), times 4."""
    return 4 * (D + 2) * UNIT_ROUNDOFF[compute]


def topk_tied_rows(logits, cand, k, err):
    """For a top-k selection among candidates ``cand`` (B, N, M) by exact ``logits`` (B, N, M), each
    computed by the kernel and the reference to within ``err``: the anchors (B, N) whose selected
    set depends on how a near-tie at the k-th place is broken, and the keys (B, M) that could be
    swapped in or out."""
    B, N, M = logits.shape
    anchors = torch.zeros(B, N, dtype=torch.bool)
    keys = torch.zeros(B, M, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            vals = logits[b, i][cand[b, i]].sort(descending=True).values
            if vals.numel() <= k or vals[k - 1] - vals[k] > 2 * err:
                continue
            anchors[b, i] = True
            row = logits[b, i]
            keys[b] |= cand[b, i] & (row >= vals[k - 1] - 2 * err) & (row <= vals[k] + 2 * err)
    return anchors, keys


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("backend", FECL_BACKENDS)
@SETTINGS
# D >= 2: with D = 1 every similarity is +-1/tau, so the top-k sets are all ties, which the spec
# lets an implementation break either way (changing which key gets the gradient).
@given(B=st.integers(1, 2), N=st.integers(1, 40), D=st.integers(2, 24), pattern=label_patterns,
       seed=st.integers(0, 2**31 - 1), preset=st.sampled_from(["dycon", "official"]),
       tau=st.floats(0.1, 1.0), gamma_pos=st.sampled_from([0.0, 1.0, 2.0]), gamma_neg=st.sampled_from([0.0, 2.0]),
       top_k=st.sampled_from([None, 1, 3, 64]), teacher_top_k=st.integers(1, 8), weighted=st.booleans(),
       reduction=st.sampled_from(["mean", "mean_positive", "sum", "none"]))
def test_fecl_property(backend, dtype, B, N, D, pattern, seed, preset, tau, gamma_pos, gamma_neg, top_k,
                       teacher_top_k, weighted, reduction):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1).to(dtype).requires_grad_()
    zt = F.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1).to(dtype)
    y = labels_for(pattern, B, N, g)
    u = torch.rand(B, N, generator=g) if weighted else None
    params = dict(temperature=tau, gamma_pos=gamma_pos, gamma_neg=gamma_neg, reduction=reduction)
    if preset == "official":
        params.update(teacher_threshold=0.1)
    else:
        params.update(top_k=top_k, teacher_top_k=teacher_top_k)
    full = dk.presets.fecl_params(preset, **params)
    half = dtype in HALF
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    # Half inputs: the reference runs on the same values upcast to float64 (see above).
    z_ref = z.detach().double().requires_grad_() if half else z
    zt_ref = zt.double() if half else zt

    # The two conditioning hazards above, judged on the exact similarities of the input values.
    z64, zt64, err = z.detach().double(), zt.double(), dot_error(D, compute)
    valid = y >= 0
    other = valid[:, :, None] & valid[:, None, :] & (y[:, :, None] != y[:, None, :])  # teacher labels = y
    if full["teacher"] == "threshold":
        c = (z64 @ zt64.transpose(1, 2))[other]
        thr = full["teacher_threshold"]
        assume(bool(((c - thr).abs() > err).all()))
        assume(bool((1 - c[c > thr] > 2 * err / TOL[compute]).all()))
    tied = torch.zeros(B, N, dtype=torch.bool)  # dz rows that a top-k near-tie can move
    # Triton's top-k compares similarities (|l tau| <= 1 here) as packed keys, equal within 2^-17
    # (float32, k <= 64) or 2^-46 (float64): near-ties it may break either way (docs/fecl_kernels.md).
    tie_err = err + (2.0 ** (-17 if compute == torch.float32 else -46) if backend == "triton" else 0.0)
    if full["top_k"] is not None:
        anchors, keys = topk_tied_rows(z64 @ z64.transpose(1, 2) / tau, other, full["top_k"], tie_err / tau)
        tied |= anchors | keys
    if full["teacher"] == "topk":
        anchors, _ = topk_tied_rows(z64 @ zt64.transpose(1, 2) / tau, other, full["teacher_top_k"], tie_err / tau)
        tied |= anchors  # teacher keys get no gradient
    if tied.any():
        event("dz rows left out for a top-k near-tie")

    got = dk.fecl(z, y, zt, anchor_weight=u, preset=preset, backend=backend, **params)
    (got_grad,) = torch.autograd.grad(got.sum(), z)
    want = reference.fecl(z_ref, y, zt_ref, anchor_weight=u, **full)
    (want_grad,) = torch.autograd.grad(want.sum(), z_ref)
    for a in (got, got_grad):
        assert a.dtype == dtype
        assert torch.isfinite(a).all()
    for a, b in ((got, want), (got_grad[~tied], want_grad[~tied])):
        if b.numel() == 0:  # every dz row is tied
            continue
        if half:
            half_close(a, b, dtype, half_rounding(backend, dtype))
        else:
            close(a, b, dtype)
