"""FeCL entry points of the C++ extension ('cpu', and 'cuda' when a GPU is present), called
directly (docs/fecl_kernels.md, "Entry points"), against a dense per-anchor computation written
here (itself checked against ``dycon_kernels.reference.fecl``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dycon_kernels import backends, reference

pytestmark = pytest.mark.skipif(not backends.extension_has("CPU"), reason="dycon_kernels._C not built")

if backends.extension_has("CPU"):
    from dycon_kernels.backends import cpp

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and backends.extension_has("CUDA") else [])
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 2e-2}


def make_cfg(tau=0.6, gamma_pos=2.0, gamma_neg=2.0, top_k=0, column_shift=False, teacher="none",
             teacher_top_k=0, teacher_threshold=None):
    return SimpleNamespace(tau=tau, gamma_pos=gamma_pos, gamma_neg=gamma_neg, top_k=top_k,
                           column_shift=column_shift, teacher=teacher, teacher_top_k=teacher_top_k,
                           teacher_threshold=teacher_threshold)


def make_inputs(B=2, N=37, D=19, Nt=23, classes=3, ignore=0.15, teacher=True, weights=False,
                dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(B, N, D, generator=g, dtype=torch.float64), dim=-1)
    y = torch.randint(0, classes, (B, N), generator=g)
    y[torch.rand(B, N, generator=g) < ignore] = -1
    zt = yt = u = None
    if teacher:
        zt = F.normalize(torch.randn(B, Nt, D, generator=g, dtype=torch.float64), dim=-1).to(dtype).to(device)
        yt = torch.randint(0, classes, (B, Nt), generator=g)
        yt[torch.rand(B, Nt, generator=g) < ignore] = -1
        yt = yt.to(device)
    if weights:
        u = (torch.rand(B, N, generator=g) + 0.5).to(device)
    return z.to(dtype).to(device), y.to(device), zt, yt, u


# ---- dense per-anchor computation (float64, autograd) -----------------------------------------

def dense(z, y, zt, yt, u, cfg):
    """Every per-anchor quantity of docs/fecl_kernels.md, dense (B, N, N), in z's dtype."""
    tau, gp, gn = cfg.tau, cfg.gamma_pos, cfg.gamma_neg
    B, N, _ = z.shape
    valid = y >= 0
    eye = torch.eye(N, dtype=torch.bool, device=z.device)
    both = valid[:, :, None] & valid[:, None, :]
    same = y[:, :, None] == y[:, None, :]
    pos, neg = both & same & ~eye, both & ~same
    cos = z @ z.transpose(1, 2)
    l = cos / tau
    ninf = torch.tensor(float("-inf"), dtype=z.dtype, device=z.device)
    if cfg.column_shift:
        col = l.detach().masked_fill(~(valid[:, :, None] & ~eye), float("-inf")).amax(dim=1).clamp_min(0)
    else:
        col = torch.zeros(B, N, dtype=z.dtype, device=z.device)
    sel = neg
    topk = None
    if cfg.top_k:
        masked = l.detach().masked_fill(~neg, float("-inf"))
        vals, idx = masked.topk(min(cfg.top_k, N), dim=-1)
        sel = torch.zeros_like(neg).scatter(-1, idx, vals > float("-inf"))
        topk = [[set(idx[b, i][vals[b, i] > float("-inf")].tolist()) for i in range(N)] for b in range(B)]
    base = (1 + cos) / 2
    if gn != 0:
        sel = sel & (base > 0)
    logw = gn * torch.log(torch.where(sel, base, torch.ones_like(base))) if gn != 0 else 0
    terms = [torch.where(sel, logw + l - col[:, None, :], ninf)]
    teacher_sets = cross = count = None
    if cfg.teacher != "none":
        ccos = z @ zt.transpose(1, 2)
        cneg = valid[:, :, None] & (yt >= 0)[:, None, :] & (y[:, :, None] != yt[:, None, :])
        if cfg.teacher == "topk":
            lt = ccos / tau
            masked = lt.detach().masked_fill(~cneg, float("-inf"))
            vals, idx = masked.topk(min(cfg.teacher_top_k, zt.shape[1]), dim=-1)
            tsel = torch.zeros_like(cneg).scatter(-1, idx, vals > float("-inf"))
            teacher_sets = [[set(idx[b, i][vals[b, i] > float("-inf")].tolist()) for i in range(N)]
                            for b in range(B)]
            terms.append(torch.where(tsel, lt, ninf))
        else:
            m = cneg & (ccos > cfg.teacher_threshold)
            cross = torch.where(m, -torch.log((1 - ccos).clamp_min(0) + 1e-18), torch.zeros_like(ccos)).sum(-1)
            count = m.sum(-1).to(z.dtype)
    terms = torch.cat(terms, dim=-1)
    has = (terms > float("-inf")).any(-1, keepdim=True)
    # Rows without any negative: log_neg = -inf, S = 1 (x = +inf); a finite placeholder keeps the
    # log-sum-exp's gradient finite.
    ln_safe = torch.logsumexp(torch.where(has, terms, torch.zeros_like(terms)), -1, keepdim=True)
    ln = torch.where(has, ln_safe, ninf)
    x = torch.where(has, l - col[:, None, :] - ln_safe, torch.full_like(l, float("inf")))
    s, oms = torch.sigmoid(x), torch.sigmoid(-x)
    logs = F.logsigmoid(x)
    f = oms ** gp * logs if gp != 0 else logs
    fs = oms ** (gp + 1) - gp * (oms ** gp if gp != 0 else 1) * s * logs
    zero = torch.zeros_like(l)
    n_pos = pos.sum(-1).to(z.dtype)
    uu = torch.ones_like(n_pos) if u is None else u.to(z.dtype)
    loss = torch.where(valid & (n_pos > 0), -uu * torch.where(pos, f, zero).sum(-1) / n_pos.clamp_min(1),
                       torch.zeros_like(n_pos))
    r = torch.where(pos, fs, zero).sum(-1)
    return SimpleNamespace(loss=loss, log_neg=ln.squeeze(-1), r=r, n_pos=n_pos, col_shift=col, cross=cross,
                           count=count, topk=topk, teacher=teacher_sets, valid=valid)


