// Per-channel affine maps, ActNorm and the batch-norm flow: the single source of their arithmetic
// for the CPU and CUDA kernels (flowkern/triton/channel_affine.py and flowkern/reference/actnorm.py,
// batchnorm_flow.py restate it; the tests hold all three to each other).
//
// x is (B, C, *spatial) viewed as (B, C, S), S = prod(spatial). Both ops are, per channel c,
//     out = (in + pre_c) * m_c + post_c,        every row's log-det += S * sum_c log m_c,
// with
//     actnorm  forward:  pre = t       m = e^s     post = 0        log m = s
//              inverse:  pre = 0       m = e^-s    post = -t       log m = -s
//     bn flow  forward:  pre = -mean   m = e^a     post = beta     log m = a
//              inverse:  pre = -beta   m = e^-a    post = mean     log m = -a
//     a = log_gamma - 0.5 log(var + eps).
// Each direction's (in + pre) m + post is the reference's own expression (adding 0 is exact), so
// the kernels round where the reference rounds. The coefficients depend on the channel only: a
// kernel computes them once per channel (CPU) or reads them from a (C,) pre-pass (CUDA).
//
// Backward, from the op's OUTPUT (the next layer keeps it anyway), with g = dL/dout,
// G = sum over rows of dL/dlogdet, and per channel the two sums over batch and space
//     R1 = sum g,        R2 = sum g (out - post)          [out - post = (in + pre) m = dout/dlog m]:
//     dL/din = g m,   dL/dpre = m R1,   dL/dpost = R1,   dL/dlog m = R2 + S G,
// and the parameters by the chain rule: ds = +-dlog m, da/dlog_gamma = 1, da/dvar = -1 / (2 (var + eps)).
// R2 is summed from out - post per element, never as sum(g out) - post sum(g): the difference
// would cancel when |post| dwarfs the normalised values.
//
// Training mode (forward; mean, var the batch's own biased statistics, N = B S): with
// xhat = (y - beta) e^-log_gamma and rstd = (var + eps)^-1/2, the paths through the statistics give
//     dL/dx = e^log_gamma rstd (g - mean(g) - xhat mean(g xhat)) - S G rstd xhat / N
//           = (g - R1 / N) m - (R2 + S G) rstd e^-log_gamma / N (y - beta),
//     dL/dlog_gamma = R2 + S G,    dL/dbeta = R1,
// two passes: the sums, then this elementwise map.
//
// Batch statistics: two passes, as PyTorch's batch norm. The first gives the mean; the second the
// sums around a pivot K (that mean, rounded to x's dtype), S1 = sum (x - K), S2 = sum (x - K)^2:
//     mean = K + S1 / N,   var = max(S2 / N - (S1 / N)^2, 0)   (biased),
// where S1 / N is a rounding error's size, so the variance has nothing to cancel.
#pragma once

#include "common.h"

