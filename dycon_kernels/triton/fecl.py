"""FeCL in Triton: streaming kernels in the style of the fused-attention tutorial.

The algorithm and the entry-point contract are ``docs/fecl_kernels.md``. Every kernel is launched
on a grid ``(cdiv(N, BLOCK_M), B)`` (the backward's pair steps: per step, see below): one program
owns a block of ``BLOCK_M`` anchors of one volume, loads their embeddings once and loops over key
tiles of ``BLOCK_N`` keys, computing similarity tiles with ``tl.dot``. The forward writes only
per-anchor statistics; nothing of size ``N x N`` exists (the backward's slabs hold N x SUPER
coefficients, SUPER <= 512).

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
   ``loss``, ``r`` (``n_pos`` from the sorted labels, ``positive_counts``).

Backward:

- The dense pairs (positives and, without top_k, dense negatives; their coefficient
  ``g_ij + g_ji`` from both anchors' saved statistics, the matrix being symmetric; the two
  directions share one reciprocal, ``_pos_grads``), each evaluated once, in a fixed schedule
  over super-blocks of ``GROUP`` anchor blocks (``schedule_group``; docs/fecl_kernels.md,
  "Gradient"): ``fecl_backward_kernel`` (step 0) takes the pairs within each super-block, both
  directions, and the threshold-teacher terms, and writes dz; each step s = 1..nsb // 2 pairs
  super-block p with p + s (mod nsb) in two launches: ``fecl_backward_pairs_kernel`` computes
  the coefficients once, keeps the row side ``g @ z_q`` in registers and stores ``g`` to a slab,
  ``fecl_backward_keys_kernel`` adds the row side and the key side ``g^T @ z_p`` (a GEMM over the
  slab) to dz. Every element of dz has one writer per launch and the launches run in order on
  one stream: no atomics, the same bits run to run. A float32 accumulator (``BLOCK_M`` x
  ``BLOCK_DC``) bounds the registers: a D wider than the budget is split over programs (grid
  axis 2).
- With top_k or the teacher top-k, the sparse pairs: ``fecl_sparse_coef_kernel`` computes their
  coefficients ``g / tau`` once per stored index (gathered dots over D in chunks);
  ``fecl_sparse_rows_kernel`` adds to its own rows, per D chunk of ``BLOCK_DG`` columns (grid
  axis 2), the row side ``dz_i += sum G_iq z_q`` (and the teacher's) and the key side
  ``dz_q += sum G_iq z_i`` read through the transposed top-k index (``_transposed_topk``), into a
  float32/float64 buffer. No atomics anywhere: every output element is written by one program in
  a fixed order, so the backward is deterministic.

D is tiled wherever a (rows, D) block would otherwise sit in registers: the similarity dots take
D in chunks of ``BLOCK_DK`` (``_sim_tile``) unless the anchor block fits the register budget
whole, the gathers in chunks of ``BLOCK_DG`` (``_gather_dot``); ``launch_config`` chooses them.

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
from typing import NamedTuple

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
def _load_rows(P, base, rows, n_rows, offs_d, D, ACC: tl.constexpr, EVEN: tl.constexpr = False):
    """(len(rows), BLOCK_D) embeddings of rows ``rows`` of a (n_rows, D) matrix at P + base, in ACC;
    rows past n_rows and columns past D load as zeros (harmless in the dots, never stored).
    EVEN: the caller knows every row and column within the matrix, unmasked."""
    ptrs = P + base + rows[:, None].to(tl.int64) * D + offs_d[None, :]
    if EVEN:
        t = tl.load(ptrs)
    else:
        t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < D), other=0.0)
    return t.to(ACC)


@triton.jit
def _load_tile(P, vol_rows, start, n_rows, offs_d, D, ACC: tl.constexpr, BLOCK: tl.constexpr,
               EVEN: tl.constexpr = False):
    """Rows start .. start + BLOCK - 1 of a volume's (n_rows, D) matrix that begins at row vol_rows
    of P, as _load_rows loads them: the tile's offset is one 64-bit scalar per tile and the
    offsets within it do not depend on ``start``, so a loop over tiles keeps them (hoisted)
    instead of recomputing a 64-bit row offset per loaded vector (2.2 instructions per pair in
    the top-k pass on sm_90, 2.6 in the positive pass). EVEN: the caller knows the tile within
    the matrix (see tiles_even), and the load is unmasked."""
    rows = tl.arange(0, BLOCK)
    within = rows[:, None].to(tl.int64) * D + offs_d[None, :]
    if EVEN:
        t = tl.load(P + (vol_rows + start) * D + within)
    else:
        mask = ((start + rows) < n_rows)[:, None] & (offs_d[None, :] < D)
        t = tl.load(P + (vol_rows + start) * D + within, mask=mask, other=0.0)
    return t.to(ACC)


@triton.jit
def _load_labels(Y, base, offs, n, EVEN: tl.constexpr = False):
    """Labels of rows ``offs`` of a volume at Y + base, -1 past n, as int32 (class indices and -1):
    a label comparison per pair is then one 32-bit compare, not a 64-bit one's two. EVEN: every
    offs < n (tiles_even), unmasked."""
    if EVEN:
        y = tl.load(Y + base + offs)
    else:
        y = tl.load(Y + base + offs, mask=offs < n, other=-1)
    return y.to(tl.int32)


@triton.jit
def _anchor_block(Y, Z, N, D, DOT_IN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_DK: tl.constexpr):
    """This program's volume b and anchor block: offsets, row mask, labels (-1 past N) and, when
    the similarity dots take D whole (BLOCK_DK == BLOCK_D), the embeddings (BLOCK_M, BLOCK_D) in
    DOT_IN (the dtype of the dots' operands), loaded once; with D in chunks (_sim_tile) the
    anchors' chunks are loaded per key tile instead and ``zi`` is a placeholder."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    yi, zi = _anchor_rows(Y, Z, b, offs_m, N, D, DOT_IN, BLOCK_D, BLOCK_DK)
    return b, offs_m, offs_m < N, yi, zi


@triton.jit
def _anchor_rows(Y, Z, b, offs_m, N, D, DOT_IN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr):
    """Labels (int32, -1 past N) and, when held (see _anchor_block), embeddings of anchors offs_m."""
    yi = _load_labels(Y, b * N, offs_m, N)
    if BLOCK_DK == BLOCK_D:
        zi = _load_rows(Z, b * N * D, offs_m, N, tl.arange(0, BLOCK_D), D, DOT_IN)
    else:
        zi = 0
    return yi, zi


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
def _key_tile(KEYS, k_rows, start, NK, offs_d, D, DOT_IN: tl.constexpr, BLOCK_N: tl.constexpr,
              HOISTED: tl.constexpr, EVEN: tl.constexpr = False):
    """Key rows start .. start + BLOCK_N - 1 (of the volume at row k_rows of KEYS), columns offs_d:
    with HOISTED from one offset per tile (_load_tile, the forward's loops), else with a row
    offset per loaded vector (_load_rows: the backward's kernels, at 255 registers, spilled with
    the hoisted offsets held: bfloat16 8 bytes on sm_80, float32 `official` 176-592 bytes);
    EVEN: unmasked (tiles_even, pair_tiles_even)."""
    if HOISTED:
        t = _load_tile(KEYS, k_rows, start, NK, offs_d, D, DOT_IN, BLOCK_N, EVEN)
    else:
        t = _load_rows(KEYS, k_rows * D, start + tl.arange(0, BLOCK_N), NK, offs_d, D, DOT_IN, EVEN)
    return t


@triton.jit
def _sim_tile(Z, z_base, offs_m, N, zi, KEYS, k_rows, start_n, NK, D, ACC: tl.constexpr, DOT_IN: tl.constexpr,
              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              BLOCK_DK: tl.constexpr, HOISTED: tl.constexpr, EVEN: tl.constexpr = False):
    """<z_i, key_j> for the (BLOCK_M, BLOCK_N) tile of anchors offs_m (rows of Z at z_base) and keys
    start_n .. start_n + BLOCK_N - 1 (of the volume starting at row k_rows of KEYS; _key_tile): one
    dot with the anchor block ``zi`` held across key tiles when BLOCK_DK == BLOCK_D, else a loop
    over D in chunks of BLOCK_DK that loads both operands per chunk (shared memory and registers
    then scale with BLOCK_DK, not D). EVEN: the key tiles unmasked (tiles_even)."""
    if BLOCK_DK == BLOCK_D:
        s = _sim(zi, _key_tile(KEYS, k_rows, start_n, NK, tl.arange(0, BLOCK_D), D, DOT_IN, BLOCK_N, HOISTED, EVEN),
                 DOT_PREC)
    else:
        s = tl.zeros([BLOCK_M, BLOCK_N], ACC)
        for d0 in range(0, D, BLOCK_DK):
            offs_d = d0 + tl.arange(0, BLOCK_DK)
            s = tl.dot(_load_rows(Z, z_base, offs_m, N, offs_d, D, DOT_IN),
                       tl.trans(_key_tile(KEYS, k_rows, start_n, NK, offs_d, D, DOT_IN, BLOCK_N, HOISTED, EVEN)), s,
                       input_precision=DOT_PREC)
    return s


@triton.jit
def _gather_dot(Z, z_base, offs_m, KEYS, k_base, idx, ok, D, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_DG: tl.constexpr):
    """<z_i, key_idx_i> for each anchor row i of offs_m and its gathered key row idx_i (0 where not
    ``ok``), over D in chunks of BLOCK_DG: no (rows, D) block is held in registers. The products
    accumulate per element and the row is reduced once after the chunks (a reduction across the
    threads per chunk cost ~12 of its ~100 warp instructions on sm_90)."""
    prods = tl.zeros([BLOCK_M, BLOCK_DG], ACC)
    for d0 in range(0, D, BLOCK_DG):
        offs_d = d0 + tl.arange(0, BLOCK_DG)
        zi = _gather_rows(Z, z_base, offs_m, ok, offs_d, D, ACC)
        prods += zi * _gather_rows(KEYS, k_base, idx, ok, offs_d, D, ACC)
    return tl.sum(prods, axis=1)


@triton.jit
def _selected_sim(IDX, SIMS, Z, KEYS, b, N, NK, D, K, slot, offs_m, row_ok, STORED: tl.constexpr,
                  ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DG: tl.constexpr):
    """For slot ``slot`` of each anchor row's stored top-k (IDX (B, N, K), keys of KEYS (B, NK, D)):
    whether it holds a key q (-1: none), q, and <z_i, key_q>: with STORED the similarity the top-k
    pass stored next to the index (SIMS, to its packed key's resolution: _bucket_value), else a
    gather of the key's row over D in chunks (_gather_dot)."""
    q = tl.load(IDX + (b * N + offs_m) * K + slot, mask=row_ok, other=-1)
    ok = row_ok & (q >= 0)
    if STORED:
        sim = tl.load(SIMS + (b * N + offs_m) * K + slot, mask=ok, other=0.0)
    else:
        sim = _gather_dot(Z, b * N * D, offs_m, KEYS, b * NK * D, q, ok, D, ACC, BLOCK_M, BLOCK_DG)
    return ok, q, sim


@triton.jit
def _stored_pair_logit(TOPK, SIMS, CS, Z, b, N, D, K, slot, offs_m, row_ok, inv_tau, COLUMN: tl.constexpr,
                       STORED: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DG: tl.constexpr):
    """For the top-k slot of each anchor row: whether it holds a key q (-1: none), the logit
    l_iq = <z_i, z_q> / tau (_selected_sim) and t_iq = l_iq - c_q (with COLUMN; else l_iq)."""
    ok, q, sim = _selected_sim(TOPK, SIMS, Z, Z, b, N, N, D, K, slot, offs_m, row_ok, STORED, ACC, BLOCK_M, BLOCK_DG)
    l = sim * inv_tau
    t = l
    if COLUMN:
        t = l - tl.load(CS + b * N + q, mask=ok, other=0.0)
    return ok, l, t


@triton.jit
def _sims_and_key_cols(Z, z_base, offs_m, N, zi, KEYS, k_rows, start_k, NK, offs_dc, D, WHOLE_D: tl.constexpr,
                       ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                       EVEN: tl.constexpr = False):
    """The backward's key tile: the similarities of the anchor rows offs_m with the key rows
    start_k .. start_k + BLOCK_N - 1 (of the volume at row k_rows of KEYS), and those rows'
    columns offs_dc (the operand of coefficients @ z_k). Where the dots and the columns both span
    all of D (WHOLE_D), one load serves both; else the dots run over D in chunks. EVEN: the key
    rows' loads unmasked (pair_tiles_even)."""
    if WHOLE_D:
        zk = _key_tile(KEYS, k_rows, start_k, NK, offs_dc, D, DOT_IN, BLOCK_N, False, EVEN)
        sims = _sim(zi, zk, DOT_PREC)
    else:
        sims = _sim_tile(Z, z_base, offs_m, N, zi, KEYS, k_rows, start_k, NK, D, ACC, DOT_IN, DOT_PREC, BLOCK_M,
                         BLOCK_N, BLOCK_D, BLOCK_DK, False)
        zk = _key_tile(KEYS, k_rows, start_k, NK, offs_dc, D, DOT_IN, BLOCK_N, False, EVEN)
    return sims, zk


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
def _log2(x, FAST_MATH: tl.constexpr):
    """log2; with FAST_MATH (GPU, float32) the hardware lg2.approx (one MUFU op, absolute error
    ~1e-7 on [0.5, 2]) instead of libdevice's (~20 instructions). The interpreter has no inline
    PTX, so CPU runs take tl.log2."""
    if FAST_MATH and x.dtype == tl.float32:
        y = tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = tl.log2(x)
    return y


@triton.jit
def _recip(x, FAST_MATH: tl.constexpr):
    """1 / x for x in [1, 4] (the sigmoid's 1 + a and products of two of them); with FAST_MATH
    (GPU, float32) the hardware rcp.approx (one MUFU op, at most 1 ulp off) instead of the
    full-range division's 6 instructions (a range test, a scaling and a select around the same
    MUFU.RCP, which [1, 4] never needs)."""
    if FAST_MATH and x.dtype == tl.float32:
        y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True,
                                      pack=1)
    else:
        y = 1.0 / x
    return y


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


