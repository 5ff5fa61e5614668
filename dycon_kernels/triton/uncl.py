"""UnCL in Triton: one program owns a block of voxels of one volume and loads all C channels.

The loss is bandwidth-bound (a few flops per byte), so the kernels read each logit once per
pass, keep everything else in registers and write nothing but the result: the forward writes
one partial sum per program (or the voxel map for reduction='none'), the backward writes the
gradients. The math mirrors csrc/uncl_math.h.

Two paths share the kernels: C = 2 in closed form (the softmax is a sigmoid of the logit
difference, the softmax Jacobian a single product p0 p1), any other C on a (BLOCK_C, BLOCK_V)
tile. Both use exp2/log2 with log2(e) and ln(2) folded into the operands, and in float32 the
approximate MUFU forms (lg2/rcp/div.approx, about 2 ulp) instead of the software log2f and the
IEEE division (benchmarks/results/uncl_instructions.md: ~3.4x fewer instructions per voxel).

Launch hygiene: every launch runs under the tensors' device guard; ``beta`` is a kernel
argument typed float64 (so float64 inputs get it unrounded; float32 programs round it once);
offsets that combine the batch or channel index with a stride are 64-bit.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from dycon_kernels.backends import SMEM_LIMITS, device_guard, new_output, triton_interpreted

EPS = tl.constexpr(1e-6)
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Size arguments whose products must be 64-bit (tests/triton_aot.py checks the compiled TTIR).
SIZE_ARGS = ("C", "V", "stride_b", "stride_c")
# Every voxel offset within a volume is int32 (program_id * BLOCK_V + lane): refuse larger volumes.
MAX_VOXELS = 2**31 - 1 - 4096


def compute_dtype(dtype):
    """float64 inputs are computed in float64 (gradcheck), everything else in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def block_sizes(C: int):
    """(BLOCK_C, BLOCK_V): all classes in one tile, about 4096 logits per program."""
    block_c = triton.next_power_of_2(C)
    return block_c, max(16, 4096 // block_c)


@triton.jit
def _exp(x):
    return tl.exp2(x * LOG2E)


if triton_interpreted():  # the interpreter has no libdevice: numpy's exact log2 and division
    @triton.jit
    def _log2(x):
        return tl.log2(x)

    @triton.jit
    def _div(a, b):
        return a / b

    @triton.jit
    def _rcp(x):
        return 1.0 / x
else:
    @triton.jit
    def _log2(x):
        """float32: lg2.approx (one MUFU op; tl.log2 is a ~20-instruction software log2f). Its
        argument here is p + eps >= 1e-6, far from the denormals that .ftz flushes."""
        if x.dtype == tl.float32:
            return libdevice.fast_log2f(x)
        else:
            return tl.log2(x)

    @triton.jit
    def _div(a, b):
        """float32: div.approx (a reciprocal and a multiply, 2 ulp). Every denominator here lies
        in [1e-12, 2], far from the |b| > 2^126 where div.approx returns 0."""
        if a.dtype == tl.float32:
            return libdevice.fast_dividef(a, b)
        else:
            return a / b

    @triton.jit
    def _rcp(x):
        """float32: rcp.approx.ftz (one MUFU op; 1 / x via div.approx adds a multiply and an
        ftz move). Its arguments here lie in [1, C]."""
        if x.dtype == tl.float32:
            return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return 1.0 / x


# ---- C = 2: closed form -------------------------------------------------------------------------

@triton.jit
def _binary_probs(x0, x1):
    """p0, p1 = softmax(x0, x1), each to full relative precision (p = sigmoid(x1 - x0) and
    1 - p computed as e / (1 + e) with e = exp(-|x1 - x0|)), and log2(p + eps) of both."""
    d = x1 - x0
    e = _exp(-tl.abs(d))
    big = _rcp(1.0 + e)
    small = e * big
    p1 = tl.where(d >= 0, big, small)
    p0 = tl.where(d >= 0, small, big)
    return p0, p1, _log2(p0 + EPS), _log2(p1 + EPS)


@triton.jit
def _binary_plogp(p0, p1, l0, l1):
    """sum p log2(p + eps) = -H / ln 2: the kernels scale it by -beta ln 2 once (beta H)."""
    return p0 * l0 + p1 * l1


@triton.jit
def _binary_grad(x0, x1, l0, l1, diff_term, coef, g):
    """g * dl/dlogit_1 of one side (dl/dlogit_0 is its negative): through the 2-class softmax
    g x0 x1 (dl/dx1 - dl/dx0), with dl/dx1 - dl/dx0 = diff_term + coef (dH/dx1 - dH/dx0) and
    dH/dx1 - dH/dx0 = -(ln x1e - ln x0e) - eps (x1 - x0) / (x0e x1e), x_ce = x_c + eps."""
    dh = -LN2 * (l1 - l0) - _div(EPS * (x1 - x0), (x0 + EPS) * (x1 + EPS))
    return g * x0 * x1 * (diff_term + coef * dh)


# ---- any C: softmax over a tile ----------------------------------------------------------------

@triton.jit
def _softmax_entropy(x, cmask):
    """Softmax over axis 0 of a (BLOCK_C, BLOCK_V) tile, and sum p log2(p + eps) = -H / ln 2."""
    x = tl.where(cmask, x, float("-inf"))
    e = _exp(x - tl.max(x, axis=0)[None, :])
    p = e * _rcp(tl.sum(e, axis=0))[None, :]  # the sum lies in [1, C]
    return p, tl.sum(p * _log2(p + EPS), axis=0)


@triton.jit
def _side_grad(x, y, cmask, w, coef_h, g):
    """g * d l / d logits of one side: x its probabilities, y the other side's (uncl_math.h)."""
    dldx = 2.0 * (x - y) * w[None, :] + coef_h[None, :] * -(LN2 * _log2(x + EPS) + _div(x, x + EPS))
    dldx = tl.where(cmask, dldx, 0.0)
    dot = tl.sum(x * dldx, axis=0)
    return g[None, :] * x * (dldx - dot[None, :])


# ---- shared by both paths ----------------------------------------------------------------------

@triton.jit
def _weights(bs, bt):
    """W = 1/(e^bs + e^bt) and share_s = e^bs W for bs = beta Hs, bt = beta Ht, around max(bs, bt):
    with a = e^{-|bs - bt|}, W = e^{-max} / (1 + a) and share_s is 1/(1 + a) or a/(1 + a)."""
    a = _exp(-tl.abs(bs - bt))
    r = _rcp(1.0 + a)
    w = _exp(-tl.maximum(bs, bt)) * r
    return w, tl.where(bs >= bt, r, a * r)


@triton.jit
def _program_voxels(V, BLOCK_V: tl.constexpr):
    """This program's volume b (int64: b * stride_b passes 2^31 in large batches), its voxel
    indices within the volume (int32: V < 2^31 is checked at launch) and their mask."""
    offs_v = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    return tl.program_id(1).to(tl.int64), offs_v, offs_v < V


@triton.jit
def _channel_offsets(offs_v, C, stride_c, BLOCK_C: tl.constexpr):
    """(BLOCK_C, BLOCK_V) offsets from a volume's start and the channel mask; the channel term is
    int64, as c * stride_c passes 2^31 once C V does."""
    offs_c = tl.arange(0, BLOCK_C)
    return offs_c.to(tl.int64)[:, None] * stride_c + offs_v[None, :], (offs_c < C)[:, None]


@triton.jit
def _load2(X, offs_v, stride_c, vmask, ACC: tl.constexpr):
    """Channels 0 and 1 of this program's voxels; X points at the volume's start. Voxels past V
    load as zeros: a harmless softmax that is never stored."""
    x0 = tl.load(X + offs_v, mask=vmask, other=0.0).to(ACC)
    x1 = tl.load(X + stride_c + offs_v, mask=vmask, other=0.0).to(ACC)
    return x0, x1


@triton.jit
def _binary_terms(S, T, offs, stride_c, vmask, ACC: tl.constexpr):
    """C = 2: both sides' probabilities, their log2(p + eps) and sum p log2(p + eps)."""
    s0, s1 = _load2(S, offs, stride_c, vmask, ACC)
    t0, t1 = _load2(T, offs, stride_c, vmask, ACC)
    p0, p1, ls0, ls1 = _binary_probs(s0, s1)
    q0, q1, lt0, lt1 = _binary_probs(t0, t1)
    return p0, p1, ls0, ls1, q0, q1, lt0, lt1, _binary_plogp(p0, p1, ls0, ls1), _binary_plogp(q0, q1, lt0, lt1)


@triton.jit
def _tile_terms(S, T, offs, vmask, C, stride_c, ACC: tl.constexpr, BLOCK_C: tl.constexpr):
    """Any C: the tile offsets and masks, both sides' probabilities, sum p log2(p + eps) and D."""
    offs2, cmask = _channel_offsets(offs, C, stride_c, BLOCK_C)
    mask = cmask & vmask[None, :]
    p, g_s = _softmax_entropy(tl.load(S + offs2, mask=mask, other=0.0).to(ACC), cmask)
    q, g_t = _softmax_entropy(tl.load(T + offs2, mask=mask, other=0.0).to(ACC), cmask)
    return offs2, mask, cmask, p, q, g_s, g_t, tl.sum((p - q) * (p - q), axis=0)


@triton.jit
def uncl_forward_kernel(S, T, W, OUT, C, V, stride_b, stride_c, beta: tl.float64, HAS_WEIGHT: tl.constexpr,
                        REDUCE: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    if ACC == tl.float32:  # float64 programs keep beta unrounded (not via a helper: under the
        beta = tl.cast(beta, tl.float32)  # interpreter a helper's return value becomes float32)
    beta_h = tl.full((), -LN2, ACC) * beta  # beta H = beta_h sum p log2(p + eps)
    b, offs, vmask = _program_voxels(V, BLOCK_V)
    S += b * stride_b  # the volume's start: the offsets below stay within it
    T += b * stride_b
    if BLOCK_C == 2:
        p0, p1, ls0, ls1, q0, q1, lt0, lt1, g_s, g_t = _binary_terms(S, T, offs, stride_c, vmask, ACC)
        d = 2.0 * (p1 - q1) * (p1 - q1)
    else:
        offs2, mask, cmask, p, q, g_s, g_t, d = _tile_terms(S, T, offs, vmask, C, stride_c, ACC, BLOCK_C)
    bs = beta_h * g_s
    bt = beta_h * g_t
    w, share_s = _weights(bs, bt)
    loss = d * w + bs + bt
    if HAS_WEIGHT:
        loss = loss * tl.load(W + b * V + offs, mask=vmask, other=0.0)
    if REDUCE:
        partial = tl.sum(tl.where(vmask, loss, 0.0), axis=0)
        tl.store(OUT + tl.program_id(1) * tl.num_programs(0) + tl.program_id(0), partial)
    else:
        tl.store(OUT + b * V + offs, loss, mask=vmask)


@triton.jit
def uncl_backward_kernel(G, S, T, W, DS, DT, C, V, stride_b, stride_c, beta: tl.float64,
                         GRAD_IS_MAP: tl.constexpr, HAS_WEIGHT: tl.constexpr, NEED_T_GRAD: tl.constexpr,
                         ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    if ACC == tl.float32:  # float64 programs keep beta unrounded (not via a helper: under the
        beta = tl.cast(beta, tl.float32)  # interpreter a helper's return value becomes float32)
    beta_h = tl.full((), -LN2, ACC) * beta  # beta H = beta_h sum p log2(p + eps)
    b, offs, vmask = _program_voxels(V, BLOCK_V)
    S += b * stride_b  # the volume's start: the offsets below stay within it
    T += b * stride_b
    DS += b * stride_b
    if GRAD_IS_MAP:
        g = tl.load(G + b * V + offs, mask=vmask, other=0.0).to(ACC)
    else:
        g = tl.zeros((BLOCK_V,), ACC) + tl.load(G).to(ACC)
    if HAS_WEIGHT:
        g = g * tl.load(W + b * V + offs, mask=vmask, other=0.0)
    if BLOCK_C == 2:
        p0, p1, ls0, ls1, q0, q1, lt0, lt1, g_s, g_t = _binary_terms(S, T, offs, stride_c, vmask, ACC)
        delta = p1 - q1
        d = 2.0 * delta * delta
        w, share_s = _weights(beta_h * g_s, beta_h * g_t)
        # dl/dp1 - dl/dp0 of the D W term: 2 (p1 - q1) W - 2 (p0 - q0) W = 4 (p1 - q1) W.
        dw4 = 4.0 * delta * w
        ds1 = _binary_grad(p0, p1, ls0, ls1, dw4, beta * (1.0 - d * w * share_s), g)
        tl.store(DS + offs, (-ds1).to(DS.dtype.element_ty), mask=vmask)
        tl.store(DS + stride_c + offs, ds1.to(DS.dtype.element_ty), mask=vmask)
        if NEED_T_GRAD:
            DT += b * stride_b
            dt1 = _binary_grad(q0, q1, lt0, lt1, -dw4, beta * (1.0 - d * w * (1.0 - share_s)), g)
            tl.store(DT + offs, (-dt1).to(DT.dtype.element_ty), mask=vmask)
            tl.store(DT + stride_c + offs, dt1.to(DT.dtype.element_ty), mask=vmask)
    else:
        offs2, mask, cmask, p, q, g_s, g_t, d = _tile_terms(S, T, offs, vmask, C, stride_c, ACC, BLOCK_C)
        w, share_s = _weights(beta_h * g_s, beta_h * g_t)
        ds = _side_grad(p, q, cmask, w, beta * (1.0 - d * w * share_s), g)
        tl.store(DS + offs2, ds.to(DS.dtype.element_ty), mask=mask)
        if NEED_T_GRAD:
            DT += b * stride_b
            dt = _side_grad(q, p, cmask, w, beta * (1.0 - d * w * (1.0 - share_s)), g)
            tl.store(DT + offs2, dt.to(DT.dtype.element_ty), mask=mask)


def _launch_args(s, t):
    """Grid and block sizes of (B, C, V) logits; checks the layout the kernels assume: voxels
    contiguous, student and teacher (and so the gradients) with the same strides."""
    B, C, V = s.shape
    if s.stride(2) != 1 or t.stride() != s.stride():
        raise ValueError(f"UnCL Triton kernels need (B, C, V) logits with unit voxel stride and equal "
                         f"strides, got {s.stride()} and {t.stride()}")
    if V > MAX_VOXELS:
        raise ValueError(f"UnCL Triton kernels take at most {MAX_VOXELS} voxels per volume, got {V}")
    block_c, block_v = block_sizes(C)
    return (triton.cdiv(V, block_v), B), block_c, block_v


def _like(x, dtype):
    """A kernel output with x's shape and strides (x's layout, so the kernels share offsets)."""
    span = 1 + sum((n - 1) * st for n, st in zip(x.shape, x.stride()))
    return new_output((span,), dtype, x.device).as_strided(x.shape, x.stride())


def uncl_forward(s, t, beta, weight, reduce):
    B, C, V = s.shape
    grid, block_c, block_v = _launch_args(s, t)
    acc = torch.float64 if s.dtype == torch.float64 else torch.float32
    out = new_output(grid[0] * grid[1] if reduce else (B, V), acc, s.device)
    with device_guard(s.device):
        uncl_forward_kernel[grid](s, t, weight, out, C, V, s.stride(0), s.stride(1), float(beta),
                                  HAS_WEIGHT=weight is not None, REDUCE=reduce, ACC=compute_dtype(s.dtype),
                                  BLOCK_C=block_c, BLOCK_V=block_v)
    return out.sum() if reduce else out


def uncl_backward(grad, s, t, beta, weight, need_t_grad):
    B, C, V = s.shape
    grid, block_c, block_v = _launch_args(s, t)
    grad = grad.contiguous()
    ds = _like(s, s.dtype)
    dt = _like(t, t.dtype) if need_t_grad else None
    with device_guard(s.device):
        uncl_backward_kernel[grid](
            grad, s, t, weight, ds, dt, C, V, s.stride(0), s.stride(1), float(beta), GRAD_IS_MAP=grad.dim() > 0,
            HAS_WEIGHT=weight is not None, NEED_T_GRAD=need_t_grad, ACC=compute_dtype(s.dtype),
            BLOCK_C=block_c, BLOCK_V=block_v)
    return ds, dt


def launch_configs(full: bool = False):
    """(kernel, signature, constexprs) triples that this module launches, for the GPU-compile test.

    By default every flag combination in float32 for two channel tilings, plus each other dtype
    once; ``full=True`` lists every dtype x tiling x flag combination (slow to compile).
    """
    configs = []
    for dtype in ("fp32", "fp16", "bf16", "fp64"):
        acc = "fp64" if dtype == "fp64" else "fp32"
        ACC = tl.float64 if dtype == "fp64" else tl.float32
        for C in ((2, 4, 5) if full else (2, 5)):
            block_c, block_v = block_sizes(C)
            flags_fwd = [(w, r) for w in (False, True) for r in (False, True)]
            flags_bwd = [(m, w, n) for m in (False, True) for w in (False, True) for n in (False, True)]
            if dtype != "fp32" and not full:
                if C != 2:
                    continue
                flags_fwd, flags_bwd = flags_fwd[-1:], flags_bwd[-1:]
            sizes = {"C": "i32", "V": "i32", "stride_b": "i32", "stride_c": "i32", "beta": "fp64"}
            for has_w, reduce in flags_fwd:
                sig = {"S": f"*{dtype}", "T": f"*{dtype}", "W": "*fp32", "OUT": f"*{acc}", **sizes}
                configs.append((uncl_forward_kernel, sig, dict(HAS_WEIGHT=has_w, REDUCE=reduce, ACC=ACC,
                                                               BLOCK_C=block_c, BLOCK_V=block_v)))
            for grad_map, has_w, need_t in flags_bwd:
                sig = {"G": f"*{acc}", "S": f"*{dtype}", "T": f"*{dtype}", "W": "*fp32",
                       "DS": f"*{dtype}", "DT": f"*{dtype}", **sizes}
                configs.append((uncl_backward_kernel, sig, dict(
                    GRAD_IS_MAP=grad_map, HAS_WEIGHT=has_w, NEED_T_GRAD=need_t, ACC=ACC,
                    BLOCK_C=block_c, BLOCK_V=block_v)))
    return configs


def fit_configs(cc: int, full: bool = False):
    """For tests/triton_aot.py --fit: ``(kernel, signature, constexprs, options, bounds)`` on
    sm_<cc>, bounded by the card's shared memory. The kernels' only shared memory is the forward's
    partial-sum reduction (a few bytes per warp), the same for every dtype and flag: by default the
    reducing forward and the all-flags backward of both channel tilings (the closed form and the
    tile) in float32; ``full``: every launch."""
    configs = launch_configs(full=full)
    if not full:
        configs = [c for c in configs if c[1]["S"] == "*fp32" and all(
            c[2].get(flag, True) for flag in ("REDUCE", "HAS_WEIGHT", "GRAD_IS_MAP", "NEED_T_GRAD"))]
    return [(kernel, sig, ce, None, dict(smem=SMEM_LIMITS[cc])) for kernel, sig, ce in configs]