def fused(device, z, y, zt, yt, u, cfg):
    return cpp.fecl_forward(z.contiguous(), y, zt, yt, u, cfg)


def assert_close(a, b, tol, what):
    a, b = a.double().cpu(), b.double().cpu()
    scale = max(b.abs().max().item(), 1.0) if b.numel() else 1.0
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale, msg=lambda m: f"{what}: {m}")


def idx_sets(idx):
    return [[set(v for v in row.tolist() if v >= 0) for row in vol] for vol in idx.cpu()]


def check(device, cfg, dtype=torch.float32, seed=0, **shape):
    z, y, zt, yt, u = make_inputs(dtype=dtype, device=device, seed=seed, teacher=cfg.teacher != "none", **shape)
    out = fused(device, z, y, zt, yt, u, cfg)
    loss, cross, cnt, log_neg, r, n_pos, col, topk_idx, teacher_idx = out
    st = torch.float64 if dtype == torch.float64 else torch.float32
    for t in (loss, log_neg, r, n_pos):
        assert t.dtype == st and t.shape == y.shape
    tol = TOL[dtype]
    # Dense in float64 from the very same (rounded) inputs.
    zd = z.detach().double().cpu().requires_grad_(True)
    ztd = None if zt is None else zt.double().cpu()
    ytc = None if yt is None else yt.cpu()
    uc = None if u is None else u.cpu()
    ref = dense(zd, y.cpu(), ztd, ytc, uc, cfg)
    valid = ref.valid
    assert_close(loss, ref.loss, tol, "loss")
    assert_close(n_pos, ref.n_pos, 0, "n_pos")
    assert_close(r, ref.r, tol, "r")
    ln_k, ln_r = log_neg.cpu().double(), ref.log_neg.detach()
    assert torch.equal(torch.isinf(ln_k), torch.isinf(ln_r)), "log_neg: -inf pattern"
    fin = torch.isfinite(ln_r)
    assert_close(ln_k[fin], ln_r[fin], tol, "log_neg")
    if cfg.column_shift:
        assert_close(col, ref.col_shift, tol, "col_shift")
    else:
        assert col.numel() == 0
    if cfg.teacher == "threshold":
        assert_close(cross, ref.cross, tol, "cross")
        assert_close(cnt, ref.count, 0, "cross_count")
    else:
        assert cross.numel() == 0 and cnt.numel() == 0
    if cfg.top_k:
        assert topk_idx.shape == (*y.shape, cfg.top_k) and topk_idx.dtype == torch.int64
        got = idx_sets(topk_idx)
        for b in range(y.shape[0]):
            for i in range(y.shape[1]):
                if valid[b, i]:
                    assert got[b][i] == ref.topk[b][i], f"top-k set of anchor ({b}, {i})"
                else:
                    assert not got[b][i]
    else:
        assert topk_idx.numel() == 0
    if cfg.teacher == "topk":
        got = idx_sets(teacher_idx)
        for b in range(y.shape[0]):
            for i in range(y.shape[1]):
                assert got[b][i] == (ref.teacher[b][i] if valid[b, i] else set()), f"teacher set ({b}, {i})"
    else:
        assert teacher_idx.numel() == 0

    # Gradient: random upstream gradients against autograd of the dense computation.
    gen = torch.Generator().manual_seed(seed + 1)
    gl = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    gc = torch.randn(y.shape, generator=gen, dtype=torch.float64) if cfg.teacher == "threshold" else None
    dz = cpp.fecl_backward(gl.to(st).to(device), None if gc is None else gc.to(st).to(device), z, y, zt, yt, u,
                           log_neg, r, n_pos, col, topk_idx, teacher_idx, cfg)
    assert dz.dtype == z.dtype and dz.shape == z.shape
    obj = (ref.loss * gl).sum()
    if gc is not None:
        obj = obj + (ref.cross * gc).sum()
    (gz,) = torch.autograd.grad(obj, zd, allow_unused=True)
    gz = torch.zeros_like(zd) if gz is None else gz
    assert torch.isfinite(dz).all()
    assert_close(dz, gz, tol, "dz")
    return out, ref


