"""FeCL Triton entry points (dycon_kernels/triton/fecl.py) against a dense float64 computation of
losses.md section 2 written here, plus the GPU compile of every launched kernel configuration.

On a machine without a GPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on CPU
tensors; the sizes are small and the tile sizes explicit (16 x 16) so that the key loops run
over several tiles with ragged ends.
"""
import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from conftest import DEVICE
from dycon_kernels import backends

pytestmark = pytest.mark.skipif(not backends.can_run("triton", DEVICE), reason="Triton cannot run here")

# The interpreter evaluates masked-off lanes too (log(0), 0/0): numpy warns, results are unaffected.
pytestmark = [pytestmark, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

REPO = Path(__file__).resolve().parents[1]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}
if DEVICE.type == "cuda":
    TOL[torch.float32] = 2e-3


def config(**kw):
    base = dict(tau=0.6, gamma_pos=2.0, gamma_neg=2.0, top_k=0, column_shift=False, teacher="none",
                teacher_top_k=4, teacher_threshold=0.1)
    base.update(kw)
    return types.SimpleNamespace(**base)


# ----------------------------------------------------------------------------------------------
# Dense float64 FeCL, straight from losses.md (every intermediate is (B, N, N))
# ----------------------------------------------------------------------------------------------

def _pow(x, p):
    return torch.ones_like(x) if p == 0 else x.clamp_min(0) ** p


def dense_fecl(z, y, zt, yt, u, cfg):
    """Per-anchor loss, cross, cross_count, log_neg, r, n_pos, col_shift, H mask, T mask.
    ``z`` float64 (may require grad); the teacher gets no gradient."""
    B, N, _ = z.shape
    tau, gp, gn = cfg.tau, cfg.gamma_pos, cfg.gamma_neg
    l = z @ z.transpose(1, 2) / tau
    valid = y >= 0
    eye = torch.eye(N, dtype=torch.bool)
    pair = valid[:, :, None] & valid[:, None, :] & ~eye
    pos = pair & (y[:, :, None] == y[:, None, :])
    neg = valid[:, :, None] & valid[:, None, :] & (y[:, :, None] != y[:, None, :])
    if cfg.column_shift:
        ld = l.detach()
        col = torch.where(pair, ld, torch.full_like(ld, -float("inf"))).amax(dim=1).clamp_min(0)
        col = torch.where(valid, col, torch.zeros_like(col))
    else:
        col = torch.zeros(B, N, dtype=z.dtype)
    e = torch.exp(l - col[:, None, :])
    w = _pow((1 + tau * l) / 2, gn)
    if cfg.top_k:
        k = min(cfg.top_k, N)
        vals = torch.where(neg, l.detach(), torch.full_like(l, -float("inf")))
        top_v, top_i = vals.topk(k, dim=2)
        hmask = torch.zeros_like(neg).scatter_(2, top_i, top_v > -float("inf"))
    else:
        hmask = neg
    negsum = torch.where(hmask, w * e, torch.zeros_like(e)).sum(dim=2)
    tmask = None
    cross = count = None
    if cfg.teacher != "none":
        c = z @ zt.transpose(1, 2)  # cosine, the teacher is a constant
        tneg = valid[:, :, None] & (yt[:, None, :] >= 0) & (y[:, :, None] != yt[:, None, :])
        if cfg.teacher == "topk":
            k = min(cfg.teacher_top_k, zt.shape[1])
            vals = torch.where(tneg, c.detach(), torch.full_like(c, -float("inf")))
            top_v, top_i = vals.topk(k, dim=2)
            tmask = torch.zeros_like(tneg).scatter_(2, top_i, top_v > -float("inf"))
            negsum = negsum + torch.where(tmask, torch.exp(c / tau), torch.zeros_like(c)).sum(dim=2)
        else:
            hit = tneg & (c.detach() > cfg.teacher_threshold)
            cross = torch.where(hit, -torch.log((1 - c).clamp_min(0) + 1e-18), torch.zeros_like(c)).sum(dim=2)
            count = hit.sum(dim=2).to(z.dtype)
    s = e / (e + negsum[:, :, None])
    f = _pow(1 - s, gp) * torch.log(s)
    n_pos = pos.sum(dim=2).to(z.dtype)
    total = torch.where(pos, f, torch.zeros_like(f)).sum(dim=2)
    uu = torch.ones(B, N, dtype=z.dtype) if u is None else u.to(z.dtype)
    loss = torch.where(n_pos > 0, -uu * total / n_pos.clamp_min(1), torch.zeros_like(total))
    sd = s.detach()
    rterm = _pow(1 - sd, gp + 1) - gp * _pow(1 - sd, gp) * sd * torch.log(sd)
    r = torch.where(pos, rterm, torch.zeros_like(rterm)).sum(dim=2)
    log_neg = torch.log(negsum.detach())
    log_neg = torch.where(valid, log_neg, torch.full_like(log_neg, -float("inf")))
    return dict(loss=loss, cross=cross, cross_count=count, log_neg=log_neg, r=r, n_pos=n_pos, col_shift=col,
                hmask=hmask, tmask=tmask)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def make_inputs(B, N, D, n_classes, dtype, Nt=None, ignore=0.1, weights=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, n_classes, (B, N), generator=g)
    y[torch.rand(B, N, generator=g) < ignore] = -1
    Nt = N if Nt is None else Nt
    zt = torch.nn.functional.normalize(torch.randn(B, Nt, D, generator=g, dtype=torch.float64), dim=-1)
    yt = torch.randint(0, n_classes, (B, Nt), generator=g)
    yt[torch.rand(B, Nt, generator=g) < ignore] = -1
    u = torch.rand(B, N, generator=g, dtype=torch.float32) + 0.5 if weights else None
    # Rounded to the dtype under test; the dense computation uses the same rounded values.
    return z.to(dtype), y, zt.to(dtype), yt, u


