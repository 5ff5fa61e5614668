// FeCL per-pair and per-anchor math (losses.md section 2, docs/fecl_kernels.md), shared by
// fecl_cpu.cpp and fecl_cuda.cu so that the CPU tests exercise the formulas the CUDA kernels run.
//
// Notation: l = <z_i, z_j> / tau, c_j the key offset (0 unless shift = column), log_neg_i the
// log of the anchor's negative sum, x_ij = l_ij - c_j - log_neg_i, S_ij = sigmoid(x_ij).
// Everything is written so that log_neg = -inf (no negative) gives S = 1, log S = 0 and a zero
// gradient, and no exp can overflow for any tau.
#pragma once

#include <math.h>

#include "common.h"
#include "fast_math.h"

namespace dycon {

constexpr double kFeclCrossEps = 1e-18;  // -log(1 - c + eps) in the threshold teacher term

// Transcendentals with an explicit float / double overload (the same calls on host and device).
DYCON_HD float fexp(float x) { return expf(x); }
DYCON_HD double fexp(double x) { return exp(x); }
DYCON_HD float flog(float x) { return logf(x); }
DYCON_HD double flog(double x) { return log(x); }

template <typename A> DYCON_HD A neg_inf() { return A(-INFINITY); }

// base^g with exact small integer exponents (the presets use 0 and 2) and 0^0 = 1.
template <typename A> DYCON_HD A fpow(A base, A g) {
  if (g == A(0)) return A(1);
  if (g == A(1)) return base;
  if (g == A(2)) return base * base;
  if (g == A(3)) return base * base * base;
  return vpow(base, g);
}

// A focal exponent fixed at compile time (the CPU kernels pass the presets' 0 and 2 this way):
// base^N as N - 1 multiplications and no branch on the exponent, which inside a row loop would
// stop GCC's vectoriser. The formulas below take an exponent E that is either this or an A;
// A(g) is its value.
template <int N> struct IntExp {
  template <typename A> DYCON_HD constexpr explicit operator A() const { return A(N); }
};
template <typename A, int N> DYCON_HD A fpow(A base, IntExp<N>) {
  if constexpr (N < 0) return A(1) / fpow(base, IntExp<-N>{});
  else if constexpr (N == 0) return A(1);
  else return base * fpow(base, IntExp<N - 1>{});
}
template <typename A> DYCON_HD A minus_one(A g) { return g - A(1); }
template <int N> DYCON_HD IntExp<N - 1> minus_one(IntExp<N>) { return {}; }

// ---- negatives: w_iq = ((1 + cos_iq) / 2)^gn, cos = tau l; w = 0 where the base is <= 0 --------

template <typename A> DYCON_HD A neg_base(A cos) { return (A(1) + cos) * A(0.5); }

template <typename A, typename E> DYCON_HD A neg_weight(A cos, E gn) {
  if (A(gn) == A(0)) return A(1);
  const A base = neg_base(cos);
  return base > A(0) ? fpow(base, gn) : A(0);
}

// d(w e)/dl / e = w + gn tau/2 base^(gn-1) = base^(gn-1) (base + gn tau/2): one power, none for
// the presets' gn = 2 (1 for gn = 0; 0 where w = 0).
template <typename A, typename E> DYCON_HD A neg_bracket(A cos, A tau, E gn) {
  if (A(gn) == A(0)) return A(1);
  const A base = neg_base(cos);
  return base > A(0) ? fpow(base, minus_one(gn)) * (base + A(gn) * tau * A(0.5)) : A(0);
}

// ---- log of the negative sum: online log-sum-exp of log(w) + x ---------------------------------

template <typename A> struct Lse {
  A m;  // running max of x over the terms with w > 0
  A s;  // sum of w exp(x - m)
  DYCON_HD void init() {
    m = neg_inf<A>();
    s = A(0);
  }
  DYCON_HD void init_log(A log_sum) {  // start from a sum known by its log (-inf: empty)
    m = log_sum;
    s = A(1);
  }
  DYCON_HD void add(A x, A w) {
    if (!(w > A(0)) || x == neg_inf<A>()) return;
    if (x > m) {
      s = s * fexp(m - x) + w;
      m = x;
    } else {
      s += w * fexp(x - m);
    }
  }
  DYCON_HD A result() const { return s > A(0) ? m + flog(s) : neg_inf<A>(); }
};

// ---- positives: f(S) = (1 - S)^gp log S and f'(S) S (1 - S) ------------------------------------

template <typename A> struct PosTerm {
  A f;   // (1 - S)^gp log S
  A fs;  // f'(S) S (1 - S) = (1 - S)^(gp+1) - gp (1 - S)^gp S log S
};

// S = sigmoid(x) from one exp, one reciprocal and one log, branch-free (so the CPU loops over a
// row vectorise) and finite for any x: with a = exp(-|x|) in [0, 1] and u = 1 + a, S and 1 - S
// are 1/u and a/u (which is which: the sign of x), log S = -softplus(-x) = min(x, 0) - log1p(a).
template <typename A, typename E> DYCON_HD PosTerm<A> pos_term(A x, E gp) {
  const A a = vexp(x < A(0) ? x : -x);
  const A u = A(1) + a;
  const A inv_u = vrcp(u);
  const A a_u = a * inv_u;
  const bool nonneg = x >= A(0);
  const A s = nonneg ? inv_u : a_u;
  const A oms = nonneg ? a_u : inv_u;
  const A logs = dmin(x, A(0)) - vlog1p(a, u, inv_u);
  const A og = fpow(oms, gp);
  return {og * logs, og * (oms - A(gp) * s * logs)};
}

// ---- per-anchor gradient coefficients ----------------------------------------------------------

// a_i = grad_loss_i u_i / |P(i)|   (0 for an invalid anchor or one without a positive).
template <typename A> DYCON_HD A anchor_coef(bool valid, A grad_loss, A u, A n_pos) {
  return (valid && n_pos > A(0)) ? grad_loss * u / n_pos : A(0);
}

// dL/dl_ij for a positive pair j in P(i), as seen from anchor i: -a_i f'(S_ij) S_ij (1 - S_ij).
// Selects instead of early returns, here and below: the CPU evaluates whole rows branch-free.
template <typename A, typename E> DYCON_HD A pos_grad(A a, A l, A c, A log_neg, E gp) {
  const A fs = pos_term(l - c - log_neg, gp).fs;
  return a == A(0) ? A(0) : -a * fs;
}

// dL/dl_iq for a negative pair q in H(i) (aR = a_i R_i, cos = <z_i, z_q>, l = cos / tau, which
// the caller has as cos * (1 / tau)):  a_i R_i exp(l - c_q - log_neg_i) (w + gn tau/2 base^(gn-1)).
// The teacher pairs use the same formula with c = 0 and gn = 0. The exp's argument is capped
// (e^80 in float, e^700 in double; it is <= 0 for every pair that counts unless w is tiny), so
// that aR = 0 or w = 0 gives 0, never inf * 0, without a select (the CPU vectorises this).
template <typename A> DYCON_HD A neg_exp_cap() { return sizeof(A) == 4 ? A(80) : A(700); }

template <typename A, typename E> DYCON_HD A neg_grad(A aR, A l, A cos, A c, A log_neg, A tau, E gn) {
  return aR * vexp(dmin(l - c - log_neg, neg_exp_cap<A>())) * neg_bracket(cos, tau, gn);
}

// ---- threshold teacher term: c = <z_i, zt_k> (cosine), pairs with c > threshold ---------------

// -log(max(1 - c, 0) + eps): rounding can give c > 1 (a teacher patch equal to the anchor).
// Its derivative in c is 1 / (1 - c + eps) where 1 - c > 0 and 0 where the clamp is active,
// the boundary 1 - c = 0 included (as torch's clamp_min in reference.fecl).
template <typename A> DYCON_HD A cross_term(A c) {
  return -vlog(dmax(A(1) - c, A(0)) + A(kFeclCrossEps));  // the argument is >= 1e-18: normal
}
template <typename A> DYCON_HD A cross_grad(A c) {
  return A(1) - c > A(0) ? A(1) / (A(1) - c + A(kFeclCrossEps)) : A(0);
}

// ---- streaming top-k: a min-heap of the k largest values seen so far ---------------------------
// val/idx hold `n` entries (n <= k); ties keep the earlier index. NaN values are never selected.

template <typename A> DYCON_HD void heap_sift_down(A* val, int64_t* idx, int64_t n, int64_t pos) {
  const A v = val[pos];
  const int64_t id = idx[pos];
  while (true) {
    int64_t child = 2 * pos + 1;
    if (child >= n) break;
    if (child + 1 < n && val[child + 1] < val[child]) ++child;
    if (!(val[child] < v)) break;
    val[pos] = val[child];
    idx[pos] = idx[child];
    pos = child;
  }
  val[pos] = v;
  idx[pos] = id;
}

template <typename A>
DYCON_HD void heap_push(A* val, int64_t* idx, int64_t& n, int64_t k, A v, int64_t j) {
  if (!(v == v)) return;  // NaN
  if (n < k) {
    int64_t pos = n++;
    while (pos > 0) {
      const int64_t parent = (pos - 1) / 2;
      if (!(v < val[parent])) break;
      val[pos] = val[parent];
      idx[pos] = idx[parent];
      pos = parent;
    }
    val[pos] = v;
    idx[pos] = j;
  } else if (k > 0 && v > val[0]) {
    val[0] = v;
    idx[0] = j;
    heap_sift_down(val, idx, n, 0);
  }
}

}  // namespace dycon
