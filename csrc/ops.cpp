// Operator schemas of dycon_kernels._C. The CPU kernels register their implementations in
// *_cpu.cpp, the CUDA kernels in *_cuda.cu; the Python package wraps these in torch.library
// custom ops with autograd (dycon_kernels/uncl.py, dycon_kernels/fecl.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dycon_C, m) {
  // s, t: (B, C, V) contiguous logits; weight: (B, V) float32 or None.
  // reduce=True returns the 0-dim weighted sum of the voxel losses, else the (B, V) map.
  m.def("uncl_forward(Tensor s, Tensor t, float beta, Tensor? weight, bool reduce) -> Tensor");
  // The forward and the gradients of the weighted loss sum (over the mean's divisor for reduction
  // "mean"): (loss, ds, dt). s, t: (B, C, *spatial); weight: (B, *spatial) or None; the loss as
  // dycon_kernels/uncl.py returns it (reduced, in the logits' dtype, or the (B, *spatial) map); ds
  // and dt in the logits' shape and the accumulation dtype, dt empty unless need_t_grad. CPU only
  // (uncl_cpu.cpp): on the GPU the backward recomputes the softmaxes instead of keeping B x C x V floats.
  m.def(
      "uncl_forward_grad(Tensor s, Tensor t, float beta, Tensor? weight, str reduction, bool need_t_grad) -> "
      "(Tensor, Tensor, Tensor)");
  // grad: 0-dim (one value for every voxel) or (B, V) float32. Returns (ds, dt); dt is an empty
  // tensor when need_t_grad is false.
  m.def(
      "uncl_backward(Tensor grad, Tensor s, Tensor t, float beta, Tensor? weight, "
      "bool need_t_grad) -> (Tensor, Tensor)");
}

// The module holds no Python functions: importing it registers the operators above.
static struct PyModuleDef dycon_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dycon_module); }

// FeCL (docs/fecl_kernels.md). z: (B, N, D) contiguous; y: (B, N) int64; zt, yt: (B, Nt, D),
// (B, Nt) or None without a teacher; u: (B, N) or None. teacher_mode: 0 none, 1 topk,
// 2 threshold; top_k = 0: every negative. Returns (loss, cross, cross_count, log_neg, r, n_pos,
// col_shift, topk_idx, teacher_idx); unused outputs are empty tensors.
TORCH_LIBRARY_FRAGMENT(dycon_C, m) {
  m.def(
      "fecl_forward(Tensor z, Tensor y, Tensor? zt, Tensor? yt, Tensor? u, float tau, "
      "float gamma_pos, float gamma_neg, int top_k, bool column_shift, int teacher_mode, "
      "int teacher_top_k, float teacher_threshold) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Returns dz (z's dtype). grad_loss, grad_cross: (B, N) in the statistics' dtype; grad_cross
  // may be None (no threshold-teacher gradient).
  m.def(
      "fecl_backward(Tensor grad_loss, Tensor? grad_cross, Tensor z, Tensor y, Tensor? zt, "
      "Tensor? yt, Tensor? u, Tensor log_neg, Tensor r, Tensor n_pos, Tensor col_shift, "
      "Tensor topk_idx, Tensor teacher_idx, float tau, float gamma_pos, float gamma_neg, "
      "int top_k, bool column_shift, int teacher_mode, int teacher_top_k, "
      "float teacher_threshold) -> Tensor");
}
