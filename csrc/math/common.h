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
FLOWKERN_HD float fk_log1p(float x) { return ::log1pf(x); }
FLOWKERN_HD double fk_log1p(double x) { return ::log1p(x); }
FLOWKERN_HD float fk_sqrt(float x) { return ::sqrtf(x); }
FLOWKERN_HD double fk_sqrt(double x) { return ::sqrt(x); }
FLOWKERN_HD float fk_abs(float x) { return ::fabsf(x); }
FLOWKERN_HD double fk_abs(double x) { return ::fabs(x); }
FLOWKERN_HD float fk_floor(float x) { return ::floorf(x); }
FLOWKERN_HD double fk_floor(double x) { return ::floor(x); }
FLOWKERN_HD float fk_max(float a, float b) { return ::fmaxf(a, b); }
FLOWKERN_HD double fk_max(double a, double b) { return ::fmax(a, b); }
FLOWKERN_HD float fk_min(float a, float b) { return ::fminf(a, b); }
FLOWKERN_HD double fk_min(double a, double b) { return ::fmin(a, b); }
// c ? a : b, elementwise for vectors (a mask then).
FLOWKERN_HD float fk_where(bool c, float a, float b) { return c ? a : b; }
FLOWKERN_HD double fk_where(bool c, double a, double b) { return c ? a : b; }

// 1 / (1 + e^-x): exp overflows to inf for very negative x, giving exactly 0, never NaN.
template <typename T>
FLOWKERN_HD T fk_sigmoid(const T& x) {
  return T(1) / (T(1) + fk_exp(-x));
}

// zuko's soft clamp of u into (-|c|, |c|), u / (1 + |u / c|), and its derivative in u.
template <typename T>
FLOWKERN_HD T fk_soft_clamp(const T& u, const T& c) {
  return u / (T(1) + fk_abs(u / c));
}
template <typename T>
FLOWKERN_HD T fk_soft_clamp_grad(const T& u, const T& c) {
  const T den = T(1) + fk_abs(u / c);
  return T(1) / (den * den);
}

// softplus(u) = log(1 + e^u) as torch computes it (u itself above its threshold of 20, so that
// float64 results match torch's to the last bit), and its derivative sigmoid(u) (1 above the
// threshold), given z = e^u (inf above the threshold only in lanes the selects drop).
constexpr double kSoftplusThreshold = 20.0;
template <typename T>
FLOWKERN_HD T fk_softplus_of(const T& u, const T& z) {
  return fk_where(u > T(kSoftplusThreshold), u, fk_log1p(z));
}
template <typename T>
FLOWKERN_HD T fk_softplus_grad_of(const T& u, const T& z) {
  return fk_where(u > T(kSoftplusThreshold), T(1), z / (z + T(1)));
}

}  // namespace math
}  // namespace flowkern
