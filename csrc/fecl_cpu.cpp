// FeCL on the CPU (docs/fecl_kernels.md): anchors are processed in tiles of TI rows; the tile's
// similarities against all keys of its volume come from one BLAS product into a TI x N buffer
// (never N x N), and the rows of a tile are processed in parallel (at::parallel_for). The
// per-pair math is fecl_math.h, the same functions the CUDA kernels call.
//
// The keys of a volume are taken in label order (KeyOrder), so that each similarity row splits
// into contiguous blocks: a row's positives and negatives are whole ranges, processed by
// branch-free loops that GCC vectorises (docs/fecl_kernels.md, "The C++ CPU kernels").
//
// Forward:  [column shift] one pass of row maxima -> col_shift;
//           one pass per tile: top-k heap / log-sum-exp over negatives, teacher terms, positives.
// Backward: per tile, the symmetric coefficient matrix G_ij = g_ij + g_ji is written over the
//           similarity buffer (g_ji from anchor j's saved statistics), then dz_tile = G z / tau
//           by BLAS. Top-k negative pairs are sparse: g_iq is computed once per stored pair and
//           added to row i (at q) and, through a transposed index (CSR built serially), to row q.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu_isa.h"
#include "fecl_common.h"
#include "fecl_math.h"

namespace dycon {
namespace {

// Elements of one tile buffer (4 MiB in float32): rows per tile = kTileElems / N.
constexpr int64_t kTileElems = int64_t(1) << 20;

// Rows per parallel_for task: about 32k pairs, so that small problems run on one thread.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(width, 1)); }

int64_t tile_rows(int64_t N, int64_t Nt) {
  const int64_t width = std::max<int64_t>({N, Nt, 1});
  int64_t t = std::max<int64_t>(16, std::min<int64_t>(1024, kTileElems / width));
  return std::max<int64_t>(1, std::min<int64_t>(t, N));
}

// The labels y and yt as int32 codes with the same equalities, every label < 0 as -1: the row
// loops then compare 32-bit lanes next to their float32 data (GCC does not vectorise the loops
// with int64 label lanes).
using label_t = int32_t;
struct LabelCodes {
  at::Tensor y, yt;  // (B * N), (B * Nt) int32; yt undefined without a teacher
};

LabelCodes label_codes(const FeclArgs& a) {
  const bool teacher = a.teacher != kTeacherNone;
  const at::Tensor all = teacher ? at::cat({a.y.reshape(-1), a.yt.reshape(-1)}) : a.y.reshape(-1);
  const at::Tensor inverse = std::get<1>(at::_unique2(all, /*sorted=*/true, /*return_inverse=*/true));
  const at::Tensor codes = inverse.masked_fill(all < 0, -1).to(at::kInt);
  LabelCodes c;
  c.y = codes.narrow(0, 0, a.B * a.N).contiguous();
  if (teacher) c.yt = codes.narrow(0, a.B * a.N, a.B * a.Nt).contiguous();
  return c;
}

// The keys of one volume ordered by label (stable): the ignored keys first, then one block per
// label, so that a row of similarities against the keys in this order splits into contiguous
// blocks (the anchor's positives, its negatives). The row loops run over whole blocks instead of
// testing every key's label, and no work goes to the pairs that a label test would discard.
struct KeyOrder {
  at::Tensor perm;            // (N) int64: position -> key
  std::vector<int64_t> pos;   // key -> position
  std::vector<int64_t> start; // label code c owns positions [start[c], start[c + 1]); before start[0]: ignored
  int64_t valid_begin() const { return start[0]; }
};

KeyOrder key_order(const label_t* yb, int64_t N) {
  label_t n_codes = 0;
  for (int64_t j = 0; j < N; ++j) n_codes = std::max<label_t>(n_codes, yb[j] + 1);
  std::vector<int64_t> next(n_codes + 2, 0);  // counting sort, slot 0: the ignored keys
  for (int64_t j = 0; j < N; ++j) ++next[yb[j] + 2];
  for (label_t c = 0; c <= n_codes; ++c) next[c + 1] += next[c];
  KeyOrder ko;
  ko.start.assign(next.begin() + 1, next.end());
  ko.perm = at::empty({N}, at::kLong);
  int64_t* perm = ko.perm.data_ptr<int64_t>();
  ko.pos.resize(N);
  for (int64_t j = 0; j < N; ++j) {
    const int64_t p = next[yb[j] + 1]++;
    perm[p] = j;
    ko.pos[j] = p;
  }
  return ko;
}

// v[j] of the keys in KeyOrder's order.
template <typename A> std::vector<A> in_key_order(const A* v, const KeyOrder& ko) {
  const int64_t* perm = ko.perm.data_ptr<int64_t>();
  std::vector<A> out(ko.pos.size());
  for (size_t p = 0; p < out.size(); ++p) out[p] = v[perm[p]];
  return out;
}

template <typename A> const FeclCpuKernels<A>& fecl_table();
template <> const FeclCpuKernels<float>& fecl_table<float>() { return cpu_kernels().fecl_f32; }
template <> const FeclCpuKernels<double>& fecl_table<double>() { return cpu_kernels().fecl_f64; }

FeclKeyOrderView key_order_view(const KeyOrder& ko) {
  return {ko.perm.data_ptr<int64_t>(), ko.pos.data(), ko.start.data(), ko.valid_begin()};
}

// rows(ctx, heap, r0, r1) over the rows of a tile in parallel; each task owns its heap buffer.
template <typename A, typename Rows>
void tile_rows_parallel(const FeclRowsFwd<A>& f, int64_t rows, int64_t width, int64_t heap, Rows fn) {
  at::parallel_for(0, rows, row_grain(width), [&](int64_t r0, int64_t r1) {
    std::vector<A> heap_val(heap);
    fn(f, heap_val.data(), r0, r1);
  });
}

template <typename A>
void forward_impl(const FeclArgs& a, const at::Tensor& zc, const at::Tensor& ztc, FeclOutputs& o) {
  const int64_t B = a.B, N = a.N, Nt = a.Nt, K = a.top_k, TK = a.teacher_top_k;
  const bool teacher = a.teacher != kTeacherNone;
  const int64_t TI = tile_rows(N, teacher ? Nt : 0);
  const FeclCpuKernels<A>& kern = fecl_table<A>();
  auto opts = zc.options();
  at::Tensor L = at::empty({TI, N}, opts);
  at::Tensor Lt = teacher ? at::empty({TI, Nt}, opts) : at::Tensor();

  const LabelCodes codes = label_codes(a);
  A* cs = a.column_shift ? o.col_shift.data_ptr<A>() : nullptr;
  const std::vector<A> no_shift(cs ? 0 : N, A(0));  // c = 0 without the column shift
  FeclRowsFwd<A> f{};
  f.N = N, f.Nt = Nt, f.K = K, f.TK = TK;
  f.tau = A(a.tau), f.inv_tau = A(1) / f.tau, f.gp = A(a.gamma_pos), f.gn = A(a.gamma_neg);
  f.thr = A(a.teacher_threshold);
  f.topk_teacher = a.teacher == kTeacherTopk, f.thr_teacher = a.teacher == kTeacherThreshold;
  const int64_t heap = std::max<int64_t>({K, TK, 1});

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor zb = zc[b];
    const int64_t off = b * N;
    f.y = codes.y.data_ptr<label_t>() + off;
    f.yt = teacher ? codes.yt.data_ptr<label_t>() + b * Nt : nullptr;
    f.u = a.u.defined() ? a.u.data_ptr<A>() + off : nullptr;
    f.loss = o.loss.data_ptr<A>() + off;
    f.log_neg = o.log_neg.data_ptr<A>() + off;
    f.r = o.r.data_ptr<A>() + off;
    f.n_pos = o.n_pos.data_ptr<A>() + off;
    f.col_shift = cs ? cs + off : nullptr;
    f.cross = f.thr_teacher ? o.cross.data_ptr<A>() + off : nullptr;
    f.cross_count = f.thr_teacher ? o.cross_count.data_ptr<A>() + off : nullptr;
    f.topk_idx = K > 0 ? o.topk_idx.data_ptr<int64_t>() + off * K : nullptr;
    f.teacher_idx = f.topk_teacher ? o.teacher_idx.data_ptr<int64_t>() + off * TK : nullptr;
    f.c_anchor = cs ? cs + off : no_shift.data();
    // Similarity rows are against the keys in label order: row[p] = <z_i, z_perm[p]>.
    const KeyOrder ko = key_order(f.y, N);
    static_cast<FeclKeyOrderView&>(f) = key_order_view(ko);
    const at::Tensor zk = zb.index_select(0, ko.perm);

    // Pass 1 (shift = column): the key offsets c, a row max by symmetry.
    if (cs) {
      for (int64_t i0 = 0; i0 < N; i0 += TI) {
        const int64_t rows = std::min(TI, N - i0);
        at::Tensor Lv = L.narrow(0, 0, rows);
        at::mm_out(Lv, zb.narrow(0, i0, rows), zk.t());
        f.L = L.data_ptr<A>(), f.i0 = i0;
        tile_rows_parallel(f, rows, N, 1, kern.colmax_rows);
      }
    }
    const std::vector<A> ck = in_key_order(f.c_anchor, ko);  // the keys' offsets c in key order
    f.c_key = ck.data();

    // Pass 2: everything else, one BLAS product (two with a teacher) per tile.
    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t rows = std::min(TI, N - i0);
      at::Tensor Lv = L.narrow(0, 0, rows);
      at::mm_out(Lv, zb.narrow(0, i0, rows), zk.t());
      if (teacher) {
        at::Tensor Ltv = Lt.narrow(0, 0, rows);
        at::mm_out(Ltv, zb.narrow(0, i0, rows), ztc[b].t());
      }
      f.L = L.data_ptr<A>(), f.Lt = teacher ? Lt.data_ptr<A>() : nullptr, f.i0 = i0;
      tile_rows_parallel(f, rows, N + (teacher ? Nt : 0), heap, kern.forward_rows);
    }
  }
}

