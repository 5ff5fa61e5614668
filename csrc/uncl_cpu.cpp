// UnCL on the CPU: one pass over the logits per direction, OpenMP over voxels.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "alloc.h"
#include "uncl_common.h"
#include "uncl_math.h"

namespace dycon {
namespace {

// Voxels per partial sum: partials are added in a fixed order, so a reduced loss does not
// depend on the number of threads.
constexpr int64_t kChunk = 4096;

at::Tensor uncl_forward_cpu(const at::Tensor& s, const at::Tensor& t, double beta,
                            const c10::optional<at::Tensor>& weight, bool reduce) {
  check_uncl_args(s, t, weight);
  const int64_t B = s.size(0), C = s.size(1), V = s.size(2), n = B * V;
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  at::Tensor out = new_output(reduce ? at::IntArrayRef{chunks} : at::IntArrayRef{B, V},
                              s.options().dtype(uncl_acc_type(s)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "uncl_forward_cpu", [&] {
    using A = acc_t<scalar_t>;
    const scalar_t* sp = s.data_ptr<scalar_t>();
    const scalar_t* tp = t.data_ptr<scalar_t>();
    A* op = out.data_ptr<A>();
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t chunk = c0; chunk < c1; ++chunk) {
        A partial = 0;
        for (int64_t i = chunk * kChunk; i < dmin(n, (chunk + 1) * kChunk); ++i) {
          const int64_t b = i / V, v = i % V, base = b * C * V + v;
          A l = uncl_voxel<A>(sp + base, tp + base, C, V, A(beta)).loss(A(beta));
          if (w) l *= w[i];
          if (reduce) partial += l; else op[i] = l;
        }
        if (reduce) op[chunk] = partial;
      }
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
    at::parallel_for(0, n, 1024, [&](int64_t i0, int64_t i1) {
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / V, v = i % V, base = b * C * V + v;
        A gv = gp[g_is_map ? i : 0] * (w ? A(w[i]) : A(1));
        const A bt = A(beta);
        UnclVoxel<A> vx = uncl_voxel<A>(sp + base, tp + base, C, V, bt);
        uncl_side_grad(sp + base, tp + base, vx.s, vx.t, vx, vx.share_s, bt, gv, C, V, dsp + base);
        if (dtp)
          uncl_side_grad(tp + base, sp + base, vx.t, vx.s, vx, A(1) - vx.share_s, bt, gv, C, V,
                         dtp + base);
      }
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
