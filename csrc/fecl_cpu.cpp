// FeCL on the CPU (docs/fecl_kernels.md): anchors are processed in tiles of TI rows; the tile's
// similarities against all keys of its volume come from one BLAS product into a TI x N buffer
// (never N x N), and the rows of a tile are processed in parallel (at::parallel_for). The
// per-pair math is fecl_math.h, the same functions the CUDA kernels call.
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

template <typename A> A dot(const A* a, const A* b, int64_t D) {
  A s = 0;
  for (int64_t d = 0; d < D; ++d) s += a[d] * b[d];
  return s;
}

template <typename A>
void forward_impl(const FeclArgs& a, const at::Tensor& zc, const at::Tensor& ztc, FeclOutputs& o) {
  const int64_t B = a.B, N = a.N, Nt = a.Nt, K = a.top_k, TK = a.teacher_top_k;
  const A tau = A(a.tau), gp = A(a.gamma_pos), gn = A(a.gamma_neg), thr = A(a.teacher_threshold);
  const bool topk_teacher = a.teacher == kTeacherTopk, thr_teacher = a.teacher == kTeacherThreshold;
  const bool teacher = a.teacher != kTeacherNone;
  const int64_t TI = tile_rows(N, teacher ? Nt : 0);
  auto opts = zc.options();
  at::Tensor L = at::empty({TI, N}, opts);
  at::Tensor Lt = teacher ? at::empty({TI, Nt}, opts) : at::Tensor();

  const int64_t* yp = a.y.data_ptr<int64_t>();
  const int64_t* ytp = teacher ? a.yt.data_ptr<int64_t>() : nullptr;
  const A* up = a.u.defined() ? a.u.data_ptr<A>() : nullptr;
  A* loss = o.loss.data_ptr<A>();
  A* log_neg = o.log_neg.data_ptr<A>();
  A* rr = o.r.data_ptr<A>();
  A* npos = o.n_pos.data_ptr<A>();
  A* cs = a.column_shift ? o.col_shift.data_ptr<A>() : nullptr;
  A* cross = thr_teacher ? o.cross.data_ptr<A>() : nullptr;
  A* ccount = thr_teacher ? o.cross_count.data_ptr<A>() : nullptr;
  int64_t* tki = K > 0 ? o.topk_idx.data_ptr<int64_t>() : nullptr;
  int64_t* tti = topk_teacher ? o.teacher_idx.data_ptr<int64_t>() : nullptr;

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor zb = zc[b];
    const int64_t* yb = yp + b * N;
    const int64_t* ytb = teacher ? ytp + b * Nt : nullptr;
    const A* csb = cs ? cs + b * N : nullptr;

    // Pass 1 (shift = column): c_j = max(0, max_{valid i != j} l_ij), a row max by symmetry.
    if (cs) {
      for (int64_t i0 = 0; i0 < N; i0 += TI) {
        const int64_t rows = std::min(TI, N - i0);
        at::Tensor Lv = L.narrow(0, 0, rows);
        at::mm_out(Lv, zb.narrow(0, i0, rows), zb.t());
        const A* Lp = L.data_ptr<A>();
        at::parallel_for(0, rows, row_grain(N), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t i = i0 + r;
            const A* row = Lp + r * N;
            A m = 0;
            for (int64_t j = 0; j < N; ++j)
              if (j != i && yb[j] >= 0) m = dmax(m, row[j] / tau);
            cs[b * N + i] = m;
          }
        });
      }
    }

    // Pass 2: everything else, one BLAS product (two with a teacher) per tile.
    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t rows = std::min(TI, N - i0);
      at::Tensor Lv = L.narrow(0, 0, rows);
      at::mm_out(Lv, zb.narrow(0, i0, rows), zb.t());
      if (teacher) {
        at::Tensor Ltv = Lt.narrow(0, 0, rows);
        at::mm_out(Ltv, zb.narrow(0, i0, rows), ztc[b].t());
      }
      const A* Lp = L.data_ptr<A>();
      const A* Ltp = teacher ? Lt.data_ptr<A>() : nullptr;
      at::parallel_for(0, rows, row_grain(N + (teacher ? Nt : 0)), [&](int64_t r0, int64_t r1) {
        std::vector<A> heap_val(std::max<int64_t>({K, TK, 1}));
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = i0 + r, gi = b * N + i;
          const int64_t lab = yb[i];
          int64_t* hidx = tki ? tki + gi * K : nullptr;
          int64_t* tidx = tti ? tti + gi * TK : nullptr;
          if (lab < 0) {  // ignored patch: neither anchor nor key
            loss[gi] = 0;
            log_neg[gi] = neg_inf<A>();
            rr[gi] = 0;
            npos[gi] = 0;
            if (cross) cross[gi] = ccount[gi] = 0;
            for (int64_t s = 0; s < K; ++s) hidx[s] = -1;
            for (int64_t s = 0; s < TK && tidx; ++s) tidx[s] = -1;
            continue;
          }
          const A* row = Lp + r * N;
          Lse<A> lse;
          lse.init();
          // Negatives: H(i) = Q(i) or its top_k largest l_iq.
          if (K > 0) {
            int64_t n = 0;
            for (int64_t j = 0; j < N; ++j)
              if (j != i && yb[j] >= 0 && yb[j] != lab) heap_push(heap_val.data(), hidx, n, K, row[j], j);
            for (int64_t s = 0; s < n; ++s) {  // the heap holds cosines: same order as l
              const int64_t q = hidx[s];
              const A cos = heap_val[s];
              lse.add(cos / tau - (csb ? csb[q] : A(0)), neg_weight(cos, gn));
            }
            for (int64_t s = n; s < K; ++s) hidx[s] = -1;
          } else {
            for (int64_t j = 0; j < N; ++j) {
              if (j == i || yb[j] < 0 || yb[j] == lab) continue;
              lse.add(row[j] / tau - (csb ? csb[j] : A(0)), neg_weight(row[j], gn));
            }
          }
          // Teacher keys (valid, other label).
          if (teacher) {
            const A* trow = Ltp + r * Nt;
            if (topk_teacher) {
              int64_t n = 0;
              for (int64_t k = 0; k < Nt; ++k)
                if (ytb[k] >= 0 && ytb[k] != lab) heap_push(heap_val.data(), tidx, n, TK, trow[k], k);
              for (int64_t s = 0; s < n; ++s) lse.add(heap_val[s] / tau, A(1));
              for (int64_t s = n; s < TK; ++s) tidx[s] = -1;
            } else {
              A cr = 0, cnt = 0;
              for (int64_t k = 0; k < Nt; ++k) {
                if (ytb[k] < 0 || ytb[k] == lab) continue;
                const A c = trow[k];
                if (c > thr) {
                  cr += cross_term(c);
                  cnt += 1;
                }
              }
              cross[gi] = cr;
              ccount[gi] = cnt;
            }
          }
          const A ln = lse.result();
          // Positives.
          A sum_f = 0, sum_r = 0;
          int64_t np = 0;
          for (int64_t j = 0; j < N; ++j) {
            if (j == i || yb[j] != lab) continue;
            const PosTerm<A> pt = pos_term(row[j] / tau - (csb ? csb[j] : A(0)) - ln, gp);
            sum_f += pt.f;
            sum_r += pt.fs;
            ++np;
          }
          log_neg[gi] = ln;
          rr[gi] = sum_r;
          npos[gi] = A(np);
          loss[gi] = np > 0 ? -(up ? up[gi] : A(1)) * sum_f / A(np) : A(0);
        }
      });
    }
  }
}

