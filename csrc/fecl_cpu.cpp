// FeCL on the CPU (docs/fecl_kernels.md): anchors are processed in tiles of TI rows; the tile's
// similarities against all keys of its volume come from one BLAS product into a TI x N buffer
// (never N x N), and the rows of a tile are processed in parallel (at::parallel_for). The
// per-pair math is fecl_math.h, the same functions the CUDA kernels call.
//
// Forward:  [column shift] one pass of row maxima -> col_shift;
//           one pass per tile: top-k heap / log-sum-exp over negatives, teacher terms, positives.
// Backward: per tile, the symmetric coefficient matrix G_ij = g_ij + g_ji is written over the
//           similarity buffer (g_ji from anchor j's saved statistics), then dz_tile = G z / tau
//           by BLAS. Top-k negative pairs are sparse: g_iq is computed once per stored pair and
//           added to row i (at q) and, through a transposed index (CSR built serially), to row q.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "fecl_common.h"
#include "fecl_math.h"

namespace dycon {
namespace {

// Elements of one tile buffer (4 MiB in float32): rows per tile = kTileElems / N.
constexpr int64_t kTileElems = int64_t(1) << 20;

// Rows per parallel_for task: about 32k pairs, so that small problems run on one thread.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(width, 1)); }

int64_t tile_rows(int64_t N, int64_t Nt) {
  const int64_t width = std::max<int64_t>({N, Nt, 1});
  int64_t t = std::max<int64_t>(16, std::min<int64_t>(1024, kTileElems / width));
  return std::max<int64_t>(1, std::min<int64_t>(t, N));
}

// The labels y and yt as int32 codes with the same equalities, every label < 0 as -1: the row
// loops then compare 32-bit lanes next to their float32 data (GCC does not vectorise the loops
// with int64 label lanes).
using label_t = int32_t;
struct LabelCodes {
  at::Tensor y, yt;  // (B * N), (B * Nt) int32; yt undefined without a teacher
};

LabelCodes label_codes(const FeclArgs& a) {
  const bool teacher = a.teacher != kTeacherNone;
  const at::Tensor all = teacher ? at::cat({a.y.reshape(-1), a.yt.reshape(-1)}) : a.y.reshape(-1);
  const at::Tensor inverse = std::get<1>(at::_unique2(all, /*sorted=*/true, /*return_inverse=*/true));
  const at::Tensor codes = inverse.masked_fill(all < 0, -1).to(at::kInt);
  LabelCodes c;
  c.y = codes.narrow(0, 0, a.B * a.N).contiguous();
  if (teacher) c.yt = codes.narrow(0, a.B * a.N, a.B * a.Nt).contiguous();
  return c;
}

template <typename A> A dot(const A* a, const A* b, int64_t D) {
  A s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// The per-row loops below are branch-free (masks and selects, fecl_math.h's formulas) under
// `omp simd`, so that the float32 build evaluates several pairs per instruction. What stops
// GCC 12 from vectorising them, and is avoided: a branch on a loop-invariant value (so the focal
// exponents come as IntExp where they are the presets' 0 or 2, see with_exponent), `j != i` on
// 64-bit indices (the diagonal is left out by splitting the range), int64 labels (label_codes).

// Calls fn(g) with g as IntExp<0> or IntExp<2> when it is that integer, else as the runtime value.
template <typename A, typename F> void with_exponent(A g, const F& fn) {
  if (g == A(0)) fn(IntExp<0>{});
  else if (g == A(2)) fn(IntExp<2>{});
  else fn(g);
}

// log Neg_i over all of Q(i) (top_k = 0): the max of x = l - c over the negatives with w > 0,
// then log of sum w exp(x - max); -inf without a negative. (j = i has label lab: no j != i test.)
template <typename A, typename E>
A dense_log_neg(const A* row, const label_t* yb, const A* cb, int64_t N, label_t lab, A inv_tau, E gn) {
  A m = neg_inf<A>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < N; ++j) {
    const bool neg = (yb[j] >= 0) & (yb[j] != lab) & (neg_weight(row[j], gn) > A(0));
    const A x = row[j] * inv_tau - cb[j];
    m = (neg & (x > m)) ? x : m;
  }
  if (m == neg_inf<A>()) return m;
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t j = 0; j < N; ++j) {
    const bool neg = (yb[j] >= 0) & (yb[j] != lab);
    const A e = neg_weight(row[j], gn) * vexp(row[j] * inv_tau - cb[j] - m);
    s += neg ? e : A(0);
  }
  return m + flog(s);  // s >= the max term's w > 0 (flog, not vlog: w may be tiny)
}

// Anchor i's positives: sums of f(S_ij) and of f'(S_ij) S_ij (1 - S_ij), and their number.
template <typename A> struct PosSums {
  A f = 0, fs = 0, n = 0;
};

// The same over keys j0 <= j < j1 with label lab.
template <typename A, typename E>
void add_positive_sums(PosSums<A>& ps, const A* row, const label_t* yb, const A* cb, int64_t j0, int64_t j1,
                       label_t lab, A inv_tau, A ln, E gp) {
  A f = 0, fs = 0, n = 0;
#pragma omp simd reduction(+ : f, fs, n)
  for (int64_t j = j0; j < j1; ++j) {
    const bool pos = yb[j] == lab;
    const PosTerm<A> pt = pos_term(row[j] * inv_tau - cb[j] - ln, gp);
    f += pos ? pt.f : A(0);
    fs += pos ? pt.fs : A(0);
    n += pos ? A(1) : A(0);
  }
  ps.f += f;
  ps.fs += fs;
  ps.n += n;
}

template <typename A, typename E>
PosSums<A> positive_sums(const A* row, const label_t* yb, const A* cb, int64_t N, int64_t i, label_t lab,
                         A inv_tau, A ln, E gp) {
  PosSums<A> ps;
  add_positive_sums(ps, row, yb, cb, 0, i, lab, inv_tau, ln, gp);
  add_positive_sums(ps, row, yb, cb, i + 1, N, lab, inv_tau, ln, gp);
  return ps;
}

// max(m, row[j]) over the valid keys j0 <= j < j1.
template <typename A> A valid_max(A m, const A* row, const label_t* yb, int64_t j0, int64_t j1) {
#pragma omp simd reduction(max : m)
  for (int64_t j = j0; j < j1; ++j) m = ((yb[j] >= 0) & (row[j] > m)) ? row[j] : m;
  return m;
}

// Threshold teacher term of anchor i: the sum of -log(1 - c + eps) over the teacher keys with
// another label and c > thr, and their number.
template <typename A>
void threshold_sums(const A* trow, const label_t* ytb, int64_t Nt, label_t lab, A thr, A& cross, A& count) {
  A cr = 0, cnt = 0;
#pragma omp simd reduction(+ : cr, cnt)
  for (int64_t k = 0; k < Nt; ++k) {
    const bool in = (ytb[k] >= 0) & (ytb[k] != lab) & (trow[k] > thr);
    const A term = cross_term(trow[k]);
    cr += in ? term : A(0);
    cnt += in ? A(1) : A(0);
  }
  cross = cr;
  count = cnt;
}

template <typename A>
void forward_impl(const FeclArgs& a, const at::Tensor& zc, const at::Tensor& ztc, FeclOutputs& o) {
  const int64_t B = a.B, N = a.N, Nt = a.Nt, K = a.top_k, TK = a.teacher_top_k;
  const A tau = A(a.tau), gp = A(a.gamma_pos), gn = A(a.gamma_neg), thr = A(a.teacher_threshold);
  const A inv_tau = A(1) / tau;
  const bool topk_teacher = a.teacher == kTeacherTopk, thr_teacher = a.teacher == kTeacherThreshold;
  const bool teacher = a.teacher != kTeacherNone;
  const int64_t TI = tile_rows(N, teacher ? Nt : 0);
  auto opts = zc.options();
  at::Tensor L = at::empty({TI, N}, opts);
  at::Tensor Lt = teacher ? at::empty({TI, Nt}, opts) : at::Tensor();

  const LabelCodes codes = label_codes(a);
  const label_t* yp = codes.y.data_ptr<label_t>();
  const label_t* ytp = teacher ? codes.yt.data_ptr<label_t>() : nullptr;
  const A* up = a.u.defined() ? a.u.data_ptr<A>() : nullptr;
  A* loss = o.loss.data_ptr<A>();
  A* log_neg = o.log_neg.data_ptr<A>();
  A* rr = o.r.data_ptr<A>();
  A* npos = o.n_pos.data_ptr<A>();
  A* cs = a.column_shift ? o.col_shift.data_ptr<A>() : nullptr;
  A* cross = thr_teacher ? o.cross.data_ptr<A>() : nullptr;
  A* ccount = thr_teacher ? o.cross_count.data_ptr<A>() : nullptr;
  int64_t* tki = K > 0 ? o.topk_idx.data_ptr<int64_t>() : nullptr;
  int64_t* tti = topk_teacher ? o.teacher_idx.data_ptr<int64_t>() : nullptr;
  const std::vector<A> no_shift(cs ? 0 : N, A(0));  // c = 0 without the column shift

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor zb = zc[b];
    const label_t* yb = yp + b * N;
    const label_t* ytb = teacher ? ytp + b * Nt : nullptr;
    const A* cb = cs ? cs + b * N : no_shift.data();

    // Pass 1 (shift = column): c_j = max(0, max_{valid i != j} l_ij), a row max by symmetry.
    if (cs) {
      for (int64_t i0 = 0; i0 < N; i0 += TI) {
        const int64_t rows = std::min(TI, N - i0);
        at::Tensor Lv = L.narrow(0, 0, rows);
        at::mm_out(Lv, zb.narrow(0, i0, rows), zb.t());
        const A* Lp = L.data_ptr<A>();
        at::parallel_for(0, rows, row_grain(N), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t i = i0 + r;
            const A* row = Lp + r * N;
            // max(0, max cos) over valid j != i, / tau afterwards: the same number, tau > 0.
            cs[b * N + i] = valid_max(valid_max(A(0), row, yb, 0, i), row, yb, i + 1, N) / tau;
          }
        });
      }
    }

    // Pass 2: everything else, one BLAS product (two with a teacher) per tile.
    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t rows = std::min(TI, N - i0);
      at::Tensor Lv = L.narrow(0, 0, rows);
      at::mm_out(Lv, zb.narrow(0, i0, rows), zb.t());
      if (teacher) {
        at::Tensor Ltv = Lt.narrow(0, 0, rows);
        at::mm_out(Ltv, zb.narrow(0, i0, rows), ztc[b].t());
      }
      const A* Lp = L.data_ptr<A>();
      const A* Ltp = teacher ? Lt.data_ptr<A>() : nullptr;
      at::parallel_for(0, rows, row_grain(N + (teacher ? Nt : 0)), [&](int64_t r0, int64_t r1) {
        std::vector<A> heap_val(std::max<int64_t>({K, TK, 1}));
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = i0 + r, gi = b * N + i;
          const label_t lab = yb[i];
          int64_t* hidx = tki ? tki + gi * K : nullptr;
          int64_t* tidx = tti ? tti + gi * TK : nullptr;
          if (lab < 0) {  // ignored patch: neither anchor nor key
            loss[gi] = 0;
            log_neg[gi] = neg_inf<A>();
            rr[gi] = 0;
            npos[gi] = 0;
            if (cross) cross[gi] = ccount[gi] = 0;
            for (int64_t s = 0; s < K; ++s) hidx[s] = -1;
            for (int64_t s = 0; s < TK && tidx; ++s) tidx[s] = -1;
            continue;
          }
          const A* row = Lp + r * N;
          // Negatives: H(i) = Q(i) or its top_k largest l_iq; then the teacher keys (valid, other label).
          Lse<A> lse;
          if (K > 0) {
            lse.init();
            int64_t n = 0;
            for (int64_t j = 0; j < N; ++j)
              if (j != i && yb[j] >= 0 && yb[j] != lab) heap_push(heap_val.data(), hidx, n, K, row[j], j);
            for (int64_t s = 0; s < n; ++s) {  // the heap holds cosines: same order as l
              const A cos = heap_val[s];
              lse.add(cos * inv_tau - cb[hidx[s]], neg_weight(cos, gn));
            }
            for (int64_t s = n; s < K; ++s) hidx[s] = -1;
          } else {
            with_exponent(gn, [&](auto e) { lse.init_log(dense_log_neg(row, yb, cb, N, lab, inv_tau, e)); });
          }
          if (topk_teacher) {
            const A* trow = Ltp + r * Nt;
            int64_t n = 0;
            for (int64_t k = 0; k < Nt; ++k)
              if (ytb[k] >= 0 && ytb[k] != lab) heap_push(heap_val.data(), tidx, n, TK, trow[k], k);
            for (int64_t s = 0; s < n; ++s) lse.add(heap_val[s] * inv_tau, A(1));
            for (int64_t s = n; s < TK; ++s) tidx[s] = -1;
          } else if (thr_teacher) {
            threshold_sums(Ltp + r * Nt, ytb, Nt, lab, thr, cross[gi], ccount[gi]);
          }
          const A ln = lse.result();
          PosSums<A> ps;
          with_exponent(gp, [&](auto e) { ps = positive_sums(row, yb, cb, N, i, lab, inv_tau, ln, e); });
          log_neg[gi] = ln;
          rr[gi] = ps.fs;
          npos[gi] = ps.n;
          loss[gi] = ps.n > A(0) ? -(up ? up[gi] : A(1)) * ps.f / ps.n : A(0);
        }
      });
    }
  }
}

