// Affine coupling, per element: the single source of its arithmetic for the CPU and CUDA
// kernels (the Triton kernel and flowkern/reference/affine_coupling.py restate it and the
// tests hold all three to each other).
//
// s = raw scale from the conditioner, t = shift, m = scale factor, c = clamp.
//   exp:     log m = s                                 dlogm/ds = 1
//   sigmoid: g = sigmoid(s + 2), m = g + 1e-3,         dlogm/ds = g (1 - g) / m
//            log m = log(m)      (the nflows / Glow convention: m stays in (1e-3, 1 + 1e-3))
//   tanh:    log m = c tanh(s / c)                     dlogm/ds = 1 - tanh^2(s / c)
//   softplus: m = softplus(s) + 1e-3, log m = log(m),  dlogm/ds = sigmoid(s) / m
//            (nflows' MaskedAffineAutoregressiveTransform; torch's softplus threshold)
//   rational: log m = s / (1 + |s / c|)                dlogm/ds = 1 / (1 + |s / c|)^2
//            (zuko's MonotonicAffineTransform with c = -log(slope))
// forward  (data -> latent): y = x m + t,     log-det += log m
// inverse  (latent -> data): x = (y - t) / m, log-det -= log m
//
// The backward needs only the tensor the caller saved: the forward's input x, or the
// inverse's output x, so one kernel serves both directions:
//   forward: dL/dx = g m,      dL/ds = (g x m + gld) dlogm/ds,   dL/dt = g
//   inverse: dL/dy = g / m,    dL/ds = -(g x + gld) dlogm/ds,    dL/dt = -g / m
// with g = dL/d(out) and gld = dL/d(logdet) of the element's row.
#pragma once

#include <cstdint>

#include "common.h"

