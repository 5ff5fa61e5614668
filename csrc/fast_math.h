// vexp / vlog: exp and log for the per-element math, vectorisable on the CPU.
//
// On the GPU they are the hardware expf/logf. On the CPU glibc's expf/logf are scalar calls
// unless a file is built with -ffast-math, which the FeCL kernels cannot use (they rely on
// -inf); so the host versions are the classic Cephes polynomials (as in sse_mathfun): ~1e-7
// relative error, branch-free, so a `#pragma omp simd` loop vectorises (with
// -fno-trapping-math, set in setup.py). double keeps exp/log (gradcheck precision).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace dycon {

#ifdef __CUDA_ARCH__
DYCON_HD float vexp(float x) { return expf(x); }
DYCON_HD float vlog(float x) { return logf(x); }
#else

inline float bits_to_float(int32_t i) { return __builtin_bit_cast(float, i); }
inline int32_t float_to_bits(float f) { return __builtin_bit_cast(int32_t, f); }

inline float vexp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);  // exp(-87) ~ 1.6e-38: underflow to ~0
  // x = n ln2 + r, n rounded to nearest with the 1.5 * 2^23 trick (floor() would not vectorise).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 split in two for accuracy
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return p * bits_to_float((static_cast<int32_t>(n) + 127) << 23);  // times 2^n
}

// Natural log of a positive, normal, finite x.
inline float vlog(float x) {
  const int32_t bits = float_to_bits(x);
  float e = static_cast<float>((bits >> 23) - 126);
  float m = bits_to_float((bits & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const bool low = m < 0.707106781186547524f;                 // keep m - 1 in [-0.29, 0.41]
  e = low ? e - 1.0f : e;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z - 2.12194440e-4f * e - 0.5f * z;
  return m + y + 0.693359375f * e;
}

#endif

DYCON_HD double vexp(double x) { return exp(x); }
DYCON_HD double vlog(double x) { return log(x); }

}  // namespace dycon
