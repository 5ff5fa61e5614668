"""The bfloat16 arithmetic of the FeCL Triton backward's tile loop, emulated on the CPU.

Under TRITON_INTERPRET=1 bfloat16 runs in float32 (the interpreter's bfloat16 dot is wrong), so
no CPU test executes what a GPU does with bfloat16 embeddings (docs/fecl_kernels.md, "Per-pair
arithmetic"). This module does, for the rows of one anchor block against all N keys:

- similarity dots ``l = z_i . z_j`` of bfloat16 operands on tensor cores: products exact, each
  block of 16 products (along D) summed, then added to a float32 accumulator with truncation
  (round toward zero), as the issue's model of HMMA/HGMMA accumulation;
- the pair coefficients ``g_ij`` (positives: both directions of f'(S) S (1 - S); dense negatives
  of the 'dycon' preset: the weighted exponentials) in float32;
- ``acc += g @ z_j`` per key tile of ``block_n`` keys as ``_dot_coef`` does it: g split into
  ``g_hi = bf16(g)`` and ``g_lo = bf16(g - g_hi)``, two tensor-core dots into the same float32
  accumulator (blocks of 16 keys, truncated).

``backward_rows(..., exact=True)`` is the same computation in float64 with exact sums: the
reference. The element-wise formulas are written once for both (``_coefficients``); they follow
the kernel's math, not its instruction sequence (the kernel's base-2 folding and fast lg2 are
float32 operations of the same size as the ones here). The saved statistics the backward reads
(log_neg, r, a) are inputs of this arithmetic; ``statistics`` estimates realistic values from a
sample of keys so that the emulation runs at N = 110 592 without an N x N pass.
"""
from __future__ import annotations

import math

import torch

F32_EPS = 2.0 ** -24  # float32 unit roundoff (round to nearest); truncation errs by up to 2u