// Per-key statistics of one volume, in KeyOrder's order, that the backward reads for the key
// end of a pair (the anchor end reads the same numbers in the original order).
template <typename A> struct KeyStats {
  std::vector<A> a, aR, ln, c;  // a_j, a_j R_j, log_neg_j, c_j (zeros without the column shift)
};

template <typename A>
at::Tensor backward_impl(const FeclArgs& a, const FeclSavedIn& s, const at::Tensor& zc,
                         const at::Tensor& ztc) {
  const int64_t B = a.B, N = a.N, D = a.D, Nt = a.Nt, K = a.top_k, TK = a.teacher_top_k;
  const A tau = A(a.tau), gp = A(a.gamma_pos), gn = A(a.gamma_neg), thr = A(a.teacher_threshold);
  const bool topk_teacher = a.teacher == kTeacherTopk;
  const bool thr_teacher = a.teacher == kTeacherThreshold && s.grad_cross.defined();
  const int64_t TI = tile_rows(N, thr_teacher ? Nt : 0);
  const A inv_tau = A(1) / tau;
  auto opts = zc.options();

  const LabelCodes codes = label_codes(a);
  const label_t* yp = codes.y.data_ptr<label_t>();
  const label_t* ytp = a.teacher != kTeacherNone ? codes.yt.data_ptr<label_t>() : nullptr;
  const A* up = a.u.defined() ? a.u.data_ptr<A>() : nullptr;
  const A* gl = s.grad_loss.data_ptr<A>();
  const A* gc = thr_teacher ? s.grad_cross.data_ptr<A>() : nullptr;
  const A* lnp = s.log_neg.data_ptr<A>();
  const A* rp = s.r.data_ptr<A>();
  const A* npp = s.n_pos.data_ptr<A>();
  const A* cs = a.column_shift ? s.col_shift.data_ptr<A>() : nullptr;
  const int64_t* tki = K > 0 ? s.topk_idx.data_ptr<int64_t>() : nullptr;
  const int64_t* tti = topk_teacher ? s.teacher_idx.data_ptr<int64_t>() : nullptr;
  const A* zp = zc.data_ptr<A>();
  const A* ztp = a.teacher != kTeacherNone ? ztc.data_ptr<A>() : nullptr;

  // Per-anchor coefficients a_i and a_i R_i.
  at::Tensor coef = at::empty({2, B * N}, opts);
  A* ap = coef.data_ptr<A>();
  A* arp = ap + B * N;
  at::parallel_for(0, B * N, 1 << 14, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      ap[g] = anchor_coef(yp[g] >= 0, gl[g], up ? up[g] : A(1), npp[g]);
      arp[g] = ap[g] * rp[g];
    }
  });

  const FeclCpuKernels<A>& kern = fecl_table<A>();
  // Top-k negatives: g_iq per stored pair, and the transposed index (key q -> its anchors).
  at::Tensor gk, rev_ptr, rev_anchor, rev_g;
  const A* gkp = nullptr;
  const int64_t* rptr = nullptr;
  const int64_t* ranc = nullptr;
  const A* rg = nullptr;
  if (K > 0) {
    gk = at::empty({B * N * K}, opts);
    A* gkw = gk.data_ptr<A>();
    at::parallel_for(0, B * N, row_grain(K * D), [&](int64_t g0, int64_t g1) {
      for (int64_t g = g0; g < g1; ++g) {
        const int64_t b = g / N;
        for (int64_t t = 0; t < K; ++t) {
          const int64_t q = tki[g * K + t];
          A v = 0;
          if (q >= 0 && arp[g] != A(0)) {
            const A cos = kern.dot(zp + g * D, zp + (b * N + q) * D, D);
            v = neg_grad(arp[g], cos * inv_tau, cos, cs ? cs[b * N + q] : A(0), lnp[g], tau, gn);
          }
          gkw[g * K + t] = v;
        }
      }
    });
    rev_ptr = at::empty({B * N + 1}, a.y.options());
    int64_t* ptr = rev_ptr.data_ptr<int64_t>();
    std::fill(ptr, ptr + B * N + 1, int64_t(0));
    for (int64_t g = 0; g < B * N; ++g)
      for (int64_t t = 0; t < K; ++t) {
        const int64_t q = tki[g * K + t];
        if (q >= 0) ++ptr[(g / N) * N + q + 1];
      }
    for (int64_t g = 0; g < B * N; ++g) ptr[g + 1] += ptr[g];
    const int64_t total = ptr[B * N];
    rev_anchor = at::empty({std::max<int64_t>(total, 1)}, a.y.options());
    rev_g = at::empty({std::max<int64_t>(total, 1)}, opts);
    int64_t* ra = rev_anchor.data_ptr<int64_t>();
    A* rgw = rev_g.data_ptr<A>();
    std::vector<int64_t> fill(ptr, ptr + B * N);
    for (int64_t g = 0; g < B * N; ++g)
      for (int64_t t = 0; t < K; ++t) {
        const int64_t q = tki[g * K + t];
        if (q < 0) continue;
        const int64_t pos = fill[(g / N) * N + q]++;
        ra[pos] = g % N;
        rgw[pos] = gkw[g * K + t];
      }
    gkp = gkw;
    rptr = ptr;
    ranc = ra;
    rg = rgw;
  }

  FeclRowsBwd<A> g{};
  g.N = N, g.Nt = Nt, g.K = K;
  g.tau = tau, g.inv_tau = inv_tau, g.gp = gp, g.gn = gn, g.thr = thr;
  g.rev_anchor = ranc, g.rev_g = rg;

  at::Tensor dz = at::empty_like(a.z);
  at::Tensor G = at::empty({TI, N}, opts);
  at::Tensor Gt = thr_teacher ? at::empty({TI, Nt}, opts) : at::Tensor();
  at::Tensor dzt = at::empty({TI, D}, opts);
  const std::vector<A> no_shift(cs ? 0 : N, A(0));  // c = 0 without the column shift

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor zb = zc[b];
    const label_t* yb = yp + b * N;
    const label_t* ytb = ytp ? ytp + b * Nt : nullptr;
    const A* ab = ap + b * N;
    const A* arb = arp + b * N;
    const A* lnb = lnp + b * N;
    const A* cb = cs ? cs + b * N : no_shift.data();
    // G's columns are the keys in label order (as in the forward); dz_tile = G z_k / tau.
    const KeyOrder ko = key_order(yb, N);
    const at::Tensor zk = zb.index_select(0, ko.perm);
    const KeyStats<A> ks{in_key_order(ab, ko), in_key_order(arb, ko), in_key_order(lnb, ko), in_key_order(cb, ko)};
    g.y = yb, g.yt = ytb;
    static_cast<FeclKeyOrderView&>(g) = key_order_view(ko);
    g.key = {ks.a.data(), ks.aR.data(), ks.ln.data(), ks.c.data()};
    g.anchor = {ab, arb, lnb, cb};
    g.grad_cross = gc ? gc + b * N : nullptr;
    g.topk_idx = tki ? tki + b * N * K : nullptr;
    g.topk_g = gkp ? gkp + b * N * K : nullptr;
    g.rev_ptr = rptr ? rptr + b * N : nullptr;
    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t rows = std::min(TI, N - i0);
      at::Tensor Gv = G.narrow(0, 0, rows);
      at::mm_out(Gv, zb.narrow(0, i0, rows), zk.t());
      g.G = G.data_ptr<A>(), g.i0 = i0;
      at::parallel_for(0, rows, row_grain(N), [&](int64_t r0, int64_t r1) { kern.grad_rows(g, r0, r1); });
      at::Tensor dzv = dzt.narrow(0, 0, rows);
      at::mm_out(dzv, Gv, zk);
      dzv.div_(a.tau);
      // Threshold teacher: d cross_i / d c_ik = 1 / (1 - c_ik + eps), no temperature.
      if (thr_teacher) {
        at::Tensor Gtv = Gt.narrow(0, 0, rows);
        at::mm_out(Gtv, zb.narrow(0, i0, rows), ztc[b].t());
        g.Gt = Gt.data_ptr<A>();
        at::parallel_for(0, rows, row_grain(Nt), [&](int64_t r0, int64_t r1) { kern.teacher_grad_rows(g, r0, r1); });
        dzv.addmm_(Gtv, ztc[b]);
      }
      // Top-k teacher: g^t_ik = a_i R_i exp(l^t_ik - log_neg_i), teacher gets no gradient.
      if (topk_teacher) {
        A* dzp = dzt.data_ptr<A>();
        at::parallel_for(0, rows, row_grain(TK * D), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t gi = b * N + i0 + r;
            if (yb[i0 + r] < 0 || arb[i0 + r] == A(0)) continue;
            const A* zi = zp + gi * D;
            A* out = dzp + r * D;
            for (int64_t t = 0; t < TK; ++t) {
              const int64_t k = tti[gi * TK + t];
              if (k < 0) continue;
              const A* zk = ztp + (b * Nt + k) * D;
              const A cos = kern.dot(zi, zk, D);
              const A g = neg_grad(arb[i0 + r], cos * inv_tau, cos, A(0), lnb[i0 + r], tau, A(0)) * inv_tau;
              kern.axpy(g, zk, out, D);
            }
          }
        });
      }
      dz[b].narrow(0, i0, rows).copy_(dzv);
    }
  }
  return dz;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
           at::Tensor>
