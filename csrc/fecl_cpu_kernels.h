// FeCL's CPU hot loops (docs/fecl_kernels.md, "The C++ CPU kernels"): the per-row work on a tile
// of similarity rows that fecl_cpu.cpp has computed by BLAS. Included once per ISA level by
// cpu_isa_*.cpp inside namespace dycon::DYCON_ISA_NS (cpu_isa.h); no torch header, no allocation.
//
// A row holds one anchor's similarities against the keys of its volume in label order
// (FeclRowsFwd::perm), so its positives and negatives are contiguous blocks, processed by
// branch-free loops that GCC vectorises.

namespace dycon {
namespace DYCON_ISA_NS {
namespace {

// fn(j0, j1) for the two parts of [lo, hi) around position `skip` (the anchor's own key).
template <typename F> void around(int64_t lo, int64_t hi, int64_t skip, const F& fn) {
  fn(lo, dmin(skip, hi));
  fn(dmax(skip + 1, lo), hi);
}

// The loops over a block are branch-free (selects, fecl_math.h's formulas) under `omp simd`, so
// that the float32 build evaluates several pairs per instruction. A branch on a loop-invariant
// value stops GCC 12's vectoriser, so the focal exponents come as IntExp where they are the
// presets' 0 or 2 (with_exponent).

// Calls fn(g) with g as IntExp<0> or IntExp<2> when it is that integer, else as the runtime value.
template <typename A, typename F> void with_exponent(A g, const F& fn) {
  if (g == A(0)) fn(IntExp<0>{});
  else if (g == A(2)) fn(IntExp<2>{});
  else fn(g);
}

// max(m, row[p]) over positions j0 <= p < j1.
template <typename A> A row_max(A m, const A* row, int64_t j0, int64_t j1) {
#pragma omp simd reduction(max : m)
  for (int64_t p = j0; p < j1; ++p) m = row[p] > m ? row[p] : m;
  return m;
}

// Negatives at positions j0 <= p < j1 (c: their offsets): max(m, x) of x = l - c over those with
// w > 0, and s += w exp(x - m_final).
template <typename A, typename E>
A neg_max(A m, const A* row, const A* c, int64_t j0, int64_t j1, A inv_tau, E gn) {
#pragma omp simd reduction(max : m)
  for (int64_t p = j0; p < j1; ++p) {
    const A x = row[p] * inv_tau - c[p];
    m = ((neg_weight(row[p], gn) > A(0)) & (x > m)) ? x : m;
  }
  return m;
}

template <typename A, typename E>
A neg_sum(A s, const A* row, const A* c, int64_t j0, int64_t j1, A inv_tau, A m, E gn) {
#pragma omp simd reduction(+ : s)
  for (int64_t p = j0; p < j1; ++p) s += neg_weight(row[p], gn) * vexp(row[p] * inv_tau - c[p] - m);
  return s;
}

// log Neg_i over all of Q(i) (top_k = 0), the negatives at positions [v0, lo) and [hi, N): the max
// of x over those with w > 0, then log of the sum of w exp(x - max); -inf without a negative.
template <typename A, typename E>
A dense_log_neg(const A* row, const A* c, int64_t v0, int64_t lo, int64_t hi, int64_t N, A inv_tau, E gn) {
  const A m = neg_max(neg_max(neg_inf<A>(), row, c, v0, lo, inv_tau, gn), row, c, hi, N, inv_tau, gn);
  if (m == neg_inf<A>()) return m;
  const A s = neg_sum(neg_sum(A(0), row, c, v0, lo, inv_tau, m, gn), row, c, hi, N, inv_tau, m, gn);
  return m + flog(s);  // s >= the max term's w > 0 (flog, not vlog: w may be tiny)
}

// Anchor i's positives: sums of f(S_ij) and of f'(S_ij) S_ij (1 - S_ij), and their number.
template <typename A> struct PosSums {
  A f = 0, fs = 0, n = 0;
};

// Adds the positives at positions j0 <= p < j1.
template <typename A, typename E>
void add_positive_sums(PosSums<A>& ps, const A* row, const A* c, int64_t j0, int64_t j1, A inv_tau, A ln, E gp) {
  A f = 0, fs = 0;
#pragma omp simd reduction(+ : f, fs)
  for (int64_t p = j0; p < j1; ++p) {
    const PosTerm<A> pt = pos_term(row[p] * inv_tau - c[p] - ln, gp);
    f += pt.f;
    fs += pt.fs;
  }
  ps.f += f;
  ps.fs += fs;
  ps.n += A(dmax<int64_t>(j1 - j0, 0));
}

// Threshold teacher term of anchor i: the sum of -log(1 - c + eps) over the teacher keys with
// another label and c > thr, and their number.
template <typename A>
void threshold_sums(const A* trow, const int32_t* ytb, int64_t Nt, int32_t lab, A thr, A& cross, A& count) {
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

// The top-k of trow[k] over the keys with a label >= 0 other than lab into the heap (val, idx);
// returns its size. Once the heap is full, a chunk of keys whose largest such value does not beat
// the heap's minimum costs one vectorised pass. In a chunk that does (with random similarities,
// most chunks of a row), one branch per key that is rarely taken: the label test and "beats the
// minimum" combined with `&`, not `&&` (the label branch alone was a coin flip per key, and
// mispredicted; this loop was the largest non-BLAS cost of a dycon forward). It skips exactly the
// keys heap_push would reject.
template <typename A>
int64_t push_other_labels(A* val, int64_t* idx, int64_t k, const A* trow, const int32_t* yt, int64_t Nt, int32_t lab) {
  constexpr int64_t kChunk = 64;
  int64_t n = 0;
  for (int64_t k0 = 0; k0 < Nt; k0 += kChunk) {
    const int64_t k1 = dmin(k0 + kChunk, Nt);
    if (n == k) {
      A m = neg_inf<A>();
#pragma omp simd reduction(max : m)
      for (int64_t j = k0; j < k1; ++j) m = ((yt[j] >= 0) & (yt[j] != lab) & (trow[j] > m)) ? trow[j] : m;
      if (!(m > val[0])) continue;
    }
    for (int64_t j = k0; j < k1; ++j) {
      const bool other = (yt[j] >= 0) & (yt[j] != lab);
      if (other & ((n < k) | (trow[j] > val[0]))) heap_push(val, idx, n, k, trow[j], j);
    }
  }
  return n;
}

// ---- forward --------------------------------------------------------------------------------------

// Pass 1 (shift = column): c_j = max(0, max_{valid i != j} l_ij), by symmetry from strips of the
// similarity matrix (fecl_cpu.cpp), each entry counted for its row and for its column.
template <typename A> void strip_row_max(const A* L, int64_t W, int64_t r0, int64_t r1, A* m) {
  for (int64_t r = r0; r < r1; ++r) {
    const A* row = L + r * W;
    A v = m[r];
    around(int64_t(0), W, r, [&](int64_t j0, int64_t j1) { v = row_max(v, row, j0, j1); });
    m[r] = v;
  }
}

template <typename A> void strip_col_max(const A* L, int64_t rows, int64_t W, int64_t q0, int64_t q1, A* m) {
  for (int64_t r = 0; r < rows; ++r) {
    const A* row = L + r * W;
#pragma omp simd
    for (int64_t q = q0; q < q1; ++q) m[q] = row[q] > m[q] ? row[q] : m[q];
  }
}

// Pass 2: everything else of rows [r0, r1); heap: max(K, TK, 1) elements.
template <typename A> void forward_rows(const FeclRowsFwd<A>& f, A* heap_val, int64_t r0, int64_t r1) {
  const int64_t N = f.N, Nt = f.Nt, K = f.K, TK = f.TK, v0 = f.v0;
  const A inv_tau = f.inv_tau;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = f.i0 + r;
    const int32_t lab = f.y[i];
    int64_t* hidx = f.topk_idx ? f.topk_idx + i * K : nullptr;
    int64_t* tidx = f.teacher_idx ? f.teacher_idx + i * TK : nullptr;
    if (lab < 0) {  // ignored patch: neither anchor nor key
      f.loss[i] = 0;
      f.log_neg[i] = neg_inf<A>();
      f.r[i] = 0;
      f.n_pos[i] = 0;
      if (f.cross) f.cross[i] = f.cross_count[i] = 0;
      for (int64_t s = 0; s < K; ++s) hidx[s] = -1;
      for (int64_t s = 0; s < TK && tidx; ++s) tidx[s] = -1;
      continue;
    }
    const A* row = f.L + r * N;
    const int64_t lo = f.start[lab], hi = f.start[lab + 1];  // the positives' block
    // Negatives [v0, lo) and [hi, N): H(i) = Q(i) or its top_k largest l_iq; then the
    // teacher keys (valid, other label).
    Lse<A> lse;
    if (K > 0) {
      lse.init();
      int64_t n = 0;
      for (int64_t p = v0; p < lo; ++p) heap_push(heap_val, hidx, n, K, row[p], f.perm[p]);
      for (int64_t p = hi; p < N; ++p) heap_push(heap_val, hidx, n, K, row[p], f.perm[p]);
      for (int64_t s = 0; s < n; ++s) {  // the heap holds cosines: same order as l
        const A cos = heap_val[s];
        lse.add(cos * inv_tau - f.c_anchor[hidx[s]], neg_weight(cos, f.gn));
      }
      for (int64_t s = n; s < K; ++s) hidx[s] = -1;
    } else {
      with_exponent(f.gn, [&](auto e) { lse.init_log(dense_log_neg(row, f.c_key, v0, lo, hi, N, inv_tau, e)); });
    }
    if (f.topk_teacher) {
      const A* trow = f.Lt + r * Nt;
      const int64_t n = push_other_labels(heap_val, tidx, TK, trow, f.yt, Nt, lab);
      for (int64_t s = 0; s < n; ++s) lse.add(heap_val[s] * inv_tau, A(1));
      for (int64_t s = n; s < TK; ++s) tidx[s] = -1;
    } else if (f.thr_teacher) {
      threshold_sums(f.Lt + r * Nt, f.yt, Nt, lab, f.thr, f.cross[i], f.cross_count[i]);
    }
    const A ln = lse.result();
    PosSums<A> ps;
    with_exponent(f.gp, [&](auto e) {
      around(lo, hi, f.pos[i], [&](int64_t j0, int64_t j1) { add_positive_sums(ps, row, f.c_key, j0, j1, inv_tau, ln, e); });
    });
    f.log_neg[i] = ln;
    f.r[i] = ps.fs;
    f.n_pos[i] = ps.n;
    f.loss[i] = ps.n > A(0) ? -(f.u ? f.u[i] : A(1)) * ps.f / ps.n : A(0);
  }
}

// ---- backward -------------------------------------------------------------------------------------

// One anchor's statistics.
template <typename A> struct AnchorStat {
  A a, aR, ln, c;
};

// G over a block of positives [j0, j1): g_ij + g_ji of the positive term.
template <typename A, typename E>
void pos_grad_block(A* row, const FeclKeyStats<A>& k, const AnchorStat<A>& s, int64_t j0, int64_t j1, A inv_tau, E gp) {
#pragma omp simd
  for (int64_t p = j0; p < j1; ++p) {
    const A l = row[p] * inv_tau;
    row[p] = pos_grad(s.a, l, k.c[p], s.ln, gp) + pos_grad(k.a[p], l, s.c, k.ln[p], gp);
  }
}

// G over a block of negatives [j0, j1) (top_k = 0): g_iq + g_qi of the negative term.
template <typename A, typename E>
void neg_grad_block(A* row, const FeclKeyStats<A>& k, const AnchorStat<A>& s, int64_t j0, int64_t j1, A tau, A inv_tau,
                    E gn) {
#pragma omp simd
  for (int64_t p = j0; p < j1; ++p) {
    const A cos = row[p], l = cos * inv_tau;
    row[p] = neg_grad(s.aR, l, cos, k.c[p], s.ln, tau, gn) + neg_grad(k.aR[p], l, cos, s.c, k.ln[p], tau, gn);
  }
}

template <typename A> void zero_block(A* row, int64_t j0, int64_t j1) {
  for (int64_t p = j0; p < j1; ++p) row[p] = A(0);
}

// G_pq = g_pq + g_qp over the rows [r0, r1) of a strip (in place). Column q of a row is element
// q - p0; the key statistics are shifted the same way. With top_k the stored negative pairs are
// not in G (fecl_cpu.cpp adds them sparsely), so only the positives are.
template <typename A> void grad_rows(const FeclRowsBwd<A>& g, int64_t r0, int64_t r1) {
  const int64_t p0 = g.p0, W = g.W;
  const FeclKeyStats<A> k{g.key.a + p0, g.key.aR + p0, g.key.ln + p0, g.key.c + p0};
  const auto column = [&](int64_t q) { return dmin(dmax(q - p0, int64_t(0)), W); };
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p = p0 + r;
    const int32_t lab = g.y[p];
    A* row = g.G + r * W;
    const AnchorStat<A> st{g.key.a[p], g.key.aR[p], g.key.ln[p], g.key.c[p]};
    const int64_t lo = column(g.start[lab]), hi = column(g.start[lab + 1]);
    with_exponent(g.gp, [&](auto e) {
      around(lo, hi, r, [&](int64_t j0, int64_t j1) { pos_grad_block(row, k, st, j0, j1, g.inv_tau, e); });
    });
    row[r] = A(0);  // the anchor itself (column p)
    if (g.K == 0) {
      with_exponent(g.gn, [&](auto e) {
        neg_grad_block(row, k, st, 0, lo, g.tau, g.inv_tau, e);
        neg_grad_block(row, k, st, hi, W, g.tau, g.inv_tau, e);
      });
    } else {
      zero_block(row, 0, lo);
      zero_block(row, hi, W);
    }
  }
}

// Threshold teacher: d cross_i / d c_ik = 1 / (1 - c_ik + eps), no temperature; Gt rows in place.
template <typename A> void teacher_grad_rows(const FeclRowsBwd<A>& g, int64_t r0, int64_t r1) {
  const int64_t Nt = g.Nt;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t p = g.p0 + r;
    const int32_t lab = g.y[p];
    const A gc = g.grad_cross[p], thr = g.thr;
    A* row = g.Gt + r * Nt;
#pragma omp simd
    for (int64_t k = 0; k < Nt; ++k) {
      const A c = row[k];
      const bool in = (gc != A(0)) & (g.yt[k] >= 0) & (g.yt[k] != lab) & (c > thr);
      row[k] = in ? gc * cross_grad(c) : A(0);
    }
  }
}

// <a, b> over D elements, for the sparse pairs (stored top-k) whose similarity is not in a BLAS
// tile. omp simd: without it the sum is one chain of dependent scalar adds (4 cycles an element).
template <typename A> A dot(const A* a, const A* b, int64_t D) {
  A s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

// out += g x over D elements.
template <typename A> void axpy(A g, const A* x, A* out, int64_t D) {
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] += g * x[d];
}

}  // namespace

template <typename A> constexpr FeclCpuKernels<A> fecl_cpu_kernels() {
  return {&strip_row_max<A>, &strip_col_max<A>, &forward_rows<A>, &grad_rows<A>, &teacher_grad_rows<A>, &dot<A>, &axpy<A>};
}

}  // namespace DYCON_ISA_NS
}  // namespace dycon