# ---- the dense computation against the reference -----------------------------------------------

@pytest.mark.parametrize("shift,teacher,top_k,gn", [
    ("column", "threshold", None, 0.0), ("exact", "topk", None, 2.0), ("exact", "topk", 4, 0.0),
    ("column", None, 3, 2.0)])
def test_dense_matches_reference(shift, teacher, top_k, gn):
    z, y, zt, yt, u = make_inputs(dtype=torch.float64, weights=True)
    cfg = make_cfg(gamma_neg=gn, top_k=top_k or 0, column_shift=shift == "column", teacher=teacher or "none",
                   teacher_top_k=5, teacher_threshold=0.2)
    ref = reference.fecl(z, y, zt if teacher else None, yt, anchor_weight=u, temperature=0.6, gamma_pos=2.0,
                         gamma_neg=gn, top_k=top_k, shift=shift, teacher=teacher, teacher_top_k=5,
                         teacher_threshold=0.2, reduction="none")
    mine = dense(z, y, zt, yt, u, cfg)
    expect = mine.loss
    if teacher == "threshold":
        expect = expect + mine.cross / mine.count.sum().clamp_min(1)
    torch.testing.assert_close(ref, expect, rtol=1e-12, atol=1e-12)


# ---- fused vs dense ---------------------------------------------------------------------------

