// Shared helpers for the math headers in csrc/math/: the one place the arithmetic of each
// flowkern op lives. Every function here is written for a generic value type T so that the
// same source compiles as scalar float/double device code under nvcc and as
// at::vec::Vectorized<float|double> SIMD code on the CPU (cpu/vec_math.h adds those
// overloads; include it before any op header in a CPU translation unit).
#pragma once

#include <cmath>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FLOWKERN_HD __host__ __device__ __forceinline__
#else
#define FLOWKERN_HD inline
#endif

namespace flowkern {
namespace math {

FLOWKERN_HD float fk_exp(float x) { return ::expf(x); }
FLOWKERN_HD double fk_exp(double x) { return ::exp(x); }
FLOWKERN_HD float fk_log(float x) { return ::logf(x); }
FLOWKERN_HD double fk_log(double x) { return ::log(x); }
FLOWKERN_HD float fk_tanh(float x) { return ::tanhf(x); }
FLOWKERN_HD double fk_tanh(double x) { return ::tanh(x); }

// 1 / (1 + e^-x): exp overflows to inf for very negative x, giving exactly 0, never NaN.
template <typename T>
FLOWKERN_HD T fk_sigmoid(const T& x) {
  return T(1) / (T(1) + fk_exp(-x));
}

}  // namespace math
}  // namespace flowkern