namespace flowkern {
namespace math {

enum ChannelOp : int { kActNorm = 0, kBatchNormFlow = 1 };

// ActNorm's coefficients from its shift t and log-scale s.
template <bool INVERSE, typename T>
FLOWKERN_HD void actnorm_coeffs(const T& t, const T& s, T& pre, T& m, T& post, T& logm) {
  if (INVERSE) {
    pre = T(0);
    m = fk_exp(-s);
    post = -t;
    logm = -s;
  } else {
    pre = t;
    m = fk_exp(s);
    post = T(0);
    logm = s;
  }
}

// The batch-norm flow's log-scale a = log_gamma - 0.5 log(var + eps).
template <typename T>
FLOWKERN_HD T batchnorm_log_scale(const T& var, const T& log_gamma, const T& eps) {
  return log_gamma - T(0.5) * fk_log(var + eps);
}

template <bool INVERSE, typename T>
FLOWKERN_HD void batchnorm_coeffs(const T& mean, const T& var, const T& log_gamma, const T& beta, const T& eps,
                                  T& pre, T& m, T& post, T& logm) {
  const T a = batchnorm_log_scale(var, log_gamma, eps);
  if (INVERSE) {
    pre = -beta;
    m = fk_exp(-a);
    post = mean;
    logm = -a;
  } else {
    pre = -mean;
    m = fk_exp(a);
    post = beta;
    logm = a;
  }
}

// One element of either op, either direction.
template <typename T>
FLOWKERN_HD T channel_apply(const T& in, const T& pre, const T& m, const T& post) {
  return (in + pre) * m + post;
}

// One element of the backward: dL/din and the element's terms of R1 (= g) and R2.
template <typename T>
FLOWKERN_HD T channel_backward(const T& g, const T& out, const T& m, const T& post, T& r2_term) {
  r2_term = g * (out - post);
  return g * m;
}

// ActNorm's parameter gradients from the channel's sums; sg = S G.
template <bool INVERSE, typename T>
FLOWKERN_HD void actnorm_param_grads(const T& r1, const T& r2, const T& sg, const T& m, T& grad_shift,
                                     T& grad_log_scale) {
  const T grad_logm = r2 + sg;
  if (INVERSE) {  // t is post = -t, s is log m = -s
    grad_shift = -r1;
    grad_log_scale = -grad_logm;
  } else {  // t is pre, s is log m
    grad_shift = m * r1;
    grad_log_scale = grad_logm;
  }
}

// The batch-norm flow's parameter gradients with given statistics; sg = S G.
template <bool INVERSE, typename T>
FLOWKERN_HD void batchnorm_param_grads(const T& r1, const T& r2, const T& sg, const T& m, const T& var, const T& eps,
                                       T& grad_mean, T& grad_var, T& grad_log_gamma, T& grad_beta) {
  const T grad_a = INVERSE ? -(r2 + sg) : r2 + sg;
  if (INVERSE) {  // mean is post, beta is -pre
    grad_mean = r1;
    grad_beta = -(m * r1);
  } else {  // mean is -pre, beta is post
    grad_mean = -(m * r1);
    grad_beta = r1;
  }
  grad_log_gamma = grad_a;
  grad_var = T(-0.5) * grad_a / (var + eps);
}

// Training mode: the parameter gradients and the coefficients of dL/dx = (g + c0) m + k1 (y - beta).
template <typename T>
FLOWKERN_HD void batchnorm_train_grads(const T& r1, const T& r2, const T& sg, const T& n, const T& var,
                                       const T& log_gamma, const T& eps, T& grad_log_gamma, T& grad_beta, T& c0,
                                       T& k1) {
  grad_log_gamma = r2 + sg;
  grad_beta = r1;
  c0 = -r1 / n;
  // rstd e^-log_gamma = e^(-log_gamma - 0.5 log(var + eps)) = 1 / (gamma sqrt(var + eps)).
  k1 = -grad_log_gamma * fk_exp(-(log_gamma + T(0.5) * fk_log(var + eps))) / n;
}

template <typename T>
FLOWKERN_HD T batchnorm_train_grad_x(const T& g, const T& y, const T& c0, const T& m, const T& k1, const T& beta) {
  return (g + c0) * m + k1 * (y - beta);
}

// (mean, biased var) from the sums of n values around the pivot k (see the top of the file).
template <typename T>
FLOWKERN_HD void batch_stats_finalize(const T& k, const T& s1, const T& s2, const T& n, T& mean, T& var) {
  const T d = s1 / n;
  const T v = s2 / n - d * d;
  mean = k + d;
  var = v < T(0) ? T(0) : v;  // clamps rounding below 0; NaN (a NaN or inf in x) stays NaN
}

}  // namespace math
}  // namespace flowkern

// Host side, shared by the CPU and CUDA launchers: the checks that guard the kernels against
// direct torch.ops calls (Python, flowkern/ops, checks first with friendlier messages).
#include "../ops.h"

#include <initializer_list>
#include <optional>

namespace flowkern {

// x (B, C, *spatial) and the (C,) parameters: same dtype and device, contiguous.
inline void check_channel_inputs(const char* op, const at::Tensor& x, std::initializer_list<at::Tensor> params,
                                 const std::optional<at::Tensor>& per_row) {
  TORCH_CHECK(x.dim() >= 2, "flowkern: ", op, " takes x of shape (B, C, *spatial), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "flowkern: ", op, " kernels take a contiguous x");
  for (const auto& p : params) {
    TORCH_CHECK(p.dim() == 1 && p.size(0) == x.size(1), "flowkern: ", op, " parameters must have shape (",
                x.size(1), ",), got ", p.sizes());
    TORCH_CHECK(p.scalar_type() == x.scalar_type(), "flowkern: ", op, " parameters must have x's dtype ",
                x.scalar_type(), ", got ", p.scalar_type());
    TORCH_CHECK(p.device() == x.device(), "flowkern: ", op, " parameters on another device than x");
    TORCH_CHECK(p.is_contiguous(), "flowkern: ", op, " kernels take contiguous parameters");
  }
  check_per_row(per_row, x.size(0), logdet_dtype(x.scalar_type()), x.device());
}

inline void check_channel_grad(const char* op, const at::Tensor& grad_out, const at::Tensor& out) {
  TORCH_CHECK(grad_out.sizes() == out.sizes() && grad_out.scalar_type() == out.scalar_type() &&
                  grad_out.device() == out.device() && grad_out.is_contiguous(),
              "flowkern: ", op, " grad_out must be contiguous with out's shape, dtype and device");
}

}  // namespace flowkern
