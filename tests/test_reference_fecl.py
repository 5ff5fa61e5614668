"""The dense FeCL reference (dycon_kernels.reference.fecl) against a brute-force loop
implementation of losses.md section 2 written here, plus gradcheck, edge cases and half inputs.

The brute force works on 0-d float64 tensors, one anchor and one pair at a time, so autograd
through it gives an independent gradient too (the only way to check ``shift="column"``, whose
detached offset makes the value's true derivative differ from the defined gradient).
"""
import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from dycon_kernels import reference
from dycon_kernels.presets import fecl_params

F64 = torch.float64
TOL = 1e-10

# A plain configuration: every option off, so each test below switches on exactly one.
PLAIN = dict(temperature=0.6, gamma_pos=0.0, gamma_neg=0.0, top_k=None, shift="exact", teacher=None,
             teacher_top_k=None, teacher_threshold=None, teacher_weight=1.0, reduction="mean")


def seed_of(*parts) -> int:
    """A fresh, reproducible seed per parametrisation."""
    return zlib.crc32(repr(parts).encode())


def make_inputs(seed, B=2, N=9, D=8, Nt=None, n_classes=3, p_ignore=0.2, separate_teacher_labels=False):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, N, D, generator=g, dtype=F64), dim=-1)
    y = torch.randint(0, n_classes, (B, N), generator=g)
    y[torch.rand(B, N, generator=g) < p_ignore] = -1
    Nt = N if Nt is None else Nt
    zt = F.normalize(torch.randn(B, Nt, D, generator=g, dtype=F64), dim=-1)
    yt = None
    if separate_teacher_labels:
        yt = torch.randint(0, n_classes, (B, Nt), generator=g)
        yt[torch.rand(B, Nt, generator=g) < p_ignore] = -1
    u = torch.rand(B, N, generator=g, dtype=F64) + 0.5
    return z, y, zt, yt, u


# ------------------------------------------------------------------------------------------
# Brute force: literal loops over volumes, anchors and pairs (no code shared with reference.py)
# ------------------------------------------------------------------------------------------

def brute_fecl(z, y, zt=None, yt=None, u=None, *, temperature, gamma_pos, gamma_neg, top_k, shift,
               teacher, teacher_top_k, teacher_threshold, teacher_weight, reduction):
    tau = temperature
    B, N, _ = z.shape
    if zt is None:
        teacher = None
    if yt is None:
        yt = y
    zero = torch.zeros((), dtype=F64)
    loss_map = [[zero for _ in range(N)] for _ in range(B)]
    cross_map = [[zero for _ in range(N)] for _ in range(B)]
    n_valid = n_with_pos = n_cross = 0
    for b in range(B):
        yb, ytb = y[b].tolist(), yt[b].tolist()
        Nt = len(ytb)
        l = {(i, j): torch.dot(z[b, i], z[b, j]) / tau for i in range(N) for j in range(N)}
        c = [0.0] * N
        if shift == "column":  # max over valid anchors i != j, at least 0, a constant
            for j in range(N):
                c[j] = max([0.0] + [l[i, j].item() for i in range(N) if i != j and yb[i] >= 0])
        for i in range(N):
            if yb[i] < 0:
                continue
            n_valid += 1
            P = [j for j in range(N) if j != i and yb[j] >= 0 and yb[j] == yb[i]]
            Q = [q for q in range(N) if yb[q] >= 0 and yb[q] != yb[i]]
            H = Q if top_k is None else sorted(Q, key=lambda q: -l[i, q].item())[:top_k]
            neg = zero
            for q in H:
                if gamma_neg == 0:
                    w = 1.0
                else:
                    w = torch.clamp((1 + tau * l[i, q]) / 2, min=0.0) ** gamma_neg
                neg = neg + w * torch.exp(l[i, q] - c[q])
            if teacher == "topk":
                cand = [k for k in range(Nt) if ytb[k] >= 0 and ytb[k] != yb[i]]
                T = sorted(cand, key=lambda k: -torch.dot(z[b, i], zt[b, k]).item())[:teacher_top_k]
                for k in T:
                    neg = neg + torch.exp(torch.dot(z[b, i], zt[b, k]) / tau)
            if teacher == "threshold":
                for k in range(Nt):
                    cik = torch.dot(z[b, i], zt[b, k])
                    if ytb[k] >= 0 and ytb[k] != yb[i] and cik.item() > teacher_threshold:
                        cross_map[b][i] = cross_map[b][i] - torch.log(1 - cik + 1e-18)
                        n_cross += 1
            if not P:
                continue
            n_with_pos += 1
            acc = zero
            for j in P:
                e = torch.exp(l[i, j] - c[j])
                S = e / (e + neg)
                acc = acc + (1 - S) ** gamma_pos * torch.log(S)
            ui = 1.0 if u is None else u[b, i].item()
            loss_map[b][i] = -ui * acc / len(P)
    loss_map = torch.stack([torch.stack(row) for row in loss_map])
    cross_map = torch.stack([torch.stack(row) for row in cross_map])
    cross_share = teacher_weight * cross_map / max(n_cross, 1)
    if reduction == "none":
        return loss_map + cross_share
    total = loss_map.sum()
    if reduction == "mean":
        total = total / max(n_valid, 1)
    elif reduction == "mean_positive":
        total = total / max(n_with_pos, 1)
    return total + cross_share.sum()


