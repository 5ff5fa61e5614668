// FeCL on the CPU (docs/fecl_kernels.md): anchors are processed in tiles of TI rows; the tile's
// similarities against all keys of its volume come from one BLAS product into a TI x N buffer
// (never N x N), and its rows are processed by the same thread: each pass is one parallel region
// in which the threads take whole tiles (cpu_parallel.h), not one region per tile. The per-pair
// math is fecl_math.h, the same functions the CUDA kernels call.
//
// The keys of a volume are taken in label order (KeyOrder), so that each similarity row splits
// into contiguous blocks: a row's positives and negatives are whole ranges, processed by
// branch-free loops that GCC vectorises (docs/fecl_kernels.md, "The C++ CPU kernels").
//
// Forward:  [column shift] one pass of maxima over upper strips (symmetry) -> col_shift;
//           one pass per tile: top-k heap / log-sum-exp over negatives, teacher terms, positives.
// Backward: the symmetric coefficient matrix G_ij = g_ij + g_ji (g_ji from anchor j's saved
//           statistics) in upper strips, rows and columns in key order: each strip's similarities
//           by one BLAS product, overwritten by G, then dz += G z / tau for the strip's rows and
//           (by symmetry) G^T z / tau for its columns, so each pair's similarity is computed once.
//           Top-k negative pairs are sparse: g_iq is computed once per stored pair and added to
//           dz_i and, through a transposed index (CSR built serially), to dz_q.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "alloc.h"
#include "cpu_isa.h"
#include "cpu_parallel.h"
#include "fecl_common.h"
#include "fecl_math.h"

namespace dycon {
namespace {

// Elements of the tile buffers of all threads together (4 MiB in float32).
constexpr int64_t kTileElems = int64_t(1) << 20;

// Rows per parallel task: about 32k pairs, so that small problems run on one thread.
int64_t row_grain(int64_t width) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(width, 1)); }

// The threads for the row passes over N anchors of `width` keys.
int64_t row_threads(int64_t N, int64_t width) { return threads_for(N, row_grain(width)); }

