// UnCL on CUDA: one thread per voxel, all C channels of that voxel loaded by the thread.
// Reductions write one partial per block (summed by torch), so results are deterministic.
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "alloc.h"
#include "uncl_common.h"
#include "uncl_math.h"

namespace dycon {
namespace {

constexpr int kThreads = 256;

template <typename T, typename A>
__global__ void uncl_forward_kernel(const T* __restrict__ s, const T* __restrict__ t,
                                    const float* __restrict__ w, A* __restrict__ out, int64_t C,
                                    int64_t V, int64_t n, A beta, bool reduce) {
  __shared__ A partial[kThreads];
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  A l = 0;
  if (i < n) {
    const int64_t b = i / V, v = i % V, base = b * C * V + v;
    l = uncl_voxel<A>(s + base, t + base, C, V, beta).loss(beta);
    if (w) l *= w[i];
    if (!reduce) out[i] = l;
  }
  if (!reduce) return;
  partial[threadIdx.x] = l;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

template <typename T, typename A>
__global__ void uncl_backward_kernel(const A* __restrict__ g, bool g_is_map, const T* __restrict__ s,
                                     const T* __restrict__ t, const float* __restrict__ w,
                                     T* __restrict__ ds, T* __restrict__ dt, int64_t C, int64_t V,
                                     int64_t n, A beta) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int64_t b = i / V, v = i % V, base = b * C * V + v;
  A gv = g[g_is_map ? i : 0] * (w ? A(w[i]) : A(1));
  UnclVoxel<A> vx = uncl_voxel<A>(s + base, t + base, C, V, beta);
  uncl_side_grad(s + base, t + base, vx.s, vx.t, vx, vx.share_s, beta, gv, C, V, ds + base);
  if (dt) uncl_side_grad(t + base, s + base, vx.t, vx.s, vx, A(1) - vx.share_s, beta, gv, C, V, dt + base);
}

at::Tensor uncl_forward_cuda(const at::Tensor& s, const at::Tensor& t, double beta,
                             const c10::optional<at::Tensor>& weight, bool reduce) {
  check_uncl_args(s, t, weight);
  c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), C = s.size(1), V = s.size(2), n = B * V;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  at::Tensor out = new_output({reduce ? blocks : n}, s.options().dtype(uncl_acc_type(s)));
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "uncl_forward_cuda", [&] {
    using A = acc_t<scalar_t>;
    uncl_forward_kernel<scalar_t, A><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), w, out.data_ptr<A>(), C, V, n, A(beta), reduce);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return reduce ? out.sum() : out.view({B, V});
}

std::tuple<at::Tensor, at::Tensor> uncl_backward_cuda(const at::Tensor& grad, const at::Tensor& s,
                                                      const at::Tensor& t, double beta,
                                                      const c10::optional<at::Tensor>& weight,
                                                      bool need_t_grad) {
  check_uncl_args(s, t, weight);
  c10::cuda::CUDAGuard guard(s.device());
  const int64_t B = s.size(0), C = s.size(1), V = s.size(2), n = B * V;
  TORCH_CHECK(grad.numel() == 1 || grad.numel() == n, "uncl_backward: grad must be 0-dim or (B, V)");
  at::Tensor g = grad.to(uncl_acc_type(s)).contiguous();
  const bool g_is_map = g.numel() == n && n != 1;
  at::Tensor ds = new_output(s.sizes(), s.options());
  at::Tensor dt = new_output(need_t_grad ? t.sizes() : at::IntArrayRef{0}, t.options());
  const float* w = weight.has_value() ? weight->data_ptr<float>() : nullptr;
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "uncl_backward_cuda", [&] {
    using A = acc_t<scalar_t>;
    uncl_backward_kernel<scalar_t, A><<<blocks, kThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
        g.data_ptr<A>(), g_is_map, s.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), w,
        ds.data_ptr<scalar_t>(), need_t_grad ? dt.data_ptr<scalar_t>() : nullptr, C, V, n, A(beta));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ds, dt};
}

}  // namespace

TORCH_LIBRARY_IMPL(dycon_C, CUDA, m) {
  m.impl("uncl_forward", &uncl_forward_cuda);
  m.impl("uncl_backward", &uncl_backward_cuda);
}

}  // namespace dycon
