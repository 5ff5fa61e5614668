// Runtime dispatch of the CPU hot loops by vector ISA (docs/engineering.md, "CPU kernels and the
// vector ISA").
//
// The hot loops (cpu_kernels_*.h) are compiled once per ISA level in their own translation unit
// (cpu_isa_baseline.cpp, cpu_isa_avx2.cpp, cpu_isa_avx512.cpp), each inside its own namespace, and
// each exports a table of function pointers. The entry points (uncl_cpu.cpp, fecl_cpu.cpp) keep
// the argument checks, allocation, BLAS and threading, and call the table of the best level this
// CPU runs, so one binary is fast on a new CPU and never executes an unsupported instruction on an
// old one. This header includes no torch header: the ISA translation units must not compile
// torch's inline functions with wider instructions (the linker keeps one copy of each).
#pragma once

#include <cstdint>

namespace dycon {

enum class CpuIsa : int { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kNumCpuIsa = 3;

// ---- UnCL: a range of voxel tiles ---------------------------------------------------------------

constexpr int64_t kUnclTile = 256;  // voxels per tile (and per partial sum: thread-count independent)

// One call's data: s, t (B, C, V) contiguous; weight (B, V) or null. Forward: out is the (B, V)
// loss map, or (reduce) one partial sum per tile. Backward: grad is one value or a (B, V) map; dt
// may be null.
template <typename A> struct UnclCpuArgs {
  const A* s;
  const A* t;
  const float* weight;
  int64_t B, C, V;
  A beta;
  A* out;
  bool reduce;
  const A* grad;
  bool grad_is_map;
  A* ds;
  A* dt;
};

// Scratch elements one thread needs for the tiles of C channels.
inline int64_t uncl_scratch_elems(int64_t C) { return (5 * C + 8) * kUnclTile; }

template <typename A> struct UnclCpuKernels {
  // Tiles [k0, k1) (tile k: volume k / tiles_per_volume); scratch: uncl_scratch_elems(C) elements.
  void (*forward)(const UnclCpuArgs<A>&, A* scratch, int64_t k0, int64_t k1);
  void (*backward)(const UnclCpuArgs<A>&, A* scratch, int64_t k0, int64_t k1);
};

// ---- the table of one ISA level -----------------------------------------------------------------

struct CpuKernels {
  CpuIsa isa;
  const char* name;
  UnclCpuKernels<float> uncl_f32;
  UnclCpuKernels<double> uncl_f64;
};

// Each ISA translation unit defines its table; a level the compiler cannot target (not x86-64
// GCC/Clang) leaves it null.
namespace isa_baseline { extern const CpuKernels* const kTable; }
namespace isa_avx2 { extern const CpuKernels* const kTable; }
namespace isa_avx512 { extern const CpuKernels* const kTable; }

// The table the kernels use now: the best level the CPU supports, or the lower one named by
// DYCON_CPU_ISA (read at every call, so tests can switch; an unknown or unsupported name is an
// error). Defined in cpu_isa.cpp.
const CpuKernels& cpu_kernels();

}  // namespace dycon