// Rows per tile (forward) or strip (backward), each taken whole by one thread (cpu_parallel.h):
// the threads' buffers of TI x width elements hold kTileElems together, and each thread gets
// about 4 tiles of a volume to take in turn; within [16, 1024] rows.
int64_t tile_rows(int64_t N, int64_t Nt, int64_t threads) {
  const int64_t width = std::max<int64_t>({N, Nt, 1});
  int64_t t = std::min<int64_t>(kTileElems / (width * threads), (N + 4 * threads - 1) / (4 * threads));
  t = std::max<int64_t>(16, std::min<int64_t>(1024, t));
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

// The similarities of the keys at positions [p0, p0 + R) against those at [q0, q0 + W) (key order),
// an R x W matrix at the front of the flat buffer buf.
at::Tensor key_similarities(const at::Tensor& buf, const at::Tensor& zk, int64_t p0, int64_t R, int64_t q0, int64_t W) {
  at::Tensor L = buf.narrow(0, 0, R * W).view({R, W});
  at::mm_out(L, zk.narrow(0, p0, R), zk.narrow(0, q0, W).t());
  return L;
}

// Pass 1 (shift = column) of one volume: c_j = max(0, max_{valid i != j} l_ij) into c (by key
// index). A column's maximum is also a row's (l is symmetric), so as in the backward the
// similarities come in upper strips, rows [p0, p0 + R) against columns [p0, N) in key order, each
// entry counted for its row and for its column: half the products of whole rows. The ignored keys
// are never rows; their columns get one product of each strip's rows against them. Each thread
// takes whole strips and keeps its own maxima; a maximum does not depend on the order, so their
// maximum is the same whichever thread took which strip.
template <typename A>
void column_shift_volume(const at::Tensor& zk, const KeyOrder& ko, int64_t TI, int64_t threads, A tau, A* c) {
  const int64_t N = zk.size(0), v0 = ko.valid_begin();
  const FeclCpuKernels<A>& kern = fecl_table<A>();
  std::vector<std::vector<A>> m_of(threads);  // per thread, in key order
  std::atomic<int64_t> next_thread{0};
  parallel_blocks(N - v0, TI, threads, [&] {
    std::vector<A>& mine = m_of[next_thread++];
    mine.assign(N, A(0));
    return [&, m = mine.data(), buf = at::empty({TI * std::max<int64_t>(N - v0, v0)}, zk.options())](int64_t lo,
                                                                                                       int64_t hi) {
      const int64_t p0 = v0 + lo, R = hi - lo, W = N - p0;
      const A* Lp = key_similarities(buf, zk, p0, R, p0, W).template data_ptr<A>();
      kern.strip_row_max(Lp, W, 0, R, m + p0);
      kern.strip_col_max(Lp, R, W, R, W, m + p0);
      if (v0 > 0) kern.strip_col_max(key_similarities(buf, zk, p0, R, 0, v0).template data_ptr<A>(), R, v0, 0, v0, m);
    };
  });
  const int64_t* perm = ko.perm.data_ptr<int64_t>();
  for (int64_t p = 0; p < N; ++p) {
    A mp = A(0);
    for (const std::vector<A>& m : m_of)
      if (!m.empty()) mp = std::max(mp, m[p]);
    c[perm[p]] = mp / tau;
  }
}

// Pass 2 of one volume: tiles of TI anchors, each taken whole by one thread: its BLAS products
// (z z_k^T, and z zt^T with a teacher) into the thread's own buffers, then the row loop. Every
// anchor's outputs are written by the tile that holds it.
template <typename A>
void main_pass_volume(const FeclRowsFwd<A>& f, const at::Tensor& zb, const at::Tensor& zk, const at::Tensor& ztb,
                      int64_t TI, int64_t threads, int64_t heap) {
  const FeclCpuKernels<A>& kern = fecl_table<A>();
  parallel_blocks(f.N, TI, threads, [&] {
    at::Tensor L = at::empty({TI, f.N}, zb.options());
    at::Tensor Lt = ztb.defined() ? at::empty({TI, f.Nt}, zb.options()) : at::Tensor();
    return [&, fw = f, L, Lt, heap_val = std::vector<A>(heap)](int64_t i0, int64_t i1) mutable {
      const int64_t rows = i1 - i0;
      const at::Tensor zr = zb.narrow(0, i0, rows);
      at::Tensor Lv = L.narrow(0, 0, rows);
      at::mm_out(Lv, zr, zk.t());
      if (Lt.defined()) {
        at::Tensor Ltv = Lt.narrow(0, 0, rows);
        at::mm_out(Ltv, zr, ztb.t());
        fw.Lt = Lt.template data_ptr<A>();
      }
      fw.L = L.template data_ptr<A>(), fw.i0 = i0;
      kern.forward_rows(fw, heap_val.data(), 0, rows);
    };
  });
}

template <typename A>
void forward_impl(const FeclArgs& a, const at::Tensor& zc, const at::Tensor& ztc, FeclOutputs& o) {
  const int64_t B = a.B, N = a.N, Nt = a.Nt, K = a.top_k, TK = a.teacher_top_k;
  const bool teacher = a.teacher != kTeacherNone;
  const int64_t threads = row_threads(N, N + (teacher ? Nt : 0));
  const int64_t TI = tile_rows(N, teacher ? Nt : 0, threads);

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
    f.cross = f.thr_teacher ? o.cross.data_ptr<A>() + off : nullptr;
    f.cross_count = f.thr_teacher ? o.cross_count.data_ptr<A>() + off : nullptr;
    f.topk_idx = K > 0 ? o.topk_idx.data_ptr<int64_t>() + off * K : nullptr;
    f.teacher_idx = f.topk_teacher ? o.teacher_idx.data_ptr<int64_t>() + off * TK : nullptr;
    f.c_anchor = cs ? cs + off : no_shift.data();
    // Similarity rows are against the keys in label order: row[p] = <z_i, z_perm[p]>.
    const KeyOrder ko = key_order(f.y, N);
    static_cast<FeclKeyOrderView&>(f) = key_order_view(ko);
    const at::Tensor zk = zb.index_select(0, ko.perm);

    if (cs) column_shift_volume(zk, ko, TI, threads, f.tau, cs + off);
    const std::vector<A> ck = in_key_order(f.c_anchor, ko);  // the keys' offsets c in key order
    f.c_key = ck.data();
    main_pass_volume(f, zb, zk, teacher ? ztc[b] : at::Tensor(), TI, threads, heap);
  }
}

