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

// The forward and the unit gradients d(sum_v w_v l_v)/d(logits) in one pass over the tiles, so that
// the backward only scales them by its grad (dycon_kernels/uncl.py): the softmaxes, logs and
// weights are computed once instead of twice. The gradients are in the widened dtype (float32 or
// float64); dt is an empty tensor unless need_t_grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> uncl_forward_grad_cpu(const at::Tensor& s_in, const at::Tensor& t_in,
                                                                     double beta,
                                                                     const c10::optional<at::Tensor>& weight,
                                                                     bool reduce, bool need_t_grad) {
  check_uncl_args(s_in, t_in, weight);
  const at::Tensor s = widened(s_in), t = widened(t_in);
  at::Tensor out = loss_output(s, reduce);
  at::Tensor ds = new_output(s.sizes(), s.options());
  at::Tensor dt = new_output(need_t_grad ? t.sizes() : at::IntArrayRef{0}, t.options());
  AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "uncl_forward_grad_cpu", [&] {
    UnclCpuArgs<scalar_t> a = uncl_args<scalar_t>(s, t, beta, weight);
    a.out = out.data_ptr<scalar_t>();
    a.reduce = reduce;
    a.ds = ds.data_ptr<scalar_t>();
    a.dt = need_t_grad ? dt.data_ptr<scalar_t>() : nullptr;
    for_tiles(a);
  });
  return {reduced(out, reduce), ds, dt};
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
