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
  the threshold-teacher term of its own anchors. No atomics.
- ``fecl_topk_scatter_kernel`` (top_k only): the transposed part of the sparse top-k pairs,
  ``dz_q += g_iq z_i / tau``, with ``tl.atomic_add`` into a float32/float64 buffer.

Numerics: embeddings are cast to the compute type right after loading (float32, float64 for
float64 inputs; the interpreter mishandles bfloat16 arithmetic). Float16/bfloat16 embeddings are
exact in TF32, so their dots use TF32 tensor cores at no loss; float32 embeddings use
"tf32x3" (``FP32_DOT_PRECISION``), close to float32 accuracy, so that the top-k sets match a dense
float32 ``torch.topk``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# tl.dot precision for float32 embeddings: "tf32x3" (three TF32 tensor-core products, close to
# float32 accuracy), "ieee" (float32 FMAs: slow to compile and to run) or "tf32" (one product,
# ~1e-3 relative error on l, which can flip near-ties of the top-k selection).
FP32_DOT_PRECISION = "tf32x3"

NEG_INF = tl.constexpr(float("-inf"))
TEACHER_CODES = {"none": 0, "topk": 1, "threshold": 2}


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
def _anchor_block(Y, Z, N, D, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's volume b and anchor block: offsets, row mask, labels (-1 past N) and
    embeddings (BLOCK_M, BLOCK_D) in ACC."""
    b = tl.program_id(1).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < N
    yi = tl.load(Y + b * N + offs_m, mask=row_ok, other=-1)
    zi = _load_rows(Z, b * N * D, offs_m, N, offs_d, D, ACC)
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
def _params(PARAMS):
    """(1/tau, tau, gamma_pos, gamma_neg, teacher_threshold), read from a small tensor in the
    compute dtype (scalar kernel arguments would be float32 even for float64 runs)."""
    return tl.load(PARAMS), tl.load(PARAMS + 1), tl.load(PARAMS + 2), tl.load(PARAMS + 3), tl.load(PARAMS + 4)


@triton.jit
def _pow(x, p):
    """x ** p for x >= 0 with 0 ** 0 = 1 (p is a runtime scalar)."""
    return tl.where(p == 0.0, 1.0, tl.exp(p * tl.log(x)))


@triton.jit
def _neg_weight(l, tau, gamma_neg, GN_ON: tl.constexpr):
    """w = ((1 + tau l) / 2) ^ gamma_neg; 0 where the base is <= 0 (rounding can push a cosine
    below -1): such a negative drops out, as in the reference and the C++ backends."""
    if GN_ON:
        base = (1.0 + tau * l) * 0.5
        return tl.where(base > 0.0, _pow(tl.maximum(base, 0.0), gamma_neg), 0.0)
    else:
        return tl.full(l.shape, 1.0, l.dtype)


@triton.jit
def _neg_bracket(l, tau, gamma_neg, GN_ON: tl.constexpr):
    """d(w e)/dl / e = w + gamma_neg tau / 2 base^(gamma_neg - 1)  (1 when gamma_neg = 0, 0 where
    the base is <= 0)."""
    if GN_ON:
        base = (1.0 + tau * l) * 0.5
        safe = tl.where(base > 0.0, base, 1.0)
        return tl.where(base > 0.0, _pow(safe, gamma_neg) + gamma_neg * tau * 0.5 * _pow(safe, gamma_neg - 1.0), 0.0)
    else:
        return tl.full(l.shape, 1.0, l.dtype)


@triton.jit
def _lse_update(m, s, t, w):
    """Online log-sum-exp of w * exp(t) along axis 1 of a tile; -inf in t excludes an entry.
    The state is (running max m, sum s scaled by exp(-m)); log of the total is m + log(s)."""
    m_new = tl.maximum(m, tl.max(t, axis=1))
    m_ref = tl.where(m_new == NEG_INF, 0.0, m_new)
    s = s * tl.exp(m - m_ref) + tl.sum(w * tl.exp(t - m_ref[:, None]), axis=1)
    return m_new, s


@triton.jit
def _pos_terms(x, gamma_pos):
    """For S = sigmoid(x): f = (1 - S)^gp log S and f'(S) S (1 - S) = (1-S)^gp ((1-S) - gp S log S),
    written with one exp and one log1p so that they stay finite for any x (x = +inf: S = 1)."""
    a = tl.exp(-tl.abs(x))                     # in (0, 1]
    one_p_a = 1.0 + a
    log1p_a = tl.where(one_p_a == 1.0, a, tl.log(one_p_a) * (a / (one_p_a - 1.0)))  # log1p(a)
    log_s = -(tl.maximum(-x, 0.0) + log1p_a)   # log S = -softplus(-x)
    log_1ms = -(tl.maximum(x, 0.0) + log1p_a)  # log(1 - S) = -softplus(x)
    s = tl.where(x >= 0, 1.0, a) / one_p_a
    one_ms = tl.where(x >= 0, a, 1.0) / one_p_a
    pw = tl.where(gamma_pos == 0.0, 1.0, tl.exp(gamma_pos * log_1ms))
    return pw * log_s, pw * (one_ms - gamma_pos * s * log_s)


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def fecl_colshift_kernel(Z, Y, CS, PARAMS, N, D, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 1: c_i = max(0, max_{valid j != i} l_ij) for valid i (0 for invalid i)."""
    inv_tau, _, _, _, _ = _params(PARAMS)
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, ACC, BLOCK_M, BLOCK_D)
    c = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yj = tl.load(Y + b * N + offs_n, mask=offs_n < N, other=-1)
        l = _sim(zi, _load_rows(Z, b * N * D, offs_n, N, offs_d, D, ACC), DOT_PREC) * inv_tau
        pair = (yi[:, None] >= 0) & (yj[None, :] >= 0) & (offs_m[:, None] != offs_n[None, :])
        c = tl.maximum(c, tl.max(tl.where(pair, l, 0.0), axis=1))
    tl.store(CS + b * N + offs_m, c, mask=offs_m < N)