// Per-position statistics of one volume in KeyOrder's order, that the backward reads for both
// ends of a pair.
template <typename A> struct KeyStats {
  std::vector<A> a, aR, ln, c;  // a_j, a_j R_j, log_neg_j, c_j (zeros without the column shift)
};

// The backward's inputs as raw pointers (all volumes), and the per-anchor coefficients.
template <typename A> struct BwdInputs {
  const label_t *y, *yt;
  const A *u, *grad_loss, *grad_cross, *log_neg, *r, *n_pos, *col_shift;
  const int64_t *topk_idx, *teacher_idx;
  const A *z, *zt;
  at::Tensor coef;  // (2, B * N): a_i and a_i R_i, at a and aR
  const A *a, *aR;
};

template <typename A>
BwdInputs<A> bwd_inputs(const FeclArgs& a, const FeclSavedIn& s, const LabelCodes& codes, const at::Tensor& zc,
                        const at::Tensor& ztc, bool thr_teacher) {
  const int64_t BN = a.B * a.N;
  BwdInputs<A> in{};
  in.y = codes.y.data_ptr<label_t>();
  in.yt = a.teacher != kTeacherNone ? codes.yt.data_ptr<label_t>() : nullptr;
  in.u = a.u.defined() ? a.u.data_ptr<A>() : nullptr;
  in.grad_loss = s.grad_loss.data_ptr<A>();
  in.grad_cross = thr_teacher ? s.grad_cross.data_ptr<A>() : nullptr;
  in.log_neg = s.log_neg.data_ptr<A>();
  in.r = s.r.data_ptr<A>();
  in.n_pos = s.n_pos.data_ptr<A>();
  in.col_shift = a.column_shift ? s.col_shift.data_ptr<A>() : nullptr;
  in.topk_idx = a.top_k > 0 ? s.topk_idx.data_ptr<int64_t>() : nullptr;
  in.teacher_idx = a.teacher == kTeacherTopk ? s.teacher_idx.data_ptr<int64_t>() : nullptr;
  in.z = zc.data_ptr<A>();
  in.zt = a.teacher != kTeacherNone ? ztc.data_ptr<A>() : nullptr;
  in.coef = at::empty({2, BN}, zc.options());
  A* ap = in.coef.template data_ptr<A>();
  A* arp = ap + BN;
  in.a = ap, in.aR = arp;
  at::parallel_for(0, BN, 1 << 14, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      ap[g] = anchor_coef(in.y[g] >= 0, in.grad_loss[g], in.u ? in.u[g] : A(1), in.n_pos[g]);
      arp[g] = ap[g] * in.r[g];
    }
  });
  return in;
}

// The stored top-k negative pairs: g_iq per pair, and the transposed index (key q -> the anchors
// that stored it, with their g), built serially so that the order is fixed.
template <typename A> struct TopkPairs {
  at::Tensor g, rev_ptr, rev_anchor, rev_g;
};

