// Rational-quadratic spline (Neural Spline Flows), per element: the single source of its
// arithmetic for the CPU and CUDA kernels. flowkern/reference/rq_spline.py is the definition
// (nflows' unconstrained spline, linear tails, minimal bin width / height / derivative 1e-3)
// and states the forward and inverse formulas; this file adds the backward.
//
// Each element has its own spline on an interval [lo, hi] (RqInterval; [-B, B] for a bound B):
// params [uw (K) | uh (K) | ud (K - 1)], or [uw (K) | uh (K) | ud (K + 1)] with learned end
// derivatives (RqStyle::learned_ends, nflows' tails=None), read through an accessor u(i) (a SIMD lane's column of a transposed block on the CPU, the element's row of
// global memory on CUDA). The bin is found by comparisons and selects over all knots, never by
// a data-dependent branch or index, so a SIMD lane is just one more element.
//
// Backward. In a bin, with theta = (x - x_k) / W, delta = H / W, om = 1 - theta, t = theta om,
//   D = delta (theta^2 + om^2) + (d_k + d_k1) t          (= the reference's den, as a sum of
//   q = d_k1 theta^2 + 2 delta t + d_k om^2                 positive terms)
//   y = y_k + H R,   R = (delta theta^2 + d_k t) / D
//   L = log F_x = log(delta^2 q / D^2)
// the partials of (y, L) in theta, delta, d_k, d_k1 are
//   R_theta = delta q / D^2          R_delta = t (d_k1 theta^2 - d_k om^2) / D^2
//   R_dk = t om (delta om + d_k1 theta) / D^2        R_dk1 = -t theta (delta theta + d_k om) / D^2
//   L_theta = q_theta / q - 2 (d_k + d_k1 - 2 delta)(om - theta) / D,
//             q_theta = 2 (d_k1 theta - d_k om + delta (om - theta))
//   L_delta = 2 / delta + 2 t / q - 2 (theta^2 + om^2) / D = 2 t ((d_k + d_k1) / (delta D) + 1 / q)
//   L_dk = om^2 / q - 2 t / D        L_dk1 = theta^2 / q - 2 t / D
// and for cotangents (gy, gl) of (y, L), with gx = gy F_x + gl L_theta / W (the x gradient)
// and Q = gy delta R_delta + gl L_delta / W (the H gradient at fixed delta, over W):
//   knot x_k: delta Q - om gx     knot x_k1: -(theta gx + delta Q)
//   knot y_k: gy (1 - R) - Q      knot y_k1: gy R + Q
//   d_k: gy H R_dk + gl L_dk      d_k1: gy H R_dk1 + gl L_dk1
// Knots to raw sizes: x_j = lo + (hi - lo) sum_{i<j} w_i, so w_i collects (hi - lo) times the
// gradients of the knots above it (x_0 = lo and x_K = hi are constants: theirs is dropped);
// w = m + (1 - K m) softmax(uw) gives g_uw = (1 - K m) s (g_w - <g_w, s>) (regrouped in
// rq_size_grads so that a peaked softmax loses no digits); d = m_d + softplus(ud) gives
// g_ud = g_d sigmoid(ud) (1 above the softplus threshold, as torch).
// Forward op: grad_x = gx with (gy, gl) = (g, gld). Inverse op (x = F^-1(y), ld = -L): by the
// implicit function theorem grad_y = G = (g - gld L_x) / F_x and the parameter gradient is the
// forward's with (gy, gl) = (-G, -gld). Outside [lo, hi]: identity, grad_x = g, no param gradient.
//
// Inverse: the reference's root formula, with its discriminant b^2 - 4ac rewritten as the sum
// of squares (rho d_k1 - (1 - rho) d_k)^2 + 4 delta^2 rho (1 - rho): the same number, without
// the cancellation that costs float32 digits on steep bins.
// At theta = 1 the output is the upper knot itself, so lo and hi map exactly onto lo and hi.
#pragma once

#include "common.h"
#include "rq_style.h"

#include <type_traits>
#include <utility>

