// Argument checks and output allocation shared by the CPU and CUDA UnCL entry points.
#pragma once

#include <torch/library.h>
#include <torch/types.h>

namespace dycon {

inline void check_uncl_args(const at::Tensor& s, const at::Tensor& t,
                            const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(s.dim() == 3 && s.sizes() == t.sizes(), "uncl: s and t must both be (B, C, V), got ",
              s.sizes(), " and ", t.sizes());
  TORCH_CHECK(s.size(1) >= 2, "uncl: need C >= 2 classes, got C = ", s.size(1));
  TORCH_CHECK(s.scalar_type() == t.scalar_type(), "uncl: s and t dtypes differ");
  TORCH_CHECK(s.is_contiguous() && t.is_contiguous(), "uncl: s and t must be contiguous");
  if (weight.has_value()) {
    TORCH_CHECK(weight->scalar_type() == at::kFloat && weight->is_contiguous() &&
                    weight->numel() == s.size(0) * s.size(2),
                "uncl: weight must be a contiguous float32 (B, V) tensor");
  }
}

// Float output type for sums: double stays double, the rest accumulate in float32.
inline at::ScalarType uncl_acc_type(const at::Tensor& s) {
  return s.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace dycon