fecl_forward_cpu(const at::Tensor& z, const at::Tensor& y, const c10::optional<at::Tensor>& zt,
                 const c10::optional<at::Tensor>& yt, const c10::optional<at::Tensor>& u, double tau,
                 double gamma_pos, double gamma_neg, int64_t top_k, bool column_shift, int64_t teacher_mode,
                 int64_t teacher_top_k, double teacher_threshold) {
  FeclArgs a = fecl_args(z, y, zt, yt, u, tau, gamma_pos, gamma_neg, top_k, column_shift, teacher_mode,
                         teacher_top_k, teacher_threshold);
  FeclOutputs o = fecl_alloc_outputs(a);
  // Half inputs are widened once (B x N x D); float and double are used in place.
  at::Tensor zc = a.z.to(a.acc).contiguous();
  at::Tensor ztc = a.teacher != kTeacherNone ? a.zt.to(a.acc).contiguous() : at::Tensor();
  if (a.acc == at::kDouble) forward_impl<double>(a, zc, ztc, o);
  else forward_impl<float>(a, zc, ztc, o);
  return o.tuple();
}

at::Tensor fecl_backward_cpu(const at::Tensor& grad_loss, const c10::optional<at::Tensor>& grad_cross,
                             const at::Tensor& z, const at::Tensor& y, const c10::optional<at::Tensor>& zt,
                             const c10::optional<at::Tensor>& yt, const c10::optional<at::Tensor>& u,
                             const at::Tensor& log_neg, const at::Tensor& r, const at::Tensor& n_pos,
                             const at::Tensor& col_shift, const at::Tensor& topk_idx,
                             const at::Tensor& teacher_idx, double tau, double gamma_pos, double gamma_neg,
                             int64_t top_k, bool column_shift, int64_t teacher_mode, int64_t teacher_top_k,
                             double teacher_threshold) {
  FeclArgs a = fecl_args(z, y, zt, yt, u, tau, gamma_pos, gamma_neg, top_k, column_shift, teacher_mode,
                         teacher_top_k, teacher_threshold);
  FeclSavedIn s = fecl_saved(a, grad_loss, grad_cross, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx);
  at::Tensor zc = a.z.to(a.acc).contiguous();
  at::Tensor ztc = a.teacher != kTeacherNone ? a.zt.to(a.acc).contiguous() : at::Tensor();
  if (a.acc == at::kDouble) return backward_impl<double>(a, s, zc, ztc);
  return backward_impl<float>(a, s, zc, ztc);
}

}  // namespace

TORCH_LIBRARY_IMPL(dycon_C, CPU, m) {
  m.impl("fecl_forward", &fecl_forward_cpu);
  m.impl("fecl_backward", &fecl_backward_cpu);
}

}  // namespace dycon