// Per-anchor statistics of one volume that the backward reads for both ends of a pair.
template <typename A> struct AnchorStats {
  const A* a;    // a_i
  const A* aR;   // a_i R_i
  const A* ln;   // log_neg_i
  const A* c;    // c_i (zeros without the column shift)
};

// Row i of G = g_ij + g_ji over the similarity row `row` (overwritten): positives both ways and,
// with kDenseNeg (top_k = 0), negatives both ways; 0 elsewhere (the diagonal set after the loop).
template <bool kDenseNeg, typename A, typename EP, typename EN>
void pair_grad_loop(A* row, const label_t* yb, const AnchorStats<A>& st, int64_t N, int64_t i, label_t lab,
                   A tau, A inv_tau, EP gp, EN gn) {
  const A a_i = st.a[i], aR_i = st.aR[i], ln_i = st.ln[i], c_i = st.c[i];
#pragma omp simd
  for (int64_t j = 0; j < N; ++j) {
    const bool valid = yb[j] >= 0, same = yb[j] == lab;
    const A cos = row[j], l = cos * inv_tau;
    const A pos = pos_grad(a_i, l, st.c[j], ln_i, gp) + pos_grad(st.a[j], l, c_i, st.ln[j], gp);
    A g = same ? pos : A(0);
    if constexpr (kDenseNeg) {
      const A neg = neg_grad(aR_i, l, cos, st.c[j], ln_i, tau, gn) + neg_grad(st.aR[j], l, cos, c_i, st.ln[j], tau, gn);
      g = (valid & !same) ? neg : g;
    }
    row[j] = g;
  }
  row[i] = A(0);
}

