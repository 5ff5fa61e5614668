// UnCL on the CPU: the entry points. The tile loops are uncl_cpu_kernels.h, compiled once per
// vector ISA (cpu_isa.h); here: checks, allocation, threading, and the table of this CPU's ISA.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "alloc.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "uncl_common.h"

namespace dycon {
namespace {

int64_t uncl_tiles(int64_t B, int64_t V) { return B * ((V + kUnclTile - 1) / kUnclTile); }

template <typename A> const UnclCpuKernels<A>& uncl_table();
template <> const UnclCpuKernels<float>& uncl_table<float>() { return cpu_kernels().uncl_f32; }
template <> const UnclCpuKernels<double>& uncl_table<double>() { return cpu_kernels().uncl_f64; }

// Tiles per block that a thread takes (cpu_parallel.h): 16384 voxels, ~60 us at C = 2, long
// enough runs of each logit row for the prefetchers and short next to a scheduler time slice, which
// is what a descheduled thread costs anyway; and the fewest tiles worth a thread of their own.
constexpr int64_t kUnclBlockTiles = 64, kUnclTilesPerThread = 8;

// This CPU's tile kernel over every tile, in parallel; each thread owns its scratch.
template <typename A> void for_tiles(const UnclCpuArgs<A>& args) {
  const auto tiles = uncl_table<A>().tiles;
  const int64_t n = uncl_tiles(args.B, args.V);
  parallel_blocks(n, kUnclBlockTiles, threads_for(n, kUnclTilesPerThread), [&] {
    return [&tiles, &args, scratch = std::vector<A>(uncl_scratch_elems(args.C))](int64_t k0, int64_t k1) mutable {
      tiles(args, scratch.data(), k0, k1);
    };
  });
}

// The tables have float and double loops: half and bfloat16 logits are widened once.
at::Tensor widened(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? x : x.to(at::kFloat); }

// The call's data with the pointers that both directions share.
template <typename A>
UnclCpuArgs<A> uncl_args(const at::Tensor& s, const at::Tensor& t, double beta, const c10::optional<at::Tensor>& w) {
  UnclCpuArgs<A> a{};
  a.s = s.data_ptr<A>();
  a.t = t.data_ptr<A>();
  a.weight = w.has_value() ? w->data_ptr<float>() : nullptr;
  a.B = s.size(0), a.C = s.size(1), a.V = s.size(2);
  a.beta = A(beta);
  return a;
}

// The loss output: the (B, V) map, or one partial sum per tile (summed by the caller).
at::Tensor loss_output(const at::Tensor& s, bool reduce) {
  const int64_t B = s.size(0), V = s.size(2);
  return new_output(reduce ? at::IntArrayRef{uncl_tiles(B, V)} : at::IntArrayRef{B, V},
                    s.options().dtype(uncl_acc_type(s)));
}

at::Tensor reduced(const at::Tensor& out, bool reduce) { return reduce ? out.sum() : out; }

at::Tensor uncl_forward_cpu(const at::Tensor& s_in, const at::Tensor& t_in, double beta,
                            const c10::optional<at::Tensor>& weight, bool reduce) {
  check_uncl_args(s_in, t_in, weight);
  const at::Tensor s = widened(s_in), t = widened(t_in);
  at::Tensor out = loss_output(s, reduce);
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "uncl_forward_cpu", [&] {
    UnclCpuArgs<scalar_t> a = uncl_args<scalar_t>(s, t, beta, weight);
    a.out = out.data_ptr<scalar_t>();
    a.reduce = reduce;
    for_tiles(a);
  });
  return reduced(out, reduce);
}

// A step's serial part, cheaper in C++ than in Python: with the caches flushed by the kernel's
// 42 MB (2 x 2 x 96^3), each torch op called from Python cost 10-20 us, so the Python wrapper
// around the kernel cost ~0.4 ms a step against ~6.7 ms for the kernel at one thread
// (docs/engineering.md, "Threads"). Hence the reshapes, the mean's divisor and the loss's final
// dtype and shape here, and the backward only multiplies by its grad.
struct UnclReduction {
  bool reduce, mean;
};

UnclReduction uncl_reduction(c10::string_view name) {
  TORCH_CHECK(name == "mean" || name == "sum" || name == "none", "uncl: reduction must be mean, sum or none, got ",
              name);
  return {name != "none", name == "mean"};
}

// The loss in the logits' dtype: the (B, *spatial) map, or the tiles' partial sums added in tile
// order in double and divided by the divisor, in plain C++: at::sum, div_ and to on a 0-dim
// tensor cost ~35 us even with warm caches.
at::Tensor finished_loss(const at::Tensor& out, const at::Tensor& s_in, UnclReduction r, double divisor) {
  if (!r.reduce) {
    std::vector<int64_t> map_shape{s_in.size(0)};
    map_shape.insert(map_shape.end(), s_in.sizes().begin() + 2, s_in.sizes().end());
    return out.view(map_shape).to(s_in.scalar_type());
  }
  double total = 0;
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "uncl_loss_sum", [&] {
    const scalar_t* partial = out.data_ptr<scalar_t>();
    for (int64_t k = 0; k < out.numel(); ++k) total += partial[k];
  });
  if (r.mean) total /= divisor;
  at::Tensor loss = at::empty({}, s_in.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, loss.scalar_type(), "uncl_loss",
                                  [&] { *loss.data_ptr<scalar_t>() = scalar_t(total); });
  return loss;
}