def value_and_grad(fn, z, *args, **kwargs):
    z = z.detach().clone().requires_grad_(True)
    out = fn(z, *args, **kwargs)
    if not out.requires_grad:  # the brute force builds no graph when no pair contributes
        return out.detach(), torch.zeros_like(z)
    (grad,) = torch.autograd.grad(out.sum(), z, allow_unused=True)
    return out.detach(), (torch.zeros_like(z) if grad is None else grad)


def check_against_brute(z, y, zt=None, yt=None, u=None, **params):
    ref_v, ref_g = value_and_grad(reference.fecl, z, y, zt, yt, anchor_weight=u, **params)
    bf_v, bf_g = value_and_grad(brute_fecl, z, y, zt, yt, u, **params)
    assert ref_v.dtype == F64 and ref_v.shape == bf_v.shape
    torch.testing.assert_close(ref_v, bf_v, rtol=TOL, atol=TOL)
    torch.testing.assert_close(ref_g, bf_g, rtol=TOL, atol=TOL)
    return ref_v


# ------------------------------------------------------------------------------------------
# Reference == brute force
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["official", "dycon"])
@pytest.mark.parametrize("N", [1, 5, 9])
@pytest.mark.parametrize("D", [3, 8])
def test_presets_match_brute_force(preset, N, D):
    z, y, zt, _, _ = make_inputs(seed_of("preset", preset, N, D), N=N, D=D)
    # official: a low threshold so that random embeddings give a non-empty M.
    params = fecl_params(preset, teacher_threshold=0.2) if preset == "official" else fecl_params(preset)
    value = check_against_brute(z, y, zt, **params)
    assert torch.isfinite(value)


SINGLE = {
    "gamma_pos=2": dict(gamma_pos=2.0),
    "gamma_pos=0.5": dict(gamma_pos=0.5),
    "gamma_neg=2": dict(gamma_neg=2.0),
    "gamma_neg=1": dict(gamma_neg=1.0),
    "top_k=1": dict(top_k=1),
    "top_k=3": dict(top_k=3),
    "top_k=100": dict(top_k=100),
    "shift=column": dict(shift="column"),
    "tau=0.1": dict(temperature=0.1),
    "teacher=topk": dict(teacher="topk", teacher_top_k=2),
    "teacher=topk,k=1": dict(teacher="topk", teacher_top_k=1),
    "teacher=topk,large_k": dict(teacher="topk", teacher_top_k=50),
    "teacher=threshold": dict(teacher="threshold", teacher_threshold=0.1),
    "teacher=threshold,w=0.3": dict(teacher="threshold", teacher_threshold=0.0, teacher_weight=0.3),
    "reduction=sum": dict(reduction="sum"),
    "reduction=mean_positive": dict(reduction="mean_positive"),
    "reduction=none": dict(reduction="none"),
    "reduction=none,threshold": dict(reduction="none", teacher="threshold", teacher_threshold=0.1),
}


@pytest.mark.parametrize("name", list(SINGLE))
@pytest.mark.parametrize("shape", [(5, 3), (9, 8)])
def test_single_parameter_matches_brute_force(name, shape):
    N, D = shape
    z, y, zt, _, _ = make_inputs(seed_of("single", name, shape), N=N, D=D)
    check_against_brute(z, y, zt, **{**PLAIN, **SINGLE[name]})


@pytest.mark.parametrize("teacher,extra", [("topk", dict(teacher_top_k=3)),
                                           ("threshold", dict(teacher_threshold=0.1))])
