"""FeCL in Triton: streaming kernels in the style of the fused-attention tutorial.

The algorithm and the entry-point contract are ``docs/fecl_kernels.md``. Every kernel is launched
on a grid ``(cdiv(N, BLOCK_M), B)``: one program owns a block of ``BLOCK_M`` anchors of one volume,
loads their embeddings once and loops over key tiles of ``BLOCK_N`` keys, computing similarity
tiles with ``tl.dot``. Only per-anchor statistics are written; nothing of size ``N x N`` exists.

Forward, one kernel per pass of the doc (each a loop over key tiles):

1. ``fecl_colshift_kernel`` (shift = column): ``c_i = max(0, max_{valid j != i} l_ij)``.
2. ``fecl_topk_kernel`` (top_k, and the teacher top-k): streaming top-k of ``<z_i, key_q>`` over
   the keys with a different valid label. The running top-k is an unsorted register buffer of
   ``K_PAD`` slots per anchor; each key tile is merged by rounds of "insert the tile's row max
   into the slot of the buffer's row min while it is larger". The number of rounds is the largest
   per-row count of tile values above the buffer's minimum (capped at ``k``), so tiles that
   cannot enter the top-k cost one comparison and are skipped. The buffer is sorted (descending,
   ``-1`` padding last) before it is stored.
3. ``fecl_logneg_kernel``: ``log Neg_i`` as a streaming (online) log-sum-exp, over the dense
   negatives or over the stored top-k indices (a gather), plus the teacher top-k terms (a gather)
   and the threshold-teacher sums ``cross``/``cross_count`` (a loop over teacher tiles).
4. ``fecl_positive_kernel``: ``S_ij = sigmoid(l_ij - c_j - log_neg_i)`` over positives ->
   ``loss``, ``r``, ``n_pos``.

Backward:

- ``fecl_backward_kernel``: row-parallel; recomputes the similarity tiles and applies
  ``g_ij + g_ji`` (``g_ji`` from anchor ``j``'s saved statistics, the matrix being symmetric),
  for positives and (without top_k) dense negatives, then the gathered top-k / teacher rows and
  the threshold-teacher term of its own anchors. No atomics. Each program evaluates both
  directions of its pairs, so every unordered pair is evaluated twice over the grid (once from
  each block); the two directions share one reciprocal (``_pos_grads``).
- ``fecl_topk_scatter_kernel`` (top_k only): the transposed part of the sparse top-k pairs,
  ``dz_q += g_iq z_i / tau``, with ``tl.atomic_add`` into a float32/float64 buffer.

Numerics: element-wise work is in the compute type (float32, float64 for float64 inputs). The
similarity dots take float16/bfloat16 embeddings as they are (products exact in float32, as the
TF32 products of their float32 copies were; the interpreter, whose bfloat16 dot is wrong, runs
bfloat16 in float32), float32 embeddings with "tf32x3" (``FP32_DOT_PRECISION``), close to float32
accuracy, so that the top-k sets match a dense float32 ``torch.topk``. The backward's
``g @ z_j`` splits g into two bfloat16 parts for bfloat16 keys (``_dot_coef``) and uses TF32 for the
others. The positive terms are computed in base 2 (``_sigmoid_parts``).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dycon_kernels.backends import SMEM_LIMITS, device_guard

# tl.dot precision for float32 embeddings: "tf32x3" (three TF32 tensor-core products, close to
# float32 accuracy), "ieee" (float32 FMAs: slow to compile and to run) or "tf32" (one product,
# ~1e-3 relative error on l, which can flip near-ties of the top-k selection).
FP32_DOT_PRECISION = "tf32x3"

NEG_INF = tl.constexpr(float("-inf"))
TEACHER_CODES = {"none": 0, "topk": 1, "threshold": 2}
# Size arguments of the kernels: tests/triton_aot.py checks that no offset multiplies them in 32 bits.
SIZE_ARGS = ("N", "NT", "NK", "D", "K", "TK")


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _load_rows(P, base, rows, n_rows, offs_d, D, ACC: tl.constexpr):
    """(len(rows), BLOCK_D) embeddings of rows ``rows`` of a (n_rows, D) matrix at P + base, in ACC;
    rows past n_rows and columns past D load as zeros (harmless in the dots, never stored)."""
    mask = (rows[:, None] < n_rows) & (offs_d[None, :] < D)
    return tl.load(P + base + rows[:, None].to(tl.int64) * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _anchor_block(Y, Z, N, D, DOT_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's volume b and anchor block: offsets, row mask, labels (-1 past N) and
    embeddings (BLOCK_M, BLOCK_D) in DOT_IN (the dtype of the similarity dots' operands)."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    yi = tl.load(Y + b * N + offs_m, mask=row_ok, other=-1)
    zi = _load_rows(Z, b * N * D, offs_m, N, offs_d, D, DOT_IN)
    return b, offs_m, offs_d, row_ok, yi, zi


@triton.jit
def _gather_rows(P, base, idx, ok, offs_d, D, ACC: tl.constexpr):
    """Rows ``idx`` (BLOCK_M,) of a (n, D) matrix at P + base, zeros where not ``ok``."""
    mask = ok[:, None] & (offs_d[None, :] < D)
    safe = tl.where(ok, idx, 0).to(tl.int64)
    return tl.load(P + base + safe[:, None] * D + offs_d[None, :], mask=mask, other=0.0).to(ACC)


@triton.jit
def _sim(a, b, DOT_PREC: tl.constexpr):
    """a @ b^T for (BLOCK_M, BLOCK_D) x (BLOCK_N, BLOCK_D) tiles."""
    return tl.dot(a, tl.trans(b), input_precision=DOT_PREC)


@triton.jit
def _scalar(value: tl.constexpr, ACC: tl.constexpr):
    """A compile-time constant in ACC at full precision (a bare Python float in an expression is
    a float32 constant, which would round 1/tau for float64 runs)."""
    return tl.full([], value, ACC)


@triton.jit
def _pow_log2(x, log2_x, P: tl.constexpr):
    """x ** P for x >= 0 (0 ** 0 = 1) with the exponent known at compile time: the presets' small
    integers as multiplications, anything else as 2^(P log2 x) from the given ``log2_x``."""
    if P == 0.0:
        y = tl.full(x.shape, 1.0, x.dtype)
    elif P == 1.0:
        y = x
    elif P == 2.0:
        y = x * x
    elif P == 3.0:
        y = x * x * x
    else:
        y = tl.exp2(P * log2_x)
    return y


@triton.jit
def _pow(x, P: tl.constexpr):
    """x ** P for x > 0 (the log is only evaluated for non-integer exponents)."""
    if P == 0.0 or P == 1.0 or P == 2.0 or P == 3.0:
        y = _pow_log2(x, x, P)
    else:
        y = _pow_log2(x, tl.log2(x), P)
    return y


@triton.jit
def _neg_weight(l, TAU: tl.constexpr, GAMMA_NEG: tl.constexpr):
    """w = ((1 + tau l) / 2) ^ gamma_neg; 0 where the base is <= 0 (rounding can push a cosine
    below -1): such a negative drops out, as in the reference and the C++ backends."""
    if GAMMA_NEG != 0.0:
        base = (1.0 + _scalar(TAU, l.dtype) * l) * 0.5
        safe = tl.where(base > 0.0, base, 1.0)
        w = tl.where(base > 0.0, _pow(safe, GAMMA_NEG), 0.0)
    else:
        w = tl.full(l.shape, 1.0, l.dtype)
    return w


@triton.jit
def _neg_bracket(l, TAU: tl.constexpr, GAMMA_NEG: tl.constexpr):
    """d(w e)/dl / e = w + gamma_neg tau / 2 base^(gamma_neg - 1)  (1 when gamma_neg = 0, 0 where
    the base is <= 0)."""
    if GAMMA_NEG != 0.0:
        base = (1.0 + _scalar(TAU, l.dtype) * l) * 0.5
        safe = tl.where(base > 0.0, base, 1.0)
        w = _pow(safe, GAMMA_NEG) + _scalar(GAMMA_NEG * TAU * 0.5, l.dtype) * _pow(safe, GAMMA_NEG - 1.0)
        w = tl.where(base > 0.0, w, 0.0)
    else:
        w = tl.full(l.shape, 1.0, l.dtype)
    return w


@triton.jit
def _lse_update(m, s, t, w):
    """Online log-sum-exp of w * exp(t) along axis 1 of a tile; -inf in t excludes an entry.
    The state is (running max m, sum s scaled by exp(-m)); log of the total is m + log(s)."""
    m_new = tl.maximum(m, tl.max(t, axis=1))
    m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(w * tl.exp(t - m_ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def _log2(x, FAST_LOG: tl.constexpr):
    """log2; with FAST_LOG (GPU, float32) the hardware lg2.approx (one MUFU op, absolute error
    ~1e-7 on [0.5, 2]) instead of libdevice's (~20 instructions). The interpreter has no inline
    PTX, so CPU runs take tl.log2."""
    if FAST_LOG and x.dtype == tl.float32:
        y = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.log2(x)
    return y


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# The positive terms work in base 2: x2 = x log2(e), with log2(e)/tau folded into the scale of the
# similarity tile and log2(e) into the per-anchor statistics, so that exp and log are the
# hardware's exp2/lg2 without a multiplication per element; ln 2 is folded into the constants.

@triton.jit
def _sigmoid_parts(x2, a, inv_u, FAST_LOG: tl.constexpr):
    """S = sigmoid(x) for x = x2 ln 2, from a = 2^-|x2| and inv_u = 1 / (1 + a): S and 1 - S (1/u
    and a/u, which is which: the sign of x), log2 S = -(max(-x2, 0) + log2(1 + a)) and
    log2(1 + a). log2(1 + a) is log2(u) corrected by (a - (u - 1)) / u / ln 2, the part of a lost
    in rounding u (exact to first order, so tiny a keep their relative accuracy); finite for any
    x (x = +inf: S = 1)."""
    u = 1.0 + a
    log1p_a = _log2(u, FAST_LOG) + (a - (u - 1.0)) * inv_u * _scalar(LOG2E, a.dtype)
    log2_s = -(tl.maximum(-x2, 0.0) + log1p_a)
    a_u = a * inv_u
    s = tl.where(x2 >= 0, inv_u, a_u)
    one_ms = tl.where(x2 >= 0, a_u, inv_u)
    return s, one_ms, log2_s, log1p_a


@triton.jit
def _focal(x2, one_ms, log1p_a, GAMMA_POS: tl.constexpr):
    """(1 - S)^gp; non-integer exponents from log2(1 - S) = -(max(x2, 0) + log2(1 + a))."""
    if GAMMA_POS == 0.0 or GAMMA_POS == 1.0 or GAMMA_POS == 2.0 or GAMMA_POS == 3.0:
        pw = _pow_log2(one_ms, one_ms, GAMMA_POS)
    else:
        pw = _pow_log2(one_ms, -(tl.maximum(x2, 0.0) + log1p_a), GAMMA_POS)
    return pw


@triton.jit
def _pos_coef(x2, s, one_ms, log2_s, log1p_a, GAMMA_POS: tl.constexpr):
    """(1 - S)^gp and f'(S) S (1 - S) = (1 - S)^gp ((1 - S) - gp S log S)."""
    pw = _focal(x2, one_ms, log1p_a, GAMMA_POS)
    return pw, pw * (one_ms - _scalar(GAMMA_POS * LN2, x2.dtype) * s * log2_s)