template <typename A>
at::Tensor backward_impl(const FeclArgs& a, const FeclSavedIn& s, const at::Tensor& zc,
                         const at::Tensor& ztc) {
  const int64_t B = a.B, N = a.N, D = a.D, Nt = a.Nt, K = a.top_k, TK = a.teacher_top_k;
  const A tau = A(a.tau), gp = A(a.gamma_pos), gn = A(a.gamma_neg), thr = A(a.teacher_threshold);
  const bool topk_teacher = a.teacher == kTeacherTopk;
  const bool thr_teacher = a.teacher == kTeacherThreshold && s.grad_cross.defined();
  const int64_t TI = tile_rows(N, thr_teacher ? Nt : 0);
  auto opts = zc.options();

  const int64_t* yp = a.y.data_ptr<int64_t>();
  const int64_t* ytp = a.teacher != kTeacherNone ? a.yt.data_ptr<int64_t>() : nullptr;
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
            const A cos = dot(zp + g * D, zp + (b * N + q) * D, D);
            v = neg_grad(arp[g], cos, cs ? cs[b * N + q] : A(0), lnp[g], tau, gn);
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

  at::Tensor dz = at::empty_like(a.z);
  at::Tensor G = at::empty({TI, N}, opts);
  at::Tensor Gt = thr_teacher ? at::empty({TI, Nt}, opts) : at::Tensor();
  at::Tensor dzt = at::empty({TI, D}, opts);

  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor zb = zc[b];
    const int64_t* yb = yp + b * N;
    const int64_t* ytb = ytp ? ytp + b * Nt : nullptr;
    const A* csb = cs ? cs + b * N : nullptr;
    const A* ab = ap + b * N;
    const A* arb = arp + b * N;
    const A* lnb = lnp + b * N;
    for (int64_t i0 = 0; i0 < N; i0 += TI) {
      const int64_t rows = std::min(TI, N - i0);
      at::Tensor Gv = G.narrow(0, 0, rows);
      at::mm_out(Gv, zb.narrow(0, i0, rows), zb.t());
      A* Gp = G.data_ptr<A>();
      // G_ij = g_ij + g_ji over the similarity buffer.
      at::parallel_for(0, rows, row_grain(N), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t i = i0 + r, gi = b * N + i;
          const int64_t lab = yb[i];
          A* row = Gp + r * N;
          if (lab < 0) {
            std::fill(row, row + N, A(0));
            continue;
          }
          const A a_i = ab[i], aR_i = arb[i], ln_i = lnb[i], c_i = csb ? csb[i] : A(0);
          for (int64_t j = 0; j < N; ++j) {
            const int64_t yj = yb[j];
            A g = 0;
            if (j != i && yj >= 0) {
              const A cos = row[j], l = cos / tau;
              const A c_j = csb ? csb[j] : A(0);
              if (yj == lab) {
                g = pos_grad(a_i, l, c_j, ln_i, gp) + pos_grad(ab[j], l, c_i, lnb[j], gp);
              } else if (K == 0) {
                g = neg_grad(aR_i, cos, c_j, ln_i, tau, gn) + neg_grad(arb[j], cos, c_i, lnb[j], tau, gn);
              }
            }
            row[j] = g;
          }
          if (K > 0) {
            for (int64_t t = 0; t < K; ++t) {
              const int64_t q = tki[gi * K + t];
              if (q >= 0) row[q] += gkp[gi * K + t];
            }
            for (int64_t p = rptr[gi]; p < rptr[gi + 1]; ++p) row[ranc[p]] += rg[p];
          }
        }
      });
      at::Tensor dzv = dzt.narrow(0, 0, rows);
      at::mm_out(dzv, Gv, zb);
      dzv.div_(a.tau);
      // Threshold teacher: d cross_i / d c_ik = 1 / (1 - c_ik + eps), no temperature.
      if (thr_teacher) {
        at::Tensor Gtv = Gt.narrow(0, 0, rows);
        at::mm_out(Gtv, zb.narrow(0, i0, rows), ztc[b].t());
        A* Gtp = Gt.data_ptr<A>();
        at::parallel_for(0, rows, row_grain(Nt), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t gi = b * N + i0 + r;
            const int64_t lab = yb[i0 + r];
            const A g = gc[gi];
            A* row = Gtp + r * Nt;
            for (int64_t k = 0; k < Nt; ++k) {
              const A c = row[k];
              row[k] = (lab >= 0 && g != A(0) && ytb[k] >= 0 && ytb[k] != lab && c > thr) ? g * cross_grad(c) : A(0);
            }
          }
        });
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
              const A g = neg_grad(arb[i0 + r], dot(zi, zk, D), A(0), lnb[i0 + r], tau, A(0)) / tau;
              for (int64_t d = 0; d < D; ++d) out[d] += g * zk[d];
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
