// UnCL per-voxel math (losses.md section 1), shared by uncl_cpu.cpp and uncl_cuda.cu.
//
// A voxel's C logits sit at x[0], x[stride], ..., x[(C-1)*stride] (layout (B, C, V)).
//   p = softmax(s), q = softmax(t), H = -sum p log(p + eps)
//   l = D / (exp(beta Hs) + exp(beta Ht)) + beta (Hs + Ht),   D = sum (p - q)^2
// The weight W = 1/(exp(beta Hs) + exp(beta Ht)) is evaluated around max(beta Hs, beta Ht) so
// a large beta cannot overflow.
#pragma once

#include "common.h"

namespace dycon {

constexpr double kUnclEps = 1e-6;  // as in the released code

template <typename A> struct Softmax {
  A max;
  A inv_sum;
  DYCON_HD A prob(A x) const { return exp(x - max) * inv_sum; }
};

template <typename A, typename T>
DYCON_HD Softmax<A> softmax_of(const T* x, int64_t C, int64_t stride) {
  A m = static_cast<A>(x[0]);
  for (int64_t c = 1; c < C; ++c) m = dmax(m, static_cast<A>(x[c * stride]));
  A sum = 0;
  for (int64_t c = 0; c < C; ++c) sum += exp(static_cast<A>(x[c * stride]) - m);
  return {m, A(1) / sum};
}

template <typename A, typename T>
DYCON_HD A entropy_of(const T* x, Softmax<A> sm, int64_t C, int64_t stride) {
  A h = 0;
  for (int64_t c = 0; c < C; ++c) {
    A p = sm.prob(static_cast<A>(x[c * stride]));
    h -= p * log(p + A(kUnclEps));
  }
  return h;
}

// dH/dp for one probability.
template <typename A> DYCON_HD A entropy_grad(A p) {
  return -(log(p + A(kUnclEps)) + p / (p + A(kUnclEps)));
}

// Everything the loss and its gradient need about one voxel.
template <typename A> struct UnclVoxel {
  Softmax<A> s, t;
  A Hs, Ht, D;
  A W;             // 1 / (exp(beta Hs) + exp(beta Ht))
  A share_s;       // exp(beta Hs) / (exp(beta Hs) + exp(beta Ht)); share_t = 1 - share_s
  DYCON_HD A loss(A beta) const { return D * W + beta * (Hs + Ht); }
};

template <typename A, typename T>
DYCON_HD UnclVoxel<A> uncl_voxel(const T* s, const T* t, int64_t C, int64_t stride, A beta) {
  UnclVoxel<A> v;
  v.s = softmax_of<A>(s, C, stride);
  v.t = softmax_of<A>(t, C, stride);
  v.Hs = entropy_of(s, v.s, C, stride);
  v.Ht = entropy_of(t, v.t, C, stride);
  v.D = 0;
  for (int64_t c = 0; c < C; ++c) {
    A d = v.s.prob(static_cast<A>(s[c * stride])) - v.t.prob(static_cast<A>(t[c * stride]));
    v.D += d * d;
  }
  A bs = beta * v.Hs, bt = beta * v.Ht, m = dmax(bs, bt);
  A es = exp(bs - m), et = exp(bt - m);
  v.W = exp(-m) / (es + et);
  v.share_s = es / (es + et);
  return v;
}

// Gradient of g * l with respect to one side's logits ("self"; "other" is the other network):
//   dl/dx_c = 2 (x_c - y_c) W + beta (1 - D W share_self) dH/dx_c     (x = softmax(self))
// then through the softmax: grad_c = g x_c (dl/dx_c - sum_k x_k dl/dx_k).
// The formula is symmetric in student and teacher, so one function serves both.
template <typename A, typename T, typename G>
DYCON_HD void uncl_side_grad(const T* self, const T* other, Softmax<A> sm_self, Softmax<A> sm_other,
                             const UnclVoxel<A>& v, A share_self, A beta, A g, int64_t C,
                             int64_t stride, G* out) {
  const A coef_h = beta * (A(1) - v.D * v.W * share_self);
  A dot = 0;
  for (int64_t c = 0; c < C; ++c) {
    A x = sm_self.prob(static_cast<A>(self[c * stride]));
    A y = sm_other.prob(static_cast<A>(other[c * stride]));
    dot += x * (A(2) * (x - y) * v.W + coef_h * entropy_grad(x));
  }
  for (int64_t c = 0; c < C; ++c) {
    A x = sm_self.prob(static_cast<A>(self[c * stride]));
    A y = sm_other.prob(static_cast<A>(other[c * stride]));
    A dldx = A(2) * (x - y) * v.W + coef_h * entropy_grad(x);
    out[c * stride] = static_cast<G>(g * x * (dldx - dot));
  }
}

}  // namespace dycon