@triton.jit
def _pos_terms(x2, GAMMA_POS: tl.constexpr, FAST_LOG: tl.constexpr):
    """For S = sigmoid(x), x = x2 ln 2: f / ln 2 = (1 - S)^gp log2 S (the caller multiplies the
    sum by ln 2) and f'(S) S (1 - S), from one exp2, one log2 and one reciprocal."""
    a = tl.exp2(-tl.abs(x2))  # in (0, 1]
    s, one_ms, log2_s, log1p_a = _sigmoid_parts(x2, a, 1.0 / (1.0 + a), FAST_LOG)
    pw, d = _pos_coef(x2, s, one_ms, log2_s, log1p_a, GAMMA_POS)
    return pw * log2_s, d


@triton.jit
def _pos_grads(x2_ij, x2_ji, GAMMA_POS: tl.constexpr, FAST_LOG: tl.constexpr):
    """f'(S) S (1 - S) for the two directions of a pair (anchor i with key j and anchor j with key
    i), from two exp2, two log2 and one reciprocal: 1/u_ij = u_ji / (u_ij u_ji) (both u in [1, 2],
    so the product cannot overflow)."""
    a_ij = tl.exp2(-tl.abs(x2_ij))
    a_ji = tl.exp2(-tl.abs(x2_ji))
    u_ij = 1.0 + a_ij
    u_ji = 1.0 + a_ji
    inv = 1.0 / (u_ij * u_ji)
    s, one_ms, log2_s, log1p_a = _sigmoid_parts(x2_ij, a_ij, u_ji * inv, FAST_LOG)
    _, d_ij = _pos_coef(x2_ij, s, one_ms, log2_s, log1p_a, GAMMA_POS)
    s, one_ms, log2_s, log1p_a = _sigmoid_parts(x2_ji, a_ji, u_ij * inv, FAST_LOG)
    _, d_ji = _pos_coef(x2_ji, s, one_ms, log2_s, log1p_a, GAMMA_POS)
    return d_ij, d_ji


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def fecl_colshift_kernel(Z, Y, CS, N, D, TAU: tl.constexpr, ACC: tl.constexpr, DOT_IN: tl.constexpr,
                         DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 1: c_i = max(0, max_{valid j != i} l_ij) for valid i (0 for invalid i)."""
    inv_tau = _scalar(1.0 / TAU, ACC)
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D)
    c = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yj = tl.load(Y + b * N + offs_n, mask=offs_n < N, other=-1)
        l = _sim(zi, _load_rows(Z, b * N * D, offs_n, N, offs_d, D, DOT_IN), DOT_PREC) * inv_tau
        pair = (yi[:, None] >= 0) & (yj[None, :] >= 0) & (offs_m[:, None] != offs_n[None, :])
        c = tl.maximum(c, tl.max(tl.where(pair, l, 0.0), axis=1))
    tl.store(CS + b * N + offs_m, c, mask=offs_m < N)


@triton.jit
def fecl_topk_kernel(Z, Y, KEYS, KY, IDX, N, NK, D, K, ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr,
                     K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Pass 2: the K keys q (of KEYS, (B, NK, D), labels KY) with ky_q >= 0, ky_q != y_i and the
    largest <z_i, key_q>, for each anchor i -> IDX (B, N, K) int64, sorted descending, -1 padded.
    Used for the student negatives (KEYS = Z) and for the teacher top-k (KEYS = ZT)."""
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D)
    offs_k = tl.arange(0, K_PAD)
    # Unsorted running top-k: slots past K hold +inf so that they are never the minimum; so do all
    # slots of an ignored anchor, which then takes no key (its row stays -1). Validity is thus
    # per row and per column, not tested per pair.
    open_slot = (offs_k[None, :] < K) & (yi[:, None] >= 0)
    vals = tl.where(open_slot, NEG_INF, float("inf")) + tl.zeros([BLOCK_M, K_PAD], ACC)
    idx = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yk = tl.load(KY + b * NK + offs_n, mask=offs_n < NK, other=-1)
        s = _sim(zi, _load_rows(KEYS, b * NK * D, offs_n, NK, offs_d, D, DOT_IN), DOT_PREC)
        key_bias = tl.where(yk >= 0, 0.0, NEG_INF)  # ignored keys: -inf
        s = tl.where(yi[:, None] != yk[None, :], s, NEG_INF) + key_bias[None, :]
        # Rounds needed: per row, how many tile values beat the current k-th value (<= K).
        n_better = tl.sum((s > tl.min(vals, axis=1)[:, None]).to(tl.int32), axis=1)
        for rnd in range(0, tl.max(tl.minimum(n_better, K), axis=0)):
            best = tl.max(s, axis=1)
            best_n = tl.argmax(s, axis=1, tie_break_left=True)
            worst = tl.min(vals, axis=1)
            worst_k = tl.argmin(vals, axis=1, tie_break_left=True)
            put = (best > worst)[:, None] & (offs_k[None, :] == worst_k[:, None])
            vals = tl.where(put, best[:, None], vals)
            idx = tl.where(put, (start_n + best_n)[:, None], idx)
            s = tl.where(tl.arange(0, BLOCK_N)[None, :] == best_n[:, None], NEG_INF, s)
    # Sort the buffer descending; every real entry (idx >= 0) is > -inf, so -1 comes last.
    vals = tl.where(idx >= 0, vals, NEG_INF)
    out = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
    for r in range(0, K):
        top = tl.argmax(vals, axis=1, tie_break_left=True)
        at_top = offs_k[None, :] == top[:, None]
        out = tl.where(offs_k[None, :] == r, tl.sum(tl.where(at_top, idx, 0), axis=1)[:, None], out)
        vals = tl.where(at_top, NEG_INF, vals)
        idx = tl.where(at_top, -1, idx)
    mask = (offs_m[:, None] < N) & (offs_k[None, :] < K)
    tl.store(IDX + (b * N + offs_m[:, None]) * K + offs_k[None, :], out.to(tl.int64), mask=mask)