_REAL_EMPTY = torch.empty


def _poisoned_empty(*args, **kwargs):
    """torch.empty filled with NaN (floats) or a bogus index (int64), so that an element a kernel
    forgets to write fails the comparison instead of passing as a lucky zero."""
    t = _REAL_EMPTY(*args, **kwargs)
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype == torch.int64:
        t.fill_(-12345)
    return t


def poisoned(fn, *args, **kwargs):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", _poisoned_empty)
        return fn(*args, **kwargs)


def close(actual, expected, tol, what):
    actual = actual.detach().to(torch.float64).cpu()
    expected = expected.detach().to(torch.float64)
    finite = torch.isfinite(expected)
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * max(scale, 1e-3), msg=lambda m: f"{what}: {m}")


def index_sets(idx):
    return [[sorted(v for v in row.tolist() if v >= 0) for row in vol] for vol in idx.cpu()]


def mask_sets(mask):
    return [[torch.nonzero(row).flatten().tolist() for row in vol] for vol in mask]


def run_case(cfg, B=2, N=37, D=19, n_classes=3, dtype=torch.float32, Nt=None, ignore=0.1, weights=False,
             seed=0, blocks=(16, 16), y=None, noncontiguous=False):
    from dycon_kernels.triton.fecl import fecl_backward, fecl_forward

    z, y_, zt, yt, u = make_inputs(B, N, D, n_classes, dtype, Nt, ignore, weights, seed)
    y = y_ if y is None else y
    use_t = cfg.teacher != "none"
    dev = DEVICE
    zd = z.to(dev)
    if noncontiguous:  # same values, strided
        zd = zd.transpose(0, 1).contiguous().transpose(0, 1)
        assert not zd.is_contiguous()
    out = poisoned(fecl_forward, zd, y.to(dev), zt.to(dev) if use_t else None, yt.to(dev) if use_t else None,
                   None if u is None else u.to(dev), cfg, blocks=blocks)
    loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx, topk_sim, teacher_sim = out

    z64 = z.to(torch.float64).requires_grad_(True)
    ref = dense_fecl(z64, y, zt.to(torch.float64), yt, u, cfg)
    tol = TOL[dtype]
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    for name, t in zip(("loss", "log_neg", "r", "n_pos"), (loss, log_neg, r, n_pos)):
        assert t.dtype == stat and t.shape == (B, N), name
        close(t, ref[name], tol, name)
    if cfg.column_shift:
        assert col_shift.dtype == stat and col_shift.shape == (B, N)
        close(col_shift, ref["col_shift"], tol, "col_shift")
    else:
        assert col_shift.numel() == 0
    if cfg.top_k:
        assert topk_idx.shape == (B, N, cfg.top_k) and topk_idx.dtype == torch.int64
        assert index_sets(topk_idx) == mask_sets(ref["hmask"])
    else:
        assert topk_idx.numel() == 0
    if cfg.teacher == "topk":
        assert teacher_idx.shape == (B, N, cfg.teacher_top_k)
        assert index_sets(teacher_idx) == mask_sets(ref["tmask"])
    else:
        assert teacher_idx.numel() == 0
    if cfg.teacher == "threshold":
        close(cross, ref["cross"], tol, "cross")
        close(cross_count, ref["cross_count"], tol, "cross_count")
    else:
        assert cross.numel() == 0 and cross_count.numel() == 0

    # Gradient: random upstream gradients of loss (and cross) vs autograd of the dense loss.
    g = torch.Generator().manual_seed(seed + 1)
    grad_loss = torch.randn(B, N, generator=g, dtype=stat)
    grad_cross = torch.randn(B, N, generator=g, dtype=stat) if cfg.teacher == "threshold" else None
    dz = poisoned(fecl_backward, grad_loss.to(dev), None if grad_cross is None else grad_cross.to(dev), zd,
                  y.to(dev), zt.to(dev) if use_t else None, yt.to(dev) if use_t else None,
                  None if u is None else u.to(dev), log_neg, r, n_pos, col_shift, topk_idx, teacher_idx, topk_sim,
                  teacher_sim, cfg, blocks=blocks)
    assert dz.dtype == dtype and dz.shape == z.shape
    objective = (grad_loss.to(torch.float64) * ref["loss"]).sum()
    if grad_cross is not None:
        objective = objective + (grad_cross.to(torch.float64) * ref["cross"]).sum()
    (expected,) = torch.autograd.grad(objective, z64, allow_unused=True)
    if expected is None:
        expected = torch.zeros_like(z64)
    close(dz, expected, tol, "dz")
    return out, ref


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("column", [False, True])
@pytest.mark.parametrize("gamma_neg", [0.0, 2.0])
def test_dense_negatives(column, gamma_neg):
    run_case(config(column_shift=column, gamma_neg=gamma_neg), weights=column)


