// Shared helpers for the CPU (.cpp) and CUDA (.cu) kernels.
//
// Every per-element formula lives in a header as a DYCON_HD inline function, so the CPU build
// (compiled and tested everywhere) exercises the same math that the CUDA kernels run.
#pragma once

#include <cmath>
#include <cstdint>

// Always inlined: the CPU row loops vectorise only when every per-element call is inlined, and
// GCC's heuristics stop inlining the larger formulas (pos_term) into them.
#ifdef __CUDACC__
#define DYCON_HD __host__ __device__ __forceinline__
#elif defined(_MSC_VER)
#define DYCON_HD __forceinline
#else
#define DYCON_HD inline __attribute__((always_inline))
#endif

namespace dycon {

// Accumulation type: double inputs keep double (gradcheck), everything else accumulates in float.
template <typename T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename T> using acc_t = typename AccType<T>::type;

template <typename T> DYCON_HD T dmax(T a, T b) { return a > b ? a : b; }
template <typename T> DYCON_HD T dmin(T a, T b) { return a < b ? a : b; }

}  // namespace dycon