template <bool kDenseNeg, typename A>
void pair_grad_row(A* row, const label_t* yb, const AnchorStats<A>& st, int64_t N, int64_t i, label_t lab,
                   A tau, A inv_tau, A gp, A gn) {
  with_exponent(gp, [&](auto ep) {
    with_exponent(gn, [&](auto en) { pair_grad_loop<kDenseNeg>(row, yb, st, N, i, lab, tau, inv_tau, ep, en); });
  });
}

template <typename A>
at::Tensor backward_impl(const FeclArgs& a, const FeclSavedIn& s, const at::Tensor& zc,
                         const at::Tensor& ztc) {
  const int64_t B = a.B, N = a.N, D = a.D, Nt = a.Nt, K = a.top_k, TK = a.teacher_top_k;
  const A tau = A(a.tau), gp = A(a.gamma_pos), gn = A(a.gamma_neg), thr = A(a.teacher_threshold);
  const bool topk_teacher = a.teacher == kTeacherTopk;
  const bool thr_teacher = a.teacher == kTeacherThreshold && s.grad_cross.defined();
  const int64_t TI = tile_rows(N, thr_teacher ? Nt : 0);
  const A inv_tau = A(1) / tau;
  auto opts = zc.options();

  const LabelCodes codes = label_codes(a);
  const label_t* yp = codes.y.data_ptr<label_t>();
  const label_t* ytp = a.teacher != kTeacherNone ? codes.yt.data_ptr<label_t>() : nullptr;
  const A* up = a.u.defined() ? a.u.data_ptr<A>() : nullptr;
  const A* gl = s.grad_loss.data_ptr<A>();
  const A* gc = thr_teacher ? s.grad_cross.data_ptr<A>() : nullptr;
  const A* lnp = s.log_neg.data_ptr<A>();
  const A* rp = s.r.data_ptr<A>();
  const A* npp = s.n_pos.data_ptr<A>();
  const A* cs = a.column_shift ? s.col_shift.data_ptr<A>() : nullptr;
  const int64_t* tki = K > 0 ? s.topk_idx.data_ptr<int64_t>() : nullptr;
  const int64_t* tti = topk_teacher ? s.teacher_idx.data_ptr<int64_t>() : nullptr;
  const A* zp = zc.data_ptr<A>();
  const A* ztp = a.teacher != kTeacherNone ? ztc.data_ptr<A>() : nullptr;

  // Per-anchor coefficients a_i and a_i R_i.
  at::Tensor coef = at::empty({2, B * N}, opts);
  A* ap = coef.data_ptr<A>();
  A* arp = ap + B * N;
  at::parallel_for(0, B * N, 1 << 14, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      ap[g] = anchor_coef(yp[g] >= 0, gl[g], up ? up[g] : A(1), npp[g]);
      arp[g] = ap[g] * rp[g];
    }
  });

  // Top-k negatives: g_iq per stored pair, and the transposed index (key q -> its anchors).
  at::Tensor gk, rev_ptr, rev_anchor, rev_g;
  const A* gkp = nullptr;
  const int64_t* rptr = nullptr;
  const int64_t* ranc = nullptr;
  const A* rg = nullptr;
  if (K > 0) {
    gk = at::empty({B * N * K}, opts);
    A* gkw = gk.data_ptr<A>();
    at::parallel_for(0, B * N, row_grain(K * D), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t b = g / N;
        for (int64_t t = 0; t < K; ++t) {
          const int64_t q = tki[g * K + t];
          A v = 0;
          if (q >= 0 && arp[g] != A(0)) {
            const A cos = dot(zp + g * D, zp + (b * N + q) * D, D);
            v = neg_grad(arp[g], cos * inv_tau, cos, cs ? cs[b * N + q] : A(0), lnp[g], tau, gn);
          }
          gkw[g * K + t] = v;
        }
      }
    });
    rev_ptr = at::empty({B * N + 1}, a.y.options());
    int64_t* ptr = rev_ptr.data_ptr<int64_t>();
    std::fill(ptr, ptr + B * N + 1, int64_t(0));
    for (int64_t g = 0; g < B * N; ++g)
      for (int64_t t = 0; t < K; ++t) {
        const int64_t q = tki[g * K + t];
        if (q >= 0) ++ptr[(g / N) * N + q + 1];
      }
    for (int64_t g = 0; g < B * N; ++g) ptr[g + 1] += ptr[g];
    const int64_t total = ptr[B * N];
    rev_anchor = at::empty({std::max<int64_t>(total, 1)}, a.y.options());
    rev_g = at::empty({std::max<int64_t>(total, 1)}, opts);
    int64_t* ra = rev_anchor.data_ptr<int64_t>();
    A* rgw = rev_g.data_ptr<A>();
    std::vector<int64_t> fill(ptr, ptr + B * N);
    for (int64_t g = 0; g < B * N; ++g)
      for (int64_t t = 0; t < K; ++t) {
        const int64_t q = tki[g * K + t];
        if (q < 0) continue;
        const int64_t pos = fill[(g / N) * N + q]++;
        ra[pos] = g % N;
        rgw[pos] = gkw[g * K + t];
      }
    gkp = gkw;
    rptr = ptr;
    ranc = ra;
    rg = rgw;
  }

  at::Tensor dz = at::empty_like(a.z);
  at::Tensor G = at::empty({TI, N}, opts);
  at::Tensor Gt = thr_teacher ? at::empty({TI, Nt}, opts) : at::Tensor();
  at::Tensor dzt = at::empty({TI, D}, opts);
  const std::vector<A> no_shift(cs ? 0 : N, A(0));  // c = 0 without the column shift

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor zb = zc[b];
    const label_t* yb = yp + b * N;
    const label_t* ytb = ytp ? ytp + b * Nt : nullptr;
    const AnchorStats<A> st{ap + b * N, arp + b * N, lnp + b * N, cs ? cs + b * N : no_shift.data()};
    const A* arb = st.aR;
    const A* lnb = st.ln;
    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t rows = std::min(TI, N - i0);
      at::Tensor Gv = G.narrow(0, 0, rows);
      at::mm_out(Gv, zb.narrow(0, i0, rows), zb.t());
      A* Gp = G.data_ptr<A>();
      // G_ij = g_ij + g_ji over the similarity buffer.
      at::parallel_for(0, rows, row_grain(N), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = i0 + r, gi = b * N + i;
          const label_t lab = yb[i];
          A* row = Gp + r * N;
          if (lab < 0) {
            std::fill(row, row + N, A(0));
            continue;
          }
          if (K > 0) pair_grad_row<false>(row, yb, st, N, i, lab, tau, inv_tau, gp, gn);
          else pair_grad_row<true>(row, yb, st, N, i, lab, tau, inv_tau, gp, gn);
          if (K > 0) {
            for (int64_t t = 0; t < K; ++t) {
              const int64_t q = tki[gi * K + t];
              if (q >= 0) row[q] += gkp[gi * K + t];
            }
            for (int64_t p = rptr[gi]; p < rptr[gi + 1]; ++p) row[ranc[p]] += rg[p];
          }
        }
      });
      at::Tensor dzv = dzt.narrow(0, 0, rows);
      at::mm_out(dzv, Gv, zb);
      dzv.div_(a.tau);
      // Threshold teacher: d cross_i / d c_ik = 1 / (1 - c_ik + eps), no temperature.
      if (thr_teacher) {
        at::Tensor Gtv = Gt.narrow(0, 0, rows);
        at::mm_out(Gtv, zb.narrow(0, i0, rows), ztc[b].t());
        A* Gtp = Gt.data_ptr<A>();
        at::parallel_for(0, rows, row_grain(Nt), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t gi = b * N + i0 + r;
            const label_t lab = yb[i0 + r];
            const A g = gc[gi];
            A* row = Gtp + r * Nt;
            for (int64_t k = 0; k < Nt; ++k) {
              const A c = row[k];
              row[k] = (lab >= 0 && g != A(0) && ytb[k] >= 0 && ytb[k] != lab && c > thr) ? g * cross_grad(c) : A(0);
            }
          }
        });
        dzv.addmm_(Gtv, ztc[b]);
      }
      // Top-k teacher: g^t_ik = a_i R_i exp(l^t_ik - log_neg_i), teacher gets no gradient.
      if (topk_teacher) {
        A* dzp = dzt.data_ptr<A>();
        at::parallel_for(0, rows, row_grain(TK * D), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t gi = b * N + i0 + r;
            if (yb[i0 + r] < 0 || arb[i0 + r] == A(0)) continue;
            const A* zi = zp + gi * D;
            A* out = dzp + r * D;
            for (int64_t t = 0; t < TK; ++t) {
              const int64_t k = tti[gi * TK + t];
              if (k < 0) continue;
              const A* zk = ztp + (b * Nt + k) * D;
              const A cos = dot(zi, zk, D);
              const A g = neg_grad(arb[i0 + r], cos * inv_tau, cos, A(0), lnb[i0 + r], tau, A(0)) * inv_tau;
              for (int64_t d = 0; d < D; ++d) out[d] += g * zk[d];
            }
          }
        });
      }
      dz[b].narrow(0, i0, rows).copy_(dzv);
    }
  }
  return dz;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