# The positive terms work in base 2: x2 = x log2(e), with log2(e)/tau folded into the scale of the
# similarity tile and log2(e) into the per-anchor statistics, so that exp and log are the
# hardware's exp2/lg2 without a multiplication per element; ln 2 is folded into the constants.

@triton.jit
def _sigmoid_parts(x2, a, inv_u, FAST_MATH: tl.constexpr):
    """S = sigmoid(x) for x = x2 ln 2, from a = 2^-|x2| and inv_u = 1 / (1 + a): S and 1 - S (1/u
    and a/u, which is which: the sign of x), log2 S = -(max(-x2, 0) + log2(1 + a)) and
    log2(1 + a). log2(1 + a) is log2(u) corrected by (a - (u - 1)) / ln 2, the part of a lost
    in rounding u (exact to first order, so tiny a keep their relative accuracy); finite for any
    x (x = +inf: S = 1, 1 - S = 0, log S = 0, so every term of the pair is 0)."""
    u = 1.0 + a
    # a - (u - 1) is exactly the rounding error e of u (|e| <= ulp(u) / 2) and ln(1 + a) =
    # ln(u) + ln(1 + e / u); taking e for e / u errs by e a / u <= 2^-24 a: relative 2^-24 of
    # log2(1 + a) ~ a log2(e), so no division by u is needed here.
    log1p_a = _log2(u, FAST_MATH) + (a - (u - 1.0)) * _scalar(LOG2E, a.dtype)
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
def _pos_terms(x2, GAMMA_POS: tl.constexpr, FAST_MATH: tl.constexpr):
    """For S = sigmoid(x), x = x2 ln 2: f / ln 2 = (1 - S)^gp log2 S (the caller multiplies the
    sum by ln 2) and f'(S) S (1 - S), from one exp2, one log2 and one reciprocal."""
    a = tl.exp2(-tl.abs(x2))  # in (0, 1]
    s, one_ms, log2_s, log1p_a = _sigmoid_parts(x2, a, _recip(1.0 + a, FAST_MATH), FAST_MATH)
    pw, d = _pos_coef(x2, s, one_ms, log2_s, log1p_a, GAMMA_POS)
    return pw * log2_s, d


@triton.jit
def _pos_grads(x2_ij, x2_ji, GAMMA_POS: tl.constexpr, FAST_MATH: tl.constexpr):
    """f'(S) S (1 - S) for the two directions of a pair (anchor i with key j and anchor j with key
    i), from two exp2, two log2 and one reciprocal: 1/u_ij = u_ji / (u_ij u_ji) (both u in [1, 2],
    so the product cannot overflow)."""
    a_ij = tl.exp2(-tl.abs(x2_ij))
    a_ji = tl.exp2(-tl.abs(x2_ji))
    u_ij = 1.0 + a_ij
    u_ji = 1.0 + a_ji
    inv = _recip(u_ij * u_ji, FAST_MATH)
    s, one_ms, log2_s, log1p_a = _sigmoid_parts(x2_ij, a_ij, u_ji * inv, FAST_MATH)
    _, d_ij = _pos_coef(x2_ij, s, one_ms, log2_s, log1p_a, GAMMA_POS)
    s, one_ms, log2_s, log1p_a = _sigmoid_parts(x2_ji, a_ji, u_ij * inv, FAST_MATH)
    _, d_ji = _pos_coef(x2_ji, s, one_ms, log2_s, log1p_a, GAMMA_POS)
    return d_ij, d_ji


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def fecl_colshift_kernel(Z, Y, CS, N, D, TAU: tl.constexpr, ACC: tl.constexpr, DOT_IN: tl.constexpr,
                         DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr):
    """Pass 1: c_i = max(0, max_{valid j != i} l_ij) for valid i (0 for invalid i)."""
    inv_tau = _scalar(1.0 / TAU, ACC)
    b, offs_m, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D, BLOCK_DK)
    c = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yj = _load_labels(Y, b * N, offs_n, N)
        l = _sim_tile(Z, b * N * D, offs_m, N, zi, Z, b * N, start_n, N, D, ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N,
                      BLOCK_D, BLOCK_DK, True) * inv_tau
        pair = (yi[:, None] >= 0) & (yj[None, :] >= 0) & (offs_m[:, None] != offs_n[None, :])
        c = tl.maximum(c, tl.max(tl.where(pair, l, 0.0), axis=1))
    tl.store(CS + b * N + offs_m, c, mask=offs_m < N)


@triton.jit
def _insert_low(bits, low_bits, LOW: tl.constexpr, FAST_MATH: tl.constexpr):
    """(bits & ~LOW) | low_bits; on the GPU (32 bits) as the one logic operation it is: ptxas
    emits the AND and the OR apart (1 instruction per pair more in the top-k passes)."""
    if FAST_MATH and bits.dtype == tl.int32:
        t = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                      [bits, tl.full(bits.shape, ~LOW, tl.int32), low_bits], dtype=tl.int32,
                                      is_pure=True, pack=1)
    else:
        t = (bits & ~LOW) | low_bits
    return t


@triton.jit
def _packed_keys(s, low_bits, ACC: tl.constexpr, LOW: tl.constexpr, FAST_MATH: tl.constexpr):
    """Integers whose signed order is the float order of ``s`` to within its low bits LOW, which
    are ``low_bits`` instead: s's bits with the low bits replaced, then the magnitude bits above
    them flipped where negative. A ``low_bits`` with every bit above LOW set gives the lowest
    key (the sign bit alone, plus the low bits) whatever s is."""
    IT: tl.constexpr = tl.int64 if ACC == tl.float64 else tl.int32
    SIGN: tl.constexpr = IT.primitive_bitwidth - 1
    t = _insert_low(s.to(IT, bitcast=True), low_bits, LOW, FAST_MATH)
    return t ^ ((t >> SIGN) & (((1 << SIGN) - 1) & ~LOW))


@triton.jit
def _bucket_value(key, ACC: tl.constexpr, LOW: tl.constexpr):
    """The float a packed key (_packed_keys) stands for: the middle of its bucket, the floats
    that agree with it above the low bits LOW (within 2^-18 relative of each for float32 and
    6 low bits: docs/fecl_kernels.md, "What the stored similarities change")."""
    IT: tl.constexpr = tl.int64 if ACC == tl.float64 else tl.int32
    SIGN: tl.constexpr = IT.primitive_bitwidth - 1
    t = key ^ ((key >> SIGN) & (((1 << SIGN) - 1) & ~LOW))  # the flip is its own inverse
    return ((t & ~LOW) | ((LOW + 1) // 2)).to(ACC, bitcast=True)


@triton.jit
def fecl_topk_kernel(Z, Y, KEYS, KY, IDX, SIMS, N, NK, D, K, FAST_MATH: tl.constexpr, ACC: tl.constexpr,
                     DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, K_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr, EVEN: tl.constexpr,
                     STORE_SIMS: tl.constexpr):
    """Pass 2: the K keys q (of KEYS, (B, NK, D), labels KY) with ky_q >= 0, ky_q != y_i and the
    largest <z_i, key_q>, for each anchor i -> IDX (B, N, K) int64, sorted descending, -1 padded.
    Used for the student negatives (KEYS = Z) and for the teacher top-k (KEYS = ZT).

    Similarities are compared as packed keys (docs/fecl_kernels.md, "Per-pair arithmetic"): the
    similarity's order-preserving integer with its low bits LOW replaced by the tile column (tile
    values) or by the buffer slot (buffer values), so that a row's maximum or minimum and where
    it is are one integer reduction, every packed value of a row being distinct. Values closer
    than the low bits (2^-17 relative for float32 at 64 columns) compare equal, and among them
    the column or the slot decides. With STORE_SIMS the similarity each selected key's packed key
    stands for (_bucket_value) goes to SIMS (B, N, K) next to its index, for the log-neg pass and
    the sparse coefficients (16-bit embeddings: stored_sims); else they recompute it from the
    embeddings and the packing only selects and orders."""
    IT: tl.constexpr = tl.int64 if ACC == tl.float64 else tl.int32  # keys: signed, of ACC's width
    UT: tl.constexpr = tl.uint64 if ACC == tl.float64 else tl.uint32
    SIGN: tl.constexpr = IT.primitive_bitwidth - 1
    LOW: tl.constexpr = (BLOCK_N - 1) | (K_PAD - 1)  # both powers of two
    b, offs_m, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D, BLOCK_DK)
    offs_k = tl.arange(0, K_PAD)
    cols = tl.arange(0, BLOCK_N).to(IT)
    lowest = tl.full([], -(1 << SIGN), IT)  # the sign bit alone: below every float's key
    # Unsorted running top-k: slots past K hold the highest key so that they are never the
    # minimum; so do all slots of an ignored anchor, which then takes no key (its row stays -1).
    # Validity is thus per row and per column, not tested per pair.
    open_slot = (offs_k[None, :] < K) & (yi[:, None] >= 0)
    vals = tl.where(open_slot, lowest, ~lowest & ~LOW) | offs_k[None, :].to(IT)
    idx = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yk = _load_labels(KY, b * NK, offs_n, NK, EVEN)
        s = _sim_tile(Z, b * N * D, offs_m, N, zi, KEYS, b * NK, start_n, NK, D, ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N,
                      BLOCK_D, BLOCK_DK, True, EVEN)
        # Candidates: valid keys (an invalid key's column bits give the lowest key, a select per
        # column, not per pair) with another label than the anchor's (the rest the lowest key).
        key = _packed_keys(s, tl.where(yk >= 0, cols, cols | ~LOW)[None, :], ACC, LOW, FAST_MATH)
        key = tl.where(yi[:, None] != yk[None, :], key, lowest)
        # Rounds needed: per row, how many tile values beat the current k-th value (<= K), the
        # low bits aside. A round takes each row's next value below the previous round's (prev),
        # without removing anything: the largest key < prev is prev - 1 - d for the smallest
        # d = prev - 1 - key taken as unsigned (the keys >= prev wrap above every key < prev), a
        # subtraction and a minimum per value instead of a maximum, a compare and a select. It
        # enters where it beats the row's worst (of two values that compare equal the one held
        # stays); equal values are all inserted in turn, and which of two keys tied at the k-th
        # value is kept is unspecified, as for torch.topk.
        n_better = tl.sum((key > (tl.min(vals, axis=1) | LOW)[:, None]).to(tl.int32), axis=1)
        prev = tl.full([BLOCK_M], -1, IT) ^ lowest  # the highest key
        for rnd in range(0, tl.max(tl.minimum(n_better, K), axis=0)):
            gap = tl.min((prev[:, None] - 1 - key).to(UT, bitcast=True), axis=1)
            found = gap <= (prev - 1 - lowest).to(UT, bitcast=True)  # no key below prev: only with NaN keys
            best = prev - 1 - gap.to(IT, bitcast=True)
            worst = tl.min(vals, axis=1)
            put = (found & (best > (worst | LOW)))[:, None] & (vals == worst[:, None])
            vals = tl.where(put, ((best & ~LOW) | (worst & LOW))[:, None], vals)
            idx = tl.where(put, (start_n + (best & LOW).to(tl.int32))[:, None], idx)
            prev = tl.where(found, tl.maximum(best, lowest + 1), prev)
    # Sort the buffer descending; slots without a key (idx < 0) take the lowest key and come last
    # (a real entry's key is above it and distinct, so the maximum is one slot until only those
    # are left, whose indices are all -1).
    vals = tl.where(idx >= 0, vals, lowest)
    out = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
    out_keys = tl.full([BLOCK_M, K_PAD], lowest, IT)
    for r in range(0, K):
        top = tl.max(vals, axis=1)
        at_top = vals == top[:, None]
        out = tl.where(offs_k[None, :] == r, tl.max(tl.where(at_top, idx, -1), axis=1)[:, None], out)
        if STORE_SIMS:
            out_keys = tl.where(offs_k[None, :] == r, top[:, None], out_keys)
        vals = tl.where(at_top, lowest, vals)
        idx = tl.where(at_top, -1, idx)
    mask = (offs_m[:, None] < N) & (offs_k[None, :] < K)
    out_at = (b * N + offs_m[:, None]) * K + offs_k[None, :]
    tl.store(IDX + out_at, out.to(tl.int64), mask=mask)
    if STORE_SIMS:
        tl.store(SIMS + out_at, _bucket_value(out_keys, ACC, LOW), mask=mask)


@triton.jit
def fecl_logneg_kernel(Z, Y, CS, ZT, YT, TOPK, TIDX, SIMS, TSIMS, LOGNEG, CROSS, CCOUNT, THRESHOLD: tl.float64, N,
                       NT, D, K, TK, COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, TAU: tl.constexpr,
                       GAMMA_NEG: tl.constexpr, TEACHER: tl.constexpr, STORED_SIMS: tl.constexpr,
                       ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DG: tl.constexpr):
    """Pass 3: log Neg_i = log(sum_{q in H(i)} w_iq exp(l_iq - c_q) + sum_{k in T(i)} exp(l^t_ik))
    (-inf without negatives); with TEACHER == 2, cross_i and cross_count_i. The stored pairs'
    similarities: SIMS / TSIMS with STORED_SIMS, else gathers (_selected_sim)."""
    inv_tau, threshold = _scalar(1.0 / TAU, ACC), (THRESHOLD + tl.zeros([], ACC)).to(ACC)
    b, offs_m, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D, BLOCK_DK)
    vi = yi >= 0
    m = tl.full([BLOCK_M], NEG_INF, ACC)
    s = tl.zeros([BLOCK_M], ACC)
    if USE_TOPK:
        # H(i) from the stored indices, one slot of each anchor at a time.
        for slot in range(0, K):
            ok, l, t = _stored_pair_logit(TOPK, SIMS, CS, Z, b, N, D, K, slot, offs_m, row_ok, inv_tau, COLUMN,
                                          STORED_SIMS, ACC, BLOCK_M, BLOCK_DG)
            t = tl.where(ok, t, NEG_INF)
            m, s = _lse_update(m, s, t[:, None], _neg_weight(l, TAU, GAMMA_NEG)[:, None])
    else:
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            yj = tl.load(Y + b * N + offs_n, mask=offs_n < N, other=-1)
            l = _sim_tile(Z, b * N * D, offs_m, N, zi, Z, b * N, start_n, N, D, ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N,
                          BLOCK_D, BLOCK_DK, True) * inv_tau
            t = l
            if COLUMN:
                t = l - tl.load(CS + b * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
            neg = vi[:, None] & (yj[None, :] >= 0) & (yi[:, None] != yj[None, :])
            m, s = _lse_update(m, s, tl.where(neg, t, NEG_INF), _neg_weight(l, TAU, GAMMA_NEG))
    if TEACHER == 1:
        # T(i) from the stored teacher indices, no offset and no weight.
        for slot in range(0, TK):
            ok, _, st = _selected_sim(TIDX, TSIMS, Z, ZT, b, N, NT, D, TK, slot, offs_m, row_ok, STORED_SIMS, ACC,
                                      BLOCK_M, BLOCK_DG)
            lt = st * inv_tau
            m, s = _lse_update(m, s, tl.where(ok, lt, NEG_INF)[:, None], tl.full([BLOCK_M, 1], 1.0, ACC))
    tl.store(LOGNEG + b * N + offs_m, tl.where(s > 0, m + tl.log(s), NEG_INF), mask=row_ok)
    if TEACHER == 2:
        cross = tl.zeros([BLOCK_M], ACC)
        count = tl.zeros([BLOCK_M], ACC)
        for start_k in range(0, NT, BLOCK_N):
            offs_k = start_k + tl.arange(0, BLOCK_N)
            yk = tl.load(YT + b * NT + offs_k, mask=offs_k < NT, other=-1)
            c = _sim_tile(Z, b * N * D, offs_m, N, zi, ZT, b * NT, start_k, NT, D, ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N,
                          BLOCK_D, BLOCK_DK, True)
            hit = vi[:, None] & (yk[None, :] >= 0) & (yi[:, None] != yk[None, :]) & (c > threshold)
            # -log(max(1 - c, 0) + eps): rounding can give c > 1.
            cross += tl.sum(tl.where(hit, -tl.log(tl.maximum(1.0 - c, 0.0) + 1e-18), 0.0), axis=1)
            count += tl.sum(hit.to(ACC), axis=1)
        tl.store(CROSS + b * N + offs_m, cross, mask=row_ok)
        tl.store(CCOUNT + b * N + offs_m, count, mask=row_ok)


@triton.jit
def fecl_positive_kernel(Z, Y, CS, LOGNEG, U, NPOS, LOSS, R, N, D, COLUMN: tl.constexpr,
                         TAU: tl.constexpr, GAMMA_POS: tl.constexpr, FAST_MATH: tl.constexpr,
                         ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                         EVEN: tl.constexpr):
    """Pass 4: over positives j, x = l_ij - c_j - log_neg_i, S = sigmoid(x):
    L_i = -u_i / |P(i)| sum (1 - S)^gp log S,  R_i = sum f'(S) S (1 - S), with n_pos_i = |P(i)|
    given (NPOS: positive_counts). In base 2 (see _sigmoid_parts): x2 = x log2(e)."""
    scale, log2e = _scalar(LOG2E / TAU, ACC), _scalar(LOG2E, ACC)  # l log2(e) = dot scale
    b, offs_m, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D, BLOCK_DK)
    log2_neg = tl.load(LOGNEG + b * N + offs_m, mask=row_ok, other=0.0) * log2e
    # The float sums accumulate per element and are reduced over the row once after the loop (a
    # row reduction per tile cost 2.2 instructions per pair more on sm_90).
    f_acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    r_acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yj = _load_labels(Y, b * N, offs_n, N, EVEN)
        l2 = _sim_tile(Z, b * N * D, offs_m, N, zi, Z, b * N, start_n, N, D, ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N,
                       BLOCK_D, BLOCK_DK, True, EVEN) * scale
        if COLUMN:
            l2 = l2 - (tl.load(CS + b * N + offs_n, mask=offs_n < N, other=0.0) * log2e)[None, :]
        # yi == yj implies a valid j for a valid i; ignored anchors are zeroed after the loop. A
        # pair that is no positive gets x = +inf, whose terms are exactly 0 (_sigmoid_parts): one
        # select per pair instead of one per sum.
        pos = (yi[:, None] == yj[None, :]) & (offs_m[:, None] != offs_n[None, :])
        f, r = _pos_terms(tl.where(pos, l2 - log2_neg[:, None], float("inf")), GAMMA_POS, FAST_MATH)
        f_acc += f
        r_acc += r
    vi = yi >= 0
    f_sum = tl.where(vi, tl.sum(f_acc, axis=1), 0.0)
    r_sum = tl.where(vi, tl.sum(r_acc, axis=1), 0.0)
    n_pos = tl.load(NPOS + b * N + offs_m, mask=row_ok, other=0.0)
    u = tl.load(U + b * N + offs_m, mask=row_ok, other=0.0).to(ACC)
    loss = tl.where(n_pos > 0, -u * (f_sum * _scalar(LN2, ACC)) / tl.maximum(n_pos, 1.0), 0.0)
    tl.store(LOSS + b * N + offs_m, loss, mask=row_ok)
    tl.store(R + b * N + offs_m, r_sum, mask=row_ok)