template <typename A>
TopkPairs<A> topk_pairs(const FeclArgs& a, const BwdInputs<A>& in, const FeclCpuKernels<A>& kern) {
  const int64_t N = a.N, D = a.D, K = a.top_k, BN = a.B * a.N;
  const A tau = A(a.tau), inv_tau = A(1) / tau, gn = A(a.gamma_neg);
  const int64_t* tki = in.topk_idx;
  const A* arp = in.aR;
  TopkPairs<A> t;
  t.g = at::empty({BN * K}, in.coef.options());
  A* gk = t.g.template data_ptr<A>();
  at::parallel_for(0, BN, row_grain(K * D), [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = g / N;
      for (int64_t s = 0; s < K; ++s) {
        const int64_t q = tki[g * K + s];
        A v = 0;
        if (q >= 0 && arp[g] != A(0)) {
          const A cos = kern.dot(in.z + g * D, in.z + (b * N + q) * D, D);
          v = neg_grad(arp[g], cos * inv_tau, cos, in.col_shift ? in.col_shift[b * N + q] : A(0), in.log_neg[g], tau, gn);
        }
        gk[g * K + s] = v;
      }
    }
  });
  t.rev_ptr = at::zeros({BN + 1}, a.y.options());
  int64_t* ptr = t.rev_ptr.template data_ptr<int64_t>();
  for (int64_t g = 0; g < BN; ++g)
    for (int64_t s = 0; s < K; ++s) {
      const int64_t q = tki[g * K + s];
      if (q >= 0) ++ptr[(g / N) * N + q + 1];
    }
  for (int64_t g = 0; g < BN; ++g) ptr[g + 1] += ptr[g];
  const int64_t total = ptr[BN];
  t.rev_anchor = at::empty({std::max<int64_t>(total, 1)}, a.y.options());
  t.rev_g = at::empty({std::max<int64_t>(total, 1)}, in.coef.options());
  int64_t* ra = t.rev_anchor.template data_ptr<int64_t>();
  A* rg = t.rev_g.template data_ptr<A>();
  std::vector<int64_t> fill(ptr, ptr + BN);
  for (int64_t g = 0; g < BN; ++g)
    for (int64_t s = 0; s < K; ++s) {
      const int64_t q = tki[g * K + s];
      if (q < 0) continue;
      const int64_t pos = fill[(g / N) * N + q]++;
      ra[pos] = g;  // global anchor index
      rg[pos] = gk[g * K + s];
    }
  return t;
}

