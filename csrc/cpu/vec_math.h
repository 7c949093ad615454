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
// The product materialized before any add sees it: GCC contracts a * b + c into an fma under
// -mfma (-ffp-contract=fast is its default, even with -std=c++20). An empty asm that claims to
// change the register hides the product (no instruction, no spill).
#if defined(CPU_CAPABILITY_AVX512)
inline __m512 fk_opaque(__m512 r) { __asm__("" : "+v"(r)); return r; }
inline __m512d fk_opaque(__m512d r) { __asm__("" : "+v"(r)); return r; }
#elif defined(CPU_CAPABILITY_AVX2)
inline __m256 fk_opaque(__m256 r) { __asm__("" : "+x"(r)); return r; }
inline __m256d fk_opaque(__m256d r) { __asm__("" : "+x"(r)); return r; }
#endif
template <typename T>
inline at::vec::Vectorized<T> fk_mul_rn(const at::vec::Vectorized<T>& a, const at::vec::Vectorized<T>& b) {
  at::vec::Vectorized<T> p = a * b;
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  return at::vec::Vectorized<T>(fk_opaque(p));
#else
  __asm__("" : "+m"(p));
  return p;
#endif
}

// float exp and log inline on AVX2: Sleef's expf_u10 and logf_u10 (what Vectorized<float>::exp()
// and log() call there) operation for operation, so the same bits (every float checked:
// tests/test_vec_math.py), without the call: around an out-of-line call the compiler spills
// every live vector register, and the spline makes 18 exps and 3 logs per element. (AVX-512
// keeps Sleef's calls: 16 lanes amortize them, and its logf uses getexp/getmant/fixupimm.)
#if defined(CPU_CAPABILITY_AVX2)
namespace avx2 {
inline __m256 set(float v) { return _mm256_set1_ps(v); }
inline __m256 add(__m256 a, __m256 b) { return _mm256_add_ps(a, b); }
inline __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m256 fma(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
// a * b rounded on its own (GCC would contract it with a following add into an fma, which
// Sleef, compiled with -ffp-contract=off, does not): an empty asm hides the product.
inline __m256 mul_rn(__m256 a, __m256 b) { return fk_opaque(_mm256_mul_ps(a, b)); }
inline __m256 pow2i(__m256i q) {  // 2^q for q in the normal exponent range
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(q, _mm256_set1_epi32(0x7f)), 23));
}
}  // namespace avx2

// q = rint(x / ln 2); s = x - q ln 2 in two fmas (ln 2 split in two); exp(s) by Sleef's
// polynomial; times 2^q as two powers of two (exact into the subnormals); 0 below -104, inf
// above 100.
template <>
inline at::vec::Vectorized<float> fk_exp(const at::vec::Vectorized<float>& xv) {
  using namespace avx2;
  const __m256 x = xv;
  const __m256i q = _mm256_cvtps_epi32(mul(x, set(1.442695040888963407359924681001892137426645954152985934135449406931f)));
  const __m256 qf = _mm256_cvtepi32_ps(q);
  __m256 s = fma(qf, set(-0.693145751953125f), x);
  s = fma(qf, set(-1.428606765330187045e-06f), s);
  __m256 u = set(0.000198527617612853646278381f);
  u = fma(u, s, set(0.00139304355252534151077271f));
  u = fma(u, s, set(0.00833336077630519866943359f));
  u = fma(u, s, set(0.0416664853692054748535156f));
  u = fma(u, s, set(0.166666671633720397949219f));
  u = fma(u, s, set(0.5f));
  u = add(set(1.0f), fma(mul(s, s), u, s));
  const __m256i h = _mm256_srai_epi32(q, 1);
  u = mul(mul(u, pow2i(h)), pow2i(_mm256_sub_epi32(q, h)));
  u = _mm256_andnot_ps(_mm256_cmp_ps(x, set(-104.0f), _CMP_LT_OQ), u);
  return _mm256_blendv_ps(u, set(INFINITY), _mm256_cmp_ps(set(100.0f), x, _CMP_LT_OQ));
}

