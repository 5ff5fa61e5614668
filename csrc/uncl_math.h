// UnCL per-element math (losses.md section 1), shared by uncl_cpu.cpp and uncl_cuda.cu.
//
//   p = softmax(s), q = softmax(t), H = -sum p log(p + eps), D = sum (p - q)^2
//   l = D W + beta (Hs + Ht),  W = 1 / (exp(beta Hs) + exp(beta Ht))
// The CPU kernel applies these to tiles of voxels (vectorised), the CUDA kernel to one voxel
// per thread; both call the same formulas below.
#pragma once

#include "common.h"
#include "fast_math.h"

namespace dycon {

constexpr double kUnclEps = 1e-6;  // inside log(p + eps), as in the released code

// W and share_s = exp(beta Hs) W, evaluated around m = max(beta Hs, beta Ht) (no overflow for large
// beta) from two exps and one reciprocal: with a = exp(-|beta Hs - beta Ht|), W = exp(-m) / (1 + a)
// and share_s is 1 / (1 + a) or a / (1 + a).
template <typename A> struct UnclWeight {
  A W;
  A share_s;  // the teacher's share is 1 - share_s
};

template <typename A> DYCON_HD UnclWeight<A> uncl_weight(A h_s, A h_t, A beta) {
  const A bs = beta * h_s, bt = beta * h_t, m = dmax(bs, bt);
  const A a = vexp(dmin(bs, bt) - m);
  const A r = vrcp(A(1) + a);
  return {vexp(-m) * r, bs >= bt ? r : a * r};
}

template <typename A> DYCON_HD A uncl_loss(A d, UnclWeight<A> w, A h_s, A h_t, A beta) {
  return d * w.W + beta * (h_s + h_t);
}

// The factor of dH/dx in dl/dx for one side: beta (1 - D W share_self).
template <typename A> DYCON_HD A uncl_entropy_coef(A beta, A d, A W, A share_self) {
  return beta * (A(1) - d * W * share_self);
}

// dl/dx_c for one side's probability x_c (y_c: the other side's), log_x = log(x_c + eps):
//   2 (x_c - y_c) W + coef dH/dx_c,   dH/dx_c = -(log(x_c + eps) + x_c / (x_c + eps)).
// The loss is symmetric in student and teacher, so this serves both. Through the softmax the
// logit gradient is g x_c (dl/dx_c - sum_k x_k dl/dx_k).
template <typename A> DYCON_HD A uncl_dldx(A x, A y, A log_x, A W, A coef) {
  return A(2) * (x - y) * W - coef * (log_x + x / (x + A(kUnclEps)));
}

}  // namespace dycon