// The forward and the unit gradients d(sum_v w_v l_v)/d(logits), divided by the mean's divisor
// (sum(weight), or the voxel count) for reduction "mean", in one pass over the tiles, so that the
// backward only scales them by its grad (dycon_kernels/uncl.py): the softmaxes, logs and weights
// are computed once instead of twice. s, t: (B, C, *spatial) logits; weight: (B, *spatial) or
// None. Returns the loss as the Python op does (reduced and in the logits' dtype, or the voxel
// map) and the gradients in the logits' shape and the widened dtype (float32 or float64); dt is an
// empty tensor unless need_t_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> uncl_forward_grad_cpu(const at::Tensor& s_in, const at::Tensor& t_in,
                                                                     double beta,
                                                                     const c10::optional<at::Tensor>& weight_in,
                                                                     c10::string_view reduction, bool need_t_grad) {
  TORCH_CHECK(s_in.dim() >= 3 && s_in.sizes() == t_in.sizes(),
              "uncl: s and t must both be (B, C, *spatial), got ", s_in.sizes(), " and ", t_in.sizes());
  const UnclReduction r = uncl_reduction(reduction);
  const int64_t B = s_in.size(0), C = s_in.size(1);
  const at::Tensor s = widened(s_in.reshape({B, C, -1}).contiguous()), t = widened(t_in.reshape({B, C, -1}).contiguous());
  c10::optional<at::Tensor> weight;
  if (weight_in.has_value()) weight = weight_in->reshape({B, -1}).to(at::kFloat).contiguous();
  check_uncl_args(s, t, weight);
  const double divisor = !r.mean ? 1.0 : weight ? weight_in->sum(uncl_acc_type(s)).item<double>() : double(B * s.size(2));
  at::Tensor out = loss_output(s, r.reduce);
  at::Tensor ds = new_output(s_in.sizes(), s.options());
  at::Tensor dt = new_output(need_t_grad ? t_in.sizes() : at::IntArrayRef{0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "uncl_forward_grad_cpu", [&] {
    UnclCpuArgs<scalar_t> a = uncl_args<scalar_t>(s, t, beta, weight);
    const scalar_t unit_scale = scalar_t(1.0 / divisor);
    a.grad = &unit_scale;
    a.out = out.data_ptr<scalar_t>();
    a.reduce = r.reduce;
    a.ds = ds.data_ptr<scalar_t>();
    a.dt = need_t_grad ? dt.data_ptr<scalar_t>() : nullptr;
    for_tiles(a);
  });
  return {finished_loss(out, s_in, r, divisor), ds, dt};
}

std::tuple<at::Tensor, at::Tensor> uncl_backward_cpu(const at::Tensor& grad, const at::Tensor& s_in,
                                                     const at::Tensor& t_in, double beta,
                                                     const c10::optional<at::Tensor>& weight,
                                                     bool need_t_grad) {
  check_uncl_args(s_in, t_in, weight);
  const at::Tensor s = widened(s_in), t = widened(t_in);
  const int64_t n = s.size(0) * s.size(2);
  TORCH_CHECK(grad.numel() == 1 || grad.numel() == n, "uncl_backward: grad must be 0-dim or (B, V)");
  at::Tensor g = grad.to(uncl_acc_type(s)).contiguous();
  at::Tensor ds = new_output(s.sizes(), s.options());
  at::Tensor dt = new_output(need_t_grad ? t.sizes() : at::IntArrayRef{0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "uncl_backward_cpu", [&] {
    UnclCpuArgs<scalar_t> a = uncl_args<scalar_t>(s, t, beta, weight);
    a.grad = g.data_ptr<scalar_t>();
    a.grad_is_map = g.numel() == n && n != 1;
    a.ds = ds.data_ptr<scalar_t>();
    a.dt = need_t_grad ? dt.data_ptr<scalar_t>() : nullptr;
    for_tiles(a);
  });
  return {ds.to(s_in.scalar_type()), dt.to(t_in.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(dycon_C, CPU, m) {
  m.impl("uncl_forward", &uncl_forward_cpu);
  m.impl("uncl_forward_grad", &uncl_forward_grad_cpu);
  m.impl("uncl_backward", &uncl_backward_cpu);
}

}  // namespace dycon