@pytest.mark.parametrize("separate_labels", [False, True])
def test_teacher_with_other_size_and_labels(teacher, extra, separate_labels):
    # Nt != N needs separate teacher labels; with Nt == N they default to the student's.
    Nt = 6 if separate_labels else 9
    z, y, zt, yt, _ = make_inputs(seed_of("teacher", teacher, separate_labels), N=9, Nt=Nt,
                                  separate_teacher_labels=separate_labels)
    check_against_brute(z, y, zt, yt, **{**PLAIN, "gamma_pos": 2.0, "gamma_neg": 2.0,
                                         "teacher": teacher, **extra})


@pytest.mark.parametrize("reduction", ["mean", "mean_positive", "sum", "none"])
def test_anchor_weights(reduction):
    z, y, zt, _, u = make_inputs(seed_of("u", reduction))
    check_against_brute(z, y, zt, None, u, **{**PLAIN, "gamma_pos": 2.0, "reduction": reduction})


@pytest.mark.parametrize("preset", ["official", "dycon"])
def test_everything_together(preset):
    z, y, zt, yt, u = make_inputs(seed_of("all", preset), N=9, Nt=7, separate_teacher_labels=True)
    overrides = dict(top_k=3, teacher_threshold=0.1) if preset == "official" else dict(top_k=3,
                                                                                     teacher_top_k=4)
    check_against_brute(z, y, zt, yt, u, **fecl_params(preset, **overrides))


def test_none_sums_to_sum_and_mean_divides_by_valid_anchors():
    z, y, zt, _, u = make_inputs(seed_of("reductions"))
    params = {**PLAIN, "gamma_pos": 2.0, "teacher": "threshold", "teacher_threshold": 0.1}
    none = reference.fecl(z, y, zt, anchor_weight=u, **{**params, "reduction": "none"})
    total = reference.fecl(z, y, zt, anchor_weight=u, **{**params, "reduction": "sum"})
    assert none.shape == y.shape and (none[y < 0] == 0).all()
    torch.testing.assert_close(none.sum(), total, rtol=TOL, atol=TOL)
    student = reference.fecl(z, y, zt, anchor_weight=u, **{**PLAIN, "gamma_pos": 2.0, "reduction": "sum"})
    mean = reference.fecl(z, y, zt, anchor_weight=u, **{**PLAIN, "gamma_pos": 2.0})
    torch.testing.assert_close(mean, student / (y >= 0).sum(), rtol=TOL, atol=TOL)


# ------------------------------------------------------------------------------------------
# gradcheck (float64). Not for shift="column": its detached offset is, by definition, not the
# derivative of the value (covered by the brute-force gradient above).
# ------------------------------------------------------------------------------------------

def _min_gap(values: torch.Tensor) -> float:
    """Smallest distance between two entries of each row (ties make top-k non-differentiable)."""
    v = values.sort(dim=-1).values
    return (v[..., 1:] - v[..., :-1]).abs().min().item()


