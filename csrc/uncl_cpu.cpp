// UnCL on the CPU: tiles of voxels, all channels of a tile at once, vectorised over voxels.
//
// A tile's softmax, log-probabilities and entropies live in small per-thread buffers; nothing
// of the size of the input is allocated besides the outputs. Each logit is read once per pass.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "alloc.h"
#include "uncl_common.h"
#include "uncl_math.h"

namespace dycon {
namespace {

constexpr int64_t kTile = 256;  // voxels per tile (and per partial sum: thread-count independent)

// Everything the forward and backward need about a tile of `nv` voxels; buffers are
// channel-major (c * kTile + v) so the inner loops run over contiguous voxels.
template <typename A> struct UnclTile {
  std::vector<A> p, q, log_p, log_q;  // softmax and log(softmax + eps) of student and teacher
  A h_s[kTile], h_t[kTile], d[kTile], W[kTile], share_s[kTile];

  explicit UnclTile(int64_t C) : p(C * kTile), q(C * kTile), log_p(C * kTile), log_q(C * kTile) {}

  template <typename T>
  static void softmax(const T* x, int64_t C, int64_t V, int64_t nv, A* prob, A* log_prob, A* h) {
    A m[kTile], sum[kTile];
    for (int64_t v = 0; v < nv; ++v) m[v] = A(x[v]), sum[v] = 0, h[v] = 0;
    for (int64_t c = 1; c < C; ++c)
#pragma omp simd
      for (int64_t v = 0; v < nv; ++v) m[v] = dmax(m[v], A(x[c * V + v]));
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int64_t v = 0; v < nv; ++v) {
        const A e = vexp(A(x[c * V + v]) - m[v]);
        prob[c * kTile + v] = e;
        sum[v] += e;
      }
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int64_t v = 0; v < nv; ++v) {
        const A pv = prob[c * kTile + v] / sum[v];
        const A lv = vlog(pv + A(kUnclEps));
        prob[c * kTile + v] = pv;
        log_prob[c * kTile + v] = lv;
        h[v] -= pv * lv;
      }
  }

  template <typename T>
  void compute(const T* s, const T* t, int64_t C, int64_t V, int64_t nv, A beta) {
    softmax(s, C, V, nv, p.data(), log_p.data(), h_s);
    softmax(t, C, V, nv, q.data(), log_q.data(), h_t);
    for (int64_t v = 0; v < nv; ++v) d[v] = 0;
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int64_t v = 0; v < nv; ++v) {
        const A diff = p[c * kTile + v] - q[c * kTile + v];
        d[v] += diff * diff;
      }
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) {
      const UnclWeight<A> w = uncl_weight(h_s[v], h_t[v], beta);
      W[v] = w.W;
      share_s[v] = w.share_s;
    }
  }

  // out[c * V + v] = g_v * d(l_v)/d(logit_c) for one side: x its softmax, y the other's.
  template <typename T>
  void side_grad(const A* x, const A* y, const A* log_x, const A* g, bool student, A beta, int64_t C,
                 int64_t V, int64_t nv, T* out) const {
    A coef[kTile], dot[kTile];
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) {
      coef[v] = uncl_entropy_coef(beta, d[v], W[v], student ? share_s[v] : A(1) - share_s[v]);
      dot[v] = 0;
    }
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t k = c * kTile + v;
        dot[v] += x[k] * uncl_dldx(x[k], y[k], log_x[k], W[v], coef[v]);
      }
    for (int64_t c = 0; c < C; ++c)
#pragma omp simd
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t k = c * kTile + v;
        out[c * V + v] = static_cast<T>(g[v] * x[k] * (uncl_dldx(x[k], y[k], log_x[k], W[v], coef[v]) - dot[v]));
      }
  }
};