// d = 2^e m with m in [0.75, 1.5) (subnormals scaled by 2^64 first); log d = e ln 2 +
// 2 atanh((m - 1) / (m + 1)), in double-float (hi + lo) arithmetic: e ln 2 with ln 2 in two
// parts, the quotient by a compensated division, the series' tail in plain float.
template <>
inline at::vec::Vectorized<float> fk_log(const at::vec::Vectorized<float>& dv) {
  using namespace avx2;
  __m256 d = dv;
  const __m256 tiny = _mm256_cmp_ps(d, set(1.17549435e-38f), _CMP_LT_OQ);
  d = _mm256_blendv_ps(d, mul(d, set(18446744073709551616.0f)), tiny);
  __m256i e = _mm256_castps_si256(mul(d, set(1.0f / 0.75f)));
  e = _mm256_sub_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 23), _mm256_set1_epi32(0xff)), _mm256_set1_epi32(0x7f));
  const __m256 m = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(d), _mm256_slli_epi32(_mm256_sub_epi32(_mm256_setzero_si256(), e), 23)));
  e = _mm256_blendv_epi8(e, _mm256_sub_epi32(e, _mm256_set1_epi32(64)), _mm256_castps_si256(tiny));
  const __m256 ef = _mm256_cvtepi32_ps(e);
  // s = (ln2_hi, ln2_lo) * e
  const __m256 l2h = set(0.69314718246459960938f), l2l = set(-1.904654323148236017e-09f);
  __m256 sx = mul_rn(l2h, ef);
  __m256 sy = fma(l2l, ef, _mm256_fmsub_ps(l2h, ef, sx));
  // n = m - 1 and den = m + 1 exactly as pairs, x = n / den
  const __m256 nx = add(set(-1.0f), m), nv = sub(nx, set(-1.0f));
  const __m256 ny = add(sub(set(-1.0f), sub(nx, nv)), sub(m, nv));
  const __m256 dx = add(set(1.0f), m), dvv = sub(dx, set(1.0f));
  const __m256 dy = add(sub(set(1.0f), sub(dx, dvv)), sub(m, dvv));
  const __m256 t0 = _mm256_div_ps(set(1.0f), dx);
  const __m256 xx = mul(nx, t0);
  const __m256 uu = _mm256_fmsub_ps(t0, nx, xx);
  const __m256 vv = _mm256_fnmadd_ps(dy, t0, _mm256_fnmadd_ps(dx, t0, set(1.0f)));
  const __m256 xy = fma(xx, vv, fma(ny, t0, uu));
  const __m256 x2 = mul(xx, xx);
  __m256 t = set(+0.3027294874e+0f);
  t = fma(t, x2, set(+0.3996108174e+0f));
  t = fma(t, x2, set(+0.6666694880e+0f));
  // s += 2 x (pair), then s += x^3 t
  const __m256 x2x = mul(xx, set(2.0f)), x2y = mul(xy, set(2.0f));
  __m256 s1 = add(sx, x2x);
  sy = add(add(add(sub(sx, s1), x2x), sy), x2y);
  sx = s1;
  const __m256 tail = mul_rn(mul(x2, xx), t);
  s1 = add(sx, tail);
  sy = add(add(sub(sx, s1), tail), sy);
  __m256 r = add(s1, sy);
  r = _mm256_blendv_ps(r, set(INFINITY), _mm256_cmp_ps(d, set(INFINITY), _CMP_EQ_OQ));
  const __m256 bad = _mm256_or_ps(_mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_LT_OQ), _mm256_cmp_ps(d, d, _CMP_NEQ_UQ));
  r = _mm256_blendv_ps(r, set(NAN), bad);
  return _mm256_blendv_ps(r, set(-INFINITY), _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ));
}
#endif

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