CONFIGS = {
    "official": dict(gamma_neg=0.0, column_shift=True, teacher="threshold", teacher_threshold=0.2),
    "dycon": dict(gamma_neg=2.0, teacher="topk", teacher_top_k=5),
    "topk1_column": dict(gamma_neg=2.0, top_k=1, column_shift=True),
    "topk_mid_teacher": dict(gamma_neg=0.0, top_k=7, teacher="topk", teacher_top_k=3),
    "topk_all": dict(gamma_neg=2.0, top_k=1000),
    "topk_threshold": dict(gamma_neg=2.0, top_k=3, teacher="threshold", teacher_threshold=0.1),
    "plain": dict(gamma_pos=0.0, gamma_neg=0.0),
    "fractional": dict(gamma_pos=1.5, gamma_neg=0.5, column_shift=True, tau=0.1),
    "teacher_topk_all": dict(gamma_neg=2.0, teacher="topk", teacher_top_k=100),
}
GRADCHECK = {
    "dycon": CONFIGS["dycon"],
    "topk_mid_teacher": CONFIGS["topk_mid_teacher"],
    "topk_threshold": CONFIGS["topk_threshold"],
    "plain": CONFIGS["plain"],
    "fractional_exact": dict(CONFIGS["fractional"], column_shift=False),
    "topk1_exact": dict(CONFIGS["topk1_column"], column_shift=False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_configs(device, name, dtype):
    check(device, make_cfg(**CONFIGS[name]), dtype=dtype, weights=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["official", "dycon", "topk_mid_teacher"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half(device, name, dtype):
    check(device, make_cfg(**CONFIGS[name]), dtype=dtype, N=40, D=32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [dict(N=1, Nt=1), dict(N=2, Nt=3), dict(N=5, D=1, Nt=4),
                                   dict(N=131, D=67, Nt=70, B=1), dict(N=300, D=8, Nt=40, B=1)])
@pytest.mark.parametrize("name", ["official", "dycon", "topk_mid_teacher"])
def test_shapes(device, shape, name):
    check(device, make_cfg(**CONFIGS[name]), dtype=torch.float64, **shape)


# Enough keys for several strips in the CPU backward and column shift (csrc/fecl_cpu.cpp: 2^20 /
# (N x threads) rows a strip, each strip used for its rows and, transposed, for the columns after
# it): about 5 at one thread, 9 at two.
STRIPS_SHAPE = dict(B=1, N=2101, D=8, Nt=300)


@pytest.mark.parametrize("name,dtype", [("dycon", torch.float32), ("topk_threshold", torch.float32),
                                        ("fractional", torch.float32), ("official", torch.float64)],
                         ids=["dycon-f32", "topk_threshold-f32", "fractional-f32", "official-f64"])
def test_cpu_strips(name, dtype):
    check("cpu", make_cfg(**CONFIGS[name]), dtype=dtype, **STRIPS_SHAPE)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["official", "dycon", "topk_threshold", "topk1_column"])
def test_one_class(device, name):
    cfg = make_cfg(**CONFIGS[name])
    (loss, *_), ref = check(device, cfg, dtype=torch.float64, classes=1)
    if cfg.teacher != "topk":
        assert (loss == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["official", "dycon", "topk_mid_teacher"])
def test_all_ignored(device, name):
    cfg = make_cfg(**CONFIGS[name])
    (loss, cross, cnt, log_neg, r, n_pos, *_), _ = check(device, cfg, dtype=torch.float64, ignore=1.0)
    assert (loss == 0).all() and (n_pos == 0).all() and torch.isinf(log_neg).all()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_volumes_and_no_teacher_embeddings(device):
    """One volume fully ignored, one normal; a teacher mode without zt means no teacher term."""
    z, y, _, _, u = make_inputs(B=2, N=30, D=12, teacher=False, dtype=torch.float64, device=device)
    y[0] = -1
    cfg = make_cfg(**CONFIGS["dycon"])
    out = cpp.fecl_forward(z, y, None, None, u, cfg)
    ref = dense(z.cpu(), y.cpu(), None, None, None if u is None else u.cpu(), make_cfg(gamma_neg=2.0))
    assert_close(out[0], ref.loss, 1e-10, "loss")
    assert out[8].numel() == 0 and (out[0][0] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_outputs_written_everywhere(device):
    """Outputs are allocated with at::empty (never zeros): repeated calls with fresh random data
    reuse freed memory, so an element a kernel forgets to write shows up as a mismatch."""
    cfg = make_cfg(**CONFIGS["topk_mid_teacher"])
    for seed in range(3):
        check(device, cfg, dtype=torch.float32, seed=seed, N=50, D=9, Nt=20)


# ---- gradcheck (float64) ----------------------------------------------------------------------

class _Fecl(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, y, zt, yt, u, cfg):
        out = cpp.fecl_forward(z, y, zt, yt, u, cfg)
        ctx.save_for_backward(z, y, *out[3:])
        ctx.extra = (zt, yt, u, cfg)
        loss, cross = out[0], out[1]
        return loss, (cross if cross.numel() else torch.zeros_like(loss))

    @staticmethod
    def backward(ctx, gl, gc):
        z, y, log_neg, r, n_pos, col, topk_idx, teacher_idx = ctx.saved_tensors
        zt, yt, u, cfg = ctx.extra
        dz = cpp.fecl_backward(gl.contiguous(), gc.contiguous(), z, y, zt, yt, u, log_neg, r, n_pos, col,
                               topk_idx, teacher_idx, cfg)
        return dz, None, None, None, None, None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(device, name):
    # Exact shift only: the column offset c_j is detached by definition, so finite differences
    # (which see it move) do not apply; the column mode's gradient is checked in test_configs.
    cfg = make_cfg(**GRADCHECK[name])
    z, y, zt, yt, u = make_inputs(B=2, N=9, D=5, Nt=7, dtype=torch.float64, device=device, weights=True,
                                  teacher=cfg.teacher != "none", seed=3)
    z.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda zz: _Fecl.apply(zz, y, zt, yt, u, cfg), (z,), eps=1e-6, atol=1e-7)


# ---- argument errors --------------------------------------------------------------------------

def test_bad_arguments():
    z, y, zt, yt, u = make_inputs(B=1, N=8, D=4, Nt=6)
    cfg = make_cfg()
    with pytest.raises(RuntimeError, match="y must be"):
        cpp.fecl_forward(z, y[:, :5], None, None, None, cfg)
    with pytest.raises(RuntimeError, match="integer"):
        cpp.fecl_forward(z, y.float(), None, None, None, cfg)
    with pytest.raises(RuntimeError, match="zt must be"):
        cpp.fecl_forward(z, y, zt[..., :3], yt, None, make_cfg(teacher="topk", teacher_top_k=2))
    with pytest.raises(RuntimeError, match="teacher_top_k"):
        cpp.fecl_forward(z, y, zt, yt, None, make_cfg(teacher="topk", teacher_top_k=0))
    with pytest.raises(ValueError, match="teacher"):
        cpp.fecl_forward(z, y, zt, yt, None, make_cfg(teacher="bogus"))


# ---- structure: no N x N buffer -----------------------------------------------------------------

def _largest_allocation(fn):
    """Largest single allocation (bytes) made while ``fn`` runs, from the profiler's memory
    events (one per allocation by the CPU allocator, C++ ops included)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    # Same figure from the op-level events (each allocating op reports what it allocated).
    sizes += [e.cpu_memory_usage for e in prof.events() if e.name == "aten::empty"]
    return max(sizes, default=0)


def test_no_n_by_n_buffer():
    N, D = 8192, 32
    z, y, zt, yt, _ = make_inputs(B=1, N=N, D=D, Nt=512, classes=4, ignore=0.05, dtype=torch.float32, seed=5)
    limit = N * N * 4 // 8
    # The method sees a large allocation made inside an op.
    probe = _largest_allocation(lambda: torch.mm(z[0, :, :1], z[0, :, :1].t()))
    assert probe >= N * N * 4
    cfg = make_cfg(**CONFIGS["official"])

    def run():
        out = cpp.fecl_forward(z, y, zt, yt, None, cfg)
        gl = torch.rand_like(out[0])
        gc = torch.rand_like(out[1])
        cpp.fecl_backward(gl, gc, z, y, zt, yt, None, *out[3:], cfg)

    peak = _largest_allocation(run)
    assert 0 < peak < limit, f"largest single allocation {peak} bytes (limit {limit})"