def round_toward_zero_f32(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` rounded to float32 toward zero (as float64)."""
    r = x.to(torch.float32)
    over = r.double().abs() > x.abs()
    r = torch.where(over, torch.nextafter(r, torch.zeros_like(r)), r)
    return r.double()


def mma(a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor, exact: bool) -> torch.Tensor:
    """acc + a @ b for (M, K) x (K, N) operands holding bfloat16 values: exact (float64), or as a
    tensor core: products exact, each block of 16 along K summed, added to the float32
    accumulator with truncation."""
    if exact:
        return acc + a @ b
    k = a.shape[1]  # a ragged last block: the masked rows of a key tile load as zeros
    for start in range(0, k, 16):
        acc = round_toward_zero_f32(acc + a[:, start:start + 16] @ b[start:start + 16])
    return acc


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).double()


def _coefficients(l, y_i, y_j, ln_i, ln_j, a_i, a_j, ar_i, ar_j, tau, gp, gn, dtype):
    """g_ij of the backward's tile (positives, both directions, and dense negatives), computed in
    ``dtype`` from similarities ``l`` (cosines): 'dycon' without column shift."""
    l = l.to(dtype)
    x_ij = l / tau - ln_i[:, None].to(dtype)
    x_ji = l / tau - ln_j[None, :].to(dtype)

    def pos_grad(x):
        s = torch.sigmoid(x)
        return (1 - s) ** gp * ((1 - s) - gp * s * torch.nn.functional.logsigmoid(x))

    pos = (y_i[:, None] == y_j[None, :]) & (y_i[:, None] >= 0)
    neg = (y_i[:, None] != y_j[None, :]) & (y_i[:, None] >= 0) & (y_j[None, :] >= 0)
    g = torch.where(pos, -(a_i[:, None].to(dtype) * pos_grad(x_ij) + a_j[None, :].to(dtype) * pos_grad(x_ji)),
                    torch.zeros((), dtype=dtype))
    e = ar_i[:, None].to(dtype) * torch.exp(x_ij) + ar_j[None, :].to(dtype) * torch.exp(x_ji)
    return g + torch.where(neg, e * _neg_bracket(l, tau, gn), torch.zeros((), dtype=dtype))


def _neg_bracket(s, tau, gn):
    """The negatives' bracket w + gn tau / 2 base^(gn - 1) of cosines ``s``, base = (1 + tau l) / 2
    = (1 + s) / 2 for the logit l = s / tau (the kernels' _neg_bracket), 0 where base <= 0."""
    base = ((1 + s) / 2).clamp_min(0)
    return torch.where(base > 0, base ** gn + gn * tau / 2 * base ** (gn - 1), torch.zeros((), dtype=s.dtype))


def statistics(z, y, tau, gn, sample: int = 2048, seed: int = 0):
    """Realistic saved statistics for every key (log_neg, a, a * r), estimated from ``sample``
    random keys per anchor (the log of the negatives' sum scaled by N / sample)."""
    g = torch.Generator().manual_seed(seed)
    n = z.shape[0]
    keys = torch.randint(0, n, (sample,), generator=g)
    l = z @ z[keys].T
    neg = (y[:, None] != y[keys][None, :]) & (y[:, None] >= 0) & (y[keys][None, :] >= 0)
    w = ((1 + tau * l) / 2).clamp_min(0) ** gn
    log_neg = torch.log((torch.where(neg, w * torch.exp(l / tau), 0.0)).sum(1) * n / sample)
    n_pos = torch.bincount(y.clamp_min(0))[y.clamp_min(0)].double() - 1
    a = torch.randn(n, generator=g, dtype=torch.float64) / n_pos.clamp_min(1)
    r = torch.rand(n, generator=g, dtype=torch.float64) * n_pos  # R_i: a sum of n_pos terms in (0, 1)
    valid = y >= 0
    return (torch.where(valid, log_neg, -math.inf), torch.where(valid, a, 0.0), torch.where(valid, a * r, 0.0))


def backward_rows(z, y, stats, rows: int, exact: bool, tau=0.6, gp=2.0, gn=2.0, block_n: int = 64,
                  split: bool = True):
    """dz of the first ``rows`` anchors from the tile loop over all keys (z: (N, D) bfloat16
    values as float64): the kernel's bfloat16 arithmetic (``split=False``: g in one bfloat16
    part, to show what the split is for), or float64 exact. Also returns sum_j |g_ij| |z_j| / tau,
    the scale of the sum's rounding errors."""
    log_neg, a, ar = stats
    dtype = torch.float64 if exact else torch.float32
    zi = z[:rows]
    acc = torch.zeros(rows, z.shape[1], dtype=torch.float64)
    scale = torch.zeros_like(acc)
    for start in range(0, z.shape[0], block_n):
        zj = z[start:start + block_n]
        l = mma(zi, zj.T, torch.zeros(rows, zj.shape[0], dtype=torch.float64), exact)
        g = _coefficients(l, y[:rows], y[start:start + block_n], log_neg[:rows], log_neg[start:start + block_n],
                          a[:rows], a[start:start + block_n], ar[:rows], ar[start:start + block_n], tau, gp, gn,
                          dtype).double()
        scale += g.abs() @ zj.abs()
        if exact:
            acc = acc + g @ zj
        else:
            g = g.float().double()
            g_hi = bf16(g)
            acc = mma(g_hi, zj, acc, exact=False)
            if split:
                acc = mma(bf16(g - g_hi), zj, acc, exact=False)
    return acc / tau, scale / tau


def error_bound(n: int, d: int) -> float:
    """The model's bound on |dz_emulated - dz_exact| / (sum_j |g_ij| |z_j| / tau), per element:
    the split keeps g to 2^-16 relative (two bfloat16 parts, 8 + 8 significant bits, the second
    rounded to nearest); each truncating float32 accumulation into dz errs by at most 2u of the
    running sum, which is at most that scale, once per block of 16 keys (2 n / 16 blocks:
    the g_hi and g_lo dots); the coefficients are float32 functions of l, whose D / 16 truncating
    blocks err by (D / 16) 2u, amplified by |d log g / d l| <= 2 (1 / tau + 2) < 8 for tau = 0.6,
    plus ~32u of float32 element-wise rounding."""
    return 2.0 ** -16 + 2 * (2 * n / 16) * F32_EPS + 8 * (d / 16) * 2 * F32_EPS + 32 * F32_EPS


def emulate(n: int, d: int, rows: int = 16, n_classes: int = 4, seed: int = 0):
    """(max error of dz relative to max |dz|, max error relative to the scale, bound) for random
    unit-norm bfloat16 embeddings of n patches (10 % ignored)."""
    g = torch.Generator().manual_seed(seed)
    z = bf16(torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))
    y = torch.randint(0, n_classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -1
    y[:rows] = torch.arange(rows) % n_classes  # valid anchors
    stats = statistics(z, y, 0.6, 2.0, seed=seed)
    got, _ = backward_rows(z, y, stats, rows, exact=False)
    want, scale = backward_rows(z, y, stats, rows, exact=True)
    err = (got - want).abs()
    return (err.max() / want.abs().max()).item(), (err / scale.clamp_min(1e-300)).max().item(), error_bound(n, d)


PACK_LOW_BITS = 6  # the top-k passes' packed keys at 64-wide key tiles and top_k <= 64


def stored_similarity(s: torch.Tensor, low_bits: int = PACK_LOW_BITS) -> torch.Tensor:
    """float32 similarities (as float64) as the top-k pass stores them for 16-bit embeddings
    (fecl_topk_kernel, _bucket_value): the bits above the packed key's low bits kept, the low bits
    set to their bucket's middle."""
    low = (1 << low_bits) - 1
    bits = s.float().view(torch.int32)
    return ((bits & ~low) | ((low + 1) >> 1)).view(torch.float32).double()


def _topk_coefficients(s, ln_i, ar_i, tau, gn, dtype):
    """g_iq / tau = a_i R_i exp(s / tau - log_neg_i) bracket(s) / tau (fecl_sparse_coef_kernel) and
    |d log g / d s| = 1 / tau + bracket'(s) / bracket(s), in ``dtype``."""
    s = s.to(dtype)
    base = (1 + s) / 2
    bracket = _neg_bracket(s, tau, gn)
    slope = (gn / 2 * base ** (gn - 1) + gn * (gn - 1) * tau / 4 * base ** (gn - 2)) / bracket
    g = ar_i[:, None].to(dtype) * torch.exp(s / tau - ln_i[:, None].to(dtype)) * bracket / tau
    return g, 1 / tau + slope


def sparse_rows(z, y, stats, rows: int, k: int, exact: bool, tau=0.6, gn=2.0, low_bits: int = PACK_LOW_BITS):
    """The top-k negatives' row side of dz, sum_q g_iq z_q / tau, for the first ``rows`` anchors
    ('dycon' top-k: each anchor's k negatives of largest similarity). Emulated: the similarity the
    top-k pass stored (its tensor-core dot, blocks of 16 truncated into float32, at its packed
    key's bucket middle: stored_similarity), g in float32 (fecl_sparse_coef_kernel), the sum over
    the slots in float32 (fecl_sparse_rows_kernel's row side). Exact: float64 from the exact
    similarity (``low_bits``: another packing, to show what the bound catches). Also returns the scale sum_q |g_iq| |z_q| and the largest |d log g / d s|."""
    log_neg, _, ar = stats
    zi = z[:rows]
    s_exact = zi @ z.T
    neg = (y[:rows, None] != y[None, :]) & (y[:rows, None] >= 0) & (y[None, :] >= 0)
    idx = torch.where(neg, s_exact, -math.inf).topk(k, dim=1).indices
    zq = z[idx]  # (rows, k, D)
    if exact:
        s = s_exact.gather(1, idx)
    else:
        s = mma(zi, z.T, torch.zeros(rows, z.shape[0], dtype=torch.float64), exact=False)
        s = stored_similarity(s, low_bits).gather(1, idx)
    dtype = torch.float64 if exact else torch.float32
    g, slope = _topk_coefficients(s, log_neg[:rows], ar[:rows], tau, gn, dtype)
    acc = torch.zeros(rows, z.shape[1], dtype=dtype)
    for slot in range(k):
        acc = acc + g[:, slot, None] * zq[:, slot].to(dtype)
    scale = (g.double().abs()[:, :, None] * zq.abs()).sum(1)
    return acc.double(), scale, slope.abs().max().item()


def sparse_error_bound(d: int, k: int, slope: float) -> float:
    """The model's bound on the sparse row side's error / (sum_q |g_iq| |z_q|), per element: the
    stored similarity errs by at most half a bucket, 2^(PACK_LOW_BITS - 1) ulps = 2^-18 relative
    (|s| <= 1 for unit vectors, so 2^-18 absolute), plus its D / 16 truncating blocks, (D / 16) 2u,
    times |d log g / d s| (slope; exp of an error e is 1 + e (1 + e)); ~32u of float32 element-wise
    rounding; 2u for each of the k float32 additions and products of the sum."""
    ds = 2.0 ** -(24 - PACK_LOW_BITS) + (d / 16) * 2 * F32_EPS
    return slope * ds * (1 + slope * ds) + 32 * F32_EPS + 2 * k * F32_EPS


def emulate_sparse(n: int, d: int, k: int = 32, rows: int = 16, n_classes: int = 4, seed: int = 0,
                   low_bits: int = PACK_LOW_BITS):
    """As emulate, for the top-k negatives' row side: (max error relative to max |row side|,
    max error relative to the scale, bound)."""
    g = torch.Generator().manual_seed(seed)
    z = bf16(torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1))
    y = torch.randint(0, n_classes, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.1] = -1
    y[:rows] = torch.arange(rows) % n_classes
    stats = statistics(z, y, 0.6, 2.0, seed=seed)
    got, _, slope = sparse_rows(z, y, stats, rows, k, exact=False, low_bits=low_bits)
    want, scale, _ = sparse_rows(z, y, stats, rows, k, exact=True)
    err = (got - want).abs()
    return (err.max() / want.abs().max()).item(), (err / scale.clamp_min(1e-300)).max().item(), \
        sparse_error_bound(d, k, slope)