def positive_counts(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """n_pos_i = |P(i)| = (keys of the volume with label y_i) - 1 for valid i, 0 for ignored i,
    from the sorted labels (O(N log N) per volume, deterministic), so that the positive pass does
    not count positives per pair (3.3 instructions per pair on sm_90, bfloat16)."""
    ys = torch.sort(y, dim=1).values
    same = torch.searchsorted(ys, y, right=True) - torch.searchsorted(ys, y, right=False)
    return torch.where(y >= 0, same - 1, 0).to(dtype)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

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
def _load_stat(ptrs, ok, other, EVEN: tl.constexpr):
    """A per-patch statistic at ``ptrs``, ``other`` where not ``ok``; EVEN: all ok, unmasked."""
    if EVEN:
        v = tl.load(ptrs)
    else:
        v = tl.load(ptrs, mask=ok, other=other)
    return v


@triton.jit
def _pair_stats(LOGNEG, A, R, CS, base, offs, N, COLUMN: tl.constexpr, TAU: tl.constexpr, ACC: tl.constexpr,
                EVEN: tl.constexpr = False):
    """What the backward's pair terms take of the anchors ``offs`` (rows of a volume at base), in
    base 2 (see _sigmoid_parts): log_neg and the column shift times log2(e); a = grad u / n_pos
    and a R, both divided by tau here (per anchor) so that no dot product is scaled per pair; and
    log_neg times log2(e) with -inf (no negative) as +inf, so that the negative terms vanish.
    EVEN: every offs < N, unmasked."""
    log2e = _scalar(LOG2E, ACC)
    ln = _load_stat(LOGNEG + base + offs, offs < N, NEG_INF, EVEN)
    a = _load_stat(A + base + offs, offs < N, 0.0, EVEN) * _scalar(1.0 / TAU, ACC)
    ar = a * _load_stat(R + base + offs, offs < N, 0.0, EVEN)
    c2 = tl.zeros(offs.shape, ACC)
    if COLUMN:
        c2 = _load_stat(CS + base + offs, offs < N, 0.0, EVEN) * log2e
    return ln * log2e, c2, a, ar, tl.where(ln == NEG_INF, float("inf"), ln) * log2e


@triton.jit
def _pair_coefs(dot, yi, yj, offs_m, offs_n, ln2_i, c2_i, a_i, ar_i, lns2_i, ln2_j, c2_j, a_j, ar_j, lns2_j,
                DIAGONAL: tl.constexpr, USE_TOPK: tl.constexpr, TAU: tl.constexpr, GAMMA_POS: tl.constexpr, GAMMA_NEG: tl.constexpr,
                FAST_MATH: tl.constexpr, ACC: tl.constexpr):
    """(g_ij + g_ji) / tau for the (BLOCK_M, BLOCK_N) tile of anchors i (offs_m, labels yi) and
    keys j (offs_n, labels yj), similarities ``dot`` = <z_i, z_j>: both directions of each pair,
    positives and, without top_k, the dense negatives (statistics from _pair_stats, a already
    divided by tau). The tile is symmetric in its role: it enters dz_i through z_j and dz_j
    through z_i. Without DIAGONAL the caller's anchors and keys are disjoint (the pair steps'
    super-blocks p != q), so no pair is an anchor with itself and that test is left out."""
    l2 = dot * _scalar(LOG2E / TAU, ACC)  # l log2(e)
    vi = yi >= 0
    # Positives: anchor i with key j (offset c_j), and anchor j with key i (offset c_i). Two
    # ignored patches (equal labels -1) need no validity test: their a is 0 and their log_neg
    # -inf, so x = +inf and both directions' terms are exactly 0 (_sigmoid_parts).
    pos = yi[:, None] == yj[None, :]
    if DIAGONAL:
        pos = pos & (offs_m[:, None] != offs_n[None, :])
    d_ij, d_ji = _pos_grads(l2 - c2_j[None, :] - ln2_i[:, None], l2 - c2_i[:, None] - ln2_j[None, :],
                            GAMMA_POS, FAST_MATH)
    g = tl.where(pos, -(a_i[:, None] * d_ij + a_j[None, :] * d_ji), 0.0)
    if not USE_TOPK:
        neg = vi[:, None] & (yj[None, :] >= 0) & (yi[:, None] != yj[None, :])
        e_ij = tl.exp2(l2 - c2_j[None, :] - lns2_i[:, None])
        e_ji = tl.exp2(l2 - c2_i[:, None] - lns2_j[None, :])
        g_neg = (ar_i[:, None] * e_ij + ar_j[None, :] * e_ji) * _neg_bracket(dot * _scalar(1.0 / TAU, ACC), TAU,
                                                                               GAMMA_NEG)
        g += tl.where(neg, g_neg, 0.0)
    return g


@triton.jit
def _key_tile_coefs(Z, Y, LOGNEG, A, R, CS, b, N, D, offs_m, yi, zi, start_n, offs_dc,
                    ln2_i, c2_i, a_i, ar_i, lns2_i, WHOLE_D: tl.constexpr, DIAGONAL: tl.constexpr,
                    EVEN: tl.constexpr, COLUMN: tl.constexpr,
                    USE_TOPK: tl.constexpr, TAU: tl.constexpr, GAMMA_POS: tl.constexpr, GAMMA_NEG: tl.constexpr,
                    FAST_MATH: tl.constexpr, ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr):
    """One key tile of the backward's dense part: the pair coefficients (g_ij + g_ji) / tau of the
    anchors offs_m (labels yi, block zi, statistics from _pair_stats) with the keys start_n ..
    start_n + BLOCK_N - 1 of volume b, and the keys' columns offs_dc that g multiplies (both
    kernels that walk key tiles; EVEN: its loads unmasked, pair_tiles_even)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    # Labels as stored (int64), as in the log-neg pass's loops: with _load_labels' int32 the
    # sm_90 backward (255 registers) spilled 32 bytes, the float32 log-neg pass 24 on sm_80/86.
    yj = _load_stat(Y + b * N + offs_n, offs_n < N, -1, EVEN)
    dot, zj = _sims_and_key_cols(Z, b * N * D, offs_m, N, zi, Z, b * N, start_n, N, offs_dc, D, WHOLE_D, ACC,
                                 DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, EVEN)
    ln2_j, c2_j, a_j, ar_j, lns2_j = _pair_stats(LOGNEG, A, R, CS, b * N, offs_n, N, COLUMN, TAU, ACC, EVEN)
    g = _pair_coefs(dot, yi, yj, offs_m, offs_n, ln2_i, c2_i, a_i, ar_i, lns2_i, ln2_j, c2_j, a_j, ar_j, lns2_j,
                    DIAGONAL, USE_TOPK, TAU, GAMMA_POS, GAMMA_NEG, FAST_MATH, ACC)
    return g, zj


@triton.jit
def _store_coefs(ptr, offs, g, PLANE: tl.constexpr, ACC: tl.constexpr, DOT_IN: tl.constexpr):
    """g at ptr + offs, as _dot_stored_coefs takes it: for bfloat16 keys the two bfloat16 parts
    that _dot_coef splits g into (the second PLANE elements further), else g in ACC."""
    if DOT_IN == tl.bfloat16:
        g_hi = g.to(tl.bfloat16)
        tl.store(ptr + offs, g_hi)
        tl.store(ptr + PLANE + offs, (g - g_hi.to(ACC)).to(tl.bfloat16))
    else:
        tl.store(ptr + offs, g)


@triton.jit
def _dot_stored_coefs(ptr, offs, zp, acc, PLANE: tl.constexpr, ACC: tl.constexpr, DOT_IN: tl.constexpr,
                      DOT_PREC: tl.constexpr):
    """acc + g^T @ zp for the coefficients g (at ptr + offs) that _store_coefs stored: the same
    products as _dot_coef's."""
    if DOT_IN == tl.bfloat16:
        acc = tl.dot(tl.trans(tl.load(ptr + offs)), zp, acc)
        acc = tl.dot(tl.trans(tl.load(ptr + PLANE + offs)), zp, acc)
    else:
        acc += tl.dot(tl.trans(tl.load(ptr + offs)), zp.to(ACC), input_precision=DOT_PREC)
    return acc


@triton.jit
def fecl_backward_kernel(Z, Y, CS, LOGNEG, R, A, ZT, YT, GC, DZ, THRESHOLD: tl.float64, N, NT, D,
                         COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, TAU: tl.constexpr,
                         GAMMA_POS: tl.constexpr, GAMMA_NEG: tl.constexpr, TEACHER: tl.constexpr,
                         FAST_MATH: tl.constexpr,
                         ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
                         BLOCK_DC: tl.constexpr, GROUP: tl.constexpr, EVEN: tl.constexpr):
    """Step 0 of the dense part of dz (the schedule: docs/fecl_kernels.md, "Gradient"): the
    pairs of this program's BLOCK_M anchors with the keys of their super-block (GROUP blocks;
    both directions, (g_ij + g_ji) z_j into dz_i, so each pair within a super-block is
    evaluated twice: GROUP / nb of the pairs) and the threshold-teacher terms of its anchors.
    Writes its rows of DZ (float32/float64), which the later steps' fecl_backward_keys_kernel
    adds to. A = grad_loss * u / n_pos (0 without positives). Program (m, b, c) writes columns
    [c BLOCK_DC, (c + 1) BLOCK_DC): the (BLOCK_M, BLOCK_DC) float32 accumulator is what bounds
    the registers, so a D too wide for it is split over programs (each recomputing the
    similarity tiles). BLOCK_N divides GROUP x BLOCK_M. The sparse top-k and teacher top-k pairs
    are fecl_sparse_coef_kernel's and fecl_sparse_rows_kernel's."""
    threshold = (THRESHOLD + tl.zeros([], ACC)).to(ACC)
    b, offs_m, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D, BLOCK_DK)
    offs_dc = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    # One key tile serves both dots when neither D is split: the similarity's and g @ z_j's.
    WHOLE_D: tl.constexpr = BLOCK_DK == BLOCK_D and BLOCK_DC == BLOCK_D
    ln2_i, c2_i, a_i, ar_i, lns2_i = _pair_stats(LOGNEG, A, R, CS, b * N, offs_m, N, COLUMN, TAU, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DC], ACC)
    for start_n in range(0, GROUP * BLOCK_M, BLOCK_N):
        g, zj = _key_tile_coefs(Z, Y, LOGNEG, A, R, CS, b, N, D, offs_m, yi, zi,
                                tl.program_id(0) // GROUP * (GROUP * BLOCK_M) + start_n, offs_dc,
                                ln2_i, c2_i, a_i, ar_i, lns2_i, WHOLE_D, True, EVEN, COLUMN, USE_TOPK, TAU, GAMMA_POS,
                                GAMMA_NEG, FAST_MATH, ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK)
        acc = _dot_coef(g, zj, acc, ACC, DOT_IN, DOT_PREC)
    if TEACHER == 2:
        vi = yi >= 0
        gc = tl.load(GC + b * N + offs_m, mask=row_ok, other=0.0)
        for start_k in range(0, NT, BLOCK_N):
            offs_k = start_k + tl.arange(0, BLOCK_N)
            yk = tl.load(YT + b * NT + offs_k, mask=offs_k < NT, other=-1)
            c, zk = _sims_and_key_cols(Z, b * N * D, offs_m, N, zi, ZT, b * NT, start_k, NT, offs_dc, D, WHOLE_D,
                                       ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK)
            hit = vi[:, None] & (yk[None, :] >= 0) & (yi[:, None] != yk[None, :]) & (c > threshold)
            # d cross / d c = 1 / (1 - c + eps), 0 where the clamp max(1 - c, 0) is active.
            hit = hit & (1.0 - c > 0.0)
            coef = tl.where(hit, gc[:, None] / (tl.where(hit, 1.0 - c, 1.0) + 1e-18), 0.0)
            acc = _dot_coef(coef, zk, acc, ACC, DOT_IN, DOT_PREC)
    mask = row_ok[:, None] & (offs_dc[None, :] < D)
    tl.store(DZ + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_dc[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["STEP", "NB"])
def fecl_backward_pairs_kernel(Z, Y, CS, LOGNEG, R, A, ROWS, GS, N, D, STEP, NB,
                               COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, TAU: tl.constexpr,
                               GAMMA_POS: tl.constexpr, GAMMA_NEG: tl.constexpr, FAST_MATH: tl.constexpr,
                               ACC: tl.constexpr, DOT_IN: tl.constexpr, DOT_PREC: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_DK: tl.constexpr, BLOCK_DC: tl.constexpr, GROUP: tl.constexpr,
                               SLAB_PARTS: tl.constexpr, EVEN: tl.constexpr):
    """Step STEP >= 1 of the dense part of dz, each pair once: program t takes the pairs of its
    block of BLOCK_M anchors (block t % GROUP of super-block p = t // GROUP; NB super-blocks of
    GROUP blocks) with the SUPER keys of super-block q = (p + STEP) mod NB, computes
    (g_ij + g_ji) / tau once per pair, writes the row side g @ z_q of its rows to ROWS and g to
    its rows of super-block p's (SUPER, SUPER) slab of GS; fecl_backward_keys_kernel then adds
    the rows to dz and the key side g^T @ z_p to the rows of q. Plain stores, one writer per
    element (the row side is not added to dz here: an accumulator loaded before the loop spilled
    64 bytes on sm_90). Program (t, b, c) computes columns as fecl_backward_kernel (the slab is
    written by c = 0)."""
    SUPER: tl.constexpr = GROUP * BLOCK_M
    b, offs_m, row_ok, yi, zi = _anchor_block(Y, Z, N, D, DOT_IN, BLOCK_M, BLOCK_D, BLOCK_DK)
    p = tl.program_id(0) // GROUP
    q0 = ((p + STEP) % NB) * SUPER
    # This block's (BLOCK_M, SUPER) rows of its super-block's slab.
    slab = GS + (b * NB + p) * (SLAB_PARTS * SUPER * SUPER) + tl.program_id(0) % GROUP * (BLOCK_M * SUPER)
    offs_dc = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    WHOLE_D: tl.constexpr = BLOCK_DK == BLOCK_D and BLOCK_DC == BLOCK_D
    ln2_i, c2_i, a_i, ar_i, lns2_i = _pair_stats(LOGNEG, A, R, CS, b * N, offs_m, N, COLUMN, TAU, ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DC], ACC)
    for start_n in range(0, GROUP * BLOCK_M, BLOCK_N):
        g, zj = _key_tile_coefs(Z, Y, LOGNEG, A, R, CS, b, N, D, offs_m, yi, zi, q0 + start_n, offs_dc,
                                ln2_i, c2_i, a_i, ar_i, lns2_i, WHOLE_D, False, EVEN, COLUMN, USE_TOPK, TAU, GAMMA_POS,
                                GAMMA_NEG, FAST_MATH, ACC, DOT_IN, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK)
        acc = _dot_coef(g, zj, acc, ACC, DOT_IN, DOT_PREC)
        # Every slab entry is written (0 for rows or keys past N: no pair there), once.
        if tl.program_id(2) == 0:
            _store_coefs(slab + start_n, tl.arange(0, BLOCK_M)[:, None] * SUPER + tl.arange(0, BLOCK_N)[None, :], g,
                         SUPER * SUPER, ACC, DOT_IN)
    mask = row_ok[:, None] & (offs_dc[None, :] < D)
    tl.store(ROWS + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_dc[None, :], acc, mask=mask)