// The dense part of volume b's gradient, dz_k = (G z_k / tau + Gt zt) in key order, from the
// upper strips of the symmetric G: the strip of rows [p0, p0 + R) against columns [p0, p0 + W)
// gives dz_k[p0 : p0 + R] += G_strip z_k[p0 : p0 + W] and, by symmetry, dz_k[p0 + R : p0 + W] +=
// G_strip[:, R:]^T z_k[p0 : p0 + R]; so each similarity G_pq with p < q is computed once and used
// twice (1.5 N^2 D multiply-adds instead of 2). Strips start at the first valid key (the ignored
// keys' rows and columns are zero); with top_k, G holds only the positives (same label: diagonal
// blocks in key order), so a strip ends with its last row's label block.
//
// Each thread takes whole strips and adds them to its own dz_k; the strips go to the threads in a
// fixed pattern (below) and the threads' dz_k are added in thread order, so the result is the same
// bits run to run for one thread count. (Taking strips in turn, as the forward takes its tiles,
// would add them in a different grouping each run.)
template <typename A>
void dense_volume_grad(const FeclArgs& a, const BwdInputs<A>& in, bool thr_teacher, int64_t b, const at::Tensor& zc,
                       const at::Tensor& ztc, at::Tensor& dzk, const KeyOrder& ko, FeclRowsBwd<A> g, int64_t TI,
                       int64_t threads) {
  const int64_t N = a.N, Nt = a.Nt;
  const FeclCpuKernels<A>& kern = fecl_table<A>();
  const at::Tensor zk = zc[b].index_select(0, ko.perm);
  const std::vector<label_t> yk = in_key_order(in.y + b * N, ko);
  const A* cb = in.col_shift ? in.col_shift + b * N : nullptr;
  const std::vector<A> no_shift(cb ? 0 : N, A(0));  // c = 0 without the column shift
  const KeyStats<A> ks{in_key_order(in.a + b * N, ko), in_key_order(in.aR + b * N, ko),
                       in_key_order(in.log_neg + b * N, ko), in_key_order(cb ? cb : no_shift.data(), ko)};
  const std::vector<A> gck = thr_teacher ? in_key_order(in.grad_cross + b * N, ko) : std::vector<A>();
  static_cast<FeclKeyOrderView&>(g) = key_order_view(ko);
  g.y = yk.data();
  g.yt = in.yt ? in.yt + b * Nt : nullptr;
  g.key = {ks.a.data(), ks.aR.data(), ks.ln.data(), ks.c.data()};
  g.grad_cross = thr_teacher ? gck.data() : nullptr;
  const at::Tensor ztb = thr_teacher ? ztc[b] : at::Tensor();
  const A inv_tau = A(1) / A(a.tau);
  const int64_t v0 = ko.valid_begin(), strips = (N - v0 + TI - 1) / TI;
  threads = std::max<int64_t>(1, std::min(threads, strips));
  std::vector<at::Tensor> acc(threads);  // each thread's dz_k; thread 0's is dzk
  acc[0] = dzk.zero_();

  // Strip s = p0 / TI of thread t: the strips' widths fall with s, so they are dealt out in a
  // snake (0, 1, ..., T-1, T-1, ..., 1, 0, 0, 1, ...) to even out the threads' work.
  const auto owner = [threads](int64_t s) {
    const int64_t r = s % threads;
    return (s / threads) % 2 == 0 ? r : threads - 1 - r;
  };
  parallel_threads(threads, [&](int64_t t) {
    const at::Tensor Gbuf = at::empty({TI * (N - v0)}, zk.options());
    const at::Tensor Gtbuf = thr_teacher ? at::empty({TI, Nt}, zk.options()) : at::Tensor();
    FeclRowsBwd<A> gl = g;
    if (t > 0) acc[t] = at::zeros_like(dzk);
    for (int64_t s = 0; s < strips; ++s) {
      if (owner(s) != t) continue;
      const int64_t p0 = v0 + s * TI, R = std::min(TI, N - p0);
      const int64_t W = a.top_k > 0 ? ko.start[yk[p0 + R - 1] + 1] - p0 : N - p0;
      const at::Tensor zr = zk.narrow(0, p0, R), zw = zk.narrow(0, p0, W);
      at::Tensor G = key_similarities(Gbuf, zk, p0, R, p0, W);
      gl.G = G.template data_ptr<A>(), gl.p0 = p0, gl.W = W;
      kern.grad_rows(gl, 0, R);
      at::Tensor dzr = acc[t].narrow(0, p0, R);
      dzr.addmm_(G, zw, /*beta=*/1, /*alpha=*/inv_tau);
      if (W > R) acc[t].narrow(0, p0 + R, W - R).addmm_(G.narrow(1, R, W - R).t(), zr, /*beta=*/1, /*alpha=*/inv_tau);
      // Threshold teacher: d cross_i / d c_ik = 1 / (1 - c_ik + eps), no temperature.
      if (thr_teacher) {
        at::Tensor Gt = Gtbuf.narrow(0, 0, R);
        at::mm_out(Gt, zr, ztb.t());
        gl.Gt = Gt.template data_ptr<A>();
        kern.teacher_grad_rows(gl, 0, R);
        dzr.addmm_(Gt, ztb);
      }
    }
  });
  for (int64_t t = 1; t < threads; ++t) dzk.add_(acc[t]);
}