fecl_forward_cpu(const at::Tensor& z, const at::Tensor& y, const c10::optional<at::Tensor>& zt,
                 const c10::optional<at::Tensor>& yt, const c10::optional<at::Tensor>& u, double tau,
                 double gamma_pos, double gamma_neg, int64_t top_k, bool column_shift, int64_t teacher_mode,
                 int64_t teacher_top_k, double teacher_threshold) {
  FeclArgs a = fecl_args(z, y, zt, yt, u, tau, gamma_pos, gamma_neg, top_k, column_shift, teacher_mode,
                         teacher_top_k, teacher_threshold);
  FeclOutputs o = fecl_alloc_outputs(a);
  // Half inputs are widened once (B x N x D); float and double are used in place.
  at::Tensor zc = a.z.to(a.acc).contiguous();
  at::Tensor ztc = a.teacher != kTeacherNone ? a.zt.to(a.acc).contiguous() : at::Tensor();
  if (a.acc == at::kDouble) forward_impl<double>(a, zc, ztc, o);
  else forward_impl<float>(a, zc, ztc, o);
  return o.tuple();
}

at::Tensor fecl_backward_cpu(const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_cross,
                             const at::Tensor& z, const at::Tensor& y, const c10::optional<at::Tensor>& zt,
                             const c10::optional<at::Tensor>& yt, const c10::optional<at::Tensor>& u,
                             const at::Tensor& log_neg, const at::Tensor& r, const at::Tensor& n_pos,
                             const at::Tensor& col_shift, const at::Tensor& topk_idx,
                             const at::Tensor& teacher_idx, double tau, double gamma_pos, double gamma_neg,
                             int64_t top_k, bool column_shift, int64_t teacher_mode, int64_t teacher_top_k,
                             double teacher_threshold) {
  FeclArgs a = fecl_args(z, y, zt, yt, u, tau, gamma_pos, gamma_neg, top_k, column_shift, teacher_mode,
                         teacher_top_k, teacher_threshold);
  FeclSavedIn s = fecl_saved(a, grad_loss, grad_cross, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx);
  at::Tensor zc = a.z.to(a.acc).contiguous();
  at::Tensor ztc = a.teacher != kTeacherNone ? a.zt.to(a.acc).contiguous() : at::Tensor();
  if (a.acc == at::kDouble) return backward_impl<double>(a, s, zc, ztc);
  return backward_impl<float>(a, s, zc, ztc);
}

}  // namespace

TORCH_LIBRARY_IMPL(dycon_C, CPU, m) {
  m.impl("fecl_forward", &fecl_forward_cpu);
  m.impl("fecl_backward", &fecl_backward_cpu);
}

}  // namespace dycon