@triton.jit
def fecl_logneg_kernel(Z, Y, CS, ZT, YT, TOPK, TIDX, LOGNEG, CROSS, CCOUNT, THRESHOLD: tl.float64, N, NT, D, K, TK,
                       COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, TAU: tl.constexpr, GAMMA_NEG: tl.constexpr,
                       TEACHER: tl.constexpr,
                       ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 3: log Neg_i = log(sum_{q in H(i)} w_iq exp(l_iq - c_q) + sum_{k in T(i)} exp(l^t_ik))
    (-inf without negatives); with TEACHER == 2, cross_i and cross_count_i."""
    inv_tau, threshold = _scalar(1.0 / TAU, ACC), (THRESHOLD + tl.zeros([], ACC)).to(ACC)
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D)
    vi = yi >= 0
    m = tl.full([BLOCK_M], NEG_INF, ACC)
    s = tl.zeros([BLOCK_M], ACC)
    if USE_TOPK:
        # H(i) from the stored indices: a gather of one key row per anchor and slot.
        for slot in range(0, K):
            q = tl.load(TOPK + (b * N + offs_m) * K + slot, mask=row_ok, other=-1)
            ok = row_ok & (q >= 0)
            l = tl.sum(zi.to(ACC) * _gather_rows(Z, b * N * D, q, ok, offs_d, D, ACC), axis=1) * inv_tau
            t = l
            if COLUMN:
                t = l - tl.load(CS + b * N + q, mask=ok, other=0.0)
            t = tl.where(ok, t, NEG_INF)
            m, s = _lse_update(m, s, t[:, None], _neg_weight(l, TAU, GAMMA_NEG)[:, None])
    else:
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            yj = tl.load(Y + b * N + offs_n, mask=offs_n < N, other=-1)
            l = _sim(zi, _load_rows(Z, b * N * D, offs_n, N, offs_d, D, DOT_IN), DOT_PREC) * inv_tau
            t = l
            if COLUMN:
                t = l - tl.load(CS + b * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
            neg = vi[:, None] & (yj[None, :] >= 0) & (yi[:, None] != yj[None, :])
            m, s = _lse_update(m, s, tl.where(neg, t, NEG_INF), _neg_weight(l, TAU, GAMMA_NEG))
    if TEACHER == 1:
        # T(i) from the stored teacher indices, no offset and no weight.
        for slot in range(0, TK):
            k = tl.load(TIDX + (b * N + offs_m) * TK + slot, mask=row_ok, other=-1)
            ok = row_ok & (k >= 0)
            lt = tl.sum(zi.to(ACC) * _gather_rows(ZT, b * NT * D, k, ok, offs_d, D, ACC), axis=1) * inv_tau
            m, s = _lse_update(m, s, tl.where(ok, lt, NEG_INF)[:, None], tl.full([BLOCK_M, 1], 1.0, ACC))
    tl.store(LOGNEG + b * N + offs_m, tl.where(s > 0, m + tl.log(s), NEG_INF), mask=row_ok)
    if TEACHER == 2:
        cross = tl.zeros([BLOCK_M], ACC)
        count = tl.zeros([BLOCK_M], ACC)
        for start_k in range(0, NT, BLOCK_N):
            offs_k = start_k + tl.arange(0, BLOCK_N)
            yk = tl.load(YT + b * NT + offs_k, mask=offs_k < NT, other=-1)
            c = _sim(zi, _load_rows(ZT, b * NT * D, offs_k, NT, offs_d, D, DOT_IN), DOT_PREC)
            hit = vi[:, None] & (yk[None, :] >= 0) & (yi[:, None] != yk[None, :]) & (c > threshold)
            # -log(max(1 - c, 0) + eps): rounding can give c > 1.
            cross += tl.sum(tl.where(hit, -tl.log(tl.maximum(1.0 - c, 0.0) + 1e-18), 0.0), axis=1)
            count += tl.sum(hit.to(ACC), axis=1)
        tl.store(CROSS + b * N + offs_m, cross, mask=row_ok)
        tl.store(CCOUNT + b * N + offs_m, count, mask=row_ok)


@triton.jit
def fecl_positive_kernel(Z, Y, CS, LOGNEG, U, LOSS, R, NPOS, N, D, COLUMN: tl.constexpr,
                         TAU: tl.constexpr, GAMMA_POS: tl.constexpr, FAST_LOG: tl.constexpr,
                         ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 4: over positives j, x = l_ij - c_j - log_neg_i, S = sigmoid(x):
    L_i = -u_i / |P(i)| sum (1 - S)^gp log S,  R_i = sum f'(S) S (1 - S),  n_pos_i = |P(i)|.
    In base 2 (see _sigmoid_parts): x2 = x log2(e)."""
    scale, log2e = _scalar(LOG2E / TAU, ACC), _scalar(LOG2E, ACC)  # l log2(e) = dot scale
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D)
    log2_neg = tl.load(LOGNEG + b * N + offs_m, mask=row_ok, other=0.0) * log2e
    f_sum = tl.zeros([BLOCK_M], ACC)
    r_sum = tl.zeros([BLOCK_M], ACC)
    n_pos = tl.zeros([BLOCK_M], tl.int32)  # an integer count: fewer instructions than a float sum
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yj = tl.load(Y + b * N + offs_n, mask=offs_n < N, other=-1)
        l2 = _sim(zi, _load_rows(Z, b * N * D, offs_n, N, offs_d, D, DOT_IN), DOT_PREC) * scale
        if COLUMN:
            l2 = l2 - (tl.load(CS + b * N + offs_n, mask=offs_n < N, other=0.0) * log2e)[None, :]
        # yi == yj implies a valid j for a valid i; ignored anchors are zeroed after the loop.
        pos = (yi[:, None] == yj[None, :]) & (offs_m[:, None] != offs_n[None, :])
        f, r = _pos_terms(l2 - log2_neg[:, None], GAMMA_POS, FAST_LOG)
        f_sum += tl.sum(tl.where(pos, f, 0.0), axis=1)
        r_sum += tl.sum(tl.where(pos, r, 0.0), axis=1)
        n_pos += tl.sum(pos.to(tl.int32), axis=1)
    vi = yi >= 0
    f_sum = tl.where(vi, f_sum, 0.0)
    r_sum = tl.where(vi, r_sum, 0.0)
    n_pos = tl.where(vi, n_pos.to(ACC), 0.0)
    u = tl.load(U + b * N + offs_m, mask=row_ok, other=0.0).to(ACC)
    loss = tl.where(n_pos > 0, -u * (f_sum * _scalar(LN2, ACC)) / tl.maximum(n_pos, 1.0), 0.0)
    tl.store(LOSS + b * N + offs_m, loss, mask=row_ok)
    tl.store(R + b * N + offs_m, r_sum, mask=row_ok)
    tl.store(NPOS + b * N + offs_m, n_pos, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _topk_neg_coef(zi, q, ok, Z, CS, base_z, base_row, a_r, ln_safe, D, offs_d, inv_tau, COLUMN: tl.constexpr,
                   TAU: tl.constexpr, GAMMA_NEG: tl.constexpr, ACC: tl.constexpr):
    """For the stored pair (i, q) of each row: g_iq = a_i R_i exp(l_iq - c_q - log_neg_i) *
    bracket(l_iq) (0 where not ok), and the gathered key rows z_q."""
    zq = _gather_rows(Z, base_z, q, ok, offs_d, D, ACC)
    l = tl.sum(zi.to(ACC) * zq, axis=1) * inv_tau
    t = l
    if COLUMN:
        t = l - tl.load(CS + base_row + q, mask=ok, other=0.0)
    g = a_r * tl.exp(t - ln_safe) * _neg_bracket(l, TAU, GAMMA_NEG)
    return tl.where(ok, g, 0.0), zq


@triton.jit
def _dot_coef(g, zj, acc, ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc + g @ zj for coefficients g in ACC and keys zj in DOT_IN. bfloat16 keys: g as the sum
    of two bfloat16 parts (16 significant bits, more than the 11 of TF32) in two native dots,
    whose products are exact in float32, so the key tile is used as loaded (no float32 copy of it
    in registers and shared memory); otherwise zj in ACC (float16's range is too narrow for g)."""
    if DOT_IN == tl.bfloat16:
        g_hi = g.to(tl.bfloat16)
        acc = tl.dot(g_hi, zj, acc)
        acc = tl.dot((g - g_hi.to(ACC)).to(tl.bfloat16), zj, acc)
    else:
        acc += tl.dot(g, zj.to(ACC), input_precision=DOT_PREC)
    return acc


@triton.jit
def fecl_backward_kernel(Z, Y, CS, LOGNEG, R, A, ZT, YT, TOPK, TIDX, GC, DZ, THRESHOLD: tl.float64, N, NT, D, K,
                         TK, COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, TAU: tl.constexpr,
                         GAMMA_POS: tl.constexpr, GAMMA_NEG: tl.constexpr, TEACHER: tl.constexpr,
                         FAST_LOG: tl.constexpr,
                         ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz_i = (1/tau) sum_j (g_ij + g_ji) z_j + teacher terms, row-parallel, no atomics.
    A = grad_loss * u / n_pos (0 without positives); g_ji uses anchor j's statistics."""
    inv_tau, threshold = _scalar(1.0 / TAU, ACC), (THRESHOLD + tl.zeros([], ACC)).to(ACC)
    # The tile loop works in base 2 (see _sigmoid_parts): l log2(e) = dot scale.
    scale, log2e = _scalar(LOG2E / TAU, ACC), _scalar(LOG2E, ACC)
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D)
    vi = yi >= 0
    ln_i = tl.load(LOGNEG + b * N + offs_m, mask=row_ok, other=NEG_INF)
    a_i = tl.load(A + b * N + offs_m, mask=row_ok, other=0.0)
    ar_i = a_i * tl.load(R + b * N + offs_m, mask=row_ok, other=0.0)
    ln_safe_i = tl.where(ln_i == NEG_INF, float("inf"), ln_i)  # no negative: negative terms vanish
    c_i = tl.zeros([BLOCK_M], ACC)
    if COLUMN:
        c_i = tl.load(CS + b * N + offs_m, mask=row_ok, other=0.0)
    ln2_i, c2_i = ln_i * log2e, c_i * log2e
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        yj = tl.load(Y + b * N + offs_n, mask=col_ok, other=-1)
        zj = _load_rows(Z, b * N * D, offs_n, N, offs_d, D, DOT_IN)
        dot = _sim(zi, zj, DOT_PREC)
        l2 = dot * scale
        ln_j = tl.load(LOGNEG + b * N + offs_n, mask=col_ok, other=NEG_INF)
        a_j = tl.load(A + b * N + offs_n, mask=col_ok, other=0.0)
        c_j = tl.zeros([BLOCK_N], ACC)
        if COLUMN:
            c_j = tl.load(CS + b * N + offs_n, mask=col_ok, other=0.0)
        ln2_j, c2_j = ln_j * log2e, c_j * log2e
        # Positives: anchor i with key j (offset c_j), and anchor j with key i (offset c_i).
        pos = vi[:, None] & (yi[:, None] == yj[None, :]) & (offs_m[:, None] != offs_n[None, :])
        d_ij, d_ji = _pos_grads(l2 - c2_j[None, :] - ln2_i[:, None], l2 - c2_i[:, None] - ln2_j[None, :],
                                GAMMA_POS, FAST_LOG)
        g = tl.where(pos, -(a_i[:, None] * d_ij + a_j[None, :] * d_ji), 0.0)
        if not USE_TOPK:
            neg = vi[:, None] & (yj[None, :] >= 0) & (yi[:, None] != yj[None, :])
            ar_j = a_j * tl.load(R + b * N + offs_n, mask=col_ok, other=0.0)
            ln_safe_j = tl.where(ln_j == NEG_INF, float("inf"), ln_j)
            e_ij = tl.exp2(l2 - c2_j[None, :] - (ln_safe_i * log2e)[:, None])
            e_ji = tl.exp2(l2 - c2_i[:, None] - (ln_safe_j * log2e)[None, :])
            g_neg = (ar_i[:, None] * e_ij + ar_j[None, :] * e_ji) * _neg_bracket(dot * inv_tau, TAU, GAMMA_NEG)
            g += tl.where(neg, g_neg, 0.0)
        acc = _dot_coef(g, zj, acc, ACC, DOT_IN, DOT_PREC)
    if USE_TOPK:
        # Row side of the sparse pairs (i, q in H(i)); the key side is fecl_topk_scatter_kernel.
        for slot in range(0, K):
            q = tl.load(TOPK + (b * N + offs_m) * K + slot, mask=row_ok, other=-1)
            g_q, zq = _topk_neg_coef(zi, q, row_ok & (q >= 0), Z, CS, b * N * D, b * N, ar_i, ln_safe_i,
                                     D, offs_d, inv_tau, COLUMN, TAU, GAMMA_NEG, ACC)
            acc += g_q[:, None] * zq
    if TEACHER == 1:
        for slot in range(0, TK):
            k = tl.load(TIDX + (b * N + offs_m) * TK + slot, mask=row_ok, other=-1)
            ok = row_ok & (k >= 0)
            zk = _gather_rows(ZT, b * NT * D, k, ok, offs_d, D, ACC)
            lt = tl.sum(zi.to(ACC) * zk, axis=1) * inv_tau
            acc += tl.where(ok, ar_i * tl.exp(lt - ln_safe_i), 0.0)[:, None] * zk
    acc = acc * inv_tau
    if TEACHER == 2:
        gc = tl.load(GC + b * N + offs_m, mask=row_ok, other=0.0)
        for start_k in range(0, NT, BLOCK_N):
            offs_k = start_k + tl.arange(0, BLOCK_N)
            yk = tl.load(YT + b * NT + offs_k, mask=offs_k < NT, other=-1)
            zk = _load_rows(ZT, b * NT * D, offs_k, NT, offs_d, D, DOT_IN)
            c = _sim(zi, zk, DOT_PREC)
            hit = vi[:, None] & (yk[None, :] >= 0) & (yi[:, None] != yk[None, :]) & (c > threshold)
            # d cross / d c = 1 / (1 - c + eps), 0 where the clamp max(1 - c, 0) is active.
            hit = hit & (1.0 - c > 0.0)
            coef = tl.where(hit, gc[:, None] / (tl.where(hit, 1.0 - c, 1.0) + 1e-18), 0.0)
            acc = _dot_coef(coef, zk, acc, ACC, DOT_IN, DOT_PREC)
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DZ + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], acc.to(DZ.dtype.element_ty),
             mask=mask)


@triton.jit
def fecl_topk_scatter_kernel(Z, CS, LOGNEG, R, A, TOPK, DZ, N, D, K, COLUMN: tl.constexpr,
                             TAU: tl.constexpr, GAMMA_NEG: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """Key side of the sparse top-k pairs: dz_q += g_iq z_i / tau (atomics into DZ, in ACC)."""
    inv_tau = _scalar(1.0 / TAU, ACC)
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    zi = _load_rows(Z, b * N * D, offs_m, N, offs_d, D, ACC)
    ln_i = tl.load(LOGNEG + b * N + offs_m, mask=row_ok, other=NEG_INF)
    ar_i = tl.load(A + b * N + offs_m, mask=row_ok, other=0.0) * tl.load(R + b * N + offs_m, mask=row_ok, other=0.0)
    ln_safe_i = tl.where(ln_i == NEG_INF, float("inf"), ln_i)
    for slot in range(0, K):
        q = tl.load(TOPK + (b * N + offs_m) * K + slot, mask=row_ok, other=-1)
        ok = row_ok & (q >= 0)
        g_q, zq = _topk_neg_coef(zi, q, ok, Z, CS, b * N * D, b * N, ar_i, ln_safe_i,
                                D, offs_d, inv_tau, COLUMN, TAU, GAMMA_NEG, ACC)
        dst = DZ + b * N * D + tl.where(ok, q, 0)[:, None] * D + offs_d[None, :]
        tl.atomic_add(dst, (g_q * inv_tau)[:, None] * zi, mask=ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def compute_dtype(dtype):
    """float64 embeddings are computed in float64, everything else in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_operand_dtype(dtype, on_gpu: bool = True):
    """The dtype of the similarity dots' operands (DOT_IN): float16/bfloat16 embeddings stay in
    their own dtype on the GPU (native tensor-core products, exact in float32 like the TF32 ones of
    their float32 copies, with half the registers and shared memory and no conversion per key
    tile); under the interpreter bfloat16 is computed in float32 (its bfloat16 dot is wrong)."""
    if dtype == torch.float16 or (dtype == torch.bfloat16 and on_gpu):
        return tl.float16 if dtype == torch.float16 else tl.bfloat16
    return compute_dtype(dtype)


def dot_precision(dtype) -> str:
    """float16/bfloat16 values are exact in TF32; float32 follows FP32_DOT_PRECISION."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    if dtype == torch.float32:
        return FP32_DOT_PRECISION
    return "ieee"


MAX_D = 1024
# Tile shapes (BLOCK_M, BLOCK_N), largest first, and pipeline depths tried for each.
TILE_CHOICES = ((64, 64), (64, 32), (32, 32), (32, 16), (16, 16))
STAGE_CHOICES = (3, 2, 1)
# Register budget: the anchor block (BLOCK_M, BLOCK_D) in ACC stays in registers for the gathers,
# at most this many elements per program. Always 4 warps: with 8, the compiled sm_90 backward
# evaluated every element-wise term twice (the two warp groups hold replicated tiles).
MAX_ANCHOR_TILE = 64 * 256
NUM_WARPS = 4


def padded_d(D: int) -> int:
    """BLOCK_D: D padded to a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(D))


def smem_estimate(kind: str, dtype: torch.dtype, bm: int, bn: int, bd: int, stages: int) -> int:
    """Bytes of shared memory a launch needs, an upper bound of what Triton allocates: tl.dot
    stages both operands in ACC (twice for float32's tf32x3, which splits each into a TF32 high
    and low part), the pipeline keeps ``stages - 1`` more key tiles in the input dtype, and the
    backward's second dot (g @ z_j) adds the (BLOCK_M, BLOCK_N) coefficients and the key tile.
    tests/test_fecl_triton.py checks it against the compiled kernels."""
    acc = 8 if dtype == torch.float64 else 4
    split = 2 if dtype == torch.float32 and FP32_DOT_PRECISION == "tf32x3" else 1
    total = (bm + bn) * bd * acc * split + (stages - 1) * bn * bd * torch.empty(0, dtype=dtype).element_size()
    if kind == "backward":
        total += (bn * bd + bm * bn) * acc
    return total


def launch_config(smem_limit: int, dtype: torch.dtype, D: int, kind: str):
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps, num_stages) for the ``kind`` ('forward' or 'backward')
    kernels of one call on a card with ``smem_limit`` bytes of shared memory per block: the
    largest tiles, then the deepest pipeline, whose estimate fits and whose (rows, BLOCK_D) tiles
    stay within the register budget. A pure function, so that the choice is testable without a GPU.
    Raises ValueError for D > MAX_D or when not even 16 x 16 tiles fit."""
    if D > MAX_D:
        raise ValueError(f"fecl (triton): embedding dimension D = {D} is larger than the supported {MAX_D}")
    bd = padded_d(D)
    for bm, bn in TILE_CHOICES:
        if bm * bd > MAX_ANCHOR_TILE:
            continue
        for stages in STAGE_CHOICES:
            if smem_estimate(kind, dtype, bm, bn, bd, stages) <= smem_limit:
                return bm, bn, bd, NUM_WARPS, stages
    need = smem_estimate(kind, dtype, 16, 16, bd, 1)
    raise ValueError(f"fecl (triton): D = {D} with {dtype} embeddings needs {need} bytes of shared memory per "
                     f"block even with 16 x 16 tiles, but this GPU allows {smem_limit}; use float16/bfloat16 "
                     f"embeddings, a smaller D or the 'cuda' backend")


@functools.lru_cache(maxsize=None)
def device_smem_limit(index: int) -> int:
    """The opt-in shared memory per block of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def _tiles(device: torch.device, dtype: torch.dtype, D: int, kind: str, blocks):
    """The launch configuration on ``device``; under the interpreter (CPU tensors) every tile step
    costs time, so 32 x 32 (or ``blocks``, tests), and the compile options do not apply."""
    if device.type != "cuda":
        bm, bn = blocks or (32, 32)
        return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=padded_d(D)), {}
    bm, bn, bd, warps, stages = launch_config(device_smem_limit(device.index), dtype, D, kind)
    if blocks is not None:
        bm, bn = blocks
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd), dict(num_warps=warps, num_stages=stages)


# Triton specialises an integer argument that is a multiple of 16 (tt.divisibility): with N such
# a multiple the row masks are known uniform over 16 rows; any other N compiles other kernels than
# the ones benchmarks/kernel_report.py measures (docs/fecl_kernels.md, "Every N is launched as a
# multiple of 16"). So every call pads N and NT to this multiple.
PAD_N = 16


def launch_n(n: int) -> int:
    """The N (and NT) the kernels are launched with for n patches: n rounded up to PAD_N. The
    padded rows are ignored patches (label -1): no anchor, key, positive or negative."""
    return -(-n // PAD_N) * PAD_N


def _pad_rows(t, n: int, fill):
    """``t`` (B, m, ...) followed by n - m rows of ``fill`` along dimension 1 (``t`` when m = n)."""
    if t.shape[1] == n:
        return t
    return torch.cat([t, t.new_full((t.shape[0], n - t.shape[1], *t.shape[2:]), fill)], dim=1)


def k_pad(k: int) -> int:
    """Register slots of a top-k buffer: k rounded up to a power of two."""
    return triton.next_power_of_2(max(int(k), 1))


class _Launch:
    """What every launch of one call shares: shapes, dtypes, tiles, flags, dummy pointers."""

    def __init__(self, z, y, zt, yt, cfg, blocks, kind):
        if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"fecl (triton): embeddings must be float16/bfloat16/float32/float64, got {z.dtype}")
        if z.dim() != 3 or tuple(y.shape) != tuple(z.shape[:2]):
            raise ValueError(f"fecl (triton): expected z (B, N, D) and y (B, N), "
                             f"got {tuple(z.shape)}, {tuple(y.shape)}")
        teacher = cfg.teacher if cfg.teacher is not None else "none"
        if teacher not in TEACHER_CODES:
            raise ValueError(f"fecl (triton): unknown teacher mode {teacher!r}; choose one of {list(TEACHER_CODES)}")
        self.B, self.n, self.D = z.shape  # n: the caller's patches; N: as launched (launch_n)
        self.N = launch_n(self.n)
        self.device = z.device
        self.stat = torch.float64 if z.dtype == torch.float64 else torch.float32
        self.z, self.y = self.rows(z.contiguous(), 0.0), self.rows(y.contiguous(), -1)
        self.teacher = TEACHER_CODES[teacher]
        self.top_k = int(cfg.top_k or 0)
        self.teacher_k = int(cfg.teacher_top_k) if self.teacher == 1 else 0
        if self.teacher == 1 and self.teacher_k < 1:
            raise ValueError(f"fecl (triton): teacher_top_k must be >= 1 with teacher='topk', got {cfg.teacher_top_k}")
        if self.teacher != 0:
            if zt is None or yt is None:
                raise ValueError("fecl (triton): a teacher mode needs zt and yt")
            self.NT = launch_n(zt.shape[1])
            self.zt = _pad_rows(zt.to(z.dtype).contiguous(), self.NT, 0.0)
            self.yt = _pad_rows(yt.contiguous(), self.NT, -1)
        else:
            self.zt, self.yt, self.NT = self.z, self.y, self.N  # passed, never read
        self.column = bool(cfg.column_shift)
        # Scalars reach the kernels as compile-time constants (no host-to-device copy per call;
        # float64 kernels get them in float64), except the teacher threshold, which the official
        # preset ramps every epoch: a float64 kernel argument.
        self.threshold = float(cfg.teacher_threshold) if self.teacher == 2 else 0.0
        self.scalars = dict(TAU=float(cfg.tau), GAMMA_POS=float(cfg.gamma_pos), GAMMA_NEG=float(cfg.gamma_neg))
        self.fast_log = self.device.type == "cuda"  # see _log; the interpreter has no inline PTX
        self.tiles, self.options = _tiles(self.device, z.dtype, self.D, kind, blocks)
        self.grid = (triton.cdiv(self.N, self.tiles["BLOCK_M"]), self.B)
        self.consts = dict(ACC=compute_dtype(z.dtype), DOT_IN=dot_operand_dtype(z.dtype, self.fast_log),
                           DOT_PREC=dot_precision(z.dtype))
        self.dummy_f = torch.empty(1, device=self.device, dtype=self.stat)  # pointers never read
        self.dummy_i = torch.empty(1, device=self.device, dtype=torch.int64)

    def stat_empty(self, *shape):
        return torch.empty(*shape, device=self.device, dtype=self.stat)

    def rows(self, t, fill):
        """A (B, n, ...) tensor padded to the launch's N rows with ``fill``."""
        return _pad_rows(t, self.N, fill)

    def unpad(self, t):
        """A (B, N, ...) result without the padded rows; unused (0,) outputs as they are."""
        return t[:, :self.n].contiguous() if t.dim() >= 2 and self.N != self.n else t


def fecl_forward(z, y, zt, yt, u, cfg, *, blocks=None):
    """Forward statistics (docs/fecl_kernels.md): returns
    (loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx).

    Unused outputs (``col_shift`` without the column shift, ``cross``/``cross_count`` without the
    threshold teacher, the index tensors) are empty tensors. ``blocks=(BLOCK_M, BLOCK_N)``
    overrides the tile sizes (tests)."""
    s = _Launch(z, y, zt, yt, cfg, blocks, "forward")
    with device_guard(s.device):
        return tuple(map(s.unpad, _forward(s, u)))


def _forward(s, u):
    B, N, NT, D = s.B, s.N, s.NT, s.D
    z, y, zt, yt, grid, opts = s.z, s.y, s.zt, s.yt, s.grid, s.options
    tau, gp, gn = s.scalars["TAU"], s.scalars["GAMMA_POS"], s.scalars["GAMMA_NEG"]
    if s.column:
        col_shift = s.stat_empty(B, N)
        fecl_colshift_kernel[grid](z, y, col_shift, N, D, TAU=tau, **s.consts, **s.tiles, **opts)
    else:
        col_shift = s.stat_empty(0)

    topk_idx = teacher_idx = torch.empty(0, device=s.device, dtype=torch.int64)
    if s.top_k:
        topk_idx = torch.empty(B, N, s.top_k, device=s.device, dtype=torch.int64)
        fecl_topk_kernel[grid](z, y, z, y, topk_idx, N, N, D, s.top_k, **s.consts, K_PAD=k_pad(s.top_k), **s.tiles,
                               **opts)
    if s.teacher_k:
        teacher_idx = torch.empty(B, N, s.teacher_k, device=s.device, dtype=torch.int64)
        fecl_topk_kernel[grid](z, y, zt, yt, teacher_idx, N, NT, D, s.teacher_k, **s.consts,
                               K_PAD=k_pad(s.teacher_k), **s.tiles, **opts)

    log_neg = s.stat_empty(B, N)
    cross = cross_count = s.stat_empty(0)
    if s.teacher == 2:
        cross, cross_count = s.stat_empty(B, N), s.stat_empty(B, N)
    cs = col_shift if s.column else s.dummy_f
    fecl_logneg_kernel[grid](
        z, y, cs, zt, yt, topk_idx if s.top_k else s.dummy_i, teacher_idx if s.teacher_k else s.dummy_i,
        log_neg, cross if s.teacher == 2 else s.dummy_f, cross_count if s.teacher == 2 else s.dummy_f, s.threshold,
        N, NT, D, s.top_k, s.teacher_k, COLUMN=s.column, USE_TOPK=s.top_k > 0, TAU=tau, GAMMA_NEG=gn,
        TEACHER=s.teacher, **s.consts, **s.tiles, **opts)

    if u is None:
        u = torch.ones(B, N, device=s.device, dtype=torch.float32)
    else:
        u = s.rows(u.to(torch.float32).contiguous(), 0.0)
    loss, r, n_pos = s.stat_empty(B, N), s.stat_empty(B, N), s.stat_empty(B, N)
    fecl_positive_kernel[grid](z, y, cs, log_neg, u, loss, r, n_pos, N, D, COLUMN=s.column, TAU=tau, GAMMA_POS=gp,
                               FAST_LOG=s.fast_log, **s.consts, **s.tiles, **opts)
    return loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx


def fecl_backward(grad_loss, grad_cross, z, y, zt, yt, u, log_neg, r, n_pos, col_shift, topk_idx,
                  teacher_idx, cfg, *, blocks=None):
    """dz (z's dtype) from the upstream (B, N) gradients of ``loss`` and ``cross`` and the saved
    statistics; ``grad_cross`` is only read with the threshold teacher (may be None otherwise)."""
    s = _Launch(z, y, zt, yt, cfg, blocks, "backward")
    with device_guard(s.device):
        return s.unpad(_backward(s, grad_loss, grad_cross, u, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx))


def _backward(s, grad_loss, grad_cross, u, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx):
    B, N, NT, D = s.B, s.N, s.NT, s.D
    z, y, zt, yt, grid = s.z, s.y, s.zt, s.yt, s.grid
    # a_i = grad_loss_i u_i / n_pos_i, 0 without positives (invalid anchors have n_pos = 0). The
    # padded rows (_Launch) get the statistics of an ignored patch: no positives, no negatives.
    n_pos = s.rows(n_pos.to(s.stat), 0.0)
    grad = grad_loss.to(s.stat) if u is None else grad_loss.to(s.stat) * u.to(s.stat)
    a = torch.where(n_pos > 0, s.rows(grad, 0.0) / n_pos.clamp_min(1.0),
                    torch.zeros((), device=s.device, dtype=s.stat))
    a = a.contiguous()
    log_neg, r = s.rows(log_neg.to(s.stat), float("-inf")).contiguous(), s.rows(r.to(s.stat), 0.0).contiguous()
    col_shift = s.rows(col_shift.to(s.stat), 0.0).contiguous() if s.column else s.dummy_f
    grad_cross = s.rows(grad_cross.to(s.stat), 0.0).contiguous() if s.teacher == 2 else s.dummy_f
    topk_idx = s.rows(topk_idx, -1).contiguous() if s.top_k else s.dummy_i
    teacher_idx = s.rows(teacher_idx, -1).contiguous() if s.teacher_k else s.dummy_i
    flags = dict(COLUMN=s.column, TAU=s.scalars["TAU"], GAMMA_NEG=s.scalars["GAMMA_NEG"])
    # With top_k the key side of the sparse pairs is added with atomics: accumulate in ACC.
    dz = torch.empty(B, N, D, device=s.device, dtype=s.stat if s.top_k else z.dtype)
    fecl_backward_kernel[grid](z, y, col_shift, log_neg, r, a, zt, yt, topk_idx, teacher_idx, grad_cross, dz,
                               s.threshold, N, NT, D, s.top_k, s.teacher_k, USE_TOPK=s.top_k > 0, TEACHER=s.teacher,
                               GAMMA_POS=s.scalars["GAMMA_POS"], FAST_LOG=s.fast_log, **flags, **s.consts, **s.tiles,
                               **s.options)
    if s.top_k:
        fecl_topk_scatter_kernel[grid](z, col_shift, log_neg, r, a, topk_idx, dz, N, D, s.top_k,
                                       **flags, ACC=s.consts["ACC"], BLOCK_M=s.tiles["BLOCK_M"],
                                       BLOCK_D=s.tiles["BLOCK_D"], **s.options)
        dz = dz.to(z.dtype)
    return dz


# ----------------------------------------------------------------------------------------------
# GPU-compile coverage (tests/triton_aot.py)
# ----------------------------------------------------------------------------------------------

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

# (COLUMN, USE_TOPK, GN_ON, TEACHER) of fecl_logneg_kernel / fecl_backward_kernel; shift = column
# with teacher = topk is rejected by the op (losses.md), so it is never launched.
ALL_FLAGS = [(c, t, g, te) for c in (False, True) for t in (False, True) for g in (False, True) for te in (0, 1, 2)
             if not (c and te == 1)]
COVER_FLAGS = [
    (False, False, True, 1),   # the 'dycon' preset: dense negatives, gamma_neg, teacher top-k
    (True, False, False, 2),   # the 'official' preset: column shift, threshold teacher
    (True, True, True, 2),     # every code path but the teacher top-k
    (False, True, False, 1),
    (False, False, False, 0),
]


def _config(kernel: str, dtype: str, D: int, cc: int = 90, **flags):
    """(kernel, signature, constexprs, options) of one launch on sm_<cc>: runtime arguments in
    order, with the types that fecl_forward/fecl_backward pass (statistics in the compute dtype,
    indices int64), the dispatcher's tiles and compile options, the presets' tau and gamma_pos."""
    tdt = TORCH_DTYPES[dtype]
    st, zp = ("*fp64" if dtype == "fp64" else "*fp32"), f"*{dtype}"
    kind = "backward" if kernel in ("backward", "scatter") else "forward"
    bm, bn, bd, warps, stages = launch_config(SMEM_LIMITS[cc], tdt, D, kind)
    options = dict(num_warps=warps, num_stages=stages)
    acc, prec, dot_in = compute_dtype(tdt), dot_precision(tdt), dot_operand_dtype(tdt)
    tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    gamma_neg = 2.0 if flags.get("GN_ON") or (flags.get("flags") and flags["flags"][2]) else 0.0
    if kernel == "colshift":
        return (fecl_colshift_kernel, dict(Z=zp, Y="*i64", CS=st, N="i32", D="i32"),
                dict(TAU=0.6, ACC=acc, DOT_IN=dot_in, DOT_PREC=prec, **tiles), options)
    if kernel == "topk":
        return (fecl_topk_kernel, dict(Z=zp, Y="*i64", KEYS=zp, KY="*i64", IDX="*i64", N="i32", NK="i32", D="i32",
                                       K="i32"),
                dict(ACC=acc, DOT_IN=dot_in, DOT_PREC=prec, K_PAD=flags["K_PAD"], **tiles), options)
    if kernel == "positive":
        return (fecl_positive_kernel, dict(Z=zp, Y="*i64", CS=st, LOGNEG=st, U="*fp32", LOSS=st, R=st, NPOS=st,
                                           N="i32", D="i32"),
                dict(COLUMN=flags["COLUMN"], TAU=0.6, GAMMA_POS=2.0, FAST_LOG=True, ACC=acc, DOT_IN=dot_in,
                     DOT_PREC=prec, **tiles),
                options)
    if kernel == "scatter":
        return (fecl_topk_scatter_kernel, dict(Z=zp, CS=st, LOGNEG=st, R=st, A=st, TOPK="*i64", DZ=st,
                                               N="i32", D="i32", K="i32"),
                dict(COLUMN=flags["COLUMN"], TAU=0.6, GAMMA_NEG=gamma_neg, ACC=acc, BLOCK_M=bm, BLOCK_D=bd), options)
    column, use_topk, _, teacher = flags["flags"]
    consts = dict(COLUMN=column, USE_TOPK=use_topk, TAU=0.6, GAMMA_NEG=gamma_neg, TEACHER=teacher, ACC=acc,
                  DOT_IN=dot_in, DOT_PREC=prec, **tiles)
    if kernel == "logneg":
        return (fecl_logneg_kernel, dict(Z=zp, Y="*i64", CS=st, ZT=zp, YT="*i64", TOPK="*i64", TIDX="*i64",
                                         LOGNEG=st, CROSS=st, CCOUNT=st, THRESHOLD="fp64", N="i32", NT="i32",
                                         D="i32", K="i32", TK="i32"), consts, options)
    assert kernel == "backward"
    consts = dict(consts, GAMMA_POS=2.0, FAST_LOG=True)
    return (fecl_backward_kernel, dict(Z=zp, Y="*i64", CS=st, LOGNEG=st, R=st, A=st, ZT=zp, YT="*i64",
                                       TOPK="*i64", TIDX="*i64", GC=st, DZ=st if use_topk else zp, THRESHOLD="fp64",
                                       N="i32", NT="i32", D="i32", K="i32", TK="i32"), consts, options)


def _kernel_set(dtype, D, flag_sets, k_pads, cc):
    """The launches of one call for each flag set (shared kernels listed once)."""
    configs = [_config("colshift", dtype, D, cc)] if any(f[0] for f in flag_sets) else []
    configs += [_config("topk", dtype, D, cc, K_PAD=kp) for kp in k_pads]
    configs += [_config("positive", dtype, D, cc, COLUMN=c) for c in sorted({f[0] for f in flag_sets})]
    scatter_flags = sorted({(f[0], f[2]) for f in flag_sets if f[1]})
    configs += [_config("scatter", dtype, D, cc, COLUMN=c, GN_ON=g) for c, g in scatter_flags]
    for f in flag_sets:
        configs += [_config("logneg", dtype, D, cc, flags=f), _config("backward", dtype, D, cc, flags=f)]
    return configs


def _fits(dtype: str, D: int, cc: int) -> bool:
    """Whether the dispatcher accepts (dtype, D) on sm_<cc> (the backward needs the most)."""
    try:
        launch_config(SMEM_LIMITS[cc], TORCH_DTYPES[dtype], D, "backward")
        return True
    except ValueError:
        return False


def launch_configs(full: bool = False, cc: int = 90):
    """(kernel, signature, constexprs, options) of the launches of fecl_forward/fecl_backward on
    sm_<cc>, for tests/triton_aot.py (a GPU compile of each catches what the interpreter accepts).

    ``full=True``: every launched combination for float32/float16/bfloat16/float64, the tiles of
    D in {16, 32, ..., 1024} that the dispatcher accepts on this card, K_PAD in {1, ..., 64} and
    every flag set (thousands of configs, hours of compiling: ptxas takes seconds per kernel).
    Default: a covering set (~30 configs) in which every kernel, dtype and code path appears: at
    D = 64 every kernel for float32 (every flag set of the forward; for the backward both presets
    and the all-on set, which contain the other sets' code), the presets and the all-on set for
    bfloat16/float64, the 'dycon' preset for float16; other tile shapes (D = 16, 128, 512 where
    accepted) for bfloat16."""
    if full:
        configs = []
        for dtype in TORCH_DTYPES:
            for D in (16, 32, 64, 128, 256, 512, 1024):
                if _fits(dtype, D, cc):
                    configs += _kernel_set(dtype, D, ALL_FLAGS, (1, 2, 4, 8, 16, 32, 64), cc)
        return configs
    dycon, official, all_on = COVER_FLAGS[:3]
    configs = [_config("colshift", "fp32", 64, cc), _config("topk", "fp32", 64, cc, K_PAD=1),
               _config("topk", "fp32", 64, cc, K_PAD=32), _config("positive", "fp32", 64, cc, COLUMN=True),
               _config("scatter", "fp32", 64, cc, COLUMN=True, GN_ON=True)]
    configs += [_config("logneg", "fp32", 64, cc, flags=f) for f in COVER_FLAGS]
    configs += [_config("backward", "fp32", 64, cc, flags=f) for f in (dycon, official, all_on)]
    for dtype in ("bf16", "fp64"):
        configs += [_config("topk", dtype, 64, cc, K_PAD=32), _config("positive", dtype, 64, cc, COLUMN=True),
                    _config("scatter", dtype, 64, cc, COLUMN=True, GN_ON=True),
                    _config("logneg", dtype, 64, cc, flags=all_on),
                    _config("backward", dtype, 64, cc, flags=dycon), _config("backward", dtype, 64, cc, flags=all_on)]
    configs += [_config("logneg", "fp16", 64, cc, flags=dycon), _config("backward", "fp16", 64, cc, flags=dycon)]
    for D in (16, 128, 512):
        if _fits("bf16", D, cc):
            configs += [_config("topk", "bf16", D, cc, K_PAD=32), _config("backward", "bf16", D, cc, flags=dycon)]
    return configs


def fit_configs(cc: int, full: bool = False):
    """For tests/triton_aot.py --fit: ``(kernel, signature, constexprs, options, bounds)`` on
    sm_<cc>. Shared memory: the kernels that need the most (column shift, the all-on log-neg and
    backward) at the configurations the dispatcher returns for (dtype, D), bounded by the card's
    limit and by the dispatcher's own estimate; by default float32/bfloat16 at D = 256 and at the
    largest D accepted (the tightest fits), ``full``: every dtype and D in {16, ..., 1024}.
    (Spills are not bounded: the kernels at D = 256 spill; benchmarks/kernel_report.py lists them.)"""
    dtypes = list(TORCH_DTYPES) if full else ["fp32", "bf16"]
    out = []
    for dtype in dtypes:
        dims = [D for D in (16, 32, 64, 128, 256, 512, 1024) if _fits(dtype, D, cc)]
        for D in (dims if full else sorted({256, dims[-1]} & set(dims))):
            for kernel, flags in (("colshift", {}), ("logneg", dict(flags=COVER_FLAGS[2])),
                                  ("backward", dict(flags=COVER_FLAGS[2]))):
                fn, sig, ce, opts = _config(kernel, dtype, D, cc, **flags)
                kind = "backward" if kernel == "backward" else "forward"
                estimate = smem_estimate(kind, TORCH_DTYPES[dtype], ce["BLOCK_M"], ce["BLOCK_N"], ce["BLOCK_D"],
                                         opts["num_stages"])
                out.append((fn, sig, ce, opts, dict(smem=SMEM_LIMITS[cc], smem_estimate=estimate)))
    return out


# The flags (COLUMN, USE_TOPK is per case, GN_ON, TEACHER) of the two presets
# (dycon_kernels/presets.py) and their teacher top-k: what benchmarks/kernel_report.py compiles.
PRESET_FLAGS = {"dycon": (False, True, 1), "official": (True, False, 2)}
PRESET_TEACHER_K = {"dycon": 32, "official": 0}


def report_configs(dtype: str, D: int, preset: str, top_k: int, cc: int):
    """The launches of one forward + backward call of ``preset`` with ``top_k`` (0 = dense) on
    sm_<cc>: ``(name, kernel, signature, constexprs, options)``; [] when the dispatcher refuses
    (dtype, D) on that card."""
    if not _fits(dtype, D, cc):
        return []
    column, gn_on, teacher = PRESET_FLAGS[preset]
    flags = (column, top_k > 0, gn_on, teacher)
    launches = []
    if column:
        launches.append(("colshift", _config("colshift", dtype, D, cc)))
    if top_k:
        launches.append(("topk", _config("topk", dtype, D, cc, K_PAD=k_pad(top_k))))
    if PRESET_TEACHER_K[preset]:
        launches.append(("topk_teacher", _config("topk", dtype, D, cc, K_PAD=k_pad(PRESET_TEACHER_K[preset]))))
    launches += [("logneg", _config("logneg", dtype, D, cc, flags=flags)),
                 ("positive", _config("positive", dtype, D, cc, COLUMN=column)),
                 ("backward", _config("backward", dtype, D, cc, flags=flags))]
    if top_k:
        launches.append(("scatter", _config("scatter", dtype, D, cc, COLUMN=column, GN_ON=gn_on)))
    return [(name, *config) for name, config in launches]