// Calls fn(tile, tile_index, b, v0, nv) for every tile of every volume, in parallel; `tile` is
// scratch space owned by the calling thread.
template <typename A, typename F> void for_each_tile(int64_t B, int64_t C, int64_t V, const F& fn) {
  const int64_t per_volume = (V + kTile - 1) / kTile;
  at::parallel_for(0, B * per_volume, 8, [&](int64_t k0, int64_t k1) {
    UnclTile<A> tile(C);
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t b = k / per_volume, v0 = (k % per_volume) * kTile;
      fn(tile, k, b, v0, dmin(kTile, V - v0));
    }
  });
}

at::Tensor uncl_forward_cpu(const at::Tensor& s, const at::Tensor& t, double beta,
                            const c10::optional<at::Tensor>& weight, bool reduce) {
  check_uncl_args(s, t, weight);
  const int64_t B = s.size(0), C = s.size(1), V = s.size(2);
  const int64_t tiles = B * ((V + kTile - 1) / kTile);
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  at::Tensor out = new_output(reduce ? at::IntArrayRef{tiles} : at::IntArrayRef{B, V},
                              s.options().dtype(uncl_acc_type(s)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "uncl_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    A* op = out.data_ptr<A>();
    for_each_tile<A>(B, C, V, [&](UnclTile<A>& tile, int64_t k, int64_t b, int64_t v0, int64_t nv) {
      tile.compute(sp + b * C * V + v0, tp + b * C * V + v0, C, V, nv, A(beta));
      A partial = 0;
      for (int64_t v = 0; v < nv; ++v) {
        A l = uncl_loss(tile.d[v], UnclWeight<A>{tile.W[v], tile.share_s[v]}, tile.h_s[v], tile.h_t[v], A(beta));
        if (w) l *= w[b * V + v0 + v];
        if (reduce) partial += l; else op[b * V + v0 + v] = l;
      }
      if (reduce) op[k] = partial;
    });
  });
  return reduce ? out.sum() : out;
}

std::tuple<at::Tensor, at::Tensor> uncl_backward_cpu(const at::Tensor& grad, const at::Tensor& s,
                                                     const at::Tensor& t, double beta,
                                                     const c10::optional<at::Tensor>& weight,
                                                     bool need_t_grad) {
  check_uncl_args(s, t, weight);
  const int64_t B = s.size(0), C = s.size(1), V = s.size(2), n = B * V;
  TORCH_CHECK(grad.numel() == 1 || grad.numel() == n, "uncl_backward: grad must be 0-dim or (B, V)");
  at::Tensor g = grad.to(uncl_acc_type(s)).contiguous();
  const bool g_is_map = g.numel() == n && n != 1;
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  at::Tensor ds = new_output(s.sizes(), s.options());
  at::Tensor dt = new_output(need_t_grad ? t.sizes() : at::IntArrayRef{0}, t.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "uncl_backward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    const A* gp = g.data_ptr<A>();
    scalar_t* dsp = ds.data_ptr<scalar_t>();
    scalar_t* dtp = need_t_grad ? dt.data_ptr<scalar_t>() : nullptr;
    for_each_tile<A>(B, C, V, [&](UnclTile<A>& tile, int64_t, int64_t b, int64_t v0, int64_t nv) {
      const int64_t base = b * C * V + v0, voxel = b * V + v0;
      tile.compute(sp + base, tp + base, C, V, nv, A(beta));
      A gv[kTile];
      for (int64_t v = 0; v < nv; ++v) gv[v] = gp[g_is_map ? voxel + v : 0] * (w ? A(w[voxel + v]) : A(1));
      tile.side_grad(tile.p.data(), tile.q.data(), tile.log_p.data(), gv, true, A(beta), C, V, nv, dsp + base);
      if (dtp)
        tile.side_grad(tile.q.data(), tile.p.data(), tile.log_q.data(), gv, false, A(beta), C, V, nv, dtp + base);
    });
  });
  return {ds, dt};
}

}  // namespace

TORCH_LIBRARY_IMPL(dycon_C, CPU, m) {
  m.impl("uncl_forward", &uncl_forward_cpu);
  m.impl("uncl_backward", &uncl_backward_cpu);
}

}  // namespace dycon