@pytest.mark.parametrize("k, N", [(1, 37), (7, 37), (24, 21)])
def test_topk_negatives(k, N):
    # k = 24 >= #negatives of every anchor (N = 21): all of Q(i), -1 padded at the end.
    cfg = config(top_k=k, column_shift=k == 7, gamma_neg=0.0 if k == 1 else 2.0)
    (*_, idx, _, _, _), ref = run_case(cfg, N=N, weights=True)
    assert (idx[..., N - 1:] == -1).all()
    # Sorted by decreasing similarity, -1 after every selected key.
    z = make_inputs(2, N, 19, 3, torch.float32)[0].double()
    sims = torch.where(idx >= 0, (z[:, :, None, :] * z[torch.arange(2)[:, None, None], idx.clamp_min(0)]).sum(-1),
                       torch.full(idx.shape, -float("inf"), dtype=torch.float64))
    assert (sims[..., 1:] <= sims[..., :-1]).all()


@pytest.mark.parametrize("k, Nt", [(1, 29), (5, 29), (16, 13)])
def test_teacher_topk(k, Nt):
    run_case(config(teacher="topk", teacher_top_k=k, top_k=3 if k == 5 else 0), Nt=Nt)


@pytest.mark.parametrize("column", [False, True])
def test_teacher_threshold(column):
    run_case(config(teacher="threshold", teacher_threshold=0.1, column_shift=column, gamma_neg=0.0), Nt=45,
             weights=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    run_case(config(top_k=5, teacher="topk", teacher_top_k=3), dtype=dtype, Nt=21)


@pytest.mark.parametrize("dtype, block_n", [(torch.bfloat16, 64), (torch.float16, 16)])
def test_stored_similarities_are_the_selected_keys(dtype, block_n):
    """16-bit embeddings: next to each selected index the top-k passes store the similarity its
    packed key stands for, the middle of its bucket (its low bits LOW, 6 at 64-wide tiles, 4 at
    16, 10...0), within 2^-(24 - bits) relative of the exact dot of that index's row (plus the
    float32 dot's own rounding), slot for slot; float32 stores none. The loss and dz from them:
    test_dtypes."""
    from dycon_kernels.triton.fecl import fecl_forward, k_pad

    B, N, Nt, D = 1, 37, 29, 24
    cfg = config(top_k=6, teacher="topk", teacher_top_k=4)
    z, y, zt, yt, _ = make_inputs(B, N, D, 3, dtype, Nt=Nt, seed=4)
    out = poisoned(fecl_forward, z.to(DEVICE), y.to(DEVICE), zt.to(DEVICE), yt.to(DEVICE), None, cfg,
                   blocks=(16, block_n))
    for idx, sims, keys, k in ((out[7], out[9], z, cfg.top_k), (out[8], out[10], zt, cfg.teacher_top_k)):
        idx, sims = idx.cpu(), sims.cpu()
        low = max(block_n, k_pad(k)) - 1
        bits = low.bit_length()
        assert sims.shape == idx.shape and sims.dtype == torch.float32
        ok = idx >= 0
        assert ok.sum() > B * N  # most slots hold a key
        zi, zq = z.double()[:, :, None, :], keys.double()[torch.arange(B)[:, None, None], idx.clamp_min(0)]
        exact = (zi * zq).sum(-1)[ok]
        dot_error = D * 2.0 ** -24 * (zi.norm(dim=-1) * zq.norm(dim=-1))[ok]  # float32 sums, exact products
        err = (sims.double()[ok] - exact).abs()
        assert (err <= 2.0 ** -(24 - bits) * exact.abs() + dot_error).all()
        assert ((sims[ok].view(torch.int32) & low) == (low + 1) // 2).all()
    z32 = z.float()
    out = fecl_forward(z32.to(DEVICE), y.to(DEVICE), z32.to(DEVICE), yt.to(DEVICE), None, cfg, blocks=(16, 16))
    assert out[9].numel() == 0 and out[10].numel() == 0


def test_op_carries_the_stored_similarities():
    """dycon::fecl on the Triton backend with 16-bit embeddings: 11 outputs, the fake
    implementation's topk_sim/teacher_sim shapes and dtypes those of the kernels, forward and
    backward through torch.library.opcheck."""
    z, y, zt, yt, _ = make_inputs(2, 16, 16, 3, torch.bfloat16, seed=5)
    args = (z.to(DEVICE).requires_grad_(), y.to(DEVICE), zt.to(DEVICE), yt.to(DEVICE), None, 0.6, 2.0, 2.0, 5,
            False, "topk", 3, torch.tensor(0.0, dtype=torch.float64), "triton")
    torch.library.opcheck(torch.ops.dycon.fecl.default, args)
    outs = torch.ops.dycon.fecl.default(*args)
    assert [(tuple(o.shape), o.dtype) for o in outs[-2:]] == [((2, 16, 5), torch.float32), ((2, 16, 3), torch.float32)]


def test_gamma_pos_zero_and_tau():
    run_case(config(gamma_pos=0.0, gamma_neg=1.0, tau=0.1), n_classes=2)


def test_one_class():
    # No negatives: log_neg = -inf, S = 1, zero loss and gradient, nothing NaN.
    (loss, _, _, log_neg, r, *_), _ = run_case(config(gamma_neg=2.0), n_classes=1, ignore=0.0)
    assert (loss == 0).all() and (r == 0).all() and torch.isneginf(log_neg).all()


def test_all_ignored():
    y = torch.full((2, 21), -1)
    (loss, *_), _ = run_case(config(top_k=3, teacher="topk"), N=21, y=y)
    assert (loss == 0).all()


@pytest.mark.parametrize("teacher", ["none", "threshold"])
def test_single_patch(teacher):
    run_case(config(teacher=teacher, top_k=2), N=1, Nt=3)


def test_other_shapes():
    # Several blocks with default 32 x 32 tiles, D a power of two, one class missing per volume.
    run_case(config(top_k=4, column_shift=True, teacher="threshold"), B=3, N=70, D=32, n_classes=4, blocks=None,
             noncontiguous=True)


def test_positive_counts_from_sorted_labels():
    """n_pos from the sorted labels (fecl.positive_counts) is the dense count of same-label valid
    keys other than the anchor: several classes, a class of one patch, ignored patches (-1) and
    label values that are not 0..C-1."""
    from dycon_kernels.triton import fecl
    gen = torch.Generator().manual_seed(7)
    y = torch.randint(-1, 5, (3, 53), generator=gen) * 3
    y[0, 5] = 99  # alone in its class: 0 positives
    dense = ((y[:, :, None] == y[:, None, :]) & (y[:, None, :] >= 0)).sum(-1) - 1
    expected = torch.where(y >= 0, dense, 0).to(torch.float32)
    got = fecl.positive_counts(y, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert got[0, 5] == 0 and (got[y < 0] == 0).all()


KERNELS = ["fecl_colshift_kernel", "fecl_topk_kernel", "fecl_logneg_kernel", "fecl_positive_kernel",
           "fecl_backward_kernel", "fecl_backward_pairs_kernel", "fecl_backward_keys_kernel",
           "fecl_sparse_coef_kernel", "fecl_sparse_rows_kernel"]


@pytest.mark.parametrize("cfg, B, N, supers, nsb", [
    (config(), 2, 37, (), 3),                                                        # GROUP 1, odd: step 1
    (config(top_k=3, teacher="topk", teacher_top_k=3), 1, 60, (), 4),                # GROUP 1, even: steps 1, 2 (half)
    (config(gamma_neg=0.0, column_shift=True, teacher="threshold"), 2, 90, (32,), 3),  # GROUP 2, odd
    (config(top_k=4), 1, 100, (32,), 4),         # GROUP 2, even, last super-block partial (112 = 3 x 32 + 16)
], ids=["g1-odd", "g1-even", "g2-odd", "g2-even-ragged"])
def test_symmetric_schedule(monkeypatch, cfg, B, N, supers, nsb):
    """The backward's schedule (each pair once: docs/fecl_kernels.md, "Gradient") with super-blocks
    of GROUP 16-anchor blocks, nsb odd and even (its last step pairs only the first half with the
    second), against the dense computation (poisoned outputs, ignored labels, padded N); and the
    same bits on a second run."""
    from dycon_kernels.triton import fecl
    from triton_aot import record_launches

    monkeypatch.setattr(fecl, "SCHEDULE_SUPER", supers)
    monkeypatch.setattr(fecl, "MIN_SUPER_BLOCKS", 1)
    launches = record_launches(monkeypatch, fecl, ["fecl_backward_pairs_kernel"])
    use_t = cfg.teacher != "none"
    out, _ = run_case(cfg, B=B, N=N, D=19, n_classes=3, Nt=29, seed=N)
    assert [args[-2:] for _, args, _ in launches] == [(s, nsb) for s in range(1, nsb // 2 + 1)]  # (STEP, NB)
    z, y, zt, yt, u = make_inputs(B, N, 19, 3, torch.float32, 29, seed=N)
    grad = torch.randn(B, N, generator=torch.Generator().manual_seed(N))
    first, second = (fecl.fecl_backward(grad, grad, z, y, zt if use_t else None, yt if use_t else None, u, *out[3:],
                                        cfg, blocks=(16, 16)) for _ in range(2))
    assert torch.equal(first, second)


def test_each_unordered_block_pair_once():
    """The index arithmetic of the schedule's steps (fecl_backward_pairs_kernel: p with
    q = (p + STEP) mod NB, the last step of an even NB for p < NB / 2 only; step 0 the pairs
    within a super-block): every unordered pair of super-blocks once, and within a step each
    super-block a source once and a target at most once (one writer per element)."""
    for nsb in range(1, 12):
        seen = [(p, p) for p in range(nsb)]
        for step in range(1, nsb // 2 + 1):
            sources = range(nsb // 2 if 2 * step == nsb else nsb)
            targets = [(p + step) % nsb for p in sources]
            assert len(set(targets)) == len(targets)
            seen += [tuple(sorted((p, q))) for p, q in zip(sources, targets)]
        assert sorted(seen) == [(p, q) for p in range(nsb) for q in range(p, nsb)]


@pytest.mark.parametrize("cfg, N, Nt", [
    (config(top_k=4, teacher="topk", teacher_top_k=4), 1960, 1960),              # 'dycon', the LA crop's N
    (config(gamma_neg=0.0, column_shift=True, teacher="threshold"), 61, 29),     # 'official'
    (config(top_k=5, teacher="topk", teacher_top_k=3), 49, 18),
], ids=["dycon-1960", "official-odd", "topk-odd"])
def test_every_n_is_launched_padded_to_16(monkeypatch, cfg, N, Nt):
    """N and NT that are not multiples of 16 are launched padded (fecl.launch_n), so that every
    call compiles the specialised kernels; the padded rows are ignored patches, so forward and
    backward still equal the dense computation on the caller's N."""
    from dycon_kernels.triton import fecl
    from triton_aot import record_launches

    launches = record_launches(monkeypatch, fecl, KERNELS)
    # Large tiles: the interpreter's cost is per tile step.
    run_case(cfg, B=1, N=N, D=16, Nt=Nt, n_classes=4, blocks=(256, 256) if N > 100 else (16, 16))
    for kernel, args, _ in launches:
        params = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)
        sizes = {name: args[params.index(name)] for name in ("N", "NT", "NK") if name in params}
        assert sizes and all(v % fecl.PAD_N == 0 for v in sizes.values()), (kernel, sizes)
        assert sizes.get("N", fecl.launch_n(N)) == fecl.launch_n(N)


@pytest.mark.parametrize("N, Nt, even", [(64, 32, (True, True)), (37, 64, (False, True)), (64, 40, (True, False))],
                         ids=["both-even", "student-uneven", "teacher-uneven"])
def test_key_tiles_unmasked_when_even(monkeypatch, N, Nt, even):
    """The top-k passes and the positive pass load their key tiles and labels unmasked (EVEN)
    exactly when the launched key count is a multiple of BLOCK_N and D = BLOCK_D
    (fecl.tiles_even): with 32-key tiles, N = 37 and NT = 40 (both launched as 48) take the masked
    loads, 64 and 32 the unmasked ones; both equal the dense computation, with ignored patches
    and poisoned outputs (run_case)."""
    from dycon_kernels.triton import fecl
    from triton_aot import record_launches

    launches = record_launches(monkeypatch, fecl, ["fecl_topk_kernel", "fecl_positive_kernel"])
    run_case(config(top_k=5, teacher="topk", teacher_top_k=3), B=1, N=N, D=16, Nt=Nt, n_classes=3,
             blocks=(16, 32))
    # Launch order: student top-k (keys N), teacher top-k (keys NT), positive pass (keys N).
    assert [kw["EVEN"] for _, _, kw in launches] == [even[0], even[1], even[0]]


@pytest.mark.parametrize("cfg, blocks", [
    (config(top_k=4, column_shift=True, teacher="threshold"), (16, 16, 64, 16, 16)),
    (config(top_k=3, teacher="topk", teacher_top_k=5), (16, 16, 16, 32, 64)),
], ids=["held-split", "chunked"])
def test_d_tiling(cfg, blocks):
    """D = 40 (BLOCK_D 64) with the anchor block held whole (BLOCK_DK = BLOCK_D), the backward's
    dz columns split over 4 programs (BLOCK_DC = 16) and gathers in 4 chunks of 16 (with the
    threshold teacher's tile loop); and with the similarity in chunks of 16, 2 column programs and
    one gather chunk (with the teacher top-k): both equal the dense computation."""
    run_case(cfg, N=23, D=40, Nt=21, blocks=blocks)


def test_float64_needs_no_error():
    # float64 is computed in float64 (not rejected).
    run_case(config(), N=17, D=16, dtype=torch.float64)


@pytest.mark.parametrize("cfg", [
    config(),                                                                   # 'dycon' without teacher
    config(gamma_neg=0.0, column_shift=True, teacher="threshold", teacher_threshold=0.05),  # 'official'
    config(top_k=6, teacher="topk", teacher_top_k=5),
], ids=["dycon", "official", "topk"])
def test_against_reference(cfg):
    """The per-anchor map and its gradient equal dycon_kernels.reference.fecl(reduction='none')."""
    from dycon_kernels import reference
    from dycon_kernels.triton.fecl import fecl_backward, fecl_forward

    B, N, D = 2, 33, 24
    z, y, zt, yt, u = make_inputs(B, N, D, 3, torch.float32, Nt=27, weights=True, seed=3)
    use_t = cfg.teacher != "none"
    dev = DEVICE
    out = poisoned(fecl_forward, z.to(dev), y.to(dev), zt.to(dev) if use_t else None, yt.to(dev) if use_t else None,
                   u.to(dev), cfg, blocks=(16, 16))
    loss, cross, cross_count = out[:3]
    mine = loss.cpu().double()
    if cfg.teacher == "threshold":
        mine = mine + cross.cpu().double() / cross_count.cpu().double().sum().clamp_min(1)
    z64 = z.double().requires_grad_(True)
    ref = reference.fecl(z64, y, zt.double() if use_t else None, yt if use_t else None, anchor_weight=u,
                         temperature=cfg.tau, gamma_pos=cfg.gamma_pos, gamma_neg=cfg.gamma_neg,
                         top_k=cfg.top_k or None, shift="column" if cfg.column_shift else "exact",
                         teacher=None if cfg.teacher == "none" else cfg.teacher, teacher_top_k=cfg.teacher_top_k,
                         teacher_threshold=cfg.teacher_threshold, reduction="none")
    close(mine, ref, TOL[torch.float32], "loss map vs reference")
    g = torch.randn(B, N, generator=torch.Generator().manual_seed(7))
    (expected,) = torch.autograd.grad((g.double() * ref).sum(), z64)
    grad_cross = None
    if cfg.teacher == "threshold":  # d/dcross_i of sum_i g_i cross_i / |M|
        grad_cross = (g / cross_count.cpu().sum().clamp_min(1)).to(dev)
    dz = poisoned(fecl_backward, g.to(dev), grad_cross, z.to(dev), y.to(dev), zt.to(dev) if use_t else None,
                  yt.to(dev) if use_t else None, u.to(dev), *out[3:], cfg, blocks=(16, 16))
    close(dz, expected, TOL[torch.float32], "dz vs reference")


def test_launch_configs_cover_launches(monkeypatch):
    """Every kernel launch of the entry points (signature and flags) is in launch_configs(), which
    the GPU-compile test compiles; tile sizes and K_PAD differ on the GPU and are not compared."""
    from dycon_kernels.triton import fecl
    from triton_aot import record_launches

    names = KERNELS
    # FAST_MATH and DOT_IN (bfloat16 dots) take their GPU values only on a GPU (_Launch), and with
    # them the slabs' parts and dtype (GS); the backward's schedule GROUP depends on N, and so
    # does whether the key tiles' loads are masked (EVEN, fecl.tiles_even).
    loose = ("BLOCK_M", "BLOCK_N", "BLOCK_D", "BLOCK_DK", "BLOCK_DC", "BLOCK_DG", "K_PAD", "FAST_MATH", "DOT_IN",
             "GROUP", "SLAB_PARTS", "EVEN")
    configs = [(fn, {k: v for k, v in sig.items() if k != "GS"}, {k: v for k, v in ce.items() if k not in loose})
               for fn, sig, ce, _ in fecl.launch_configs(full=True)]
    launches = record_launches(monkeypatch, fecl, names)
    short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
             torch.int64: "i64"}
    cases = [(config(top_k=3, column_shift=True, teacher="threshold"), torch.float32),
             (config(top_k=0, gamma_neg=0.0, teacher="topk"), torch.bfloat16),
             (config(top_k=2, teacher="none"), torch.float64)]
    for cfg, dtype in cases:
        run_case(cfg, N=20, D=5, Nt=7, dtype=dtype)  # 2 blocks of 16: the backward's pair step runs
    seen = set()
    for kernel, args, kwargs in launches:
        params = inspect.signature(getattr(kernel, "fn", kernel)).parameters
        runtime = [n for n, p in params.items() if "constexpr" not in str(p.annotation)]
        assert len(runtime) == len(args)
        sig = {n: (f"*{short[a.dtype]}" if isinstance(a, torch.Tensor) else "i32" if isinstance(a, int) else "fp64")
               for n, a in zip(runtime, args) if n != "GS"}
        flags = {k: v for k, v in kwargs.items() if k not in loose + ("num_warps", "num_stages")}
        assert any(c[0] is kernel and c[1] == sig and c[2] == flags for c in configs), (kernel, sig, flags)
        seen.add(kernel)
    assert len(seen) == len(names)


# DYCON_AOT_FULL=1: the GPU-compile tests compile their exhaustive lists (hours) instead of the
# covering subsets CI runs.
AOT_FULL = ["--full"] if os.environ.get("DYCON_AOT_FULL") == "1" else []


def _aot(*args, timeout=1800):
    """Run tests/triton_aot.py in a subprocess without TRITON_INTERPRET (under it @triton.jit
    returns interpreted functions); Triton's cache is shared with the other runs."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(REPO / "tests" / "triton_aot.py"), *args, *AOT_FULL]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc.stdout


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="the GPU runs the kernels themselves")
def test_gpu_compile():
    """Compile every launched configuration for sm_80 and sm_90 (no GPU needed, Triton ships
    ptxas); the TTIR of each must multiply no size argument in 32 bits (fecl.SIZE_ARGS)."""
    _aot("dycon_kernels.triton.fecl", "-j", "2")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="a GPU checks its own limit at launch")
def test_compiled_kernels_fit_every_card():
    """Every configuration the dispatcher returns on sm_80/86/89/90 (a covering subset: the
    largest-footprint kernels at D = 256 and the largest accepted D) compiles within that card's
    shared memory and within the dispatcher's own estimate (fecl.fit_configs)."""
    _aot("--fit", "dycon_kernels.triton.fecl", "--cc", "80", "86", "89", "90", "-j", "2")


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type == "cuda", reason="compiled separately")
def test_float64_scalars_reach_kernels_in_float64():
    """A float64 kernel gets the teacher threshold as a .f64 parameter and 1/tau (tau = 0.6) as the
    float64 constant 0x3FFAAAAAAAAAAAAB, not a float32 rounding of it."""
    code = ("from tests.triton_aot import compile_one\n"
            "from dycon_kernels.triton import fecl\n"
            "fn, sig, ce, opts = fecl._config('logneg', 'fp64', 32, 90, flags=(True, False, True, 2))\n"
            "print(list(sig).index('THRESHOLD'))\n"
            "print(compile_one(fn, sig, ce, 90, opts).asm['ptx'])\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    position, ptx = proc.stdout.split("\n", 1)
    assert f".param .f64 fecl_logneg_kernel_param_{position}" in ptx
    assert "0d3FFAAAAAAAAAAAAB" in ptx


def test_int32_size_products_are_found():
    """The 64-bit offset check of tests/triton_aot.py flags a 32-bit product of a size argument,
    directly or through a splat, and passes the 64-bit form."""
    from triton_aot import int32_size_products

    bad = ["%r = arith.muli %offs, %D : i32 loc(#a)",
           "%d = tt.splat %D : i32 -> tensor<64xi32> loc(#a)",
           "%p = arith.muli %rows, %d : tensor<64xi32> loc(#a)"]
    good = ["%e = arith.extsi %D : i32 to i64 loc(#a)",
            "%p = arith.muli %rows, %e : tensor<64xi64> loc(#a)",
            "%q = arith.muli %pid, %c64_i32 : i32 loc(#a)"]
    assert len(int32_size_products("\n".join(bad), ["N", "D"])) == 2
    assert int32_size_products("\n".join(good), ["N", "D"]) == []


@pytest.mark.parametrize("cc", [80, 86, 89, 90])
def test_launch_config_fits_or_refuses(cc):
    """For every dtype and D up to 1024 the dispatcher returns tiles within the card's shared
    memory (by its estimate, which test_compiled_kernels_fit_every_card checks against the
    compiler) and the register budgets (D in chunks, the backward's D split over programs);
    D > 1024 is refused. The backward with dense negatives takes tiles of at most 32 x 32."""
    from dycon_kernels.triton import fecl

    limit = fecl.SMEM_LIMITS[cc]
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        for D in (1, 16, 19, 64, 100, 128, 256, 300, 512, 700, 1024):
            for kind, dense in (("forward", False), ("backward", False), ("backward", True)):
                c = fecl.launch_config(limit, dtype, D, kind, dense)
                assert c.BLOCK_D >= D and c.BLOCK_M >= 16 and c.BLOCK_N >= 16 and c.num_warps == 4
                assert c.num_stages >= 1 and c.BLOCK_D % c.BLOCK_DK == 0 and c.BLOCK_D % c.BLOCK_DC == 0
                assert fecl.smem_estimate(kind, dtype, c.BLOCK_M, c.BLOCK_N, c.BLOCK_D, c.num_stages, c.BLOCK_DK,
                                          c.BLOCK_DC) <= limit
                # Register budgets: the backward's accumulator (and float32's split key columns), a
                # gather's chunks, a held anchor block (float32: only up to MAX_HELD_SPLIT_D).
                assert c.BLOCK_M * c.BLOCK_DC <= fecl.MAX_ACC_TILE or kind == "forward"
                # (float32 and float16 take the key columns of g @ z_j in float32, float32 in two parts.)
                if kind == "backward" and dtype in (torch.float32, torch.float16):
                    parts = 2 if dtype == torch.float32 else 1
                    assert (c.BLOCK_M + parts * c.BLOCK_N) * c.BLOCK_DC * 4 <= fecl.MAX_SPLIT_BACKWARD_BYTES
                # The dense negatives' terms (top_k 0) on top of the accumulator: smaller tiles.
                assert not dense or c.BLOCK_M * c.BLOCK_N <= fecl.MAX_DENSE_PAIR_TILE
                assert c.BLOCK_M * c.BLOCK_DG <= fecl.MAX_GATHER_TILE
                for group in (1, 8) if kind == "backward" else ():  # the key sums: own blocks and stages
                    keys, opts = fecl.keys_launch(c, dtype, group, limit)
                    estimate = fecl.keys_smem_estimate(dtype, keys["BLOCK_M"], keys["BLOCK_DC"], opts["num_stages"])
                    assert estimate <= limit and keys["BLOCK_M"] * keys["GROUP"] == group * c.BLOCK_M
                    assert keys["BLOCK_DC"] <= fecl.MAX_KEYS_DC
                if c.BLOCK_DK == c.BLOCK_D:
                    assert c.BLOCK_M * c.BLOCK_D <= fecl.MAX_HELD_ANCHOR
                    assert dtype != torch.float32 or c.BLOCK_D <= fecl.MAX_HELD_SPLIT_D
                else:
                    assert ((c.BLOCK_M + c.BLOCK_N) * c.BLOCK_DK * fecl._dot_bytes(dtype) <= fecl.MAX_CHUNK_BYTES
                            or c.BLOCK_DK == 16)
    with pytest.raises(ValueError, match="larger than the supported 1024"):
        fecl.launch_config(limit, torch.bfloat16, 1025, "forward")


def test_no_host_values_copied_per_call(monkeypatch):
    """The scalars reach the kernels as constants/arguments: a call builds no tensor from Python
    values (torch.tensor(...).to(device) would be a synchronising host-to-device copy on a GPU)."""
    from dycon_kernels.triton.fecl import fecl_backward, fecl_forward

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called inside a FeCL call")

    cfg = config(top_k=3, teacher="threshold", column_shift=True)
    z, y, zt, yt, u = make_inputs(1, 9, 5, 3, torch.float32, Nt=7, weights=True)
    grad = torch.ones(1, 9)
    monkeypatch.setattr(torch, "tensor", refuse)
    out = fecl_forward(z, y, zt, yt, u, cfg, blocks=(16, 16))
    dz = fecl_backward(grad, grad, z, y, zt, yt, u, *out[3:], cfg, blocks=(16, 16))
    assert torch.isfinite(dz).all()


def test_launch_uses_the_tensors_device():
    """Launches happen under torch.cuda.device(z.device) (Triton launches on the current GPU);
    CPU tensors (the interpreter) need no guard."""
    from dycon_kernels.backends import device_guard

    guard = device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.device("cpu")), torch.cuda.device)
