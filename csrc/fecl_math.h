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

namespace dycon {

constexpr double kFeclCrossEps = 1e-18;  // -log(1 - c + eps) in the threshold teacher term

// Transcendentals with an explicit float / double overload (the same calls on host and device).
DYCON_HD float fexp(float x) { return expf(x); }
DYCON_HD double fexp(double x) { return exp(x); }
DYCON_HD float flog(float x) { return logf(x); }
DYCON_HD double flog(double x) { return log(x); }
DYCON_HD float flog1p(float x) { return log1pf(x); }
DYCON_HD double flog1p(double x) { return log1p(x); }
DYCON_HD float fpow_(float x, float g) { return powf(x, g); }
DYCON_HD double fpow_(double x, double g) { return pow(x, g); }

template <typename A> DYCON_HD A neg_inf() { return A(-INFINITY); }

// base^g with exact small integer exponents (the presets use 0 and 2) and 0^0 = 1.
template <typename A> DYCON_HD A fpow(A base, A g) {
  if (g == A(0)) return A(1);
  if (g == A(1)) return base;
  if (g == A(2)) return base * base;
  if (g == A(3)) return base * base * base;
  return fpow_(base, g);
}

// ---- negatives: w_iq = ((1 + cos_iq) / 2)^gn, cos = tau l; w = 0 where the base is <= 0 --------

template <typename A> DYCON_HD A neg_weight(A cos, A gn) {
  if (gn == A(0)) return A(1);
  const A base = (A(1) + cos) * A(0.5);
  return base > A(0) ? fpow(base, gn) : A(0);
}

// d(w e)/dl / e = w + gn tau/2 base^(gn-1)   (1 for gn = 0; 0 where w = 0).
template <typename A> DYCON_HD A neg_bracket(A cos, A tau, A gn) {
  if (gn == A(0)) return A(1);
  const A base = (A(1) + cos) * A(0.5);
  if (!(base > A(0))) return A(0);
  return fpow(base, gn) + gn * tau * A(0.5) * fpow(base, gn - A(1));
}

// ---- log of the negative sum: online log-sum-exp of log(w) + x ---------------------------------

template <typename A> struct Lse {
  A m;  // running max of x over the terms with w > 0
  A s;  // sum of w exp(x - m)
  DYCON_HD void init() {
    m = neg_inf<A>();
    s = A(0);
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

// S = sigmoid(x), 1 - S = sigmoid(-x), log S = -softplus(-x), from one exp and one log1p.
template <typename A> DYCON_HD PosTerm<A> pos_term(A x, A gp) {
  const A t = fexp(x < A(0) ? x : -x);  // exp(-|x|) in [0, 1]
  const A inv = A(1) / (A(1) + t);
  const A lp = flog1p(t);
  A s, oms, logs;
  if (x >= A(0)) {
    s = inv;
    oms = t * inv;
    logs = -lp;
  } else {
    s = t * inv;
    oms = inv;
    logs = x - lp;
  }
  const A og = fpow(oms, gp);
  PosTerm<A> p;
  p.f = og * logs;
  p.fs = og * oms - gp * og * s * logs;
  return p;
}

// ---- per-anchor gradient coefficients ----------------------------------------------------------

// a_i = grad_loss_i u_i / |P(i)|   (0 for an invalid anchor or one without a positive).
template <typename A> DYCON_HD A anchor_coef(bool valid, A grad_loss, A u, A n_pos) {
  return (valid && n_pos > A(0)) ? grad_loss * u / n_pos : A(0);
}

// dL/dl_ij for a positive pair j in P(i), as seen from anchor i: -a_i f'(S_ij) S_ij (1 - S_ij).
template <typename A> DYCON_HD A pos_grad(A a, A l, A c, A log_neg, A gp) {
  if (a == A(0)) return A(0);
  return -a * pos_term(l - c - log_neg, gp).fs;
}

// dL/dl_iq for a negative pair q in H(i) (aR = a_i R_i, cos = <z_i, z_q>, l = cos / tau):
//   a_i R_i exp(l - c_q - log_neg_i) (w + gn tau/2 base^(gn-1)).
// The teacher pairs use the same formula with c = 0 and gn = 0.
template <typename A> DYCON_HD A neg_grad(A aR, A cos, A c, A log_neg, A tau, A gn) {
  if (aR == A(0)) return A(0);
  const A l = cos / tau;
  const A br = neg_bracket(cos, tau, gn);
  if (br == A(0)) return A(0);
  return aR * fexp(l - c - log_neg) * br;
}

// ---- threshold teacher term: c = <z_i, zt_k> (cosine), pairs with c > threshold ---------------

// -log(max(1 - c, 0) + eps): rounding can give c > 1 (a teacher patch equal to the anchor).
// Its derivative in c is 1 / (1 - c + eps) where 1 - c > 0 and 0 where the clamp is active,
// the boundary 1 - c = 0 included (as torch's clamp_min in reference.fecl).
template <typename A> DYCON_HD A cross_term(A c) {
  return -flog(dmax(A(1) - c, A(0)) + A(kFeclCrossEps));
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
