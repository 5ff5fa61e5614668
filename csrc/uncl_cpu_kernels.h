// UnCL's CPU hot loops: tiles of voxels, all channels of a tile at once, vectorised over voxels.
// Included once per ISA level by cpu_isa_*.cpp inside namespace dycon::DYCON_ISA_NS (cpu_isa.h);
// no torch header, no allocation: the caller hands each thread its scratch.
//
// A tile's softmax, log-probabilities and entropies live in the scratch (channel-major,
// c * kUnclTile + v, so the inner loops run over contiguous voxels); each logit is read once per
// pass. Per voxel and side: one exp and one log per channel, one reciprocal; two exps for W.

namespace dycon {
namespace DYCON_ISA_NS {
namespace {

constexpr int64_t kT = kUnclTile;

// Views into one thread's scratch (uncl_scratch_elems(C) elements).
template <typename A> struct UnclTileBuf {
  A *p, *q, *log_p, *log_q, *dl;  // C x kT each: softmaxes, log(softmax + eps), one side's dl/dx
  A *h_s, *h_t, *d, *W, *share_s, *m, *sum, *g;  // kT each

  UnclTileBuf(A* s, int64_t C)
      : p(s), q(p + C * kT), log_p(q + C * kT), log_q(log_p + C * kT), dl(log_q + C * kT), h_s(dl + C * kT),
        h_t(h_s + kT), d(h_t + kT), W(d + kT), share_s(W + kT), m(share_s + kT), sum(m + kT), g(sum + kT) {}
};

// prob = softmax over channels of x (C rows of stride V), log_prob = log(prob + eps), h = entropy.
template <typename A>
void softmax_tile(const A* x, int64_t C, int64_t V, int64_t nv, A* prob, A* log_prob, A* h, A* m, A* sum) {
#pragma omp simd
  for (int64_t v = 0; v < nv; ++v) m[v] = x[v], sum[v] = 0, h[v] = 0;
  for (int64_t c = 1; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) m[v] = dmax(m[v], x[c * V + v]);
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) {
      const A e = vexp_nonpos(x[c * V + v] - m[v]);
      prob[c * kT + v] = e;
      sum[v] += e;
    }
#pragma omp simd
  for (int64_t v = 0; v < nv; ++v) sum[v] = vrcp(sum[v]);  // one division per voxel, not per channel
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) {
      const A pv = prob[c * kT + v] * sum[v];
      const A lv = vlog(pv + A(kUnclEps));
      prob[c * kT + v] = pv;
      log_prob[c * kT + v] = lv;
      h[v] -= pv * lv;
    }
}

// Everything the forward and backward need about the tile of nv voxels at s, t.
template <typename A> void compute_tile(const UnclTileBuf<A>& b, const A* s, const A* t, int64_t C, int64_t V, int64_t nv, A beta) {
  softmax_tile(s, C, V, nv, b.p, b.log_p, b.h_s, b.m, b.sum);
  softmax_tile(t, C, V, nv, b.q, b.log_q, b.h_t, b.m, b.sum);
#pragma omp simd
  for (int64_t v = 0; v < nv; ++v) b.d[v] = 0;
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) {
      const A diff = b.p[c * kT + v] - b.q[c * kT + v];
      b.d[v] += diff * diff;
    }
#pragma omp simd
  for (int64_t v = 0; v < nv; ++v) {
    const UnclWeight<A> w = uncl_weight(b.h_s[v], b.h_t[v], beta);
    b.W[v] = w.W;
    b.share_s[v] = w.share_s;
  }
}

// out[c * V + v] = g_v * d(l_v)/d(logit_c) for one side: x its softmax, y the other's.
template <typename A>
void side_grad(const UnclTileBuf<A>& b, const A* x, const A* y, const A* log_x, bool student, A beta, int64_t C,
               int64_t V, int64_t nv, A* out) {
  A* coef = b.m;  // m and sum are free after compute_tile
  A* dot = b.sum;
#pragma omp simd
  for (int64_t v = 0; v < nv; ++v) {
    coef[v] = uncl_entropy_coef(beta, b.d[v], b.W[v], student ? b.share_s[v] : A(1) - b.share_s[v]);
    dot[v] = 0;
  }
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t k = c * kT + v;
      const A dl = uncl_dldx(x[k], y[k], log_x[k], b.W[v], coef[v]);
      b.dl[k] = dl;
      dot[v] += x[k] * dl;
    }
  for (int64_t c = 0; c < C; ++c)
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) {
      const int64_t k = c * kT + v;
      out[c * V + v] = b.g[v] * x[k] * (b.dl[k] - dot[v]);
    }
}

// The voxel losses of a tile (times the voxel weights): the (B, V) map, or the tile's partial sum.
template <typename A>
void write_loss(const UnclCpuArgs<A>& a, const UnclTileBuf<A>& b, int64_t k, int64_t voxel, int64_t nv) {
  A* l = b.m;  // m and sum are free after compute_tile
#pragma omp simd
  for (int64_t v = 0; v < nv; ++v)
    l[v] = uncl_loss(b.d[v], UnclWeight<A>{b.W[v], b.share_s[v]}, b.h_s[v], b.h_t[v], a.beta);
  if (a.weight) {
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) l[v] *= a.weight[voxel + v];
  }
  if (!a.reduce) {
    for (int64_t v = 0; v < nv; ++v) a.out[voxel + v] = l[v];
    return;
  }
  A partial = 0;
#pragma omp simd reduction(+ : partial)
  for (int64_t v = 0; v < nv; ++v) partial += l[v];
  a.out[k] = partial;
}

// The logit gradients of a tile, each voxel's scaled by g_v = grad_v * weight_v (grad: 1 when null).
template <typename A>
void write_grads(const UnclCpuArgs<A>& a, const UnclTileBuf<A>& b, int64_t base, int64_t voxel, int64_t nv) {
  if (a.grad && a.grad_is_map) {
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) b.g[v] = a.grad[voxel + v];
  } else {
    const A g = a.grad ? a.grad[0] : A(1);
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) b.g[v] = g;
  }
  if (a.weight) {
#pragma omp simd
    for (int64_t v = 0; v < nv; ++v) b.g[v] *= a.weight[voxel + v];
  }
  side_grad(b, b.p, b.q, b.log_p, true, a.beta, a.C, a.V, nv, a.ds + base);
  if (a.dt) side_grad(b, b.q, b.p, b.log_q, false, a.beta, a.C, a.V, nv, a.dt + base);
}

// Tiles [k0, k1) (tile k: volume k / tiles per volume): the outputs a names, each tile's softmaxes,
// entropies and weights computed once for all of them.
template <typename A> void uncl_tiles(const UnclCpuArgs<A>& a, A* scratch, int64_t k0, int64_t k1) {
  const UnclTileBuf<A> b(scratch, a.C);
  const int64_t per_volume = (a.V + kT - 1) / kT;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t vol = k / per_volume, v0 = (k % per_volume) * kT, nv = dmin(kT, a.V - v0);
    const int64_t base = vol * a.C * a.V + v0, voxel = vol * a.V + v0;
    compute_tile(b, a.s + base, a.t + base, a.C, a.V, nv, a.beta);
    if (a.out) write_loss(a, b, k, voxel, nv);
    if (a.ds) write_grads(a, b, base, voxel, nv);
  }
}

}  // namespace

template <typename A> constexpr UnclCpuKernels<A> uncl_cpu_kernels() {
  return {&uncl_tiles<A>};
}

}  // namespace DYCON_ISA_NS
}  // namespace dycon
