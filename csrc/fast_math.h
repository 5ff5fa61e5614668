// vexp / vlog / vlog1p / vrcp: exp, log, log1p and 1/x for the per-element math, vectorisable
// on the CPU.
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
DYCON_HD float vexp_nonpos(float x) { return expf(x); }
DYCON_HD float vlog(float x) { return logf(x); }
DYCON_HD float vpow(float x, float g) { return powf(x, g); }
#else

DYCON_HD float bits_to_float(int32_t i) { return __builtin_bit_cast(float, i); }
DYCON_HD int32_t float_to_bits(float f) { return __builtin_bit_cast(int32_t, f); }

// exp(x) for x in [-87, 88]: x = n ln2 + r, n rounded to nearest with the 1.5 * 2^23 trick
// (floor() would not vectorise), then a polynomial in r times 2^n.
DYCON_HD float exp_in_range(float x) {
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

// exp(x); 0 below -87 (exp(-87) ~ 1.6e-38: the true value is a denormal or 0, e.g. exp(-inf)),
// exp(88) ~ 1.7e38 above 88 (no inf).
DYCON_HD float vexp(float x) {
  const bool underflow = x < -87.0f;
  const float e = exp_in_range(underflow ? -87.0f : (x > 88.0f ? 88.0f : x));
  return underflow ? 0.0f : e;
}

// vexp for x <= 0 (softmax terms x - max, UnCL's weights): one clamp fewer per element.
DYCON_HD float vexp_nonpos(float x) {
  const bool underflow = x < -87.0f;
  const float e = exp_in_range(underflow ? -87.0f : x);
  return underflow ? 0.0f : e;
}

// Natural log of a positive, normal, finite x.
DYCON_HD float vlog(float x) {
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

// x^g for x >= 0 as exp(g log x) (0 for x = 0, g > 0), branch-free: a focal weight with a
// non-integer exponent keeps its row loop vectorised (integer exponents never get here).
DYCON_HD float vpow(float x, float g) { return x > 0.0f ? vexp(g * vlog(x)) : 0.0f; }

#endif

DYCON_HD double vexp(double x) { return exp(x); }
DYCON_HD double vexp_nonpos(double x) { return exp(x); }
DYCON_HD double vlog(double x) { return log(x); }
DYCON_HD double vpow(double x, double g) { return pow(x, g); }

// 1 / x: one reciprocal where a formula would otherwise divide several times. On the GPU in
// float32 the fast division (2 ulp for the x in [1, 2] it gets here); exact elsewhere.
#ifdef __CUDA_ARCH__
DYCON_HD float vrcp(float x) { return __fdividef(1.0f, x); }
#else
DYCON_HD float vrcp(float x) { return 1.0f / x; }
#endif
DYCON_HD double vrcp(double x) { return 1.0 / x; }

// log1p(a) for a in [0, 1], given u = 1 + a rounded and its reciprocal inv_u: log(u) corrected
// by (a - (u - 1)) / u, the part of a lost in rounding u (exact to first order, so a tiny a keeps
// its relative accuracy: u = 1 gives log 0 + a). double: log1p itself.
DYCON_HD float vlog1p(float a, float u, float inv_u) { return vlog(u) + (a - (u - 1.0f)) * inv_u; }
DYCON_HD double vlog1p(double a, double, double) { return log1p(a); }

}  // namespace dycon