@triton.jit
def fecl_topk_kernel(Z, Y, KEYS, KY, IDX, N, NK, D, K, ACC: tl.constexpr, DOT_PREC: tl.constexpr,
                     K_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Pass 2: the K keys q (of KEYS, (B, NK, D), labels KY) with ky_q >= 0, ky_q != y_i and the
    largest <z_i, key_q>, for each anchor i -> IDX (B, N, K) int64, sorted descending, -1 padded.
    Used for the student negatives (KEYS = Z) and for the teacher top-k (KEYS = ZT)."""
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, ACC, BLOCK_M, BLOCK_D)
    offs_k = tl.arange(0, K_PAD)
    # Unsorted running top-k: slots past K hold +inf so that they are never the minimum.
    vals = tl.where(offs_k[None, :] < K, NEG_INF, float("inf")) + tl.zeros([BLOCK_M, K_PAD], ACC)
    idx = tl.full([BLOCK_M, K_PAD], -1, tl.int32)
    for start_n in range(0, NK, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yk = tl.load(KY + b * NK + offs_n, mask=offs_n < NK, other=-1)
        s = _sim(zi, _load_rows(KEYS, b * NK * D, offs_n, NK, offs_d, D, ACC), DOT_PREC)
        cand = (yi[:, None] >= 0) & (yk[None, :] >= 0) & (yi[:, None] != yk[None, :])
        s = tl.where(cand, s, NEG_INF)
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
def fecl_logneg_kernel(Z, Y, CS, ZT, YT, TOPK, TIDX, LOGNEG, CROSS, CCOUNT, PARAMS, N, NT, D, K, TK,
                       COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, GN_ON: tl.constexpr, TEACHER: tl.constexpr,
                       ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 3: log Neg_i = log(sum_{q in H(i)} w_iq exp(l_iq - c_q) + sum_{k in T(i)} exp(l^t_ik))
    (-inf without negatives); with TEACHER == 2, cross_i and cross_count_i."""
    inv_tau, tau, _, gamma_neg, threshold = _params(PARAMS)
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, ACC, BLOCK_M, BLOCK_D)
    vi = yi >= 0
    m = tl.full([BLOCK_M], NEG_INF, ACC)
    s = tl.zeros([BLOCK_M], ACC)
    if USE_TOPK:
        # H(i) from the stored indices: a gather of one key row per anchor and slot.
        for slot in range(0, K):
            q = tl.load(TOPK + (b * N + offs_m) * K + slot, mask=row_ok, other=-1)
            ok = row_ok & (q >= 0)
            l = tl.sum(zi * _gather_rows(Z, b * N * D, q, ok, offs_d, D, ACC), axis=1) * inv_tau
            t = l
            if COLUMN:
                t = l - tl.load(CS + b * N + q, mask=ok, other=0.0)
            t = tl.where(ok, t, NEG_INF)
            m, s = _lse_update(m, s, t[:, None], _neg_weight(l, tau, gamma_neg, GN_ON)[:, None])
    else:
        for start_n in range(0, N, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            yj = tl.load(Y + b * N + offs_n, mask=offs_n < N, other=-1)
            l = _sim(zi, _load_rows(Z, b * N * D, offs_n, N, offs_d, D, ACC), DOT_PREC) * inv_tau
            t = l
            if COLUMN:
                t = l - tl.load(CS + b * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
            neg = vi[:, None] & (yj[None, :] >= 0) & (yi[:, None] != yj[None, :])
            m, s = _lse_update(m, s, tl.where(neg, t, NEG_INF), _neg_weight(l, tau, gamma_neg, GN_ON))
    if TEACHER == 1:
        # T(i) from the stored teacher indices, no offset and no weight.
        for slot in range(0, TK):
            k = tl.load(TIDX + (b * N + offs_m) * TK + slot, mask=row_ok, other=-1)
            ok = row_ok & (k >= 0)
            lt = tl.sum(zi * _gather_rows(ZT, b * NT * D, k, ok, offs_d, D, ACC), axis=1) * inv_tau
            m, s = _lse_update(m, s, tl.where(ok, lt, NEG_INF)[:, None], tl.full([BLOCK_M, 1], 1.0, ACC))
    tl.store(LOGNEG + b * N + offs_m, tl.where(s > 0, m + tl.log(s), NEG_INF), mask=row_ok)
    if TEACHER == 2:
        cross = tl.zeros([BLOCK_M], ACC)
        count = tl.zeros([BLOCK_M], ACC)
        for start_k in range(0, NT, BLOCK_N):
            offs_k = start_k + tl.arange(0, BLOCK_N)
            yk = tl.load(YT + b * NT + offs_k, mask=offs_k < NT, other=-1)
            c = _sim(zi, _load_rows(ZT, b * NT * D, offs_k, NT, offs_d, D, ACC), DOT_PREC)
            hit = vi[:, None] & (yk[None, :] >= 0) & (yi[:, None] != yk[None, :]) & (c > threshold)
            # -log(max(1 - c, 0) + eps): rounding can give c > 1.
            cross += tl.sum(tl.where(hit, -tl.log(tl.maximum(1.0 - c, 0.0) + 1e-18), 0.0), axis=1)
            count += tl.sum(hit.to(ACC), axis=1)
        tl.store(CROSS + b * N + offs_m, cross, mask=row_ok)
        tl.store(CCOUNT + b * N + offs_m, count, mask=row_ok)


@triton.jit
def fecl_positive_kernel(Z, Y, CS, LOGNEG, U, LOSS, R, NPOS, PARAMS, N, D, COLUMN: tl.constexpr,
                         ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 4: over positives j, x = l_ij - c_j - log_neg_i, S = sigmoid(x):
    L_i = -u_i / |P(i)| sum (1 - S)^gp log S,  R_i = sum f'(S) S (1 - S),  n_pos_i = |P(i)|."""
    inv_tau, _, gamma_pos, _, _ = _params(PARAMS)
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, ACC, BLOCK_M, BLOCK_D)
    log_neg = tl.load(LOGNEG + b * N + offs_m, mask=row_ok, other=0.0)
    f_sum = tl.zeros([BLOCK_M], ACC)
    r_sum = tl.zeros([BLOCK_M], ACC)
    n_pos = tl.zeros([BLOCK_M], ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        yj = tl.load(Y + b * N + offs_n, mask=offs_n < N, other=-1)
        l = _sim(zi, _load_rows(Z, b * N * D, offs_n, N, offs_d, D, ACC), DOT_PREC) * inv_tau
        if COLUMN:
            l = l - tl.load(CS + b * N + offs_n, mask=offs_n < N, other=0.0)[None, :]
        pos = (yi[:, None] >= 0) & (yi[:, None] == yj[None, :]) & (offs_m[:, None] != offs_n[None, :])
        f, r = _pos_terms(l - log_neg[:, None], gamma_pos)
        f_sum += tl.sum(tl.where(pos, f, 0.0), axis=1)
        r_sum += tl.sum(tl.where(pos, r, 0.0), axis=1)
        n_pos += tl.sum(pos.to(ACC), axis=1)
    u = tl.load(U + b * N + offs_m, mask=row_ok, other=0.0).to(ACC)
    loss = tl.where(n_pos > 0, -u * f_sum / tl.maximum(n_pos, 1.0), 0.0)
    tl.store(LOSS + b * N + offs_m, loss, mask=row_ok)
    tl.store(R + b * N + offs_m, r_sum, mask=row_ok)
    tl.store(NPOS + b * N + offs_m, n_pos, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _topk_neg_coef(zi, q, ok, Z, CS, base_z, base_row, a_r, ln_safe, D, offs_d, inv_tau, tau,
                   gamma_neg, COLUMN: tl.constexpr, GN_ON: tl.constexpr, ACC: tl.constexpr):
    """For the stored pair (i, q) of each row: g_iq = a_i R_i exp(l_iq - c_q - log_neg_i) *
    bracket(l_iq) (0 where not ok), and the gathered key rows z_q."""
    zq = _gather_rows(Z, base_z, q, ok, offs_d, D, ACC)
    l = tl.sum(zi * zq, axis=1) * inv_tau
    t = l
    if COLUMN:
        t = l - tl.load(CS + base_row + q, mask=ok, other=0.0)
    g = a_r * tl.exp(t - ln_safe) * _neg_bracket(l, tau, gamma_neg, GN_ON)
    return tl.where(ok, g, 0.0), zq


@triton.jit
def fecl_backward_kernel(Z, Y, CS, LOGNEG, R, A, ZT, YT, TOPK, TIDX, GC, DZ, PARAMS, N, NT, D, K, TK,
                         COLUMN: tl.constexpr, USE_TOPK: tl.constexpr, GN_ON: tl.constexpr, TEACHER: tl.constexpr,
                         ACC: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz_i = (1/tau) sum_j (g_ij + g_ji) z_j + teacher terms, row-parallel, no atomics.
    A = grad_loss * u / n_pos (0 without positives); g_ji uses anchor j's statistics."""
    inv_tau, tau, gamma_pos, gamma_neg, threshold = _params(PARAMS)
    b, offs_m, offs_d, row_ok, yi, zi = _anchor_block(Y, Z, N, D, ACC, BLOCK_M, BLOCK_D)
    vi = yi >= 0
    ln_i = tl.load(LOGNEG + b * N + offs_m, mask=row_ok, other=NEG_INF)
    a_i = tl.load(A + b * N + offs_m, mask=row_ok, other=0.0)
    ar_i = a_i * tl.load(R + b * N + offs_m, mask=row_ok, other=0.0)
    ln_safe_i = tl.where(ln_i == NEG_INF, float("inf"), ln_i)  # no negative: negative terms vanish
    c_i = tl.zeros([BLOCK_M], ACC)
    if COLUMN:
        c_i = tl.load(CS + b * N + offs_m, mask=row_ok, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        yj = tl.load(Y + b * N + offs_n, mask=col_ok, other=-1)
        zj = _load_rows(Z, b * N * D, offs_n, N, offs_d, D, ACC)
        l = _sim(zi, zj, DOT_PREC) * inv_tau
        ln_j = tl.load(LOGNEG + b * N + offs_n, mask=col_ok, other=NEG_INF)
        a_j = tl.load(A + b * N + offs_n, mask=col_ok, other=0.0)
        c_j = tl.zeros([BLOCK_N], ACC)
        if COLUMN:
            c_j = tl.load(CS + b * N + offs_n, mask=col_ok, other=0.0)
        # Positives: anchor i with key j (offset c_j), and anchor j with key i (offset c_i).
        pos = vi[:, None] & (yi[:, None] == yj[None, :]) & (offs_m[:, None] != offs_n[None, :])
        f_ij, d_ij = _pos_terms(l - c_j[None, :] - ln_i[:, None], gamma_pos)
        f_ji, d_ji = _pos_terms(l - c_i[:, None] - ln_j[None, :], gamma_pos)
        g = tl.where(pos, -(a_i[:, None] * d_ij + a_j[None, :] * d_ji), 0.0)
        if not USE_TOPK:
            neg = vi[:, None] & (yj[None, :] >= 0) & (yi[:, None] != yj[None, :])
            ar_j = a_j * tl.load(R + b * N + offs_n, mask=col_ok, other=0.0)
            ln_safe_j = tl.where(ln_j == NEG_INF, float("inf"), ln_j)
            e_ij = tl.exp(l - c_j[None, :] - ln_safe_i[:, None])
            e_ji = tl.exp(l - c_i[:, None] - ln_safe_j[None, :])
            g_neg = (ar_i[:, None] * e_ij + ar_j[None, :] * e_ji) * _neg_bracket(l, tau, gamma_neg, GN_ON)
            g += tl.where(neg, g_neg, 0.0)
        acc += tl.dot(g, zj, input_precision=DOT_PREC)
    if USE_TOPK:
        # Row side of the sparse pairs (i, q in H(i)); the key side is fecl_topk_scatter_kernel.
        for slot in range(0, K):
            q = tl.load(TOPK + (b * N + offs_m) * K + slot, mask=row_ok, other=-1)
            g_q, zq = _topk_neg_coef(zi, q, row_ok & (q >= 0), Z, CS, b * N * D, b * N, ar_i, ln_safe_i,
                                     D, offs_d, inv_tau, tau, gamma_neg, COLUMN, GN_ON, ACC)
            acc += g_q[:, None] * zq
    if TEACHER == 1:
        for slot in range(0, TK):
            k = tl.load(TIDX + (b * N + offs_m) * TK + slot, mask=row_ok, other=-1)
            ok = row_ok & (k >= 0)
            zk = _gather_rows(ZT, b * NT * D, k, ok, offs_d, D, ACC)
            lt = tl.sum(zi * zk, axis=1) * inv_tau
            acc += tl.where(ok, ar_i * tl.exp(lt - ln_safe_i), 0.0)[:, None] * zk
    acc = acc * inv_tau
    if TEACHER == 2:
        gc = tl.load(GC + b * N + offs_m, mask=row_ok, other=0.0)
        for start_k in range(0, NT, BLOCK_N):
            offs_k = start_k + tl.arange(0, BLOCK_N)
            yk = tl.load(YT + b * NT + offs_k, mask=offs_k < NT, other=-1)
            zk = _load_rows(ZT, b * NT * D, offs_k, NT, offs_d, D, ACC)
            c = _sim(zi, zk, DOT_PREC)
            hit = vi[:, None] & (yk[None, :] >= 0) & (yi[:, None] != yk[None, :]) & (c > threshold)
            # d cross / d c = 1 / (1 - c + eps), 0 where the clamp max(1 - c, 0) is active.
            hit = hit & (1.0 - c > 0.0)
            coef = tl.where(hit, gc[:, None] / (tl.where(hit, 1.0 - c, 1.0) + 1e-18), 0.0)
            acc += tl.dot(coef, zk, input_precision=DOT_PREC)
    mask = row_ok[:, None] & (offs_d[None, :] < D)
    tl.store(DZ + b * N * D + offs_m[:, None].to(tl.int64) * D + offs_d[None, :], acc.to(DZ.dtype.element_ty),
             mask=mask)


@triton.jit
def fecl_topk_scatter_kernel(Z, CS, LOGNEG, R, A, TOPK, DZ, PARAMS, N, D, K, COLUMN: tl.constexpr,
                             GN_ON: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """Key side of the sparse top-k pairs: dz_q += g_iq z_i / tau (atomics into DZ, in ACC)."""
    inv_tau, tau, gamma_pos, gamma_neg, threshold = _params(PARAMS)
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
                                D, offs_d, inv_tau, tau, gamma_neg, COLUMN, GN_ON, ACC)
        dst = DZ + b * N * D + tl.where(ok, q, 0)[:, None] * D + offs_d[None, :]
        tl.atomic_add(dst, (g_q * inv_tau)[:, None] * zi, mask=ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------------------

def compute_dtype(dtype):
    """float64 embeddings are computed in float64, everything else in float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype) -> str:
    """float16/bfloat16 values are exact in TF32; float32 follows FP32_DOT_PRECISION."""
    if dtype in (torch.float16, torch.bfloat16):
        return "tf32"
    if dtype == torch.float32:
        return FP32_DOT_PRECISION
    return "ieee"


def block_sizes(D: int, device_type: str = "cuda"):
    """(BLOCK_M, BLOCK_N, BLOCK_D): D padded to a power of two >= 16 (tl.dot needs every dim
    >= 16). On the GPU 64 x 64 tiles (64 x 32 for D > 64, 32 x 32 for D > 256, to bound
    registers); under the interpreter (CPU tensors) every tile step costs, so 32 x 32."""
    block_d = max(16, triton.next_power_of_2(D))
    if device_type != "cuda":
        return 32, 32, block_d
    if block_d <= 64:
        return 64, 64, block_d
    if block_d <= 256:
        return 64, 32, block_d
    return 32, 32, block_d


def k_pad(k: int) -> int:
    """Register slots of a top-k buffer: k rounded up to a power of two."""
    return triton.next_power_of_2(max(int(k), 1))


class _Launch:
    """What every launch of one call shares: shapes, dtypes, tiles, flags, dummy pointers."""

    def __init__(self, z, y, zt, yt, cfg, blocks):
        if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"fecl (triton): embeddings must be float16/bfloat16/float32/float64, got {z.dtype}")
        if z.dim() != 3 or tuple(y.shape) != tuple(z.shape[:2]):
            raise ValueError(f"fecl (triton): expected z (B, N, D) and y (B, N), "
                             f"got {tuple(z.shape)}, {tuple(y.shape)}")
        teacher = cfg.teacher if cfg.teacher is not None else "none"
        if teacher not in TEACHER_CODES:
            raise ValueError(f"fecl (triton): unknown teacher mode {teacher!r}; choose one of {list(TEACHER_CODES)}")
        self.B, self.N, self.D = z.shape
        self.device = z.device
        self.stat = torch.float64 if z.dtype == torch.float64 else torch.float32
        self.z, self.y = z.contiguous(), y.contiguous()
        self.teacher = TEACHER_CODES[teacher]
        self.top_k = int(cfg.top_k or 0)
        self.teacher_k = int(cfg.teacher_top_k) if self.teacher == 1 else 0
        if self.teacher == 1 and self.teacher_k < 1:
            raise ValueError(f"fecl (triton): teacher_top_k must be >= 1 with teacher='topk', got {cfg.teacher_top_k}")
        if self.teacher != 0:
            if zt is None or yt is None:
                raise ValueError("fecl (triton): a teacher mode needs zt and yt")
            self.zt, self.yt = zt.to(z.dtype).contiguous(), yt.contiguous()
            self.NT = zt.shape[1]
        else:
            self.zt, self.yt, self.NT = self.z, self.y, self.N  # passed, never read
        self.column = bool(cfg.column_shift)
        self.gn_on = float(cfg.gamma_neg) != 0.0
        threshold = float(cfg.teacher_threshold) if self.teacher == 2 else 0.0
        self.params = torch.tensor([1.0 / float(cfg.tau), float(cfg.tau), float(cfg.gamma_pos), float(cfg.gamma_neg),
                                    threshold], dtype=self.stat).to(self.device)
        bm, bn, bd = block_sizes(self.D, self.device.type)
        if blocks is not None:
            bm, bn = blocks
        self.grid = (triton.cdiv(self.N, bm), self.B)
        self.tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
        self.consts = dict(ACC=compute_dtype(z.dtype), DOT_PREC=dot_precision(z.dtype))
        self.dummy_f = torch.empty(1, device=self.device, dtype=self.stat)  # pointers never read
        self.dummy_i = torch.empty(1, device=self.device, dtype=torch.int64)

    def stat_empty(self, *shape):
        return torch.empty(*shape, device=self.device, dtype=self.stat)


def fecl_forward(z, y, zt, yt, u, cfg, *, blocks=None):
    """Forward statistics (docs/fecl_kernels.md): returns
    (loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx).

    Unused outputs (``col_shift`` without the column shift, ``cross``/``cross_count`` without the
    threshold teacher, the index tensors) are empty tensors. ``blocks=(BLOCK_M, BLOCK_N)``
    overrides the tile sizes (tests)."""
    s = _Launch(z, y, zt, yt, cfg, blocks)
    B, N, NT, D = s.B, s.N, s.NT, s.D
    z, y, zt, yt, grid = s.z, s.y, s.zt, s.yt, s.grid

    if s.column:
        col_shift = s.stat_empty(B, N)
        fecl_colshift_kernel[grid](z, y, col_shift, s.params, N, D, **s.consts, **s.tiles)
    else:
        col_shift = s.stat_empty(0)

    topk_idx = teacher_idx = torch.empty(0, device=s.device, dtype=torch.int64)
    if s.top_k:
        topk_idx = torch.empty(B, N, s.top_k, device=s.device, dtype=torch.int64)
        fecl_topk_kernel[grid](z, y, z, y, topk_idx, N, N, D, s.top_k, **s.consts, K_PAD=k_pad(s.top_k), **s.tiles)
    if s.teacher_k:
        teacher_idx = torch.empty(B, N, s.teacher_k, device=s.device, dtype=torch.int64)
        fecl_topk_kernel[grid](z, y, zt, yt, teacher_idx, N, NT, D, s.teacher_k, **s.consts,
                               K_PAD=k_pad(s.teacher_k), **s.tiles)

    log_neg = s.stat_empty(B, N)
    cross = cross_count = s.stat_empty(0)
    if s.teacher == 2:
        cross, cross_count = s.stat_empty(B, N), s.stat_empty(B, N)
    cs = col_shift if s.column else s.dummy_f
    fecl_logneg_kernel[grid](
        z, y, cs, zt, yt, topk_idx if s.top_k else s.dummy_i, teacher_idx if s.teacher_k else s.dummy_i,
        log_neg, cross if s.teacher == 2 else s.dummy_f, cross_count if s.teacher == 2 else s.dummy_f, s.params,
        N, NT, D, s.top_k, s.teacher_k, COLUMN=s.column, USE_TOPK=s.top_k > 0, GN_ON=s.gn_on, TEACHER=s.teacher,
        **s.consts, **s.tiles)

    u = torch.ones(B, N, device=s.device, dtype=torch.float32) if u is None else u.to(torch.float32).contiguous()
    loss, r, n_pos = s.stat_empty(B, N), s.stat_empty(B, N), s.stat_empty(B, N)
    fecl_positive_kernel[grid](z, y, cs, log_neg, u, loss, r, n_pos, s.params, N, D, COLUMN=s.column,
                               **s.consts, **s.tiles)
    return loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx


def fecl_backward(grad_loss, grad_cross, z, y, zt, yt, u, log_neg, r, n_pos, col_shift, topk_idx,
                  teacher_idx, cfg, *, blocks=None):
    """dz (z's dtype) from the upstream (B, N) gradients of ``loss`` and ``cross`` and the saved
    statistics; ``grad_cross`` is only read with the threshold teacher (may be None otherwise)."""
    s = _Launch(z, y, zt, yt, cfg, blocks)
    B, N, NT, D = s.B, s.N, s.NT, s.D
    z, y, zt, yt, grid = s.z, s.y, s.zt, s.yt, s.grid
    # a_i = grad_loss_i u_i / n_pos_i, 0 without positives (invalid anchors have n_pos = 0).
    n_pos = n_pos.to(s.stat)
    grad = grad_loss.to(s.stat) if u is None else grad_loss.to(s.stat) * u.to(s.stat)
    a = torch.where(n_pos > 0, grad / n_pos.clamp_min(1.0), torch.zeros((), device=s.device, dtype=s.stat))
    a = a.contiguous()
    log_neg, r = log_neg.to(s.stat).contiguous(), r.to(s.stat).contiguous()
    col_shift = col_shift.to(s.stat).contiguous() if s.column else s.dummy_f
    grad_cross = grad_cross.to(s.stat).contiguous() if s.teacher == 2 else s.dummy_f
    topk_idx = topk_idx.contiguous() if s.top_k else s.dummy_i
    teacher_idx = teacher_idx.contiguous() if s.teacher_k else s.dummy_i
    flags = dict(COLUMN=s.column, GN_ON=s.gn_on)
    # With top_k the key side of the sparse pairs is added with atomics: accumulate in ACC.
    dz = torch.empty(B, N, D, device=s.device, dtype=s.stat if s.top_k else z.dtype)
    fecl_backward_kernel[grid](z, y, col_shift, log_neg, r, a, zt, yt, topk_idx, teacher_idx, grad_cross, dz,
                               s.params, N, NT, D, s.top_k, s.teacher_k, USE_TOPK=s.top_k > 0, TEACHER=s.teacher,
                               **flags, **s.consts, **s.tiles)
    if s.top_k:
        fecl_topk_scatter_kernel[grid](z, col_shift, log_neg, r, a, topk_idx, dz, s.params, N, D, s.top_k,
                                       **flags, ACC=s.consts["ACC"], BLOCK_M=s.tiles["BLOCK_M"],
                                       BLOCK_D=s.tiles["BLOCK_D"])
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


def _config(kernel: str, dtype: str, D: int, **flags):
    """(kernel, signature, constexprs) of one launch: runtime arguments in order, with the types
    that fecl_forward/fecl_backward pass (statistics in the compute dtype, indices int64)."""
    tdt = TORCH_DTYPES[dtype]
    st, zp = ("*fp64" if dtype == "fp64" else "*fp32"), f"*{dtype}"
    bm, bn, bd = block_sizes(D, "cuda")
    acc, prec = compute_dtype(tdt), dot_precision(tdt)
    tiles = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd)
    if kernel == "colshift":
        return (fecl_colshift_kernel, dict(Z=zp, Y="*i64", CS=st, PARAMS=st, N="i32", D="i32"),
                dict(ACC=acc, DOT_PREC=prec, **tiles))
    if kernel == "topk":
        return (fecl_topk_kernel, dict(Z=zp, Y="*i64", KEYS=zp, KY="*i64", IDX="*i64", N="i32", NK="i32", D="i32",
                                       K="i32"), dict(ACC=acc, DOT_PREC=prec, K_PAD=flags["K_PAD"], **tiles))
    if kernel == "positive":
        return (fecl_positive_kernel, dict(Z=zp, Y="*i64", CS=st, LOGNEG=st, U="*fp32", LOSS=st, R=st, NPOS=st,
                                           PARAMS=st, N="i32", D="i32"),
                dict(COLUMN=flags["COLUMN"], ACC=acc, DOT_PREC=prec, **tiles))
    if kernel == "scatter":
        return (fecl_topk_scatter_kernel, dict(Z=zp, CS=st, LOGNEG=st, R=st, A=st, TOPK="*i64", DZ=st, PARAMS=st,
                                               N="i32", D="i32", K="i32"),
                dict(COLUMN=flags["COLUMN"], GN_ON=flags["GN_ON"], ACC=acc, BLOCK_M=bm, BLOCK_D=bd))
    column, use_topk, gn_on, teacher = flags["flags"]
    flags = dict(COLUMN=column, USE_TOPK=use_topk, GN_ON=gn_on, TEACHER=teacher, ACC=acc, DOT_PREC=prec, **tiles)
    if kernel == "logneg":
        return (fecl_logneg_kernel, dict(Z=zp, Y="*i64", CS=st, ZT=zp, YT="*i64", TOPK="*i64", TIDX="*i64",
                                         LOGNEG=st, CROSS=st, CCOUNT=st, PARAMS=st, N="i32", NT="i32", D="i32",
                                         K="i32", TK="i32"), flags)
    assert kernel == "backward"
    return (fecl_backward_kernel, dict(Z=zp, Y="*i64", CS=st, LOGNEG=st, R=st, A=st, ZT=zp, YT="*i64",
                                       TOPK="*i64", TIDX="*i64", GC=st, DZ=st if use_topk else zp, PARAMS=st,
                                       N="i32", NT="i32", D="i32", K="i32", TK="i32"), flags)


def _kernel_set(dtype, D, flag_sets, k_pads):
    """The launches of one call for each flag set (shared kernels listed once)."""
    configs = [_config("colshift", dtype, D)] if any(f[0] for f in flag_sets) else []
    configs += [_config("topk", dtype, D, K_PAD=kp) for kp in k_pads]
    configs += [_config("positive", dtype, D, COLUMN=c) for c in sorted({f[0] for f in flag_sets})]
    scatter_flags = sorted({(f[0], f[2]) for f in flag_sets if f[1]})
    configs += [_config("scatter", dtype, D, COLUMN=c, GN_ON=g) for c, g in scatter_flags]
    for f in flag_sets:
        configs += [_config("logneg", dtype, D, flags=f), _config("backward", dtype, D, flags=f)]
    return configs


def launch_configs(full: bool = False):
    """(kernel, signature, constexprs) of the launches of fecl_forward/fecl_backward on the GPU,
    for tests/triton_aot.py (a GPU compile of each catches what the interpreter accepts).

    ``full=True``: every launched combination for float32/float16/bfloat16/float64, the tiles of
    D in {16, 32, 64, 128, 256, 512}, K_PAD in {1, ..., 64} and every flag set (~1300 configs,
    hours of compiling: ptxas takes seconds per kernel). Default: a covering set (~30 configs)
    in which every kernel, dtype, tile shape and code path appears: at the D = 64 tiles every
    kernel for float32 (every flag set of the forward; for the backward both presets and the
    all-on set, which contain the other sets' code), the presets and the all-on set for
    bfloat16/float64, the 'dycon' preset for float16; the other tile shapes
    (64 x 64 x 16, 64 x 32 x 128, 32 x 32 x 512) for bfloat16."""
    if full:
        configs = []
        for dtype in TORCH_DTYPES:
            for D in (16, 32, 64, 128, 256, 512):
                configs += _kernel_set(dtype, D, ALL_FLAGS, (1, 2, 4, 8, 16, 32, 64))
        return configs
    dycon, official, all_on = COVER_FLAGS[:3]
    configs = [_config("colshift", "fp32", 64), _config("topk", "fp32", 64, K_PAD=1),
               _config("topk", "fp32", 64, K_PAD=32), _config("positive", "fp32", 64, COLUMN=True),
               _config("scatter", "fp32", 64, COLUMN=True, GN_ON=True)]
    configs += [_config("logneg", "fp32", 64, flags=f) for f in COVER_FLAGS]
    configs += [_config("backward", "fp32", 64, flags=f) for f in (dycon, official, all_on)]
    for dtype in ("bf16", "fp64"):
        configs += [_config("topk", dtype, 64, K_PAD=32), _config("positive", dtype, 64, COLUMN=True),
                    _config("scatter", dtype, 64, COLUMN=True, GN_ON=True), _config("logneg", dtype, 64, flags=all_on),
                    _config("backward", dtype, 64, flags=dycon), _config("backward", dtype, 64, flags=all_on)]
    configs += [_config("logneg", "fp16", 64, flags=dycon), _config("backward", "fp16", 64, flags=dycon)]
    for D in (16, 128, 512):
        configs += [_config("topk", "bf16", D, K_PAD=32), _config("backward", "bf16", D, flags=dycon)]
    return configs


# The flags (COLUMN, GN_ON, TEACHER) of the two presets (dycon_kernels/presets.py) and their
# teacher top-k: what benchmarks/kernel_report.py compiles.
PRESET_FLAGS = {"dycon": (False, True, 1), "official": (True, False, 2)}
PRESET_TEACHER_K = {"dycon": 32, "official": 0}


def report_configs(dtype: str, D: int, preset: str, top_k: int, cc: int):
    """The launches of one forward + backward call of ``preset`` with ``top_k`` (0 = dense) on
    sm_<cc> (the tiles do not depend on the card yet): ``(name, kernel, signature, constexprs,
    options)`` with ``options`` the compile options (num_warps, num_stages)."""
    column, gn_on, teacher = PRESET_FLAGS[preset]
    flags = (column, top_k > 0, gn_on, teacher)
    launches = []
    if column:
        launches.append(("colshift", _config("colshift", dtype, D)))
    if top_k:
        launches.append(("topk", _config("topk", dtype, D, K_PAD=k_pad(top_k))))
    if PRESET_TEACHER_K[preset]:
        launches.append(("topk_teacher", _config("topk", dtype, D, K_PAD=k_pad(PRESET_TEACHER_K[preset]))))
    launches += [("logneg", _config("logneg", dtype, D, flags=flags)),
                 ("positive", _config("positive", dtype, D, COLUMN=column)),
                 ("backward", _config("backward", dtype, D, flags=flags))]
    if top_k:
        launches.append(("scatter", _config("scatter", dtype, D, COLUMN=column, GN_ON=gn_on)))
    options = dict(num_warps=4, num_stages=3)  # Triton's defaults
    return [(name, kernel, sig, ce, options) for name, (kernel, sig, ce) in launches]
