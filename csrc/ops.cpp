// Operator schemas of dycon_kernels._C. The CPU kernels register their implementations in
// *_cpu.cpp, the CUDA kernels in *_cuda.cu; the Python package wraps these in torch.library
// custom ops with autograd (dycon_kernels/uncl.py, dycon_kernels/fecl.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(dycon_C, m) {
  // s, t: (B, C, V) contiguous logits; weight: (B, V) float32 or None.
  // reduce=True returns the 0-dim weighted sum of the voxel losses, else the (B, V) map.
  m.def("uncl_forward(Tensor s, Tensor t, float beta, Tensor? weight, bool reduce) -> Tensor");
  // grad: 0-dim (one value for every voxel) or (B, V) float32. Returns (ds, dt); dt is an empty
  // tensor when need_t_grad is false.
  m.def(
      "uncl_backward(Tensor grad, Tensor s, Tensor t, float beta, Tensor? weight, "
      "bool need_t_grad) -> (Tensor, Tensor)");
}

// The module holds no Python functions: importing it registers the operators above.
static struct PyModuleDef dycon_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&dycon_module); }
