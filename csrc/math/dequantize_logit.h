// Fused dequantization + logit of 8-bit pixels, per element: the single source of its
// arithmetic for the CPU and CUDA kernels (the Triton kernel and flowkern/reference/dequantize.py
// restate it, and the tests hold all three to each other).
//
// x in {0, ..., 255}, u in [0, 1) (given, or the counter noise below), a = alpha, c = 1 - 2a:
//   s  = min(x + u, largest value below x + 1)   x + u rounds up to x + 1 when u is within half
//                                                an ulp of 1; the clamp keeps every pixel in its cell
//   v  = s / 256                                 exact (a power of two)
//   v' = a + c v,   1 - v' = a + c (1 - v)       the second NOT as 1 - v': it keeps its relative
//                                                precision for v near 1 (the reference's order)
//   y  = log v' - log(1 - v')
//   row log-det = -D log 256 + D log c - sum(log v' + log(1 - v'))
// Backward, to the given noise only (x is integer), with g = dL/dy and gld = dL/d(logdet):
//   dy/du = (c / 256)(1/v' + 1/(1 - v')),  dlogdet/du = -(c / 256)(1/v' - 1/(1 - v'))
//   grad_u = (c / 256) ((g - gld)(1 - v') + (g + gld) v') / (v' (1 - v'))   (one division)
// Inverse (sampling), per element of y:
//   e = exp(-|y|), sigmoid(y) = (y >= 0 ? 1 : e) / (1 + e), v = (sigmoid(y) - a) / c,
//   pixel = clamp(floor(256 v), 0, 255)   (NaN stays NaN)
//   log v' + log(1 - v') = logsigmoid(y) + logsigmoid(-y) = -|y| - 2 log1p(e)
//   row log-det = D log 256 - D log c + sum(-|y| - 2 log1p(e))   (the forward's, negated)
//
// Counter-based noise: u of flat element i (row-major over x) for a 64-bit seed s is a function
// of (s, i) alone, so any thread computes any element's noise and every backend (C++, CUDA,
// Triton, the PyTorch reference) draws bit-identical u. It is SplitMix64's output at step i + 1:
//   z = s + (i + 1) * 0x9E3779B97F4A7C15 (mod 2^64), then the SplitMix64 finalizer,
//   u = (z >> 40) 2^-24 (float32 arithmetic) or (z >> 11) 2^-53 (float64): k 2^-p, exactly
//   representable, in [0, 1 - 2^-p].
#pragma once

#include "common.h"

#include <cstdint>

