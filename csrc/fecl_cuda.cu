// FeCL on CUDA (docs/fecl_kernels.md): one thread per anchor, blocks of kThreads anchors of one
// volume; key tiles of KT keys are staged through shared memory in DC-wide feature chunks and
// every thread accumulates its KT dot products in registers (scalar FMAs: correctness over
// speed). The per-pair math is fecl_math.h, the same functions the CPU kernels call.
//
// Forward:  [column shift] a row-max kernel -> col_shift; then one kernel that streams the keys
//           three times per anchor: negatives (online log-sum-exp, or a top-k min-heap kept in
//           global memory), teacher keys (heap or threshold sums), positives.
// Backward: one row-parallel kernel: G_ij = g_ij + g_ji per key tile (g_ji from anchor j's saved
//           statistics), accumulated into the anchor's own float/double row of dz (no atomics);
//           then a kernel over the stored top-k pairs (i, q) that atomically adds g_iq z_q to
//           dz_i and g_iq z_i to dz_q.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "fecl_common.h"
#include "fecl_math.h"

namespace dycon {
namespace {

constexpr int kThreads = 128;  // anchors per block
constexpr int KT = 32;         // keys per shared-memory tile
constexpr int DC = 32;         // features per chunk

struct Cfg {
  int64_t N, D, Nt, K, TK;
  double tau, gp, gn, thr;
  int64_t teacher;
};

inline int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

// sK[t * DC + dd] = keys[j0 + t][d0 + dd] (0 past nk or D), loaded by the whole block between
// barriers (so the previous chunk is no longer in use and this one is complete).
template <typename T, typename A>
__device__ __forceinline__ void load_key_chunk(const T* __restrict__ keys, int64_t j0, int64_t nk, int64_t d0,
                                               int64_t D, A* sK) {
  __syncthreads();
  for (int e = threadIdx.x; e < KT * DC; e += blockDim.x) {
    const int t = e / DC, dd = e % DC;
    const int64_t j = j0 + t, d = d0 + dd;
    sK[e] = (j < nk && d < D) ? static_cast<A>(keys[j * D + d]) : A(0);
  }
  __syncthreads();
}

// acc[t] = <anchor, keys[j0 + t]> for t < KT (keys past nk count as 0). Every thread of the block
// must call it (it synchronises); threads without an anchor pass nullptr and only help loading.
template <typename T, typename A>
__device__ __forceinline__ void tile_dots(const T* __restrict__ keys, int64_t j0, int64_t nk,
                                          const T* __restrict__ anchor, int64_t D, A* sK, A (&acc)[KT]) {
#pragma unroll
  for (int t = 0; t < KT; ++t) acc[t] = A(0);
  for (int64_t d0 = 0; d0 < D; d0 += DC) {
    load_key_chunk(keys, j0, nk, d0, D, sK);
    if (anchor != nullptr) {
      const int dn = static_cast<int>(D - d0 < DC ? D - d0 : DC);
      for (int dd = 0; dd < dn; ++dd) {
        const A av = static_cast<A>(anchor[d0 + dd]);
#pragma unroll
        for (int t = 0; t < KT; ++t) acc[t] += av * sK[t * DC + dd];
      }
    }
  }
}

// out[d] += scale * sum_t G[t] keys[j0 + t][d]. Every thread of the block must call it.
template <typename T, typename A>
__device__ __forceinline__ void tile_accumulate(const T* __restrict__ keys, int64_t j0, int64_t nk,
                                                int64_t D, A* sK, const A (&G)[KT], A* out, A scale) {
  for (int64_t d0 = 0; d0 < D; d0 += DC) {
    load_key_chunk(keys, j0, nk, d0, D, sK);
    if (out != nullptr) {
      const int dn = static_cast<int>(D - d0 < DC ? D - d0 : DC);
      for (int dd = 0; dd < dn; ++dd) {
        A s = 0;
#pragma unroll
        for (int t = 0; t < KT; ++t) s += G[t] * sK[t * DC + dd];
        out[d0 + dd] += scale * s;
      }
    }
  }
}

template <typename T, typename A>
__device__ __forceinline__ A gdot(const T* __restrict__ a, const T* __restrict__ b, int64_t D) {
  A s = 0;
  for (int64_t d = 0; d < D; ++d) s += static_cast<A>(a[d]) * static_cast<A>(b[d]);
  return s;
}

// c_i = max(0, max_{valid j != i} l_ij): by symmetry the column offset of key i.
template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) fecl_colshift_kernel(const T* __restrict__ z,
                                                                 const int64_t* __restrict__ y,
                                                                 A* __restrict__ cs, Cfg c) {
  __shared__ A sK[KT * DC];
  const int64_t b = blockIdx.y, i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  const bool active = i < c.N;
  const T* zb = z + b * c.N * c.D;
  const int64_t* yb = y + b * c.N;
  A m = 0;  // max(0, max cos); / tau at the end: the same number, tau > 0
  A acc[KT];
  for (int64_t j0 = 0; j0 < c.N; j0 += KT) {
    tile_dots<T, A>(zb, j0, c.N, active ? zb + i * c.D : nullptr, c.D, sK, acc);
    if (active) {
#pragma unroll
      for (int t = 0; t < KT; ++t) {
        const int64_t j = j0 + t;
        if (j < c.N && j != i && yb[j] >= 0) m = dmax(m, acc[t]);
      }
    }
  }
  if (active) cs[b * c.N + i] = m / A(c.tau);
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) fecl_forward_kernel(
    const T* __restrict__ z, const int64_t* __restrict__ y, const T* __restrict__ zt,
    const int64_t* __restrict__ yt, const A* __restrict__ u, const A* __restrict__ cs, Cfg c,
    A* __restrict__ loss, A* __restrict__ log_neg, A* __restrict__ rr, A* __restrict__ npos,
    A* __restrict__ cross, A* __restrict__ ccount, int64_t* __restrict__ tki, A* __restrict__ tkv,
    int64_t* __restrict__ tti, A* __restrict__ ttv) {
  __shared__ A sK[KT * DC];
  const int64_t N = c.N, D = c.D, Nt = c.Nt, K = c.K, TK = c.TK;
  const int64_t b = blockIdx.y, i = int64_t(blockIdx.x) * kThreads + threadIdx.x, gi = b * N + i;
  const bool active = i < N;
  const T* zb = z + b * N * D;
  const int64_t* yb = y + b * N;
  const A* csb = cs ? cs + b * N : nullptr;
  const int64_t lab = active ? yb[i] : -1;
  const bool work = lab >= 0;
  const T* anchor = work ? zb + i * D : nullptr;
  const A tau = A(c.tau), gp = A(c.gp), gn = A(c.gn), thr = A(c.thr), inv_tau = A(1) / tau;
  A acc[KT];

  Lse<A> lse;
  lse.init();
  // Negatives: H(i) = Q(i) (log-sum-exp on the fly) or its top-k (heap of cosines).
  int64_t nh = 0;
  int64_t* hidx = (work && K > 0) ? tki + gi * K : nullptr;
  A* hval = (work && K > 0) ? tkv + gi * K : nullptr;
  for (int64_t j0 = 0; j0 < N; j0 += KT) {
    tile_dots<T, A>(zb, j0, N, anchor, D, sK, acc);
    if (work) {
#pragma unroll
      for (int t = 0; t < KT; ++t) {
        const int64_t j = j0 + t;
        if (j >= N || j == i || yb[j] < 0 || yb[j] == lab) continue;
        if (K > 0) heap_push(hval, hidx, nh, K, acc[t], j);
        else lse.add(acc[t] * inv_tau - (csb ? csb[j] : A(0)), neg_weight(acc[t], gn));
      }
    }
  }
  if (work && K > 0) {
    for (int64_t s = 0; s < nh; ++s)
      lse.add(hval[s] * inv_tau - (csb ? csb[hidx[s]] : A(0)), neg_weight(hval[s], gn));
    for (int64_t s = nh; s < K; ++s) hidx[s] = -1;
  }

  // Teacher keys (valid, other label): top-k heap or the threshold sums.
  A cr = 0, cnt = 0;
  if (c.teacher != kTeacherNone) {
    const T* ztb = zt + b * Nt * D;
    const int64_t* ytb = yt + b * Nt;
    int64_t nt = 0;
    int64_t* tidx = (work && c.teacher == kTeacherTopk) ? tti + gi * TK : nullptr;
    A* tval = (work && c.teacher == kTeacherTopk) ? ttv + gi * TK : nullptr;
    for (int64_t k0 = 0; k0 < Nt; k0 += KT) {
      tile_dots<T, A>(ztb, k0, Nt, anchor, D, sK, acc);
      if (work) {
#pragma unroll
        for (int t = 0; t < KT; ++t) {
          const int64_t k = k0 + t;
          if (k >= Nt || ytb[k] < 0 || ytb[k] == lab) continue;
          if (c.teacher == kTeacherTopk) {
            heap_push(tval, tidx, nt, TK, acc[t], k);
          } else if (acc[t] > thr) {
            cr += cross_term(acc[t]);
            cnt += A(1);
          }
        }
      }
    }
    if (work && c.teacher == kTeacherTopk) {
      for (int64_t s = 0; s < nt; ++s) lse.add(tval[s] * inv_tau, A(1));
      for (int64_t s = nt; s < TK; ++s) tidx[s] = -1;
    }
  }
  const A ln = lse.result();

  // Positives.
  A sum_f = 0, sum_r = 0, np = 0;
  for (int64_t j0 = 0; j0 < N; j0 += KT) {
    tile_dots<T, A>(zb, j0, N, anchor, D, sK, acc);
    if (work) {
#pragma unroll
      for (int t = 0; t < KT; ++t) {
        const int64_t j = j0 + t;
        if (j >= N || j == i || yb[j] != lab) continue;
        const PosTerm<A> pt = pos_term(acc[t] * inv_tau - (csb ? csb[j] : A(0)) - ln, gp);
        sum_f += pt.f;
        sum_r += pt.fs;
        np += A(1);
      }
    }
  }

  if (!active) return;
  if (!work) {
    loss[gi] = 0;
    log_neg[gi] = neg_inf<A>();
    rr[gi] = 0;
    npos[gi] = 0;
    if (cross) cross[gi] = ccount[gi] = 0;
    for (int64_t s = 0; s < K; ++s) tki[gi * K + s] = -1;
    if (c.teacher == kTeacherTopk)
      for (int64_t s = 0; s < TK; ++s) tti[gi * TK + s] = -1;
    return;
  }
  log_neg[gi] = ln;
  rr[gi] = sum_r;
  npos[gi] = np;
  loss[gi] = np > A(0) ? -(u ? u[gi] : A(1)) * sum_f / np : A(0);
  if (cross) {
    cross[gi] = cr;
    ccount[gi] = cnt;
  }
}

// a_i and a_i R_i for every anchor.
template <typename A>
__global__ void fecl_coef_kernel(const int64_t* __restrict__ y, const A* __restrict__ gl,
                                 const A* __restrict__ u, const A* __restrict__ npos,
                                 const A* __restrict__ rr, A* __restrict__ ap, A* __restrict__ arp, int64_t n) {
  const int64_t g = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (g >= n) return;
  const A a = anchor_coef(y[g] >= 0, gl[g], u ? u[g] : A(1), npos[g]);
  ap[g] = a;
  arp[g] = a * rr[g];
}

template <typename T, typename A>
__global__ void __launch_bounds__(kThreads) fecl_backward_kernel(
    const T* __restrict__ z, const int64_t* __restrict__ y, const T* __restrict__ zt,
    const int64_t* __restrict__ yt, const A* __restrict__ ap, const A* __restrict__ arp,
    const A* __restrict__ lnp, const A* __restrict__ cs, const A* __restrict__ gc,
    const int64_t* __restrict__ tti, Cfg c, A* __restrict__ dz) {
  __shared__ A sK[KT * DC];
  const int64_t N = c.N, D = c.D, Nt = c.Nt, K = c.K, TK = c.TK;
  const int64_t b = blockIdx.y, i = int64_t(blockIdx.x) * kThreads + threadIdx.x, gi = b * N + i;
  const bool active = i < N;
  const T* zb = z + b * N * D;
  const int64_t* yb = y + b * N;
  const A* csb = cs ? cs + b * N : nullptr;
  const A* ab = ap + b * N;
  const A* arb = arp + b * N;
  const A* lnb = lnp + b * N;
  const int64_t lab = active ? yb[i] : -1;
  const bool work = lab >= 0;
  const T* anchor = work ? zb + i * D : nullptr;
  A* out = work ? dz + gi * D : nullptr;
  const A tau = A(c.tau), gp = A(c.gp), gn = A(c.gn), thr = A(c.thr), inv_tau = A(1) / tau;
  const A a_i = work ? ab[i] : A(0), aR_i = work ? arb[i] : A(0), ln_i = work ? lnb[i] : A(0);
  const A c_i = (work && csb) ? csb[i] : A(0);
  A acc[KT], G[KT];

  // Dense part: positives both ways, negatives both ways when every negative is used.
  for (int64_t j0 = 0; j0 < N; j0 += KT) {
    tile_dots<T, A>(zb, j0, N, anchor, D, sK, acc);
#pragma unroll
    for (int t = 0; t < KT; ++t) {
      const int64_t j = j0 + t;
      A g = 0;
      if (work && j < N && j != i && yb[j] >= 0) {
        const A cos = acc[t], l = cos * inv_tau, c_j = csb ? csb[j] : A(0);
        if (yb[j] == lab) g = pos_grad(a_i, l, c_j, ln_i, gp) + pos_grad(ab[j], l, c_i, lnb[j], gp);
        else if (K == 0) g = neg_grad(aR_i, l, cos, c_j, ln_i, tau, gn) + neg_grad(arb[j], l, cos, c_i, lnb[j], tau, gn);
      }
      G[t] = g;
    }
    tile_accumulate<T, A>(zb, j0, N, D, sK, G, out, inv_tau);
  }

  if (c.teacher == kTeacherThreshold && gc != nullptr) {
    const T* ztb = zt + b * Nt * D;
    const int64_t* ytb = yt + b * Nt;
    const A g_i = work ? gc[gi] : A(0);
    for (int64_t k0 = 0; k0 < Nt; k0 += KT) {
      tile_dots<T, A>(ztb, k0, Nt, anchor, D, sK, acc);
#pragma unroll
      for (int t = 0; t < KT; ++t) {
        const int64_t k = k0 + t;
        G[t] = (work && g_i != A(0) && k < Nt && ytb[k] >= 0 && ytb[k] != lab && acc[t] > thr)
                   ? g_i * cross_grad(acc[t]) : A(0);
      }
      tile_accumulate<T, A>(ztb, k0, Nt, D, sK, G, out, A(1));
    }
  }

  if (c.teacher == kTeacherTopk && work && aR_i != A(0)) {
    const T* ztb = zt + b * Nt * D;
    for (int64_t s = 0; s < TK; ++s) {
      const int64_t k = tti[gi * TK + s];
      if (k < 0) continue;
      const T* zk = ztb + k * D;
      const A cos = gdot<T, A>(anchor, zk, D);
      const A g = neg_grad(aR_i, cos * inv_tau, cos, A(0), ln_i, tau, A(0)) * inv_tau;
      for (int64_t d = 0; d < D; ++d) out[d] += g * static_cast<A>(zk[d]);
    }
  }
}

// Stored top-k pairs (i, q): dz_i += g_iq z_q / tau and dz_q += g_iq z_i / tau (atomics).
template <typename T, typename A>
__global__ void fecl_topk_scatter_kernel(const T* __restrict__ z, const int64_t* __restrict__ tki,
                                         const A* __restrict__ arp, const A* __restrict__ lnp,
                                         const A* __restrict__ cs, Cfg c, int64_t n_pairs, A* __restrict__ dz) {
  const int64_t p = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= n_pairs) return;
  const int64_t gi = p / c.K, b = gi / c.N;
  const int64_t q = tki[p];
  if (q < 0 || arp[gi] == A(0)) return;
  const int64_t gq = b * c.N + q;
  const T* zi = z + gi * c.D;
  const T* zq = z + gq * c.D;
  const A tau = A(c.tau), inv_tau = A(1) / tau;
  const A cos = gdot<T, A>(zi, zq, c.D);
  const A g = neg_grad(arp[gi], cos * inv_tau, cos, cs ? cs[gq] : A(0), lnp[gi], tau, A(c.gn)) * inv_tau;
  if (g == A(0)) return;
  for (int64_t d = 0; d < c.D; ++d) {
    atomicAdd(dz + gi * c.D + d, g * static_cast<A>(zq[d]));
    atomicAdd(dz + gq * c.D + d, g * static_cast<A>(zi[d]));
  }
}