@triton.jit(do_not_specialize=["STEP", "NB"])
def fecl_backward_keys_kernel(Z, GS, ROWS, DZ, N, D, STEP, NB, ACC: tl.constexpr, DOT_IN: tl.constexpr,
                              DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DC: tl.constexpr,
                              GROUP: tl.constexpr, SLAB_PARTS: tl.constexpr):
    """Step STEP's sums into DZ, per block of BLOCK_M rows: program (t, b, c) takes block t % GROUP
    of super-block q = t // GROUP and columns c, and adds to those rows of DZ the row side that
    fecl_backward_pairs_kernel left in ROWS (when q was a super-block p of the step) and the key
    side g^T @ z_p over the SUPER anchors of p = (q - STEP) mod NB from the coefficients it stored
    in GS (when q was p + STEP of the step). With NB even the last step (2 STEP = NB) pairs p < NB/2
    with q = p + NB/2: the first half of DZ gets rows, the second keys. One read-modify-write per
    element and launch, the launches in a fixed order on one stream: no atomics, the same sums
    run to run."""
    SUPER: tl.constexpr = GROUP * BLOCK_M
    b = tl.program_id(1).to(tl.int64)
    q = tl.program_id(0) // GROUP
    k0 = tl.program_id(0) % GROUP * BLOCK_M
    p = (q + NB - STEP) % NB
    half = 2 * STEP == NB
    offs_dc = tl.program_id(2) * BLOCK_DC + tl.arange(0, BLOCK_DC)
    acc = tl.zeros([BLOCK_M, BLOCK_DC], ACC)
    if not half or q >= NB - STEP:
        slab = GS + (b * NB + p) * (SLAB_PARTS * SUPER * SUPER) + k0
        # g: row i (an anchor of p), column k (a key of this block) at i SUPER + k of the slab.
        offs_g = tl.arange(0, BLOCK_M)[:, None] * SUPER + tl.arange(0, BLOCK_M)[None, :]
        for start_m in range(0, GROUP * BLOCK_M, BLOCK_M):
            zp = _load_tile(Z, b * N, p * SUPER + start_m, N, offs_dc, D, DOT_IN, BLOCK_M)
            acc = _dot_stored_coefs(slab + start_m * SUPER, offs_g, zp, acc, SUPER * SUPER, ACC, DOT_IN, DOT_PREC)
    offs_m = q * SUPER + k0 + tl.arange(0, BLOCK_M)
    rows = b * N * D + offs_m[:, None].to(tl.int64) * D + offs_dc[None, :]
    mask = (offs_m < N)[:, None] & (offs_dc[None, :] < D)
    has_rows = not half or q < STEP
    acc += tl.load(ROWS + rows, mask=mask & has_rows, other=0.0)
    tl.store(DZ + rows, acc + tl.load(DZ + rows, mask=mask, other=0.0), mask=mask)


@triton.jit
def fecl_sparse_coef_kernel(Z, CS, LOGNEG, R, A, ZT, TOPK, TIDX, SIMS, TSIMS, G, GT, N, NT, D, K, TK,
                            COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, TAU: tl.constexpr,
                            GAMMA_NEG: tl.constexpr, TEACHER: tl.constexpr, STORED_SIMS: tl.constexpr,
                            ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DG: tl.constexpr):
    """The coefficients of the sparse pairs, divided by tau, for the stored index of each anchor
    and slot: G (B, N, K) g_iq / tau = a_i R_i exp(l_iq - c_q - log_neg_i) bracket(l_iq) / tau for
    q in H(i), GT (B, N, TK) g^t_ik / tau = a_i R_i exp(l^t_ik - log_neg_i) / tau for k in T(i);
    0 for a -1 slot. The similarities: SIMS / TSIMS with STORED_SIMS, else gathers (_selected_sim)."""
    inv_tau = _scalar(1.0 / TAU, ACC)
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < N
    ln_i = tl.load(LOGNEG + b * N + offs_m, mask=row_ok, other=NEG_INF)
    ar_i = tl.load(A + b * N + offs_m, mask=row_ok, other=0.0) * tl.load(R + b * N + offs_m, mask=row_ok, other=0.0)
    ln_safe_i = tl.where(ln_i == NEG_INF, float("inf"), ln_i)  # no negative: the terms vanish
    if USE_TOPK:
        for slot in range(0, K):
            ok, l, t = _stored_pair_logit(TOPK, SIMS, CS, Z, b, N, D, K, slot, offs_m, row_ok, inv_tau, COLUMN,
                                          STORED_SIMS, ACC, BLOCK_M, BLOCK_DG)
            g = ar_i * tl.exp(t - ln_safe_i) * _neg_bracket(l, TAU, GAMMA_NEG) * inv_tau
            tl.store(G + (b * N + offs_m) * K + slot, tl.where(ok, g, 0.0), mask=row_ok)
    if TEACHER == 1:
        for slot in range(0, TK):
            ok, _, st = _selected_sim(TIDX, TSIMS, Z, ZT, b, N, NT, D, TK, slot, offs_m, row_ok, STORED_SIMS, ACC,
                                      BLOCK_M, BLOCK_DG)
            lt = st * inv_tau
            tl.store(GT + (b * N + offs_m) * TK + slot, tl.where(ok, ar_i * tl.exp(lt - ln_safe_i) * inv_tau, 0.0),
                     mask=row_ok)