namespace flowkern {
namespace math {

constexpr double kPixelLevels = 256.0;
constexpr double kLogPixelLevels = 5.5451774444795623;  // log(256)

FLOWKERN_HD uint64_t counter_hash(uint64_t seed, uint64_t index) {
  uint64_t z = seed + (index + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// The counter noise of element `index`, with as many random bits as T's mantissa holds.
template <typename T>
FLOWKERN_HD T counter_uniform(uint64_t seed, uint64_t index);
template <>
FLOWKERN_HD float counter_uniform<float>(uint64_t seed, uint64_t index) {
  // Through int32: below 2^24, so exact, and the cheapest integer -> float conversion to vectorize.
  return static_cast<float>(static_cast<int32_t>(counter_hash(seed, index) >> 40)) * 0x1p-24f;
}
template <>
FLOWKERN_HD double counter_uniform<double>(uint64_t seed, uint64_t index) {
  return static_cast<double>(static_cast<int64_t>(counter_hash(seed, index) >> 11)) * 0x1p-53;
}

// Scalar helpers of this op (the shared ones are math/common.h's); cpu/likelihood.cpp declares
// their at::vec::Vectorized overloads before including this header.
FLOWKERN_HD float dq_log(float a) { return fk_log(a); }
FLOWKERN_HD double dq_log(double a) { return fk_log(a); }
// The largest value below `top`, for top >= 1 (a positive normal number).
FLOWKERN_HD float dq_below(float top) { return ::nextafterf(top, 0.0f); }
FLOWKERN_HD double dq_below(double top) { return ::nextafter(top, 0.0); }
// clamp(p, 0, 255) written with comparisons that are false for NaN, so NaN passes through
// (fminf/fmaxf would turn it into a pixel value).
FLOWKERN_HD float dq_clamp_pixel(float p) { return p < 0.0f ? 0.0f : (p > 255.0f ? 255.0f : p); }
FLOWKERN_HD double dq_clamp_pixel(double p) { return p < 0.0 ? 0.0 : (p > 255.0 ? 255.0 : p); }

// v = (x + u) / 256 with the clamp, from the pixel value as T.
template <typename T>
FLOWKERN_HD T dequantized(const T& pixel, const T& u) {
  return fk_min(pixel + u, dq_below(pixel + T(1))) * T(1.0 / kPixelLevels);
}

// v' and 1 - v' of one element (both kept to full relative precision; see the top).
// scale = 1 - 2 alpha, rounded to T once on the host (as the reference's Python float is).
template <typename T>
FLOWKERN_HD void dequantize_logit_odds(const T& pixel, const T& u, const T& alpha, const T& scale, T& lo, T& hi) {
  const T v = dequantized(pixel, u);
  lo = alpha + scale * v;
  hi = alpha + scale * (T(1) - v);
}

// One element of the forward: y, and log v', log(1 - v') for the row's log-det (the CUDA form).
template <typename T>
FLOWKERN_HD void dequantize_logit_forward(const T& pixel, const T& u, const T& alpha, const T& scale, T& y,
                                          T& log_lo, T& log_hi) {
  T lo, hi;
  dequantize_logit_odds(pixel, u, alpha, scale, lo, hi);
  log_lo = dq_log(lo);
  log_hi = dq_log(hi);
  y = log_lo - log_hi;
}

// y as one log of the odds v' / (1 - v'): the same number to within a rounding of the ratio.
// The CPU kernel's form, where each log costs: its row log-det then sums log(v' (1 - v')) through
// products (one log per group of elements; cpu/likelihood.cpp), so an element takes one log, not two.
template <typename T>
FLOWKERN_HD T dequantize_logit_from_odds(const T& lo, const T& hi) {
  return dq_log(lo / hi);
}

// dL/du of one element, recomputed from x and u.
template <typename T>
FLOWKERN_HD T dequantize_logit_backward(const T& pixel, const T& u, const T& alpha, const T& scale, const T& g,
                                        const T& gld) {
  T lo, hi;
  dequantize_logit_odds(pixel, u, alpha, scale, lo, hi);
  return (scale * T(1.0 / kPixelLevels)) * ((g - gld) * hi + (g + gld) * lo) / (lo * hi);
}

// One element of the inverse: the pixel value (in T) and -|y| - 2 log1p(e) for the row's log-det.
template <typename T>
FLOWKERN_HD void dequantize_logit_inverse(const T& y, const T& alpha, const T& scale, T& pixel, T& ld_term) {
  const T a = fk_abs(y);
  const T e = fk_exp(-a);  // never overflows; 0 far in the tails
  const T sig = fk_where(y >= T(0), T(1), e) / (T(1) + e);
  pixel = dq_clamp_pixel(fk_floor((sig - alpha) / scale * T(kPixelLevels)));
  ld_term = -a - T(2) * fk_log1p(e);
}

}  // namespace math
}  // namespace flowkern

// ---- host side: the argument checks the CPU and CUDA launchers share ------------------------
// (Python validates with friendly messages first; these guard the kernels against direct
// torch.ops calls.)
#include "../ops.h"

#include <optional>

namespace flowkern {

// The dtype the kernels compute in for output dtype t: float32 for the half types (the log-det's
// dtype too).
inline at::ScalarType dequantize_compute_dtype(at::ScalarType t) { return logdet_dtype(t); }

inline void check_dequantize_pixels(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kByte, "flowkern: dequantize_logit takes uint8 pixels, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "flowkern: dequantize_logit needs a batch dimension");
  TORCH_CHECK(x.is_contiguous(), "flowkern: dequantize_logit kernels take contiguous pixels");
}

// A float tensor of `like`'s shape and device, contiguous, of one of the dtypes `a` or `b`.
inline void check_dequantize_like(const char* name, const at::Tensor& t, const at::Tensor& like, at::ScalarType a,
                                  at::ScalarType b) {
  TORCH_CHECK(t.sizes() == like.sizes(), "flowkern: dequantize_logit ", name, " must have shape ", like.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == a || t.scalar_type() == b, "flowkern: dequantize_logit ", name, " must be ", a,
              (a == b ? "" : " or "), (a == b ? "" : c10::toString(b)), ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "flowkern: dequantize_logit ", name, " is on another device");
  TORCH_CHECK(t.is_contiguous(), "flowkern: dequantize_logit kernels take a contiguous ", name);
}

inline void check_dequantize_alpha(double alpha) {
  TORCH_CHECK(alpha >= 0.0 && alpha < 0.5, "flowkern: dequantize_logit alpha must lie in [0, 0.5), got ", alpha);
}

}  // namespace flowkern
