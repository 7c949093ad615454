// Negative log-likelihood of a flow's latent under the standard normal base, per row: the
// single source of its arithmetic for the CPU and CUDA kernels (the Triton kernel and
// flowkern/reference/gaussian_nll.py restate it).
//
//   nll = 0.5 sum z^2 + (D / 2) log(2 pi) - logdet          D = elements per row
//   bits per dim: nll / (D ln 2)
// Backward, with g the row's dL/d(nll) and k = 1 (or 1 / (D ln 2) for bits):
//   dL/dz = g k z,   dL/d(logdet) = -g k   (the latter is plain torch in flowkern/ops)
// The sum of squares is accumulated in float32 (float64 for float64 z) whatever z's dtype.
#pragma once

#include "common.h"

#include <cstdint>

namespace flowkern {
namespace math {

constexpr double kHalfLog2Pi = 0.91893853320467274;  // log(2 pi) / 2
constexpr double kLn2 = 0.69314718055994531;

// The row's nll from its sum of squares; `logdet` is 0 when the caller has none. The constants
// are formed in double and rounded to T once.
template <typename T>
FLOWKERN_HD T gaussian_nll_from_sumsq(T sumsq, T logdet, int64_t n, bool bits) {
  const T nll = T(0.5) * sumsq + T(kHalfLog2Pi * static_cast<double>(n)) - logdet;
  return bits ? nll / T(kLn2 * static_cast<double>(n)) : nll;
}

// k g: the factor of z in the row's gradient.
template <typename T>
FLOWKERN_HD T gaussian_nll_grad_factor(T g, int64_t n, bool bits) {
  return bits ? g / T(kLn2 * static_cast<double>(n)) : g;
}

}  // namespace math
}  // namespace flowkern

// ---- host side: the argument checks the CPU and CUDA launchers share ------------------------
#include "../ops.h"

#include <optional>

namespace flowkern {

inline void check_gaussian_nll_z(const at::Tensor& z) {
  TORCH_CHECK(z.dim() >= 1, "flowkern: gaussian_nll needs a batch dimension");
  TORCH_CHECK(at::isFloatingType(z.scalar_type()), "flowkern: gaussian_nll takes floating z, got ", z.scalar_type());
  TORCH_CHECK(z.is_contiguous(), "flowkern: gaussian_nll kernels take a contiguous z");
}

}  // namespace flowkern