namespace flowkern {
namespace math {

constexpr int kRqMaxBins = 64;
constexpr int kRqMaxParams = 3 * kRqMaxBins + 1;

// The spline's interval [lo, hi], in the kernels' type (a SIMD vector on the CPU).
template <typename T>
struct RqInterval {
  T lo, hi;
};

// The raw param i as the knots see it: soft-clamped when the style asks (sizes into
// (l/2, -l/2), derivatives into (l, -l): fk_soft_clamp; u / (l/2) = 2u / l exactly, as the
// reference's torch ops round it).
template <typename T>
FLOWKERN_HD T rq_clamp_bound(int i, int bins, const RqStyle& st) {
  return i < 2 * bins ? T(st.log_slope * 0.5) : T(st.log_slope);
}
template <bool CLAMP, typename T>
FLOWKERN_HD T rq_raw(const T& u, int i, int bins, const RqStyle& st) {
  if constexpr (!CLAMP) {
    return u;
  } else {
    return fk_soft_clamp(u, rq_clamp_bound<T>(i, bins, st));
  }
}

// d rq_raw / du (with the clamp).
template <typename T>
FLOWKERN_HD T rq_raw_grad(const T& u, int i, int bins, const RqStyle& st) {
  return fk_soft_clamp_grad(u, rq_clamp_bound<T>(i, bins, st));
}

// a * b rounded on its own: never fused into an fma with a following add (the knots must
// round as the reference's separate torch ops do, or an input exactly on a knot could land
// in the other bin).
FLOWKERN_HD float fk_mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
FLOWKERN_HD double fk_mul_rn(double a, double b) {
#ifdef __CUDA_ARCH__
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

// Sum of n values in order (the CPU overload follows torch's reduction order instead).
template <typename T>
FLOWKERN_HD T rq_row_sum(const T* e, int n) {
  T sum = e[0];
  for (int i = 1; i < n; ++i) sum = sum + e[i];
  return sum;
}

// Whether the knots' running sum is kept exact and rounded once per knot, as torch's float32
// cumsum does (it accumulates in double): for float; float64 sums in double, in order.
// (Declared only: asked through decltype.)
std::true_type rq_exact_cumsum(float);
std::false_type rq_exact_cumsum(double);

// The element's bin on both axes and the derivatives at its knots.
template <typename T>
struct RqBin {
  T k;                       // bin index: interior knots <= the input on the searched axis
  T x_lo, x_hi, y_lo, y_hi;  // the bin's knots
  T d_lo, d_hi;              // derivatives at them (1 at lo and hi unless learned)
  T sig_lo, sig_hi;          // d d / d ud at them (backward only)
};

// softmax of the K raw sizes u(offset + i) into s (max-shifted: never overflows).
template <typename T, typename U>
FLOWKERN_HD void rq_softmax(const U& u, int offset, int bins, T* s) {
  T mx = u(offset);
  for (int i = 1; i < bins; ++i) mx = fk_max(mx, u(offset + i));
  for (int i = 0; i < bins; ++i) s[i] = fk_exp(u(offset + i) - mx);
  const T inv = T(1) / rq_row_sum(s, bins);  // torch's softmax: times the reciprocal
  for (int i = 0; i < bins; ++i) s[i] = s[i] * inv;
}

// Interior knot j = 1..K-1 of a table, walked in order: size = min + (1 - K min) s_{j-1},
// cum = size_0 + ... + size_{j-1}, knot = (hi - lo) cum + lo, each step rounded as the
// reference's torch ops round it (so on the CPU the knots are the reference's to the bit, and
// an input on a knot takes the reference's bin). The end knots are lo and hi exactly.
// SEARCH: the bin of v (k = #knots <= v) and its knots. Otherwise: the knots of bin k.
template <bool SEARCH, typename T>
FLOWKERN_HD void rq_table(const T* s, int bins, const RqInterval<T>& iv, double min_size, const T& v, T& k, T& lo,
                          T& hi) {
  const T m(min_size), scale(1.0 - min_size * bins), width = iv.hi - iv.lo;
  constexpr bool kExact = decltype(rq_exact_cumsum(std::declval<T>()))::value;
  T cum(0), err(0);  // kExact: cum + err is the exact sum (sizes >= 1e-3 and <= 64 of them:
                     // it needs 34 bits, and err, a sum of multiples of 2^-33 below 2^-18, 16)
  if constexpr (SEARCH) k = T(0);
  lo = iv.lo;
  hi = iv.hi;
  for (int j = 1; j < bins; ++j) {
    const T size = m + fk_mul_rn(scale, s[j - 1]);
    T cum_j;
    if constexpr (kExact) {  // Knuth's two-sum: new cum + its rounding error = old cum + size
      const T next = cum + size, part = next - cum;
      err = err + ((cum - (next - part)) + (size - part));
      cum = next;
      cum_j = cum + err;  // the exact prefix sum rounded once, as torch's double accumulator
    } else {
      cum = cum + size;
      cum_j = cum;
    }
    const T knot = fk_mul_rn(width, cum_j) + iv.lo;
    if constexpr (SEARCH) {
      const auto ge = v >= knot;  // knots increase: true for j <= k, false after
      lo = fk_where(ge, knot, lo);
      hi = fk_where(ge, hi, fk_min(hi, knot));
      k = k + fk_where(ge, T(1), T(0));
    } else {
      lo = fk_where(k == T(j), knot, lo);
      hi = fk_where(k == T(j - 1), knot, hi);
    }
  }
}

// min_derivative + softplus(ud) (torch's threshold), or + exp(ud), and, for the backward, its
// derivative in ud.
template <bool GRAD, typename T>
FLOWKERN_HD void rq_derivative(const T& ud, const RqStyle& st, T& d, T& sig) {
  const T z = fk_exp(ud);  // softplus: inf above the threshold, only in lanes the selects drop
  if (st.exp_derivative) {
    d = T(st.min_derivative) + z;
    if constexpr (GRAD) sig = z;
    return;
  }
  d = T(st.min_derivative) + fk_softplus_of(ud, z);
  if constexpr (GRAD) sig = fk_softplus_grad_of(ud, z);
}

// Softmaxes of both tables into sx, sy (kept for the backward), the bin of v (searched on the
// y knots going back) and the derivatives at its knots.
// u: the raw params as the knots see them (rq_raw applied).
template <bool INVERSE, bool GRAD, typename T, typename U>
FLOWKERN_HD RqBin<T> rq_locate(const T& v, const U& u, int bins, const RqInterval<T>& iv, const RqStyle& st, T* sx,
                               T* sy) {
  RqBin<T> b;
  rq_softmax(u, 0, bins, sx);
  rq_softmax(u, bins, bins, sy);
  if constexpr (INVERSE) {
    rq_table<true>(sy, bins, iv, st.min_height, v, b.k, b.y_lo, b.y_hi);
    rq_table<false>(sx, bins, iv, st.min_width, v, b.k, b.x_lo, b.x_hi);
  } else {
    rq_table<true>(sx, bins, iv, st.min_width, v, b.k, b.x_lo, b.x_hi);
    rq_table<false>(sy, bins, iv, st.min_height, v, b.k, b.y_lo, b.y_hi);
  }
  // knot j's derivative param: 2K + j (learned ends, j = 0..K) or 2K + j - 1 (interior j)
  const int first = st.learned_ends ? 0 : 1, last = st.learned_ends ? bins : bins - 1;
  T ud_lo(0), ud_hi(0);
  for (int j = first; j <= last; ++j) {
    const T uj = u(2 * bins + j - first);
    ud_lo = fk_where(b.k == T(j), uj, ud_lo);
    ud_hi = fk_where(b.k == T(j - 1), uj, ud_hi);
  }
  rq_derivative<GRAD>(ud_lo, st, b.d_lo, b.sig_lo);
  rq_derivative<GRAD>(ud_hi, st, b.d_hi, b.sig_hi);
  if (!st.learned_ends) {
    b.d_lo = fk_where(b.k == T(0), T(1), b.d_lo);
    b.d_hi = fk_where(b.k == T(bins - 1), T(1), b.d_hi);
  }
  return b;
}

// theta in [0, 1] of the point of the bin that maps to v (the inverse), h = y_hi - y_lo.
template <typename T>
FLOWKERN_HD T rq_inverse_theta(const T& v, const RqBin<T>& b, const T& h, const T& delta) {
  const T rho = (v - b.y_lo) / h;
  const T orho = T(1) - rho;
  const T m1 = rho * b.d_hi - orho * b.d_lo;   // e + 2 delta rho
  const T two_dr = T(2) * delta * rho;         // -2c
  const T bq = two_dr - m1;                    // b = -e
  const T disc = m1 * m1 + T(2) * two_dr * delta * orho;  // b^2 - 4ac >= 0
  const T sq = fk_sqrt(disc);
  const auto use_c = bq >= T(0);
  // numerator and denominator chosen before the one division: neither chosen one vanishes
  T theta = fk_where(use_c, -two_dr, sq - bq) / fk_where(use_c, -bq - sq, T(2) * (delta - bq));
  theta = fk_min(fk_max(theta, T(0)), T(1));
  return fk_where(rho >= T(1), T(1), theta);
}

// Where an element falls in its spline and the terms both the forward and the backward use.
template <typename T>
struct RqPoint {
  RqBin<T> b;
  T w, h, delta;             // bin width, height, slope
  T theta, om, t, th2, om2;  // theta, 1 - theta, theta (1 - theta), theta^2, (1 - theta)^2
  T den, q;                  // the rational function's denominator; dy/dx = delta^2 q / den^2
};

// v: the input inside the interval (callers put lo outside, which keeps unused lanes finite).
template <bool INVERSE, bool GRADS, typename T, typename U>
FLOWKERN_HD RqPoint<T> rq_point(const T& v, const U& u, int bins, const RqInterval<T>& iv, const RqStyle& st, T* sx,
                                T* sy) {
  RqPoint<T> p;
  p.b = rq_locate<INVERSE, GRADS>(v, u, bins, iv, st, sx, sy);
  p.w = p.b.x_hi - p.b.x_lo;
  p.h = p.b.y_hi - p.b.y_lo;
  p.delta = p.h / p.w;
  if constexpr (INVERSE) p.theta = rq_inverse_theta(v, p.b, p.h, p.delta);
  else p.theta = (v - p.b.x_lo) / p.w;
  p.om = T(1) - p.theta;
  p.t = p.theta * p.om;
  p.th2 = p.theta * p.theta;
  p.om2 = p.om * p.om;
  p.den = p.delta * (p.th2 + p.om2) + (p.b.d_lo + p.b.d_hi) * p.t;
  p.q = p.b.d_hi * p.th2 + T(2) * p.delta * p.t + p.b.d_lo * p.om2;
  return p;
}

// Forward (INVERSE=false: x -> y, logdet = log dy/dx) or inverse (y -> x, logdet = -log dy/dx)
// of one element; identity with logdet 0 outside [lo, hi]. sx, sy: scratch of K values.
template <bool INVERSE, bool CLAMP, typename T, typename U>
FLOWKERN_HD void rq_spline_forward_style(const T& xin, const U& u_in, int bins, const RqInterval<T>& iv,
                                         const RqStyle& st, T* sx, T* sy, T& out, T& logdet) {
  const auto u = [&](int i) { return rq_raw<CLAMP>(u_in(i), i, bins, st); };
  const auto inside = (xin >= iv.lo) & (xin <= iv.hi);
  const RqPoint<T> p = rq_point<INVERSE, false>(fk_where(inside, xin, iv.lo), u, bins, iv, st, sx, sy);
  const RqBin<T>& b = p.b;
  const T &w = p.w, &h = p.h, &delta = p.delta, &theta = p.theta, &t = p.t, &th2 = p.th2, &den = p.den, &q = p.q;
  const T r = delta / den;
  const T log_slope = fk_log(r * r * q);  // one log; delta / den lies in (0, 2]
  T o;
  if constexpr (INVERSE) o = fk_where(theta == T(1), b.x_hi, b.x_lo + theta * w);
  else o = fk_where(theta == T(1), b.y_hi, b.y_lo + h * ((delta * th2 + b.d_lo * t) / den));
  out = fk_where(inside, o, xin);
  logdet = fk_where(inside, INVERSE ? -log_slope : log_slope, T(0));
}

template <bool INVERSE, typename T, typename U>
FLOWKERN_HD void rq_spline_forward(const T& xin, const U& u, int bins, const RqInterval<T>& iv, const RqStyle& st,
                                   T* sx, T* sy, T& out, T& logdet) {
  if (st.log_slope != 0) rq_spline_forward_style<INVERSE, true>(xin, u, bins, iv, st, sx, sy, out, logdet);
  else rq_spline_forward_style<INVERSE, false>(xin, u, bins, iv, st, sx, sy, out, logdet);
}

// Gradients of the raw sizes of one table from those of the bin's two knots (g_lo, g_hi),
// stored through store(offset + i, value). Size i moves the knots above it by L = hi - lo, so
// g_w = L (g_lo + g_hi) below bin k, L g_hi at k, 0 above, and the softmax backward
// s_i (g_w_i - <g_w, s>) becomes, with S_lt, S_gt the mass of the sizes below / above k,
//   i < k: L (g_lo (S_gt + s_k) + g_hi S_gt)     i = k: L (g_hi S_gt - g_lo S_lt)
//   i > k: -L (g_lo S_lt + g_hi (S_lt + s_k))
// which never subtracts the nearly equal g_w_i and <g_w, s> of a peaked softmax, and drops the
// end knots' gradients by itself (g_lo has S_lt = 0 in bin 0, g_hi S_gt = 0 in the last).
template <typename T, typename S>
FLOWKERN_HD void rq_size_grads(const T* s, int bins, const T& k, const RqInterval<T>& iv, double min_size,
                               const T& g_lo, const T& g_hi, int offset, const S& store) {
  T s_lt(0), s_gt(0), s_k(0);
  for (int i = 0; i < bins; ++i) {
    const T fi(i);
    s_lt = s_lt + fk_where(fi < k, s[i], T(0));
    s_gt = s_gt + fk_where(fi > k, s[i], T(0));
    s_k = s_k + fk_where(fi == k, s[i], T(0));
  }
  const T c = T(1.0 - min_size * bins) * (iv.hi - iv.lo);
  const T below = c * (g_lo * (s_gt + s_k) + g_hi * s_gt);
  const T at = c * (g_hi * s_gt - g_lo * s_lt);
  const T above = -c * (g_lo * s_lt + g_hi * (s_lt + s_k));
  for (int i = 0; i < bins; ++i) {
    const T fi(i);
    store(offset + i, s[i] * fk_where(fi < k, below, fk_where(fi == k, at, above)));
  }
}

// Backward of rq_spline_forward for one element: g = dL/d(out), gld = dL/d(row logdet), xin
// the op's input. Writes dL/d(xin) to grad_in and dL/d(params i) through store(i, value),
// i = 0..3K-2 (0..3K with learned ends).
template <bool INVERSE, bool CLAMP, typename T, typename U, typename S>
FLOWKERN_HD void rq_spline_backward_style(const T& g, const T& gld, const T& xin, const U& u_in, int bins,
                                          const RqInterval<T>& iv, const RqStyle& st, T* sx, T* sy, T& grad_in,
                                          const S& store_in) {
  const auto u = [&](int i) { return rq_raw<CLAMP>(u_in(i), i, bins, st); };
  // the gradient of a clamped param goes back through the clamp
  const auto store = [&](int i, const T& value) {
    if constexpr (CLAMP) store_in(i, value * rq_raw_grad(u_in(i), i, bins, st));
    else store_in(i, value);
  };
  const auto inside = (xin >= iv.lo) & (xin <= iv.hi);
  const RqPoint<T> p = rq_point<INVERSE, true>(fk_where(inside, xin, iv.lo), u, bins, iv, st, sx, sy);
  const RqBin<T>& b = p.b;
  const T &w = p.w, &h = p.h, &delta = p.delta, &theta = p.theta, &om = p.om, &t = p.t, &th2 = p.th2,
          &om2 = p.om2, &den = p.den, &q = p.q;
  const T inv_den = T(1) / den, inv_q = T(1) / q;
  const T inv_den2 = inv_den * inv_den;
  const T r = (delta * th2 + b.d_lo * t) * inv_den;  // (y - y_lo) / h
  const T fx = delta * delta * q * inv_den2;         // dy/dx
  const T lx = (T(2) * (b.d_hi * theta - b.d_lo * om + delta * (om - theta)) * inv_q -
                T(2) * (b.d_lo + b.d_hi - T(2) * delta) * (om - theta) * inv_den) / w;  // d log(dy/dx) / dx
  // The cotangents (gy, gl) of the forward map's (y, log dy/dx) at this point.
  T gy, gl, gi;
  if constexpr (INVERSE) {
    const T G = (g - gld * lx) / fx;
    gi = G;
    gy = -G;
    gl = -gld;
  } else {
    gi = g * fx + gld * lx;
    gy = g;
    gl = gld;
  }
  grad_in = fk_where(inside, gi, g);
  gy = fk_where(inside, gy, T(0));
  gl = fk_where(inside, gl, T(0));

  // The x gradient of the forward map under (gy, gl); going back that is -g exactly, and
  // -(G fx + gld lx) would cancel.
  const T gx = INVERSE ? fk_where(inside, -g, T(0)) : gy * fx + gl * lx;
  const T r_delta = t * (b.d_hi * th2 - b.d_lo * om2) * inv_den2;
  // L_delta / W; 2 / delta - 2 (theta^2 + om^2) / D = 2 (d_k + d_k1) t / (delta D): no cancellation
  const T l_delta_w = T(2) * t * ((b.d_lo + b.d_hi) * inv_den / delta + inv_q) / w;
  const T dq = delta * (gy * delta * r_delta + gl * l_delta_w);  // delta Q
  const T qh = gy * delta * r_delta + gl * l_delta_w;            // Q
  rq_size_grads(sx, bins, b.k, iv, st.min_width, dq - om * gx, -(theta * gx + dq), 0, store);
  const T one_minus_r = om * (delta * om + b.d_hi * theta) * inv_den;  // 1 - r without cancellation
  rq_size_grads(sy, bins, b.k, iv, st.min_height, gy * one_minus_r - qh, gy * r + qh, bins, store);

  const T two_t_den = T(2) * t * inv_den;
  const T g_dlo = (gy * h * t * om * (delta * om + b.d_hi * theta) * inv_den2 + gl * (om2 * inv_q - two_t_den)) *
                  b.sig_lo;
  const T g_dhi = (gl * (th2 * inv_q - two_t_den) - gy * h * t * theta * (delta * theta + b.d_lo * om) * inv_den2) *
                  b.sig_hi;
  const int first = st.learned_ends ? 0 : 1, last = st.learned_ends ? bins : bins - 1;
  for (int j = first; j <= last; ++j)
    store(2 * bins + j - first, fk_where(b.k == T(j), g_dlo, fk_where(b.k == T(j - 1), g_dhi, T(0))));
}

template <bool INVERSE, typename T, typename U, typename S>
FLOWKERN_HD void rq_spline_backward(const T& g, const T& gld, const T& xin, const U& u, int bins,
                                    const RqInterval<T>& iv, const RqStyle& st, T* sx, T* sy, T& grad_in,
                                    const S& store) {
  if (st.log_slope != 0)
    rq_spline_backward_style<INVERSE, true>(g, gld, xin, u, bins, iv, st, sx, sy, grad_in, store);
  else
    rq_spline_backward_style<INVERSE, false>(g, gld, xin, u, bins, iv, st, sx, sy, grad_in, store);
}

}  // namespace math
}  // namespace flowkern
