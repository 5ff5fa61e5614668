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

// One voxel's softmax over C channels x[c * stride], evaluated on demand (the CPU kernel keeps
// tiles in buffers instead; here a recomputed exp is cheaper than local memory).
template <typename A, typename T> struct VoxelSoftmax {
  const T* x;
  int64_t stride;
  A max, inv_sum;
  __device__ A logit(int64_t c) const { return A(x[c * stride]); }
  __device__ A prob(int64_t c) const { return vexp(logit(c) - max) * inv_sum; }
};

template <typename A, typename T>
__device__ VoxelSoftmax<A, T> voxel_softmax(const T* x, int64_t C, int64_t stride) {
  VoxelSoftmax<A, T> sm{x, stride, A(x[0]), A(0)};
  for (int64_t c = 1; c < C; ++c) sm.max = dmax(sm.max, sm.logit(c));
  for (int64_t c = 0; c < C; ++c) sm.inv_sum += vexp(sm.logit(c) - sm.max);
  sm.inv_sum = A(1) / sm.inv_sum;
  return sm;
}

template <typename A, typename T> struct UnclVoxel {
  VoxelSoftmax<A, T> s, t;
  A h_s, h_t, d;
  UnclWeight<A> w;
};

template <typename A, typename T>
__device__ UnclVoxel<A, T> uncl_voxel(const T* s, const T* t, int64_t C, int64_t V, A beta) {
  UnclVoxel<A, T> v{voxel_softmax<A>(s, C, V), voxel_softmax<A>(t, C, V), A(0), A(0), A(0), {}};
  for (int64_t c = 0; c < C; ++c) {
    const A p = v.s.prob(c), q = v.t.prob(c);
    v.h_s -= p * vlog(p + A(kUnclEps));
    v.h_t -= q * vlog(q + A(kUnclEps));
    v.d += (p - q) * (p - q);
  }
  v.w = uncl_weight(v.h_s, v.h_t, beta);
  return v;
}

// out[c * V] = g d(l)/d(logit_c) for one side (self) of the voxel; other is the other side.
template <typename A, typename T>
__device__ void side_grad(const VoxelSoftmax<A, T>& self, const VoxelSoftmax<A, T>& other, A coef, A W, A g,
                          int64_t C, int64_t V, T* out) {
  A dot = 0;
  for (int64_t c = 0; c < C; ++c) {
    const A x = self.prob(c);
    dot += x * uncl_dldx(x, other.prob(c), vlog(x + A(kUnclEps)), W, coef);
  }
  for (int64_t c = 0; c < C; ++c) {
    const A x = self.prob(c);
    out[c * V] = static_cast<T>(g * x * (uncl_dldx(x, other.prob(c), vlog(x + A(kUnclEps)), W, coef) - dot));
  }
}

template <typename T, typename A>
__global__ void uncl_forward_kernel(const T* __restrict__ s, const T* __restrict__ t,
                                    const float* __restrict__ w, A* __restrict__ out, int64_t C,
                                    int64_t V, int64_t n, A beta, bool reduce) {
  __shared__ A partial[kThreads];
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  A l = 0;
  if (i < n) {
    const int64_t b = i / V, v = i % V, base = b * C * V + v;
    const UnclVoxel<A, T> vx = uncl_voxel<A>(s + base, t + base, C, V, beta);
    l = uncl_loss(vx.d, vx.w, vx.h_s, vx.h_t, beta);
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
  const A gv = g[g_is_map ? i : 0] * (w ? A(w[i]) : A(1));
  const UnclVoxel<A, T> vx = uncl_voxel<A>(s + base, t + base, C, V, beta);
  const A W = vx.w.W;
  side_grad(vx.s, vx.t, uncl_entropy_coef(beta, vx.d, W, vx.w.share_s), W, gv, C, V, ds + base);
  if (dt) side_grad(vx.t, vx.s, uncl_entropy_coef(beta, vx.d, W, A(1) - vx.w.share_s), W, gv, C, V, dt + base);
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
