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

// One call's data: s, t (B, C, V) contiguous; weight (B, V) or null. The kernel writes the
// outputs that are not null: out, the (B, V) loss map or (reduce) one partial sum per tile; ds and
// dt (dt may be null when ds is not), the logit gradients scaled per voxel by grad (one value or a
// (B, V) map; null: 1, the unit gradient the forward saves) times the weight.
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
  void (*tiles)(const UnclCpuArgs<A>&, A* scratch, int64_t k0, int64_t k1);
};

// ---- FeCL: a range of rows of one tile of similarities (docs/fecl_kernels.md) ---------------------
// Forward: pointers to per-anchor arrays are the volume's (index: anchor i); rows r of a tile are
// anchors i0 + r; a row's columns are the volume's keys in label order (perm: position -> key, pos: key ->
// position, start[c]: the first position of label code c, v0 = start[0]: before it the ignored keys).

struct FeclKeyOrderView {
  const int64_t* perm;
  const int64_t* pos;
  const int64_t* start;
  int64_t v0;
};

template <typename A> struct FeclRowsFwd : FeclKeyOrderView {
  const A* L;   // rows x N similarities (cosines)
  const A* Lt;  // rows x Nt teacher similarities, or null
  int64_t i0, N, Nt, K, TK;
  const int32_t* y;   // label codes (-1: ignored)
  const int32_t* yt;  // teacher label codes, or null
  const A* c_key;     // offsets c in key order (zeros without the column shift)
  const A* c_anchor;  // the same by key index
  A tau, inv_tau, gp, gn, thr;
  bool topk_teacher, thr_teacher;
  const A* u;  // anchor weights or null
  A *loss, *log_neg, *r, *n_pos, *cross, *cross_count;
  int64_t* topk_idx;     // (N, K) or null
  int64_t* teacher_idx;  // (N, TK) or null
};

template <typename A> struct FeclKeyStats {
  const A *a, *aR, *ln, *c;  // a_j, a_j R_j, log_neg_j, c_j
};

// The backward works on strips of the symmetric coefficient matrix G with rows and columns in key
// order: rows are the positions p0 + r (all valid: strips start at or after v0), columns the
// positions p0 .. p0 + W - 1 (row stride W). Per-position arrays are in key order, so one set of
// statistics serves both ends of a pair.
template <typename A> struct FeclRowsBwd : FeclKeyOrderView {
  A* G;   // rows x W similarities in, coefficients out
  A* Gt;  // rows x Nt teacher similarities in, coefficients out (threshold teacher)
  int64_t p0, W, N, Nt, K;
  const int32_t* y;   // label codes in key order
  const int32_t* yt;  // teacher label codes
  FeclKeyStats<A> key;
  A tau, inv_tau, gp, gn, thr;
  const A* grad_cross;  // in key order
};

template <typename A> struct FeclCpuKernels {
  // The column shift's maxima over a strip of similarities (rows x W, row stride W): m[r] =
  // max(m[r], row r's maximum except column r) for rows [r0, r1), and m[q] = max(m[q], column q's
  // maximum over all rows) for columns [q0, q1).
  void (*strip_row_max)(const A* L, int64_t W, int64_t r0, int64_t r1, A* m);
  void (*strip_col_max)(const A* L, int64_t rows, int64_t W, int64_t q0, int64_t q1, A* m);
  // heap: max(K, TK, 1) elements per thread.
  void (*forward_rows)(const FeclRowsFwd<A>&, A* heap, int64_t r0, int64_t r1);
  void (*grad_rows)(const FeclRowsBwd<A>&, int64_t r0, int64_t r1);  // rows of a strip of G
  void (*teacher_grad_rows)(const FeclRowsBwd<A>&, int64_t r0, int64_t r1);
  // The stored top-k pairs' work (backward): a dot product and out += g x, D elements.
  A (*dot)(const A* a, const A* b, int64_t D);
  void (*axpy)(A g, const A* x, A* out, int64_t D);
};

// ---- the table of one ISA level -----------------------------------------------------------------

struct CpuKernels {
  CpuIsa isa;
  const char* name;
  UnclCpuKernels<float> uncl_f32;
  UnclCpuKernels<double> uncl_f64;
  FeclCpuKernels<float> fecl_f32;
  FeclCpuKernels<double> fecl_f64;
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