namespace flowkern {
namespace math {

enum AffineScale : int { kAffineExp = 0, kAffineSigmoid = 1, kAffineTanh = 2, kAffineSoftplus = 3, kAffineRational = 4 };
constexpr int kAffineModes = 5;
// Whether a forward may save its factor for the backward (affine_dlogm_from_factor): for
// softplus and rational the backward from s costs no more than one from the factor.
constexpr bool affine_saves_factor(int mode) { return mode <= kAffineTanh; }
// double: T(kAffineEps) is then 1e-3 rounded once to T (a float constant would give the
// float64 kernels 1.0000000475e-3, a relative error of 5e-8 in every sigmoid factor).
constexpr double kAffineSigmoidOffset = 2.0;
constexpr double kAffineEps = 1e-3;

// The factor applied to the data (m forward, 1/m inverse) and log m (unsigned). The row's
// log-det is the sum of log(factor) = +-log m in either direction. exp(-log m) rather than
// 1/exp(log m) in the inverse keeps x finite when m overflows.
// NEED_LOGM=false lets a caller that sums log(factor) its own way (the CPU kernel multiplies
// factors and takes one log per group) skip the per-element log of "sigmoid".
template <int MODE, bool INVERSE, bool NEED_LOGM = true, typename T>
FLOWKERN_HD void affine_factor(const T& s, const T& clamp, T& factor, T& logm) {
  if constexpr (MODE == kAffineExp) {
    logm = s;
    factor = fk_exp(INVERSE ? -s : s);
  } else if constexpr (MODE == kAffineTanh) {
    logm = clamp * fk_tanh(s / clamp);
    factor = fk_exp(INVERSE ? -logm : logm);
  } else if constexpr (MODE == kAffineRational) {
    logm = fk_soft_clamp(s, clamp);
    factor = fk_exp(INVERSE ? -logm : logm);
  } else if constexpr (MODE == kAffineSoftplus) {
    const T m = fk_softplus_of(s, fk_exp(s)) + T(kAffineEps);
    logm = fk_log(m);
    factor = INVERSE ? T(1) / m : m;
  } else {
    const T m = fk_sigmoid(s + T(kAffineSigmoidOffset)) + T(kAffineEps);
    if constexpr (NEED_LOGM) logm = fk_log(m);
    factor = INVERSE ? T(1) / m : m;
  }
}

// The same factor, and d(log m)/ds for the backward pass.
template <int MODE, bool INVERSE, typename T>
FLOWKERN_HD void affine_factor_grad(const T& s, const T& clamp, T& factor, T& dlogm) {
  if constexpr (MODE == kAffineExp) {
    factor = fk_exp(INVERSE ? -s : s);
    dlogm = T(1);
  } else if constexpr (MODE == kAffineTanh) {
    const T th = fk_tanh(s / clamp);
    const T logm = clamp * th;
    factor = fk_exp(INVERSE ? -logm : logm);
    dlogm = T(1) - th * th;
  } else if constexpr (MODE == kAffineRational) {
    const T logm = fk_soft_clamp(s, clamp);
    factor = fk_exp(INVERSE ? -logm : logm);
    dlogm = fk_soft_clamp_grad(s, clamp);
  } else if constexpr (MODE == kAffineSoftplus) {
    const T z = fk_exp(s);
    const T m = fk_softplus_of(s, z) + T(kAffineEps);
    factor = INVERSE ? T(1) / m : m;
    dlogm = fk_softplus_grad_of(s, z) / m;
  } else {
    const T g = fk_sigmoid(s + T(kAffineSigmoidOffset));
    const T m = g + T(kAffineEps);
    factor = INVERSE ? T(1) / m : m;
    dlogm = g * (T(1) - g) / m;
  }
}

// One element of the transform given its factor (m forward, 1/m inverse).
template <bool INVERSE, typename T>
FLOWKERN_HD T affine_apply(const T& x, const T& t, const T& factor) {
  return INVERSE ? (x - t) * factor : x * factor + t;
}

// d(log m)/ds from the factor the forward saved (m, or 1/m going back): the CPU backward uses
// it instead of recomputing exp/sigmoid from s, which is where a CPU spends its time.
template <int MODE, bool INVERSE, typename T>
FLOWKERN_HD T affine_dlogm_from_factor(const T& factor, const T& clamp) {
  static_assert(affine_saves_factor(MODE), "this scale mode's backward takes the raw scale, not a factor");
  if constexpr (MODE == kAffineExp) {
    return T(1);
  } else if constexpr (MODE == kAffineTanh) {
    const T th = fk_log(factor) / clamp;  // +-tanh(s / c); its sign does not matter below
    return T(1) - th * th;
  } else {
    const T m = INVERSE ? T(1) / factor : factor;
    const T g = m - T(kAffineEps);
    return g * (T(1) - g) / m;
  }
}

// One element of the backward pass. `saved` is the forward's input or the inverse's output;
// `s_or_factor` is the raw scale s, or (FROM_FACTOR) the factor the forward saved.
template <int MODE, bool INVERSE, bool FROM_FACTOR, typename T>
FLOWKERN_HD void affine_backward(const T& g, const T& gld, const T& saved, const T& s_or_factor,
                                 const T& clamp, T& grad_in, T& grad_s) {
  T factor, dlogm;
  if constexpr (FROM_FACTOR) {
    factor = s_or_factor;
    dlogm = affine_dlogm_from_factor<MODE, INVERSE>(factor, clamp);
  } else {
    affine_factor_grad<MODE, INVERSE>(s_or_factor, clamp, factor, dlogm);
  }
  grad_in = g * factor;
  grad_s = INVERSE ? -((g * saved + gld) * dlogm) : (g * saved * factor + gld) * dlogm;
}

// The backward from the op's OUTPUT and the raw scale alone, for memory-saving backprop (which
// keeps no input): rebuilds the op's input in the same pass. With d = out - t:
//   forward (out = x m + t):  x = d / m,      dL/dx = g m,   dL/ds = (g d + gld) dlogm/ds
//   inverse (out = (y - t)/m): y = out m + t, dL/dy = g / m, dL/ds = -(g out + gld) dlogm/ds
// (g x m = g d: the forward's gradient needs no division).
template <int MODE, bool INVERSE, typename T>
FLOWKERN_HD void affine_backward_from_output(const T& g, const T& gld, const T& out, const T& t, const T& s,
                                             const T& clamp, T& input, T& grad_in, T& grad_s) {
  T factor, dlogm;
  affine_factor_grad<MODE, INVERSE>(s, clamp, factor, dlogm);
  const T d = out - t;
  input = INVERSE ? out / factor + t : d / factor;
  grad_in = g * factor;
  grad_s = INVERSE ? -((g * out + gld) * dlogm) : (g * d + gld) * dlogm;
}

// dL/dt given g = dL/d(out) and grad_in = dL/d(input): g going forward (y = x m + t); going
// back (x = (y - t) / m) it is -g / m = -grad_in.
template <bool INVERSE, typename T>
FLOWKERN_HD T affine_shift_grad(const T& g, const T& grad_in) {
  return INVERSE ? -grad_in : g;
}

// Row pointers and row strides (in elements) of the forward's tensors. Every row is contiguous
// within itself; the rows may sit anywhere (views of wider rows: the halves of a coupling's
// input, the [shift | raw scale] halves of its conditioner's output). `kept`, when set, is
// copied into out's row at kept_at, beside the n transformed elements written at moved_at: the
// merged output of a coupling layer in the same pass.
template <typename T>
struct AffineFwdRows {
  const T *x, *t, *s;
  int64_t x_rs, t_rs, s_rs;
  T* out;
  int64_t out_rs, moved_at;
  T* factor;  // (rows, n) contiguous, or null
  const T* kept = nullptr;
  int64_t kept_rs = 0, k = 0, kept_at = 0;
};

// The backward's row pointers and strides, as AffineFwdRows. grad_in is (rows, n) contiguous;
// grad_shift, when set, receives dL/dt (g going forward, -g/m going back) beside grad_s.
template <typename T>
struct AffineBwdRows {
  const T *g, *saved, *s;
  int64_t g_rs, saved_rs, s_rs;
  T* grad_in;
  T* grad_s;
  int64_t grad_s_rs;
  T* grad_shift = nullptr;
  int64_t grad_shift_rs = 0;
  // From the output (affine_backward_from_output): `saved` is the op's output, t its shift rows,
  // and the rebuilt input goes to `input` ((rows, n) contiguous).
  const T* t = nullptr;
  int64_t t_rs = 0;
  T* input = nullptr;
};

}  // namespace math
}  // namespace flowkern