Cfg make_cfg(const FeclArgs& a) {
  return Cfg{a.N, a.D, a.Nt, a.top_k, a.teacher_top_k, a.tau, a.gamma_pos, a.gamma_neg,
             a.teacher_threshold, a.teacher};
}

template <typename T>
void forward_launch(const FeclArgs& a, FeclOutputs& o) {
  using A = acc_t<T>;
  const Cfg c = make_cfg(a);
  auto stream = at::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(blocks_for(a.N)), static_cast<unsigned>(a.B));
  const T* z = reinterpret_cast<const T*>(a.z.data_ptr());
  const int64_t* y = a.y.data_ptr<int64_t>();
  const bool teacher = a.teacher != kTeacherNone;
  A* cs = a.column_shift ? o.col_shift.data_ptr<A>() : nullptr;
  if (cs) {
    fecl_colshift_kernel<T, A><<<grid, kThreads, 0, stream>>>(z, y, cs, c);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  auto f = a.z.options().dtype(a.acc);
  at::Tensor tkv = a.top_k > 0 ? at::empty({a.B, a.N, a.top_k}, f) : at::Tensor();
  at::Tensor ttv = a.teacher == kTeacherTopk ? at::empty({a.B, a.N, a.teacher_top_k}, f) : at::Tensor();
  const bool thr = a.teacher == kTeacherThreshold;
  fecl_forward_kernel<T, A><<<grid, kThreads, 0, stream>>>(
      z, y, teacher ? reinterpret_cast<const T*>(a.zt.data_ptr()) : nullptr,
      teacher ? a.yt.data_ptr<int64_t>() : nullptr, a.u.defined() ? a.u.data_ptr<A>() : nullptr, cs, c,
      o.loss.data_ptr<A>(), o.log_neg.data_ptr<A>(), o.r.data_ptr<A>(), o.n_pos.data_ptr<A>(),
      thr ? o.cross.data_ptr<A>() : nullptr, thr ? o.cross_count.data_ptr<A>() : nullptr,
      a.top_k > 0 ? o.topk_idx.data_ptr<int64_t>() : nullptr, a.top_k > 0 ? tkv.data_ptr<A>() : nullptr,
      a.teacher == kTeacherTopk ? o.teacher_idx.data_ptr<int64_t>() : nullptr,
      a.teacher == kTeacherTopk ? ttv.data_ptr<A>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
at::Tensor backward_launch(const FeclArgs& a, const FeclSavedIn& s) {
  using A = acc_t<T>;
  const Cfg c = make_cfg(a);
  auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t n = a.B * a.N;
  auto f = a.z.options().dtype(a.acc);
  at::Tensor coef = at::empty({2, std::max<int64_t>(n, 1)}, f);
  A* ap = coef.data_ptr<A>();
  A* arp = ap + std::max<int64_t>(n, 1);
  const A* lnp = s.log_neg.data_ptr<A>();
  const A* cs = a.column_shift ? s.col_shift.data_ptr<A>() : nullptr;
  const T* z = reinterpret_cast<const T*>(a.z.data_ptr());
  const int64_t* y = a.y.data_ptr<int64_t>();
  // Accumulation buffer of dz (the kernels add into it), in the statistics' dtype.
  at::Tensor dzacc = at::zeros({a.B, a.N, a.D}, f);
  if (n == 0 || a.D == 0) return dzacc.to(a.z.scalar_type());
  fecl_coef_kernel<A><<<blocks_for(n), kThreads, 0, stream>>>(
      y, s.grad_loss.data_ptr<A>(), a.u.defined() ? a.u.data_ptr<A>() : nullptr, s.n_pos.data_ptr<A>(),
      s.r.data_ptr<A>(), ap, arp, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool teacher = a.teacher != kTeacherNone;
  const dim3 grid(static_cast<unsigned>(blocks_for(a.N)), static_cast<unsigned>(a.B));
  fecl_backward_kernel<T, A><<<grid, kThreads, 0, stream>>>(
      z, y, teacher ? reinterpret_cast<const T*>(a.zt.data_ptr()) : nullptr,
      teacher ? a.yt.data_ptr<int64_t>() : nullptr, ap, arp, lnp, cs,
      s.grad_cross.defined() ? s.grad_cross.data_ptr<A>() : nullptr,
      a.teacher == kTeacherTopk ? s.teacher_idx.data_ptr<int64_t>() : nullptr, c, dzacc.data_ptr<A>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (a.top_k > 0) {
    const int64_t pairs = n * a.top_k;
    fecl_topk_scatter_kernel<T, A><<<blocks_for(pairs), kThreads, 0, stream>>>(
        z, s.topk_idx.data_ptr<int64_t>(), arp, lnp, cs, c, pairs, dzacc.data_ptr<A>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return dzacc.to(a.z.scalar_type());
}

template <typename F>
void dispatch_float(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kDouble: f(double{}); break;
    case at::kHalf: f(at::Half{}); break;
    case at::kBFloat16: f(at::BFloat16{}); break;
    default: TORCH_CHECK(false, "fecl: unsupported dtype ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
fecl_forward_cuda(const at::Tensor& z, const at::Tensor& y, const c10::optional<at::Tensor>& zt,
                  const c10::optional<at::Tensor>& yt, const c10::optional<at::Tensor>& u, double tau,
                  double gamma_pos, double gamma_neg, int64_t top_k, bool column_shift, int64_t teacher_mode,
                  int64_t teacher_top_k, double teacher_threshold) {
  c10::cuda::CUDAGuard guard(z.device());
  FeclArgs a = fecl_args(z, y, zt, yt, u, tau, gamma_pos, gamma_neg, top_k, column_shift, teacher_mode,
                         teacher_top_k, teacher_threshold);
  FeclOutputs o = fecl_alloc_outputs(a);
  if (a.B * a.N > 0) dispatch_float(a.z.scalar_type(), [&](auto tag) { forward_launch<decltype(tag)>(a, o); });
  return o.tuple();
}

at::Tensor fecl_backward_cuda(const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_cross,
                              const at::Tensor& z, const at::Tensor& y, const c10::optional<at::Tensor>& zt,
                              const c10::optional<at::Tensor>& yt, const c10::optional<at::Tensor>& u,
                              const at::Tensor& log_neg, const at::Tensor& r, const at::Tensor& n_pos,
                              const at::Tensor& col_shift, const at::Tensor& topk_idx,
                              const at::Tensor& teacher_idx, double tau, double gamma_pos, double gamma_neg,
                              int64_t top_k, bool column_shift, int64_t teacher_mode, int64_t teacher_top_k,
                              double teacher_threshold) {
  c10::cuda::CUDAGuard guard(z.device());
  FeclArgs a = fecl_args(z, y, zt, yt, u, tau, gamma_pos, gamma_neg, top_k, column_shift, teacher_mode,
                         teacher_top_k, teacher_threshold);
  FeclSavedIn s = fecl_saved(a, grad_loss, grad_cross, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx);
  at::Tensor dz;
  dispatch_float(a.z.scalar_type(), [&](auto tag) { dz = backward_launch<decltype(tag)>(a, s); });
  return dz;
}

}  // namespace

TORCH_LIBRARY_IMPL(dycon_C, CUDA, m) {
  m.impl("fecl_forward", &fecl_forward_cuda);
  m.impl("fecl_backward", &fecl_backward_cuda);
}

}  // namespace dycon