@triton.jit
def fecl_sparse_rows_kernel(Z, ZT, TOPK, TIDX, G, GT, KEY_ROW, KEY_G, BOUNDS, DZ, N, NT, D, K, TK,
                            USE_TOPK: tl.constexpr,
                            TEACHER: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_DG: tl.constexpr):
    """The sparse pairs' terms of this program's rows and its BLOCK_DG columns of D (grid axis 2):
    the row side dz_i += sum_q G_iq z_q + sum_k GT_ik zt_k, and the key side of the top-k pairs
    dz_q += sum G_i,slot z_i over the entries (i, slot) with TOPK[i, slot] = q, read from the
    transposed index (_transposed_topk: the entries grouped by key, each key's in (i, slot) order,
    as their anchor i in KEY_ROW and coefficient in KEY_G; BOUNDS: where each key's group
    starts). Only this program writes
    these elements: a read-modify-write of DZ (in ACC) in a fixed order, no atomics, so the sums
    are the same run to run."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.program_id(2) * BLOCK_DG + tl.arange(0, BLOCK_DG)
    row_ok = offs_m < N
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    ptrs = DZ + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0)
    if USE_TOPK:
        for slot in range(0, K):
            q = tl.load(TOPK + (b * N + offs_m) * K + slot, mask=row_ok, other=-1)
            g = tl.load(G + (b * N + offs_m) * K + slot, mask=row_ok, other=0.0)
            acc += g[:, None] * _gather_rows(Z, b * N * D, q, row_ok & (q >= 0), offs_d, D, ACC)
        first = tl.load(BOUNDS + b * (N + 1) + offs_m, mask=row_ok, other=0)
        n_in = tl.load(BOUNDS + b * (N + 1) + offs_m + 1, mask=row_ok, other=0) - first
        for e in range(0, tl.max(n_in, axis=0)):
            has = e < n_in
            i = tl.load(KEY_ROW + b * N * K + first + e, mask=has, other=0)
            g = tl.load(KEY_G + b * N * K + first + e, mask=has, other=0.0)
            acc += g[:, None] * _gather_rows(Z, b * N * D, i, has, offs_d, D, ACC)
    if TEACHER == 1:
        for slot in range(0, TK):
            k = tl.load(TIDX + (b * N + offs_m) * TK + slot, mask=row_ok, other=-1)
            g = tl.load(GT + (b * N + offs_m) * TK + slot, mask=row_ok, other=0.0)
            acc += g[:, None] * _gather_rows(ZT, b * NT * D, k, row_ok & (k >= 0), offs_d, D, ACC)
    tl.store(ptrs, acc, mask=mask)


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


def stored_sims(dtype) -> bool:
    """Whether the top-k passes store each selected key's similarity (to its packed key's
    resolution, 2^-18 relative) for the log-neg pass and the sparse coefficients, which then need
    no gather: for 16-bit embeddings, whose outputs round to 2^-8 (bfloat16) or 2^-11 (float16)
    relative; float32 and float64 recompute it exactly (docs/fecl_kernels.md, "What the stored
    similarities change")."""
    return dtype in (torch.float16, torch.bfloat16)


def dot_precision(dtype) -> str:
    """float16/bfloat16 values are exact in TF32; float32 follows FP32_DOT_PRECISION."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    if dtype == torch.float32:
        return FP32_DOT_PRECISION
    return "ieee"


MAX_D = 1024
# Tile shapes (BLOCK_M, BLOCK_N), largest first, and pipeline depths tried for each.
TILE_CHOICES = ((64, 64), (64, 32), (32, 64), (32, 32), (32, 16), (16, 16))
# The backward's: within MAX_PAIR_TILE, and 16 x 32 before 32 x 16: with 4 warps the 32 x 16 tile
# evaluated its element-wise terms twice (bfloat16, D = 256, sm_86: 178 instructions and 10 MUFU
# per pair against 117 and 5 at 16 x 32; float32 on sm_90: 16 MUFU against 8).
BACKWARD_TILE_CHOICES = ((64, 32), (32, 64), (32, 32), (16, 32), (32, 16), (16, 16))
STAGE_CHOICES = (3, 2, 1)
# D chunks of the similarity dots when the anchor block is not held across key tiles (_sim_tile).
CHUNK_CHOICES = (128, 64, 32, 16)
# Register budgets, per program of NUM_WARPS warps (128 threads; a thread has at most 255 registers):
# - the anchor block held across key tiles (BLOCK_DK = BLOCK_D): at most 64 x 256 values, and
#   for float32 (tf32x3, whose high and low parts of both blocks sit in registers) only up to
#   BLOCK_D = MAX_HELD_SPLIT_D: every held float32 tile at D = 256 spilled (sm_90: 64 x 32 1.2 KB
#   in the log-neg pass, 32 x 32 4.9 KB, 16 x 64 1.5 KB; sm_80/86 likewise), at D = 128 too
#   (64 x 64: 196 B, 64 x 32: 1.3 KB on sm_86); 64 x 64 x 64 did not;
# - a D chunk's two operands when D is chunked: (BLOCK_M + BLOCK_N) x BLOCK_DK x bytes (float32
#   counted twice, tf32x3's two parts) <= 16 KB: the Ampere-style dot holds its operands in
#   registers (float32 64 x 64 x 32 chunks, 32 KB, spilled 40-140 B on sm_80/86, and the float32
#   backward's 16 x 32 x 64, 24 KB, 32 B on sm_80 at 3 stages; 64 x 64 x 16 and 16 x 32 x 32
#   did not, on any card);
# - the backward's float32 accumulator (BLOCK_M, BLOCK_DC): 64 x 256 values (128 registers);
#   BLOCK_M = 16 splits a wider D over programs, larger BLOCK_M never do; with float32 keys the
#   accumulator and the key tile's columns that g @ z_j takes in two TF32 parts (BLOCK_N x
#   BLOCK_DC x 8 bytes) <= 80 KB (at D = 256: 16 x 32; 32 x 32 spilled 1.6 KB, 64 x 32 more);
# - a gather's (BLOCK_M, BLOCK_DG) chunks: 64 x 32 values (16 registers each; at 64 x 64 the
#   float32 sparse rows kernel spilled 24 B and the log-neg gathers 8 B on sm_80/86/89, and
#   bfloat16's call took 1.3 more instructions per pair on sm_90); the sparse-pair
#   kernels take SPARSE_BLOCK_M rows;
# Always 4 warps: with 8, the compiled sm_90 backward evaluated every element-wise term twice
# (the two warp groups hold replicated tiles).
MAX_HELD_ANCHOR = 64 * 256
MAX_HELD_SPLIT_D = 64
MAX_CHUNK_BYTES = 16 * 1024
MAX_SPLIT_BACKWARD_BYTES = 80 * 1024
MAX_ACC_TILE = 64 * 256
MAX_GATHER_TILE = 64 * 32
SPARSE_BLOCK_M = 64
# - the similarity tile of the positive pass and of the backward, whose per-pair terms (three
#   and five MUFU operations, the focal factors, both directions) hold about twice the registers
#   per element of the other passes: BLOCK_M x BLOCK_N <= 64 x 32. At 64 x 64 the sm_90 compiles
#   spilled (positive 16 bytes, backward 384 with its 64 x 256 accumulator); at 64 x 32 they use
#   154 and 255 registers without spilling and no more instructions per pair.
MAX_PAIR_TILE = 64 * 32
# - the positive pass's tile when its anchor block is held (BLOCK_DK = BLOCK_D): 64 x 64, which
#   halves the per-tile work (the dot's descriptors, key tile and label loads, loop) per pair:
#   bfloat16 D = 256 `dycon` on sm_90 32.3 -> 29.2 instructions per pair (187 registers), sm_80
#   35.0 -> 34.5 (255), 0 spills at D = 256 for float16/bfloat16 with and without the column
#   shift on sm_80/90 (the 99 KB cards' forward tiles are 64 x 32). With D in chunks (float32)
#   64 x 64 spilled 36-52 bytes with the column shift on sm_80/86/89: those keep MAX_PAIR_TILE.
MAX_HELD_POSITIVE_TILE = 64 * 64
# - the backward's tile when it also evaluates the dense negatives (top_k 0: the exponentials
#   e_ij, e_ji and the bracket of both directions on top of the positive terms): BLOCK_M x BLOCK_N
#   <= 32 x 32. bfloat16 `official` at 64 x 32 with its 64 x 256 accumulator spilled in step 0
#   and the pair steps (sm_90 8 + 180 bytes, sm_80 144 + 100); 64 x 16 still spilled 96 on sm_80
#   (and evaluated each term twice there), 32 x 64 used all 255 registers; 32 x 32 takes 175
#   (sm_90) and 237 (sm_80) without spilling.
MAX_DENSE_PAIR_TILE = 32 * 32
# fecl_backward_keys_kernel's blocks and accumulator (BLOCK_M, BLOCK_DC): see keys_launch.
KEYS_BLOCKS = (64, 32)
MAX_KEYS_DC = 128
NUM_WARPS = 4


class LaunchConfig(NamedTuple):
    """The tiles and compile options of the forward or backward kernels of one call."""
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_D: int    # D padded to a power of two
    BLOCK_DK: int   # D chunk of the similarity dots; BLOCK_D: the anchor block is held across key tiles
    BLOCK_DC: int   # backward: columns of dz per program (BLOCK_D unless D is split over programs)
    BLOCK_DG: int   # D chunk of the gathers, and columns per program of the sparse-pair kernels
    num_warps: int
    num_stages: int


def gather_chunk(rows: int, bd: int) -> int:
    """BLOCK_DG for gathers of ``rows`` anchors: MAX_GATHER_TILE elements, at most BLOCK_D."""
    return min(bd, MAX_GATHER_TILE // rows)


def padded_d(D: int) -> int:
    """BLOCK_D: D padded to a power of two >= 16 (tl.dot needs every dimension >= 16)."""
    return max(16, triton.next_power_of_2(D))


def _split(dtype: torch.dtype) -> int:
    """Parts each dot operand is split into on the GPU: 2 for float32 under tf32x3, else 1."""
    return 2 if dtype == torch.float32 and FP32_DOT_PRECISION == "tf32x3" else 1


def _dot_bytes(dtype: torch.dtype) -> int:
    """Bytes per element of the similarity dots' operands on the GPU, times tf32x3's two parts."""
    return torch.empty(0, dtype=dtype).element_size() * _split(dtype)


def _held_fits(dtype: torch.dtype, bm: int, bd: int) -> bool:
    """Whether an anchor block of bm x bd may be held across key tiles (the register budgets above)."""
    return bm * bd <= MAX_HELD_ANCHOR and (_split(dtype) == 1 or bd <= MAX_HELD_SPLIT_D)


def _backward_regs_fit(kind: str, dtype: torch.dtype, bm: int, bn: int, dc: int) -> bool:
    """The backward's accumulator and the key columns that g @ z_j takes in float32 within
    MAX_SPLIT_BACKWARD_BYTES where it converts them: float32 (two TF32 parts) and float16
    (_dot_coef: its range is too narrow for g; at 64 x 32 x 256, 96 KB, its backward spilled
    56-604 bytes per kernel on sm_90 and sm_80 in every preset). bfloat16 keeps its keys as
    loaded (MAX_ACC_TILE alone, _column_splits); the forward has no such tiles."""
    split = _split(dtype)
    converted = split > 1 or dtype == torch.float16
    return kind != "backward" or not converted or (bm + bn * split) * dc * 4 <= MAX_SPLIT_BACKWARD_BYTES


def smem_estimate(kind: str, dtype: torch.dtype, bm: int, bn: int, bd: int, stages: int, dk: int | None = None,
                  dc: int | None = None) -> int:
    """Bytes of shared memory a launch needs, an upper bound of what Triton allocates: tl.dot
    stages both operands of a (D chunk ``dk``) in ACC (twice for float32's tf32x3, which splits
    each into a TF32 high and low part), the pipeline keeps ``stages - 1`` more key chunks (and
    anchor chunks, when those are loaded per key tile: dk < bd) in the input dtype, and the
    backward's second dot (g @ z_j) adds the (BLOCK_M, BLOCK_N) coefficients and the key tile's
    ``dc`` columns. tests/test_fecl_triton.py checks it against the compiled kernels."""
    dk, dc = dk or bd, dc or bd
    acc, split = (8 if dtype == torch.float64 else 4), _split(dtype)
    piped = bn + (bm if dk < bd else 0)
    total = (bm + bn) * dk * acc * split + (stages - 1) * piped * dk * torch.empty(0, dtype=dtype).element_size()
    if kind == "backward":
        total += (bn * dc + bm * bn) * acc
    return total


def _column_splits(kind: str, bm: int, bd: int) -> tuple:
    """The BLOCK_DC a launch may take, widest first: BLOCK_D for the forward; for the backward at
    most MAX_ACC_TILE / BLOCK_M, and, with BLOCK_M = 16 only (larger blocks never split D),
    narrower down to 64 columns when the key tile's columns of g @ z_j do not fit otherwise
    (float64 at D = 1024 on the 99 KB cards)."""
    if kind == "forward":
        return (bd,)
    widest = min(bd, MAX_ACC_TILE // bm)
    if bm > 16:
        return (widest,) if widest == bd else ()
    return tuple(dc for dc in (widest, widest // 2, widest // 4) if dc >= min(64, bd))


def _tile_choices(kind: str, dense: bool) -> tuple:
    """(BLOCK_M, BLOCK_N) candidates of a launch, largest first (the register budgets above)."""
    if kind == "forward":
        return TILE_CHOICES
    return tuple((bm, bn) for bm, bn in BACKWARD_TILE_CHOICES if not dense or bm * bn <= MAX_DENSE_PAIR_TILE)


def launch_config(smem_limit: int, dtype: torch.dtype, D: int, kind: str, dense: bool = False) -> LaunchConfig:
    """The LaunchConfig of the ``kind`` ('forward' or 'backward') kernels of one call on a card
    with ``smem_limit`` bytes of shared memory per block (``dense``: a backward that evaluates
    the dense negatives, top_k 0, within MAX_DENSE_PAIR_TILE): the anchor block held whole across key
    tiles if any tiles allow it, else D in chunks (the widest first); then the fewest programs
    per row block (the backward's column split), the largest tiles, then the deepest pipeline
    whose estimate fits and that keep within the register budgets above. A
    pure function, so that the choice is testable without a GPU. Raises ValueError for D > MAX_D
    or when not even 16 x 16 tiles with 16-wide chunks fit."""
    if D > MAX_D:
        raise ValueError(f"fecl (triton): embedding dimension D = {D} is larger than the supported {MAX_D}")
    bd = padded_d(D)
    for held in (True, False):
        # Fewer programs per row block first (each recomputes the similarity tiles), then tiles:
        # level l takes the l-th of _column_splits' at most three widths.
        for level in range(3):
            for bm, bn in _tile_choices(kind, dense):
                widths = _column_splits(kind, bm, bd)
                if level >= len(widths) or not _backward_regs_fit(kind, dtype, bm, bn, widths[level]):
                    continue
                if held:
                    chunks = (bd,) if _held_fits(dtype, bm, bd) else ()
                else:
                    chunks = tuple(c for c in CHUNK_CHOICES if c < bd
                                   and (bm + bn) * c * _dot_bytes(dtype) <= MAX_CHUNK_BYTES) or (16,)
                for dk in chunks:
                    for stages in STAGE_CHOICES:
                        if smem_estimate(kind, dtype, bm, bn, bd, stages, dk, widths[level]) <= smem_limit:
                            return LaunchConfig(bm, bn, bd, dk, widths[level], gather_chunk(bm, bd), NUM_WARPS,
                                                stages)
    need = smem_estimate(kind, dtype, 16, 16, bd, 1, 16, _column_splits(kind, 16, bd)[-1])
    raise ValueError(f"fecl (triton): D = {D} with {dtype} embeddings needs {need} bytes of shared memory per "
                     f"block even with 16 x 16 tiles, but this GPU allows {smem_limit}; use float16/bfloat16 "
                     f"embeddings, a smaller D or the 'cuda' backend")


@functools.lru_cache(maxsize=None)
def device_smem_limit(index: int) -> int:
    """The opt-in shared memory per block of CUDA device ``index``."""
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


# Under the interpreter (CPU tensors) every tile step costs time: 32 x 32 tiles; D in chunks of 16
# (so the tests' D of 19 to 32 run the chunked dots; a ``blocks`` override can hold D whole).
INTERPRETER_TILES = (32, 32, 16, None, 16)


def _tiles(device: torch.device, dtype: torch.dtype, D: int, kind: str, blocks, dense: bool) -> LaunchConfig:
    """The launch configuration on ``device``, or under the interpreter INTERPRETER_TILES (the
    compile options do not apply). ``blocks`` (tests) overrides (BLOCK_M, BLOCK_N[, BLOCK_DK[,
    BLOCK_DC[, BLOCK_DG]]]); None (or a missing entry) keeps the default, a chunk above BLOCK_D
    is BLOCK_D."""
    bd = padded_d(D)
    if device.type == "cuda":
        base = launch_config(device_smem_limit(device.index), dtype, D, kind, dense)
    else:
        base = LaunchConfig(*INTERPRETER_TILES[:2], bd, INTERPRETER_TILES[2], bd, INTERPRETER_TILES[4], NUM_WARPS, 1)
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_DK", "BLOCK_DC", "BLOCK_DG")
    over = {k: v for k, v in zip(keys, blocks or ()) if v is not None}
    cfg = base._replace(**over)
    return cfg._replace(BLOCK_DK=min(cfg.BLOCK_DK, bd), BLOCK_DC=min(cfg.BLOCK_DC, bd), BLOCK_DG=min(cfg.BLOCK_DG, bd))


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
        self.stored_sims = stored_sims(z.dtype)
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
        self.fast_math = self.device.type == "cuda"  # see _log2, _recip: the interpreter has no inline PTX
        self.launch = _tiles(self.device, z.dtype, self.D, kind, blocks, dense=not self.top_k)
        self.tiles = tile_consts(self.launch)
        self.sparse_tiles = sparse_consts(self.launch, self.device.type != "cuda")
        self.options = compile_options(self.launch) if self.device.type == "cuda" else {}
        self.grid = (triton.cdiv(self.N, self.launch.BLOCK_M), self.B)
        # The sparse-pair kernels: their own rows per program, and the rows kernel one program per
        # D chunk.
        self.grid_sparse = (triton.cdiv(self.N, self.sparse_tiles["BLOCK_M"]), self.B)
        self.grid_rows = self.grid_sparse + (triton.cdiv(self.D, self.sparse_tiles["BLOCK_DG"]),)
        self.consts = dict(ACC=compute_dtype(z.dtype), DOT_IN=dot_operand_dtype(z.dtype, self.fast_math),
                           DOT_PREC=dot_precision(z.dtype))
        self.dummy_f = torch.empty(1, device=self.device, dtype=self.stat)  # pointers never read
        self.dummy_i = torch.empty(1, device=self.device, dtype=torch.int64)

    def pointers(self, topk_idx, teacher_idx, topk_sim, teacher_sim):
        """TOPK, TIDX, SIMS, TSIMS of the kernels that read the stored top-k, the dummy pointers
        where they are not read."""
        used = (self.top_k, self.teacher_k, self.top_k and self.stored_sims, self.teacher_k and self.stored_sims)
        dummies = (self.dummy_i, self.dummy_i, self.dummy_f, self.dummy_f)
        return [t if u else d for t, u, d in zip((topk_idx, teacher_idx, topk_sim, teacher_sim), used, dummies)]

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
    (loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx, topk_sim, teacher_sim).

    Unused outputs (``col_shift`` without the column shift, ``cross``/``cross_count`` without the
    threshold teacher, the index tensors, the similarities of the selected keys unless
    stored_sims) are empty tensors. ``blocks=(BLOCK_M, BLOCK_N)``
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

    topk_idx, topk_sim = _topk(s, zt=z, yt=y, NT=N, k=s.top_k)
    teacher_idx, teacher_sim = _topk(s, zt=zt, yt=yt, NT=NT, k=s.teacher_k)

    log_neg = s.stat_empty(B, N)
    cross = cross_count = s.stat_empty(0)
    if s.teacher == 2:
        cross, cross_count = s.stat_empty(B, N), s.stat_empty(B, N)
    cs = col_shift if s.column else s.dummy_f
    fecl_logneg_kernel[grid](
        z, y, cs, zt, yt, *s.pointers(topk_idx, teacher_idx, topk_sim, teacher_sim),
        log_neg, cross if s.teacher == 2 else s.dummy_f, cross_count if s.teacher == 2 else s.dummy_f, s.threshold,
        N, NT, D, s.top_k, s.teacher_k, COLUMN=s.column, USE_TOPK=s.top_k > 0, TAU=tau, GAMMA_NEG=gn,
        TEACHER=s.teacher, STORED_SIMS=s.stored_sims, **s.consts, **s.tiles, BLOCK_DG=s.launch.BLOCK_DG, **opts)

    if u is None:
        u = torch.ones(B, N, device=s.device, dtype=torch.float32)
    else:
        u = s.rows(u.to(torch.float32).contiguous(), 0.0)
    loss, r, n_pos = s.stat_empty(B, N), s.stat_empty(B, N), positive_counts(y, s.stat)
    pos_tiles = positive_consts(s.launch)
    fecl_positive_kernel[grid](z, y, cs, log_neg, u, n_pos, loss, r, N, D, COLUMN=s.column, TAU=tau, GAMMA_POS=gp,
                               FAST_MATH=s.fast_math, **s.consts, **pos_tiles, EVEN=tiles_even(N, D, pos_tiles),
                               **opts)
    return loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx, topk_sim, teacher_sim


def _topk(s, zt, yt, NT: int, k: int):
    """The k keys of (zt, yt) with the largest similarity to each anchor (fecl_topk_kernel) and,
    with stored_sims, those similarities; empty tensors for k = 0."""
    idx = torch.empty(s.B, s.N, k, device=s.device, dtype=torch.int64) if k else s.dummy_i.new_empty(0)
    sims = s.stat_empty(s.B, s.N, k) if k and s.stored_sims else s.stat_empty(0)
    if k:
        fecl_topk_kernel[s.grid](s.z, s.y, zt, yt, idx, sims if s.stored_sims else s.dummy_f, s.N, NT, s.D, k,
                                 FAST_MATH=s.fast_math, **s.consts, K_PAD=k_pad(k), **s.tiles,
                                 EVEN=tiles_even(NT, s.D, s.tiles), STORE_SIMS=s.stored_sims, **s.options)
    return idx, sims


def fecl_backward(grad_loss, grad_cross, z, y, zt, yt, u, log_neg, r, n_pos, col_shift, topk_idx,
                  teacher_idx, topk_sim, teacher_sim, cfg, *, blocks=None):
    """dz (z's dtype) from the upstream (B, N) gradients of ``loss`` and ``cross`` and the saved
    statistics (fecl_forward's; topk_sim and teacher_sim are read with stored_sims only);
    ``grad_cross`` is only read with the threshold teacher (may be None otherwise)."""
    s = _Launch(z, y, zt, yt, cfg, blocks, "backward")
    with device_guard(s.device):
        return s.unpad(_backward(s, grad_loss, grad_cross, u, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx,
                                 topk_sim, teacher_sim))


def _backward(s, grad_loss, grad_cross, u, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx, topk_sim,
              teacher_sim):
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
    if s.stored_sims:  # (the padded rows' slots are -1: their similarities are not read)
        topk_sim = s.rows(topk_sim.to(s.stat), 0.0).contiguous() if s.top_k else s.dummy_f
        teacher_sim = s.rows(teacher_sim.to(s.stat), 0.0).contiguous() if s.teacher_k else s.dummy_f
    flags = dict(COLUMN=s.column, TAU=s.scalars["TAU"], GAMMA_NEG=s.scalars["GAMMA_NEG"])
    dz = _dense_backward(s, a, log_neg, r, col_shift, grad_cross, flags)
    if not (s.top_k or s.teacher_k):
        return dz.to(z.dtype)
    g = s.stat_empty(B, N, s.top_k) if s.top_k else s.dummy_f
    gt = s.stat_empty(B, N, s.teacher_k) if s.teacher_k else s.dummy_f
    common = dict(USE_TOPK=s.top_k > 0, TEACHER=s.teacher, ACC=s.consts["ACC"], **s.sparse_tiles)
    fecl_sparse_coef_kernel[s.grid_sparse](z, col_shift, log_neg, r, a, zt,
                                           *s.pointers(topk_idx, teacher_idx, topk_sim, teacher_sim), g, gt, N,
                                           NT, D, s.top_k, s.teacher_k, STORED_SIMS=s.stored_sims, **flags,
                                           **common, **s.options)
    key_row, key_g, bounds = _transposed_topk(topk_idx, g, N) if s.top_k else (s.dummy_i, s.dummy_f, s.dummy_i)
    fecl_sparse_rows_kernel[s.grid_rows](z, zt, topk_idx, teacher_idx, g, gt, key_row, key_g, bounds, dz, N, NT, D,
                                         s.top_k, s.teacher_k, **common, **s.options)
    return dz.to(z.dtype)


def _dense_backward(s, a, log_neg, r, col_shift, grad_cross, flags):
    """The dense part of dz (positives, dense negatives, the threshold teacher) in the compute
    dtype, each pair evaluated once but for the pairs within a super-block (docs/fecl_kernels.md,
    "Gradient": the schedule). Step 0 (fecl_backward_kernel) writes every block's pairs with its
    super-block into ``dz``; each step 1..nsb // 2 is two launches: fecl_backward_pairs_kernel
    (super-block p with p + step mod nsb: coefficients into ``slabs``, the row side into ``rows``)
    and fecl_backward_keys_kernel (adds the row side and the key side to ``dz``); with nsb even
    the last step takes p < nsb / 2 only. Extra memory: ``rows`` (B, N, D) and ``slabs``, B N
    SUPER coefficients (float32, or two bfloat16 parts)."""
    B, N, D, cfg = s.B, s.N, s.D, s.launch
    group = schedule_group(N, cfg.BLOCK_M)
    common = dict(USE_TOPK=s.top_k > 0, GAMMA_POS=s.scalars["GAMMA_POS"], FAST_MATH=s.fast_math, **flags, **s.consts,
                  BLOCK_DC=cfg.BLOCK_DC, **backward_consts(cfg, group), EVEN=pair_tiles_even(N, D, cfg, group),
                  **s.options)
    splits = cfg.BLOCK_D // cfg.BLOCK_DC
    super_block = group * cfg.BLOCK_M
    nsb = triton.cdiv(N, super_block)
    dz = s.stat_empty(B, N, D)
    fecl_backward_kernel[(triton.cdiv(N, cfg.BLOCK_M), B, splits)](
        s.z, s.y, col_shift, log_neg, r, a, s.zt, s.yt, grad_cross, dz, s.threshold, N, s.NT, D, TEACHER=s.teacher,
        **common)
    if nsb == 1:
        return dz
    rows = s.stat_empty(B, N, D)
    keys, keys_opts = keys_launch(cfg, s.z.dtype, group, device_smem_limit(s.device.index) if s.fast_math else None)
    parts = slab_parts(s.consts["DOT_IN"])
    slabs = torch.empty(B, nsb, parts, super_block, super_block, device=s.device,
                        dtype=torch.bfloat16 if parts == 2 else s.stat)
    for step in range(1, nsb // 2 + 1):
        sources = nsb // 2 if 2 * step == nsb else nsb
        fecl_backward_pairs_kernel[(sources * group, B, splits)](s.z, s.y, col_shift, log_neg, r, a, rows, slabs, N,
                                                                 D, step, nsb, SLAB_PARTS=parts, **common)
        fecl_backward_keys_kernel[(nsb * keys["GROUP"], B, cfg.BLOCK_D // keys["BLOCK_DC"])](
            s.z, slabs, rows, dz, N, D, step, nsb, **keys, **s.consts, SLAB_PARTS=parts, **keys_opts)
    return dz


# The schedule pairs super-blocks of GROUP anchor blocks: fecl_backward_keys_kernel's sums into
# dz (a read-modify-write per program) are amortised over a super-block's anchors (bfloat16,
# D = 256, sm_90: 10.7 instructions per pair with 512 anchors at N = 13 824, 37.9 with 64 at
# N = 1960), and a call takes 2 (nsb // 2) + 1 launches for nsb super-blocks. A super-block
# has the largest of SCHEDULE_SUPER anchors that leaves at least MIN_SUPER_BLOCKS super-blocks,
# whatever BLOCK_M (the 99 KB cards' 16 would otherwise multiply the launches by 4), else one
# block. At most 512: the slabs hold N x SUPER coefficients per volume.
SCHEDULE_SUPER = (512, 256, 128)
MIN_SUPER_BLOCKS = 8


def schedule_group(N: int, block_m: int) -> int:
    """GROUP, the anchor blocks per super-block of the backward's schedule, for N (launched)
    patches in blocks of block_m."""
    return next((sup // block_m for sup in SCHEDULE_SUPER
                 if sup >= block_m and triton.cdiv(N, sup) >= MIN_SUPER_BLOCKS), 1)




def _transposed_topk(topk_idx, g, N: int):
    """The top-k pairs grouped by key, for the key side of fecl_sparse_rows_kernel: the entries
    (i, slot) sorted by their key q = topk_idx[i, slot] (stable: each key's entries in (i, slot)
    order; -1 slots last) as their anchor i (B, N K) and coefficient g[i, slot] (B, N K), and
    where key q's entries start (B, N + 1; q = N: where the -1 slots start). torch's stable sort,
    gather and searchsorted are deterministic."""
    B, _, K = topk_idx.shape
    key = torch.where(topk_idx >= 0, topk_idx, N).reshape(B, N * K)
    key_sorted, order = torch.sort(key, dim=1, stable=True)
    queries = torch.arange(N + 1, device=key.device).expand(B, N + 1).contiguous()
    return (torch.div(order, K, rounding_mode="floor"), g.reshape(B, N * K).gather(1, order),
            torch.searchsorted(key_sorted, queries))


def tile_consts(cfg: LaunchConfig) -> dict:
    """The tile constexprs of the tile-loop kernels (the log-neg kernel adds BLOCK_DG, the backward
    BLOCK_DC)."""
    return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_D=cfg.BLOCK_D, BLOCK_DK=cfg.BLOCK_DK)


def backward_consts(cfg: LaunchConfig, group: int) -> dict:
    """The dense backward kernels' tiles and schedule: key tiles within a super-block (BLOCK_N
    at most GROUP x BLOCK_M, so that it divides the keys the schedule pairs a block with)."""
    return dict(tile_consts(cfg), BLOCK_N=min(cfg.BLOCK_N, group * cfg.BLOCK_M), GROUP=group)


def pair_tiles_even(N: int, D: int, cfg: LaunchConfig, group: int) -> bool:
    """EVEN of the dense backward's kernels (step 0, the pair steps): every key tile of every
    super-block lies within the N keys and D columns (N a multiple of GROUP x BLOCK_M, D =
    BLOCK_D), so that the key rows, their labels and statistics load unmasked (the masks'
    compares and selects were ~0.5 instructions per pair of the pair steps on sm_90, bfloat16
    D = 256). The threshold teacher's loop stays masked."""
    return N % (group * cfg.BLOCK_M) == 0 and D == cfg.BLOCK_D


def slab_parts(dot_in) -> int:
    """Parts each coefficient of the backward's slabs is stored in: bfloat16 keys take g as two
    bfloat16 parts (_dot_coef), the others g itself in the compute dtype."""
    return 2 if dot_in == tl.bfloat16 else 1


def keys_launch(cfg: LaunchConfig, dtype: torch.dtype, group: int, smem_limit: int | None) -> tuple:
    """fecl_backward_keys_kernel's tiles and compile options: blocks of BLOCK_M keys (and anchors
    per step) within the schedule's super-block of group x cfg.BLOCK_M (GROUP: its blocks per
    super-block), independent of the backward's BLOCK_M (float32's 16 made its tiles small);
    at most MAX_KEYS_DC columns (at 64 x 256 the sm_90 bfloat16 kernel spilled 2.6 KB, at
    32 x 256 the sm_80 float32 one 248 bytes); the deepest pipeline up to the backward's that
    keys_smem_estimate fits in ``smem_limit`` (None: the interpreter, no options). 64 x 128 blocks, but for float32/float64 only where
    they get 2 stages (sm_90; the sm_80 float32 kernel spilled 27 KB at 1 stage, 2 KB at 2);
    else 32 x 128 (sm_80 float32: no spill)."""
    super_block = group * cfg.BLOCK_M
    blocks = [b for b in KEYS_BLOCKS if b <= super_block] or [super_block]
    for bm in blocks:
        tiles = dict(BLOCK_M=bm, BLOCK_DC=min(cfg.BLOCK_DC, MAX_KEYS_DC), GROUP=super_block // bm)
        if smem_limit is None:
            return tiles, {}
        stages = next(st for st in STAGE_CHOICES if st <= cfg.num_stages and
                      (keys_smem_estimate(dtype, bm, tiles["BLOCK_DC"], st) <= smem_limit or st == 1))
        if stages >= 2 or _dot_bytes(dtype) <= 2 or bm == blocks[-1]:
            return tiles, dict(num_warps=cfg.num_warps, num_stages=stages)


def keys_smem_estimate(dtype: torch.dtype, bm: int, dc: int, stages: int) -> int:
    """Bytes of shared memory of fecl_backward_keys_kernel, an upper bound: per pipeline stage a
    (bm, bm) block of coefficients (two bfloat16 parts, or the compute dtype, twice for
    float32's tf32x3) and a (bm, dc) block of embeddings (twice for tf32x3); or, if more, the
    (bm, dc) accumulator, which the epilogue converts through shared memory (sm_80, bfloat16,
    16 x 512: 32 KB against 17 KB of pipeline)."""
    acc, split = (8 if dtype == torch.float64 else 4), _split(dtype)
    coef = 4 if dtype == torch.bfloat16 else acc * split
    return max(stages * bm * (bm * coef + dc * torch.empty(0, dtype=dtype).element_size() * split), bm * dc * acc)


def tiles_even(nk: int, D: int, tiles: dict) -> bool:
    """EVEN of the loops over key tiles (fecl_topk_kernel, fecl_positive_kernel): every key tile
    lies within the nk keys and D columns (nk a multiple of BLOCK_N, D = BLOCK_D), so that its
    loads need no mask (the masks' compares and selects were 2.5 instructions per pair of each
    top-k pass on sm_90, bfloat16 D = 256). Anchor rows past N stay masked."""
    return nk % tiles["BLOCK_N"] == 0 and D == tiles["BLOCK_D"]


def positive_consts(cfg: LaunchConfig) -> dict:
    """fecl_positive_kernel's tiles: BLOCK_N cut to MAX_HELD_POSITIVE_TILE with the anchor block
    held across key tiles, else to MAX_PAIR_TILE."""
    limit = MAX_HELD_POSITIVE_TILE if cfg.BLOCK_DK == cfg.BLOCK_D else MAX_PAIR_TILE
    return dict(tile_consts(cfg), BLOCK_N=max(16, min(cfg.BLOCK_N, limit // cfg.BLOCK_M)))


def sparse_consts(cfg: LaunchConfig, interpreted: bool = False) -> dict:
    """The tile constexprs of the sparse-pair kernels: SPARSE_BLOCK_M rows on the GPU (they hold
    no similarity tile, so the backward's BLOCK_M does not bound them), the tile loops' BLOCK_M
    and BLOCK_DG under the interpreter (so that the tests' blocks reach them too)."""
    if interpreted:
        return dict(BLOCK_M=cfg.BLOCK_M, BLOCK_DG=cfg.BLOCK_DG)
    return dict(BLOCK_M=SPARSE_BLOCK_M, BLOCK_DG=gather_chunk(SPARSE_BLOCK_M, cfg.BLOCK_D))


def compile_options(cfg: LaunchConfig) -> dict:
    return dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


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
    (False, True, False, 1),   # top-k and teacher top-k: every sparse-pair path
    (False, False, False, 0),
]


BACKWARD_KERNELS = ("backward", "pairs", "keys", "coef", "rows")
# The N of the compile coverage (launch_configs, fit_configs): the trainer's 96^3 crop in 4^3
# patches, 24^3; it sets the backward's schedule GROUP (schedule_group), a loop bound only.
DEFAULT_REPORT_N = 13824


def _config(kernel: str, dtype: str, D: int, cc: int = 90, N: int = DEFAULT_REPORT_N, **flags):
    """(kernel, signature, constexprs, options) of one launch on sm_<cc>: runtime arguments in
    order, with the types that fecl_forward/fecl_backward pass (statistics in the compute dtype,
    indices int64), the dispatcher's tiles and compile options, the presets' tau and gamma_pos;
    the backward's schedule GROUP for N (launched) patches."""
    tdt = TORCH_DTYPES[dtype]
    st, zp = ("*fp64" if dtype == "fp64" else "*fp32"), f"*{dtype}"
    kind = "backward" if kernel in BACKWARD_KERNELS else "forward"
    # The backward's tiles: smaller where it evaluates the dense negatives (no top_k; the key sums
    # have no flags and are told).
    dense = kind == "backward" and flags.get("dense", "flags" in flags and not flags["flags"][1])
    cfg = launch_config(SMEM_LIMITS[cc], tdt, D, kind, dense)
    options = compile_options(cfg)
    acc, prec, dot_in = compute_dtype(tdt), dot_precision(tdt), dot_operand_dtype(tdt)
    tiles = tile_consts(cfg)
    if kernel == "colshift":
        return (fecl_colshift_kernel, dict(Z=zp, Y="*i64", CS=st, N="i32", D="i32"),
                dict(TAU=0.6, ACC=acc, DOT_IN=dot_in, DOT_PREC=prec, **tiles), options)
    if kernel == "topk":
        return (fecl_topk_kernel, dict(Z=zp, Y="*i64", KEYS=zp, KY="*i64", IDX="*i64", SIMS=st, N="i32", NK="i32",
                                       D="i32", K="i32"),
                dict(FAST_MATH=True, ACC=acc, DOT_IN=dot_in, DOT_PREC=prec, K_PAD=flags["K_PAD"], **tiles,
                     EVEN=tiles_even(N, D, tiles), STORE_SIMS=stored_sims(tdt)), options)
    if kernel == "positive":
        pos_tiles = positive_consts(cfg)
        return (fecl_positive_kernel, dict(Z=zp, Y="*i64", CS=st, LOGNEG=st, U="*fp32", NPOS=st, LOSS=st, R=st,
                                           N="i32", D="i32"),
                dict(COLUMN=flags["COLUMN"], TAU=0.6, GAMMA_POS=2.0, FAST_MATH=True, ACC=acc, DOT_IN=dot_in,
                     DOT_PREC=prec, **pos_tiles, EVEN=tiles_even(N, D, pos_tiles)),
                options)
    if kernel == "keys":
        gs = "*bf16" if slab_parts(dot_in) == 2 else st
        tiles, keys_opts = keys_launch(cfg, tdt, schedule_group(N, cfg.BLOCK_M), SMEM_LIMITS[cc])
        return (fecl_backward_keys_kernel, dict(Z=zp, GS=gs, ROWS=st, DZ=st, N="i32", D="i32", STEP="i32", NB="i32"),
                dict(ACC=acc, DOT_IN=dot_in, DOT_PREC=prec, **tiles, SLAB_PARTS=slab_parts(dot_in)), keys_opts)
    column, use_topk, gn_on, teacher = flags["flags"]
    sparse = dict(USE_TOPK=use_topk, TEACHER=teacher, ACC=acc, **sparse_consts(cfg))
    if kernel == "rows":
        return (fecl_sparse_rows_kernel, dict(Z=zp, ZT=zp, TOPK="*i64", TIDX="*i64", G=st, GT=st, KEY_ROW="*i64",
                                              KEY_G=st, BOUNDS="*i64", DZ=st, N="i32", NT="i32", D="i32", K="i32",
                                              TK="i32"),
                sparse, options)
    flag_consts = dict(COLUMN=column, TAU=0.6, GAMMA_NEG=2.0 if gn_on else 0.0)
    if kernel == "coef":
        return (fecl_sparse_coef_kernel, dict(Z=zp, CS=st, LOGNEG=st, R=st, A=st, ZT=zp, TOPK="*i64", TIDX="*i64",
                                              SIMS=st, TSIMS=st, G=st, GT=st, N="i32", NT="i32", D="i32", K="i32",
                                              TK="i32"),
                dict(flag_consts, **sparse, STORED_SIMS=stored_sims(tdt)), options)
    consts = dict(flag_consts, USE_TOPK=use_topk, TEACHER=teacher, ACC=acc, DOT_IN=dot_in, DOT_PREC=prec, **tiles)
    if kernel == "logneg":
        return (fecl_logneg_kernel, dict(Z=zp, Y="*i64", CS=st, ZT=zp, YT="*i64", TOPK="*i64", TIDX="*i64",
                                         SIMS=st, TSIMS=st, LOGNEG=st, CROSS=st, CCOUNT=st, THRESHOLD="fp64",
                                         N="i32", NT="i32", D="i32", K="i32", TK="i32"),
                dict(consts, STORED_SIMS=stored_sims(tdt), BLOCK_DG=cfg.BLOCK_DG), options)
    group = schedule_group(N, cfg.BLOCK_M)
    consts = dict(consts, GAMMA_POS=2.0, FAST_MATH=True, **backward_consts(cfg, group), BLOCK_DC=cfg.BLOCK_DC,
                  EVEN=pair_tiles_even(N, D, cfg, group))
    if kernel == "pairs":
        del consts["TEACHER"]
        gs = "*bf16" if slab_parts(dot_in) == 2 else st
        return (fecl_backward_pairs_kernel, dict(Z=zp, Y="*i64", CS=st, LOGNEG=st, R=st, A=st, ROWS=st, GS=gs,
                                                 N="i32", D="i32", STEP="i32", NB="i32"),
                dict(consts, SLAB_PARTS=slab_parts(dot_in)), options)
    assert kernel == "backward"
    return (fecl_backward_kernel, dict(Z=zp, Y="*i64", CS=st, LOGNEG=st, R=st, A=st, ZT=zp, YT="*i64", GC=st,
                                       DZ=st, THRESHOLD="fp64", N="i32", NT="i32", D="i32"), consts, options)


def _sparse(flags) -> bool:
    """Whether a call with these (COLUMN, USE_TOPK, GN_ON, TEACHER) has sparse pairs (top-k or
    teacher top-k): fecl_sparse_coef_kernel and fecl_sparse_rows_kernel run."""
    return bool(flags[1] or flags[3] == 1)


def _kernel_set(dtype, D, flag_sets, k_pads, cc):
    """The launches of one call for each flag set (shared kernels listed once)."""
    configs = [_config("colshift", dtype, D, cc)] if any(f[0] for f in flag_sets) else []
    configs += [_config("topk", dtype, D, cc, K_PAD=kp) for kp in k_pads]
    configs += [_config("positive", dtype, D, cc, COLUMN=c) for c in sorted({f[0] for f in flag_sets})]
    configs += [_config("keys", dtype, D, cc, dense=dense) for dense in sorted({not f[1] for f in flag_sets})]
    for f in flag_sets:
        configs += [_config(k, dtype, D, cc, flags=f) for k in ("logneg", "backward", "pairs")]
        if _sparse(f):
            configs += [_config("coef", dtype, D, cc, flags=f), _config("rows", dtype, D, cc, flags=f)]
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
    Default: a covering set (51 configs) in which every kernel, dtype and code path appears: at
    D = 64 every kernel for float32 (every flag set of the forward; for the backward both presets
    and the all-on set, which contain the other sets' code; the sparse-pair kernels with the
    all-on set and with top-k plus teacher top-k), the presets and the all-on set for
    bfloat16/float64 (the sparse-pair kernels for bfloat16), the 'dycon' preset for float16; the
    backward's pair steps for each dtype; other tile shapes for bfloat16 (D = 16, 512, 1024: the
    chunked dots and the backward's column split) and float32 (D = 1024)."""
    if full:
        configs = []
        for dtype in TORCH_DTYPES:
            for D in (16, 32, 64, 128, 256, 512, 1024):
                if _fits(dtype, D, cc):
                    configs += _kernel_set(dtype, D, ALL_FLAGS, (1, 2, 4, 8, 16, 32, 64), cc)
        return configs
    dycon, official, all_on, topk_teacher = COVER_FLAGS[:4]
    # The loops over key tiles with their masks (EVEN False, tiles_even, pair_tiles_even): the LA
    # crop's N = 1960.
    uneven = launch_n(1960)
    configs = [_config("colshift", "fp32", 64, cc), _config("topk", "fp32", 64, cc, uneven, K_PAD=1),
               _config("topk", "fp32", 64, cc, K_PAD=32), _config("positive", "fp32", 64, cc, uneven, COLUMN=True)]
    configs += [_config("logneg", "fp32", 64, cc, flags=f) for f in COVER_FLAGS]
    configs += [_config("backward", "fp32", 64, cc, uneven if f == official else DEFAULT_REPORT_N, flags=f)
                for f in (dycon, official, all_on)]
    # The pair steps: fecl_backward_pairs_kernel's terms are the backward's (_pair_coefs), so the
    # 'dycon' and all-on sets (the latter masked, pair_tiles_even); fecl_backward_keys_kernel has no flags.
    configs += [_config("pairs", "fp32", 64, cc, uneven if f == all_on else DEFAULT_REPORT_N, flags=f)
                for f in (dycon, all_on)]
    configs += [_config("keys", dtype, 64, cc) for dtype in ("fp32", "bf16", "fp16", "fp64")]
    configs += [_config(k, "fp32", 64, cc, flags=f) for k in ("coef", "rows") for f in (all_on, topk_teacher)]
    for dtype in ("bf16", "fp64"):
        configs += [_config("topk", dtype, 64, cc, K_PAD=32), _config("positive", dtype, 64, cc, COLUMN=True),
                    _config("logneg", dtype, 64, cc, flags=all_on),
                    _config("backward", dtype, 64, cc, flags=dycon), _config("backward", dtype, 64, cc, flags=all_on),
                    _config("pairs", dtype, 64, cc, flags=dycon if dtype == "bf16" else all_on)]
    configs += [_config("coef", "bf16", 64, cc, flags=topk_teacher), _config("rows", "bf16", 64, cc, flags=topk_teacher)]
    configs += [_config(k, "fp16", 64, cc, flags=dycon) for k in ("logneg", "backward", "pairs")]
    # Other tile shapes: D = 16 (one 16-wide block), 512, and the chunked dots and split D of 1024.
    for D in (16, 512, 1024):
        configs += [_config("topk", "bf16", D, cc, K_PAD=32), _config("backward", "bf16", D, cc, flags=dycon)]
    configs += [_config("pairs", "bf16", 1024, cc, flags=dycon), _config("keys", "bf16", 1024, cc)]
    configs += [_config(k, "fp32", 1024, cc, flags=all_on) for k in ("logneg", "backward", "pairs")]
    configs.append(_config("keys", "fp32", 1024, cc))
    return configs


def fit_configs(cc: int, full: bool = False):
    """For tests/triton_aot.py --fit: ``(kernel, signature, constexprs, options, bounds)`` on
    sm_<cc>. Shared memory: the kernels that need the most (column shift, the all-on log-neg,
    backward and pair steps, the key sums) at the configurations the dispatcher returns for
    (dtype, D), bounded by the card's limit and by the dispatcher's own estimate; by default
    float32/bfloat16 at D = 256 and at the largest D accepted (the tightest fits), ``full``: every
    dtype and D in {16, ..., 1024}. Spills: 0 bytes at D = 256 (spill_configs)."""
    dtypes = list(TORCH_DTYPES) if full else ["fp32", "bf16"]
    out = []
    for dtype in dtypes:
        dims = [D for D in (16, 32, 64, 128, 256, 512, 1024) if _fits(dtype, D, cc)]
        for D in (dims if full else sorted({256, dims[-1]} & set(dims))):
            for kernel, flags in (("colshift", {}), ("logneg", dict(flags=COVER_FLAGS[2])),
                                  ("backward", dict(flags=COVER_FLAGS[2])), ("pairs", dict(flags=COVER_FLAGS[2])),
                                  ("keys", {})):
                out.append(_fit_entry(kernel, dtype, D, cc, dict(spill=0) if D == 256 else {}, **flags))
    return out + spill_configs(cc, full)


def _fit_entry(kernel: str, dtype: str, D: int, cc: int, bounds: dict, **flags):
    """One entry of fit_configs: _config's launch with the card's shared memory and the
    dispatcher's estimate of it as bounds, and ``bounds``."""
    fn, sig, ce, opts = _config(kernel, dtype, D, cc, **flags)
    if kernel == "keys":
        estimate = keys_smem_estimate(TORCH_DTYPES[dtype], ce["BLOCK_M"], ce["BLOCK_DC"], opts["num_stages"])
    else:
        kind = "backward" if kernel in BACKWARD_KERNELS else "forward"
        estimate = smem_estimate(kind, TORCH_DTYPES[dtype], ce["BLOCK_M"], ce["BLOCK_N"], ce["BLOCK_D"],
                                 opts["num_stages"], ce["BLOCK_DK"], ce.get("BLOCK_DC"))
    return fn, sig, ce, opts, dict(smem=SMEM_LIMITS[cc], smem_estimate=estimate, **bounds)


# What spill_configs adds to fit_configs' entries in CI: the backward's step 0 and pair steps
# (the kernels that hold the (BLOCK_M, BLOCK_DC) accumulator with the pair terms) with the dense
# negatives of top_k 0 (the `official` preset's flags) for bfloat16 and float16, and float16's
# with top_k (the all-on flags), on the cards whose tiles are the largest (sm_80, sm_90; the
# 99 KB cards take 16-row tiles). Before the dispatcher's MAX_DENSE_PAIR_TILE and float16 rule
# every one of them spilled (docs/kernel_report.md, "Spills at D = 256 in every preset"). And the
# positive pass of bfloat16 `dycon` at its 64 x 64 tile (MAX_HELD_POSITIVE_TILE): 255 registers
# on sm_80, the fullest of the held tiles.
SPILL_CI_CARDS = (80, 90)
SPILL_CI = (("bf16", COVER_FLAGS[1]), ("fp16", COVER_FLAGS[1]), ("fp16", COVER_FLAGS[2]))


def spill_configs(cc: int, full: bool = False):
    """fit_configs entries bounded to 0 spill bytes at D = 256 besides its own: ``full``, every
    kernel of every call report_configs compiles (float32/bfloat16/float16 x both presets x
    top_k 0 and 32) on every card; else SPILL_CI."""
    if full:
        seen, out = set(), []
        for dtype in ("fp32", "bf16", "fp16"):
            for preset in PRESET_FLAGS:
                for top_k in (0, 32):
                    for _, fn, sig, ce, opts in report_configs(dtype, 256, preset, top_k, cc):
                        key = (fn, repr(sig), repr(ce), repr(opts))
                        if key not in seen:
                            seen.add(key)
                            out.append((fn, sig, ce, opts, dict(smem=SMEM_LIMITS[cc], spill=0)))
        return out
    if cc not in SPILL_CI_CARDS:
        return []
    return [_fit_entry(kernel, dtype, 256, cc, dict(spill=0), flags=flags)
            for dtype, flags in SPILL_CI for kernel in ("backward", "pairs")] + [
        _fit_entry("positive", "bf16", 256, cc, dict(spill=0), COLUMN=False)]


# The flags (COLUMN, USE_TOPK is per case, GN_ON, TEACHER) of the two presets
# (dycon_kernels/presets.py) and their teacher top-k: what benchmarks/kernel_report.py compiles.
PRESET_FLAGS = {"dycon": (False, True, 1), "official": (True, False, 2)}
PRESET_TEACHER_K = {"dycon": 32, "official": 0}


def report_configs(dtype: str, D: int, preset: str, top_k: int, cc: int, N: int = DEFAULT_REPORT_N):
    """The launches of one forward + backward call of ``preset`` with ``top_k`` (0 = dense) on
    sm_<cc> for N (launched) patches: ``(name, kernel, signature, constexprs, options)``; [] when
    the dispatcher refuses (dtype, D) on that card."""
    if not _fits(dtype, D, cc):
        return []
    column, gn_on, teacher = PRESET_FLAGS[preset]
    flags = (column, top_k > 0, gn_on, teacher)
    launches = []
    if column:
        launches.append(("colshift", _config("colshift", dtype, D, cc)))
    if top_k:
        launches.append(("topk", _config("topk", dtype, D, cc, N, K_PAD=k_pad(top_k))))
    if PRESET_TEACHER_K[preset]:
        launches.append(("topk_teacher", _config("topk", dtype, D, cc, N, K_PAD=k_pad(PRESET_TEACHER_K[preset]))))
    launches += [("logneg", _config("logneg", dtype, D, cc, flags=flags)),
                 ("positive", _config("positive", dtype, D, cc, N, COLUMN=column)),
                 ("backward", _config("backward", dtype, D, cc, N, flags=flags)),
                 ("pairs", _config("pairs", dtype, D, cc, N, flags=flags)),
                 ("keys", _config("keys", dtype, D, cc, N, dense=not top_k))]
    if _sparse(flags):
        launches += [("coef", _config("coef", dtype, D, cc, flags=flags)),
                     ("rows", _config("rows", dtype, D, cc, flags=flags))]
    return [(name, *config) for name, config in launches]


def programs_per_volume(name: str, constexprs: dict, N: int, D: int) -> int:
    """Programs a call runs per volume of N (launched) patches over all its launches of the
    kernel ``name`` (of report_configs): one per block of BLOCK_M anchors, times the D chunks of
    the grid's axis 2 (the backward's BLOCK_D / BLOCK_DC, the sparse rows' cdiv(D, BLOCK_DG));
    the backward's pair steps (nb // 2 launches) one per unordered pair of distinct super-blocks."""
    nb = triton.cdiv(N, constexprs["BLOCK_M"])
    if name in ("pairs", "keys"):
        # Pairs: a program per block of the step's super-blocks p; keys: per block of every
        # super-block (nb of them) at each of the nb // 2 steps.
        nsb = triton.cdiv(N, constexprs["GROUP"] * constexprs["BLOCK_M"])
        launched = nsb * (nsb - 1) // 2 if name == "pairs" else nsb * (nsb // 2)
        return launched * constexprs["GROUP"] * (padded_d(D) // constexprs["BLOCK_DC"])
    if name == "backward":
        return nb * (constexprs["BLOCK_D"] // constexprs["BLOCK_DC"])
    if name == "rows":
        return nb * triton.cdiv(D, constexprs["BLOCK_DG"])
    return nb


def launches_per_call(name: str, constexprs: dict, N: int) -> int:
    """Launches of the kernel ``name`` (of report_configs) in one call for N (launched) patches:
    nsb // 2 for the backward's pair steps (pairs, keys), else 1."""
    if name in ("pairs", "keys"):
        return triton.cdiv(N, constexprs["GROUP"] * constexprs["BLOCK_M"]) // 2
    return 1