GRADCHECK = {
    "dycon": dict(fecl_params("dycon", teacher_top_k=2)),
    "dycon,none": dict(fecl_params("dycon", teacher_top_k=3, reduction="none")),
    "top_k=2": dict(PLAIN, gamma_pos=2.0, gamma_neg=2.0, top_k=2),
    "gamma_pos=0.5,gamma_neg=1.5,tau=0.2": dict(PLAIN, gamma_pos=0.5, gamma_neg=1.5, temperature=0.2),
    "threshold": dict(PLAIN, gamma_pos=2.0, teacher="threshold", teacher_weight=0.7),
    "official,exact,mean_positive": dict(fecl_params("official", shift="exact", reduction="mean_positive")),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(name):
    params = dict(GRADCHECK[name])
    z, y, zt, yt, u = make_inputs(seed_of("gradcheck", name), B=2, N=6, D=4, Nt=5, separate_teacher_labels=True)
    # No near-ties in any selection: similarities well apart, threshold in a gap of the cosines.
    assert _min_gap(z @ z.transpose(1, 2)) > 1e-4 and _min_gap(z @ zt.transpose(1, 2)) > 1e-4
    if params["teacher"] == "threshold":
        cosines = (z @ zt.transpose(1, 2)).flatten().sort().values
        mid = len(cosines) // 2
        params["teacher_threshold"] = ((cosines[mid] + cosines[mid + 1]) / 2).item()
    z = z.clone().requires_grad_(True)
    fn = lambda z_: reference.fecl(z_, y, zt, yt, anchor_weight=u, **params)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_teacher_gets_no_gradient():
    z, y, zt, _, _ = make_inputs(seed_of("teacher-grad"))
    zt = zt.clone().requires_grad_(True)
    out = reference.fecl(z.requires_grad_(True), y, zt, **fecl_params("dycon"))
    out.backward()
    assert zt.grad is None and torch.isfinite(z.grad).all()


# ------------------------------------------------------------------------------------------
# Edge cases: finite value and gradient, exact zeros where the spec says so
# ------------------------------------------------------------------------------------------

def _preset_params(preset, **overrides):
    if preset == "official":
        overrides.setdefault("teacher_threshold", 0.0)
    return fecl_params(preset, **overrides)


def _value_grad_checked(z, y, zt=None, yt=None, u=None, **params):
    v, g = value_and_grad(reference.fecl, z, y, zt, yt, anchor_weight=u, **params)
    assert torch.isfinite(v).all() and torch.isfinite(g).all()
    return v, g


@pytest.mark.parametrize("preset", ["official", "dycon"])
@pytest.mark.parametrize("reduction", ["mean", "mean_positive", "sum", "none"])
@pytest.mark.parametrize("case", ["one_class", "all_ignored", "one_valid", "N=1", "all_distinct"])
def test_degenerate_label_patterns_give_exact_zero(preset, reduction, case):
    N = 1 if case == "N=1" else 7
    z, y, zt, _, u = make_inputs(seed_of("edge", preset, reduction, case), N=N, D=5)
    if case == "one_class":
        y[:] = 2
    elif case == "all_ignored":
        y[:] = -1
    elif case == "one_valid":
        y[:] = -1
        y[:, 3] = 1
    elif case == "all_distinct":  # nobody has a positive (the threshold M pairs distinct labels)
        y = torch.arange(N).repeat(2, 1)
    params = _preset_params(preset, reduction=reduction)
    if case == "all_distinct" and preset == "official":
        params["teacher"] = None  # M would be non-empty; the student term alone must be 0
    v, g = _value_grad_checked(z, y, zt, None, u, **params)
    assert (v == 0).all() and (g == 0).all()
    assert v.shape == (y.shape if reduction == "none" else ())


def test_one_class_volume_next_to_a_normal_one():
    z, y, zt, _, _ = make_inputs(seed_of("mixed-volumes"), N=7)
    y[0] = 1
    y[1] = torch.tensor([0, 1, 0, 1, 2, -1, 2])
    v, g = _value_grad_checked(z, y, zt, **fecl_params("dycon", reduction="none"))
    assert (v[0] == 0).all() and (g[0] == 0).all() and (v[1] != 0).any()


@pytest.mark.parametrize("top_k", [6, 7, 1000])
def test_top_k_larger_than_negatives_uses_all(top_k):
    z, y, zt, _, _ = make_inputs(seed_of("topk-large", top_k), N=7, p_ignore=0.0)
    full = reference.fecl(z, y, zt, **fecl_params("dycon", top_k=None))
    many = reference.fecl(z, y, zt, **fecl_params("dycon", top_k=top_k))  # |Q(i)| <= 6
    torch.testing.assert_close(many, full, rtol=1e-14, atol=1e-14)
    all_teacher = reference.fecl(z, y, zt, **fecl_params("dycon", teacher_top_k=7))
    more_teacher = reference.fecl(z, y, zt, **fecl_params("dycon", teacher_top_k=10_000))
    torch.testing.assert_close(more_teacher, all_teacher, rtol=1e-14, atol=1e-14)


def test_teacher_absent_when_no_teacher_embeddings_or_mode_none():
    z, y, zt, _, _ = make_inputs(seed_of("no-teacher"))
    plain = reference.fecl(z, y, **fecl_params("dycon"))
    torch.testing.assert_close(reference.fecl(z, y, zt, **fecl_params("dycon", teacher=None)), plain)
    off = reference.fecl(z, y, **fecl_params("official"))
    torch.testing.assert_close(off, reference.fecl(z, y, zt, **fecl_params("official", teacher=None)))


def test_empty_threshold_set_adds_nothing():
    z, y, zt, _, _ = make_inputs(seed_of("empty-M"))
    with_term = reference.fecl(z, y, zt, **fecl_params("official", teacher_threshold=1.5))
    torch.testing.assert_close(with_term, reference.fecl(z, y, **fecl_params("official")), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("tau", [0.05, 0.005, 0.0005])
@pytest.mark.parametrize("gammas", [(0.0, 0.0), (0.5, 0.5), (2.0, 1.0), (2.0, 2.0)])
@pytest.mark.parametrize("shift", ["exact", "column"])
def test_extreme_inputs_stay_finite(dtype, tau, gammas, shift):
    """Small tau, duplicated and antipodal embeddings (focal base exactly 0), teacher equal to a
    student of another class (threshold term at c = 1)."""
    z, y, zt, _, u = make_inputs(seed_of("extreme", dtype, tau, gammas, shift), N=8, D=4, p_ignore=0.0)
    y = torch.tensor([[0, 0, 1, 1, 2, 2, 0, 1]] * 2)
    z[:, 1] = z[:, 0]            # identical positives: S_ij -> 1 from below for small tau
    z[:, 2] = -z[:, 0]           # antipodal negative: (1 + cos)/2 = 0
    z[:, 7] = z[:, 0]            # identical negative
    zt[:, 4] = z[:, 0]           # teacher of another class at cosine exactly 1
    z, zt = z.to(dtype), zt.to(dtype)
    teachers = ["threshold"] if shift == "column" else ["topk", "threshold"]
    for teacher in teachers:
        for reduction in ["mean", "none"]:
            params = dict(temperature=tau, gamma_pos=gammas[0], gamma_neg=gammas[1], top_k=None, shift=shift,
                          teacher=teacher, teacher_top_k=3, teacher_threshold=0.3, teacher_weight=1.0,
                          reduction=reduction)
            _value_grad_checked(z, y, zt, None, u, **params)
            _value_grad_checked(z, y, zt, None, u, **{**params, "top_k": 2})


def test_moderately_small_tau_matches_brute_force():
    z, y, zt, _, _ = make_inputs(seed_of("tau-0.05"), N=7)
    check_against_brute(z, y, zt, **{**PLAIN, "temperature": 0.05, "gamma_pos": 2.0, "gamma_neg": 2.0,
                                     "teacher": "topk", "teacher_top_k": 2})


def test_ignored_anchor_weight_cannot_leak():
    z, y, zt, _, u = make_inputs(seed_of("u-nan"))
    y[0, 0] = -1
    u[0, 0] = float("nan")
    v, _ = _value_grad_checked(z, y, zt, None, u, **fecl_params("dycon"))


# ------------------------------------------------------------------------------------------
# Dtypes, layout, errors
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("preset", ["official", "dycon"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_matches_float64(dtype, preset, reduction):
    z, y, zt, _, u = make_inputs(seed_of("dtype", dtype, preset, reduction), B=2, N=33, D=16)
    params = _preset_params(preset, reduction=reduction, teacher_threshold=0.2)
    zl, ztl = z.to(dtype), zt.to(dtype)
    v, g = _value_grad_checked(zl, y, ztl, None, u, **params)
    assert v.dtype == dtype and g.dtype == dtype
    # float64 on the same (rounded) inputs: this measures the computation, not the input rounding.
    v64, g64 = value_and_grad(reference.fecl, zl.to(F64), y, ztl.to(F64), anchor_weight=u, **params)
    tol = 2e-2 if dtype != torch.float32 else 1e-5
    assert ((v.to(F64) - v64).abs().max() / v64.abs().max()).item() < tol
    assert ((g.to(F64) - g64).abs().max() / g64.abs().max()).item() < tol


def test_non_contiguous_inputs():
    z, y, zt, _, u = make_inputs(seed_of("layout"), N=9, D=8)
    zn = z.transpose(1, 2).contiguous().transpose(1, 2)
    ztn = zt.transpose(1, 2).contiguous().transpose(1, 2)
    yn, un = y.t().contiguous().t(), u.t().contiguous().t()
    assert not zn.is_contiguous() and not yn.is_contiguous()
    for preset in ["official", "dycon"]:
        params = _preset_params(preset, teacher_threshold=0.2)
        torch.testing.assert_close(reference.fecl(zn, yn, ztn, anchor_weight=un, **params),
                                   reference.fecl(z, y, zt, anchor_weight=u, **params), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("bad", [
    dict(shift="row"), dict(teacher="both"), dict(reduction="max"), dict(temperature=0.0),
    dict(top_k=0), dict(shift="column"),  # column with the (active) topk teacher
    dict(teacher="threshold", teacher_threshold=None), dict(teacher_top_k=0),
])
def test_invalid_parameters_raise(bad):
    z, y, zt, _, _ = make_inputs(seed_of("bad", repr(bad)))
    with pytest.raises(ValueError):
        reference.fecl(z, y, zt, **fecl_params("dycon", **bad))


def test_float_labels_raise():
    z, y, zt, _, _ = make_inputs(seed_of("float-labels"))
    with pytest.raises(ValueError):
        reference.fecl(z, y.double(), zt, **fecl_params("dycon"))


def test_teacher_size_mismatch_needs_teacher_labels():
    z, y, zt, _, _ = make_inputs(seed_of("bad-teacher"), N=9, Nt=5)
    with pytest.raises(ValueError):
        reference.fecl(z, y, zt, **fecl_params("dycon"))
