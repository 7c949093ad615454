// at::vec::Vectorized overloads of the math helpers in math/common.h, so the op headers'
// templates compile to SIMD code (Sleef exp/log/tanh) on the CPU. Include before op headers:
// the templates look these names up at definition time.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>

namespace flowkern {
namespace math {

template <typename T>
inline at::vec::Vectorized<T> fk_exp(const at::vec::Vectorized<T>& x) { return x.exp(); }
template <typename T>
inline at::vec::Vectorized<T> fk_log(const at::vec::Vectorized<T>& x) { return x.log(); }
template <typename T>
inline at::vec::Vectorized<T> fk_tanh(const at::vec::Vectorized<T>& x) { return x.tanh(); }
template <typename T>
inline at::vec::Vectorized<T> fk_sqrt(const at::vec::Vectorized<T>& x) { return x.sqrt(); }
template <typename T>
inline at::vec::Vectorized<T> fk_abs(const at::vec::Vectorized<T>& x) { return x.abs(); }
template <typename T>
inline at::vec::Vectorized<T> fk_floor(const at::vec::Vectorized<T>& x) { return x.floor(); }
template <typename T>
inline at::vec::Vectorized<T> fk_max(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::maximum(a, b);
}
template <typename T>
inline at::vec::Vectorized<T> fk_min(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  return at::vec::minimum(a, b);
}
// mask ? a : b per lane, the mask a comparison's all-ones/all-zeros lanes.
template <typename T>
inline at::vec::Vectorized<T> fk_where(const at::vec::Vectorized<T>& mask, const at::vec::Vectorized<T>& a,
                                       const at::vec::Vectorized<T>& b) {
  return at::vec::Vectorized<T>::blendv(b, a, mask);
}
// log1p(x) = log(1 + x) x / ((1 + x) - 1) (Kahan's trick; x where 1 + x rounds to 1): accurate to
// a few ulps, and several times cheaper than Sleef's log1p, which in the spline cost as much as
// all its exps together.
template <typename T>
inline at::vec::Vectorized<T> fk_log1p(const at::vec::Vectorized<T>& x) {
  using Vec = at::vec::Vectorized<T>;
  const Vec w = Vec(T(1)) + x;
  const Vec d = w - Vec(T(1));
  return Vec::blendv(w.log() * (x / d), x, d == Vec(T(0)));
}

// float tanh without Sleef's tanh, which costs about four exps here: (1 - e) / (1 + e) with
// e = exp(-2|u|) (never overflows; exactly +-1 for large |u|), and for |u| < 1/4, where 1 - e
// cancels, the odd Taylor series through u^9 (relative error below 1e-8 there).
template <>
inline at::vec::Vectorized<float> fk_tanh(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  const Vec a = x.abs();
  const Vec e = (a * Vec(-2.0f)).exp();
  const Vec big = (Vec(1.0f) - e) / (Vec(1.0f) + e);
  const Vec u2 = x * x;
  Vec poly = at::vec::fmadd(u2, Vec(0.021869488536155203f), Vec(-0.05396825396825397f));
  poly = at::vec::fmadd(u2, poly, Vec(0.13333333333333333f));
  poly = at::vec::fmadd(u2, poly, Vec(-0.3333333333333333f));
  poly = at::vec::fmadd(u2, poly, Vec(1.0f)) * a;
  return Vec::blendv(big, poly, a < Vec(0.25f)).copysign(x);
}

// Sum of a vector's lanes, in lane order (deterministic).
template <typename T>
inline T hsum(const at::vec::Vectorized<T>& v) {
  alignas(64) T buf[at::vec::Vectorized<T>::size()];
  v.store(buf);
  T total = 0;
  for (int i = 0; i < at::vec::Vectorized<T>::size(); ++i) total += buf[i];
  return total;
}

// Rows per at::parallel_for chunk for rows of n elements: about `elements` elements of work
// per chunk, so small batches stay on one thread.
inline int64_t row_grain(int64_t n, int64_t elements) {
  return std::max<int64_t>(1, elements / std::max<int64_t>(n, 1));
}

}  // namespace math
}  // namespace flowkern

#include "../math/common.h"
