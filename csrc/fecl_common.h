// Argument checks, input normalisation and output allocation shared by the CPU and CUDA FeCL
// entry points (contract: docs/fecl_kernels.md, "Entry points").
#pragma once

#include <torch/library.h>
#include <torch/types.h>

namespace dycon {

enum FeclTeacher : int64_t { kTeacherNone = 0, kTeacherTopk = 1, kTeacherThreshold = 2 };

// Shapes and parameters of one call, plus the inputs in the form the kernels read.
struct FeclArgs {
  int64_t B = 0, N = 0, D = 0, Nt = 0;
  double tau = 1, gamma_pos = 0, gamma_neg = 0, teacher_threshold = 0;
  int64_t top_k = 0;          // 0: every negative
  bool column_shift = false;
  int64_t teacher = kTeacherNone;
  int64_t teacher_top_k = 0;  // > 0 with teacher = topk
  at::ScalarType acc = at::kFloat;
  at::Tensor z;   // (B, N, D) contiguous, input dtype
  at::Tensor y;   // (B, N) int64 contiguous
  at::Tensor zt;  // (B, Nt, D) contiguous, z's dtype (undefined without a teacher)
  at::Tensor yt;  // (B, Nt) int64 contiguous (undefined without a teacher)
  at::Tensor u;   // (B, N) acc dtype contiguous (undefined: all ones)
};

// Statistics dtype: float64 for float64 embeddings, float32 otherwise.
inline at::ScalarType fecl_acc_type(const at::Tensor& z) {
  return z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline FeclArgs fecl_args(const at::Tensor& z, const at::Tensor& y, const c10::optional<at::Tensor>& zt,
                          const c10::optional<at::Tensor>& yt, const c10::optional<at::Tensor>& u,
                          double tau, double gamma_pos, double gamma_neg, int64_t top_k,
                          bool column_shift, int64_t teacher_mode, int64_t teacher_top_k,
                          double teacher_threshold) {
  TORCH_CHECK(z.dim() == 3, "fecl: z must be (B, N, D), got ", z.sizes());
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "fecl: z must be floating point, got ", z.scalar_type());
  TORCH_CHECK(y.dim() == 2 && y.size(0) == z.size(0) && y.size(1) == z.size(1),
              "fecl: y must be (B, N) = ", z.sizes().slice(0, 2), ", got ", y.sizes());
  TORCH_CHECK(!at::isFloatingType(y.scalar_type()) && y.scalar_type() != at::kBool,
              "fecl: y must be an integer tensor, got ", y.scalar_type());
  TORCH_CHECK(y.device() == z.device(), "fecl: y is on ", y.device(), ", z on ", z.device());
  TORCH_CHECK(tau > 0, "fecl: tau must be > 0, got ", tau);
  TORCH_CHECK(gamma_pos >= 0 && gamma_neg >= 0, "fecl: gamma_pos and gamma_neg must be >= 0");
  TORCH_CHECK(top_k >= 0, "fecl: top_k must be >= 0 (0 = every negative), got ", top_k);
  TORCH_CHECK(teacher_mode >= 0 && teacher_mode <= 2, "fecl: teacher_mode must be 0, 1 or 2, got ",
              teacher_mode);
  FeclArgs a;
  a.B = z.size(0);
  a.N = z.size(1);
  a.D = z.size(2);
  a.tau = tau;
  a.gamma_pos = gamma_pos;
  a.gamma_neg = gamma_neg;
  a.top_k = top_k;
  a.column_shift = column_shift;
  // A teacher mode without teacher embeddings means no teacher term (as in reference.fecl).
  a.teacher = (zt.has_value() && zt->defined()) ? teacher_mode : int64_t(kTeacherNone);
  a.teacher_top_k = teacher_top_k;
  a.teacher_threshold = teacher_threshold;
  a.acc = fecl_acc_type(z);
  a.z = z.contiguous();
  a.y = y.to(at::kLong).contiguous();
  if (a.teacher != kTeacherNone) {
    const at::Tensor& t = *zt;
    TORCH_CHECK(t.dim() == 3 && t.size(0) == a.B && t.size(2) == a.D,
                "fecl: zt must be (B, Nt, D) with B = ", a.B, " and D = ", a.D, ", got ", t.sizes());
    TORCH_CHECK(t.device() == z.device(), "fecl: zt is on ", t.device(), ", z on ", z.device());
    a.Nt = t.size(1);
    a.zt = t.to(z.scalar_type()).contiguous();
    if (yt.has_value() && yt->defined()) {
      TORCH_CHECK(yt->dim() == 2 && yt->size(0) == a.B && yt->size(1) == a.Nt,
                  "fecl: yt must be (B, Nt) = (", a.B, ", ", a.Nt, "), got ", yt->sizes());
      TORCH_CHECK(!at::isFloatingType(yt->scalar_type()), "fecl: yt must be an integer tensor");
      TORCH_CHECK(yt->device() == z.device(), "fecl: yt is on ", yt->device(), ", z on ", z.device());
      a.yt = yt->to(at::kLong).contiguous();
    } else {
      TORCH_CHECK(a.Nt == a.N, "fecl: yt may be omitted only when Nt == N");
      a.yt = a.y;
    }
    if (a.teacher == kTeacherTopk)
      TORCH_CHECK(teacher_top_k >= 1, "fecl: teacher = topk needs teacher_top_k >= 1, got ", teacher_top_k);
  }
  if (u.has_value() && u->defined()) {
    TORCH_CHECK(u->numel() == a.B * a.N, "fecl: u must be (B, N), got ", u->sizes());
    TORCH_CHECK(u->device() == z.device(), "fecl: u is on ", u->device(), ", z on ", z.device());
    a.u = u->reshape({a.B, a.N}).to(a.acc).contiguous();
  }
  return a;
}

// The forward outputs, in the order of the entry point's tuple. Unused ones are empty tensors.
// Everything is allocated with at::empty: each kernel writes every element it returns.
struct FeclOutputs {
  at::Tensor loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
             at::Tensor, at::Tensor>
  tuple() const {
    return {loss, cross, cross_count, log_neg, r, n_pos, col_shift, topk_idx, teacher_idx};
  }
};

inline FeclOutputs fecl_alloc_outputs(const FeclArgs& a) {
  auto f = a.z.options().dtype(a.acc);
  auto l = a.z.options().dtype(at::kLong);
  const bool thr = a.teacher == kTeacherThreshold;
  FeclOutputs o;
  o.loss = at::empty({a.B, a.N}, f);
  o.cross = thr ? at::empty({a.B, a.N}, f) : at::empty({0}, f);
  o.cross_count = thr ? at::empty({a.B, a.N}, f) : at::empty({0}, f);
  o.log_neg = at::empty({a.B, a.N}, f);
  o.r = at::empty({a.B, a.N}, f);
  o.n_pos = at::empty({a.B, a.N}, f);
  o.col_shift = a.column_shift ? at::empty({a.B, a.N}, f) : at::empty({0}, f);
  o.topk_idx = a.top_k > 0 ? at::empty({a.B, a.N, a.top_k}, l) : at::empty({0}, l);
  o.teacher_idx = a.teacher == kTeacherTopk ? at::empty({a.B, a.N, a.teacher_top_k}, l) : at::empty({0}, l);
  return o;
}

// The forward statistics handed back to the backward, checked and converted to the kernels' form.
struct FeclSavedIn {
  at::Tensor grad_loss, grad_cross;  // (B, N) acc; grad_cross undefined when absent
  at::Tensor log_neg, r, n_pos;      // (B, N) acc
  at::Tensor col_shift;              // (B, N) acc, undefined without the column shift
  at::Tensor topk_idx, teacher_idx;  // (B, N, k) int64, undefined when unused
};

inline at::Tensor fecl_stat(const at::Tensor& t, const FeclArgs& a, const char* name) {
  TORCH_CHECK(t.defined() && t.numel() == a.B * a.N, "fecl_backward: ", name, " must be (B, N) = (",
              a.B, ", ", a.N, "), got ", t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.device() == a.z.device(), "fecl_backward: ", name, " is on ", t.device());
  return t.reshape({a.B, a.N}).to(a.acc).contiguous();
}

inline at::Tensor fecl_idx(const at::Tensor& t, const FeclArgs& a, int64_t k, const char* name) {
  TORCH_CHECK(t.defined() && t.dim() == 3 && t.size(0) == a.B && t.size(1) == a.N && t.size(2) == k,
              "fecl_backward: ", name, " must be (B, N, ", k, "), got ",
              t.defined() ? t.sizes() : at::IntArrayRef{});
  TORCH_CHECK(t.device() == a.z.device(), "fecl_backward: ", name, " is on ", t.device());
  return t.to(at::kLong).contiguous();
}

inline FeclSavedIn fecl_saved(const FeclArgs& a, const at::Tensor& grad_loss,
                              const c10::optional<at::Tensor>& grad_cross, const at::Tensor& log_neg,
                              const at::Tensor& r, const at::Tensor& n_pos, const at::Tensor& col_shift,
                              const at::Tensor& topk_idx, const at::Tensor& teacher_idx) {
  FeclSavedIn s;
  s.grad_loss = fecl_stat(grad_loss, a, "grad_loss");
  if (a.teacher == kTeacherThreshold && grad_cross.has_value() && grad_cross->defined() &&
      grad_cross->numel() > 0)
    s.grad_cross = fecl_stat(*grad_cross, a, "grad_cross");
  s.log_neg = fecl_stat(log_neg, a, "log_neg");
  s.r = fecl_stat(r, a, "r");
  s.n_pos = fecl_stat(n_pos, a, "n_pos");
  if (a.column_shift) s.col_shift = fecl_stat(col_shift, a, "col_shift");
  if (a.top_k > 0) s.topk_idx = fecl_idx(topk_idx, a, a.top_k, "topk_idx");
  if (a.teacher == kTeacherTopk) s.teacher_idx = fecl_idx(teacher_idx, a, a.teacher_top_k, "teacher_idx");
  return s;
}

}  // namespace dycon