// The sparse pairs of anchors [g0, g1) (global indices), each adding to its own row of dz: the
// stored top-k negatives both ways (dz_i += g_iq z_q / tau for i's pairs and g_qi z_q / tau for the
// anchors q that stored i), and the top-k teacher pairs, g^t_ik = a_i R_i exp(l^t_ik - log_neg_i)
// (the teacher gets no gradient).
template <typename A>
void sparse_grad_rows(const FeclArgs& a, const BwdInputs<A>& in, const TopkPairs<A>* tp, A* dz, int64_t g0, int64_t g1) {
  const int64_t N = a.N, D = a.D, K = a.top_k, TK = a.teacher_top_k, Nt = a.Nt;
  const A tau = A(a.tau), inv_tau = A(1) / tau;
  const FeclCpuKernels<A>& kern = fecl_table<A>();
  const A* arp = in.aR;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t b = g / N;
    A* out = dz + g * D;
    if (tp) {
      const A* gk = tp->g.template data_ptr<A>();
      const int64_t* ptr = tp->rev_ptr.template data_ptr<int64_t>();
      const int64_t* ra = tp->rev_anchor.template data_ptr<int64_t>();
      const A* rg = tp->rev_g.template data_ptr<A>();
      for (int64_t s = 0; s < K; ++s) {
        const int64_t q = in.topk_idx[g * K + s];
        if (q >= 0) kern.axpy(gk[g * K + s] * inv_tau, in.z + (b * N + q) * D, out, D);
      }
      for (int64_t s = ptr[g]; s < ptr[g + 1]; ++s) kern.axpy(rg[s] * inv_tau, in.z + ra[s] * D, out, D);
    }
    if (in.teacher_idx && in.y[g] >= 0 && arp[g] != A(0)) {
      const A* zi = in.z + g * D;
      for (int64_t s = 0; s < TK; ++s) {
        const int64_t k = in.teacher_idx[g * TK + s];
        if (k < 0) continue;
        const A* ztk = in.zt + (b * Nt + k) * D;
        const A cos = kern.dot(zi, ztk, D);
        kern.axpy(neg_grad(arp[g], cos * inv_tau, cos, A(0), in.log_neg[g], tau, A(0)) * inv_tau, ztk, out, D);
      }
    }
  }
}

template <typename A>
at::Tensor backward_impl(const FeclArgs& a, const FeclSavedIn& s, const at::Tensor& zc, const at::Tensor& ztc) {
  const int64_t B = a.B, N = a.N, D = a.D, Nt = a.Nt, K = a.top_k;
  const bool thr_teacher = a.teacher == kTeacherThreshold && s.grad_cross.defined();
  const int64_t threads = row_threads(N, N + (thr_teacher ? Nt : 0));
  const int64_t TI = tile_rows(N, thr_teacher ? Nt : 0, threads);
  auto opts = zc.options();
  const LabelCodes codes = label_codes(a);
  const BwdInputs<A> in = bwd_inputs<A>(a, s, codes, zc, ztc, thr_teacher);
  const TopkPairs<A> tp = K > 0 ? topk_pairs(a, in, fecl_table<A>()) : TopkPairs<A>();

  FeclRowsBwd<A> g{};
  g.N = N, g.Nt = Nt, g.K = K;
  g.tau = A(a.tau), g.inv_tau = A(1) / g.tau, g.gp = A(a.gamma_pos), g.gn = A(a.gamma_neg);
  g.thr = A(a.teacher_threshold);
  at::Tensor dz = new_output({B, N, D}, opts);
  at::Tensor dzk = at::empty({N, D}, opts);
  for (int64_t b = 0; b < B; ++b) {
    const KeyOrder ko = key_order(codes.y.data_ptr<label_t>() + b * N, N);
    dense_volume_grad(a, in, thr_teacher, b, zc, ztc, dzk, ko, g, TI, threads);
    dz[b].index_copy_(0, ko.perm, dzk);
  }
  if (K > 0 || in.teacher_idx) {
    A* dzp = dz.data_ptr<A>();
    const int64_t width = K * 2 + (in.teacher_idx ? a.teacher_top_k : 0);
    at::parallel_for(0, B * N, row_grain(width * D),
                     [&](int64_t g0, int64_t g1) { sparse_grad_rows(a, in, K > 0 ? &tp : nullptr, dzp, g0, g1); });
  }
  return dz.to(a.z.scalar_type());
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
