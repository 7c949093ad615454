// Declarations of flowkern's compiled ops (schemas in registration.cpp) and the checks every
// launcher repeats. Python (flowkern/ops) validates arguments with friendly messages first;
// these TORCH_CHECKs only guard the kernels against direct torch.ops calls.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <cmath>
#include <optional>
#include <tuple>
#include <type_traits>

#include "math/affine_coupling.h"
#include "math/rq_style.h"

namespace flowkern {

// The dtype in which a row's log-det is accumulated and returned: float32 for float32 and the
// half types, float64 for float64.
inline at::ScalarType logdet_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-row tensor (a running log-det, its gradient, a per-row result's gradient): (rows,),
// contiguous, of `dtype`, on `device`. `name` says which one in the message.
inline void check_per_row(const char* name, const at::Tensor& t, int64_t rows, at::ScalarType dtype,
                          const at::Device& device) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == rows && t.is_contiguous(), "flowkern: ", name,
              " must be contiguous with shape (", rows, ",), got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, "flowkern: ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == device, "flowkern: ", name, " is on ", t.device(), ", not ", device);
}

inline void check_per_row(const std::optional<at::Tensor>& per_row, int64_t rows, at::ScalarType dtype,
                          const at::Device& device) {
  if (per_row.has_value()) check_per_row("per-row tensor", *per_row, rows, dtype, device);
}

inline void check_affine_inputs(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c,
                                const std::optional<at::Tensor>& per_row) {
  TORCH_CHECK(a.dim() >= 1, "flowkern: affine_coupling needs a batch dimension");
  TORCH_CHECK(a.sizes() == b.sizes() && a.sizes() == c.sizes(), "flowkern: affine_coupling tensors differ in shape: ",
              a.sizes(), ", ", b.sizes(), ", ", c.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && a.scalar_type() == c.scalar_type(),
              "flowkern: affine_coupling tensors differ in dtype");
  TORCH_CHECK(a.device() == b.device() && a.device() == c.device(), "flowkern: affine_coupling tensors differ in device");
  TORCH_CHECK(a.is_contiguous() && b.is_contiguous() && c.is_contiguous(),
              "flowkern: affine_coupling kernels take contiguous tensors");
  check_per_row(per_row, a.size(0), logdet_dtype(a.scalar_type()), a.device());
}

// A (rows, cols) matrix whose rows are each contiguous, at any row stride: a view of wider
// rows (the halves of a coupling layer's input or of its conditioner's output).
inline void check_rows(const char* name, const at::Tensor& t, const at::Tensor& like) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == like.size(0), "flowkern: affine_coupling_merge: ", name,
              " must be 2-D with ", like.size(0), " rows, got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "flowkern: affine_coupling_merge: ", name,
              " needs contiguous rows, got strides ", t.strides());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), "flowkern: affine_coupling_merge tensors differ in dtype");
  TORCH_CHECK(t.device() == like.device(), "flowkern: affine_coupling_merge tensors differ in device");
}

// affine_coupling_merge_fwd: kept (B, k), x (B, n), params (B, 2n) = [shift | raw scale].
inline void check_affine_merge_inputs(const at::Tensor& kept, const at::Tensor& x, const at::Tensor& params,
                                      const std::optional<at::Tensor>& per_row) {
  check_rows("x", x, x);
  check_rows("kept", kept, x);
  check_rows("params", params, x);
  TORCH_CHECK(params.size(1) == 2 * x.size(1), "flowkern: affine_coupling_merge params must have 2 * ", x.size(1),
              " columns, got ", params.size(1));
  check_per_row(per_row, x.size(0), logdet_dtype(x.scalar_type()), x.device());
}

// affine_coupling_merge_bwd: grad_out (B, k + n), saved and scale_or_factor (B, n).
inline void check_affine_merge_grads(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet,
                                     const at::Tensor& saved, const at::Tensor& scale_or_factor) {
  check_rows("saved", saved, saved);
  check_rows("grad_out", grad_out, saved);
  check_rows("scale_or_factor", scale_or_factor, saved);
  TORCH_CHECK(scale_or_factor.size(1) == saved.size(1) && grad_out.size(1) >= saved.size(1),
              "flowkern: affine_coupling_merge_bwd shapes disagree: grad_out ", grad_out.sizes(), ", saved ",
              saved.sizes(), ", scale_or_factor ", scale_or_factor.sizes());
  check_per_row(grad_logdet, saved.size(0), logdet_dtype(saved.scalar_type()), saved.device());
}

// affine_coupling_merge_bwd_out: grad_out and out (B, k + n), params (B, 2n).
inline void check_affine_merge_bwd_out(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet,
                                       const at::Tensor& out, const at::Tensor& params) {
  check_rows("out", out, out);
  check_rows("grad_out", grad_out, out);
  check_rows("params", params, out);
  TORCH_CHECK(grad_out.size(1) == out.size(1) && params.size(1) % 2 == 0 && params.size(1) / 2 <= out.size(1),
              "flowkern: affine_coupling_merge_bwd_out shapes disagree: grad_out ", grad_out.sizes(), ", out ",
              out.sizes(), ", params ", params.sizes());
  check_per_row(grad_logdet, out.size(0), logdet_dtype(out.scalar_type()), out.device());
}

// The merge ops' row layouts, one place for the CPU and CUDA launchers: out (B, k + n) holds
// kept at column 0 (kept_first) or n and the transformed part at k or 0; params (B, 2n) =
// [shift | raw scale]; every input at its own row stride.
template <typename T>
math::AffineFwdRows<T> merge_fwd_rows(const at::Tensor& kept, const at::Tensor& x, const at::Tensor& params,
                                      const at::Tensor& out, T* factor, bool kept_first) {
  const int64_t n = x.size(1), k = kept.size(1);
  const T* p = params.data_ptr<T>();
  return {x.data_ptr<T>(), p, p + n, x.stride(0), params.stride(0), params.stride(0),
          out.data_ptr<T>(), k + n, kept_first ? k : 0, factor,
          kept.data_ptr<T>(), kept.stride(0), k, kept_first ? 0 : n};
}

// merge_bwd: grad_out (B, k + n), saved and scale_or_factor (B, n); grad_x (B, n) and
// grad_params (B, 2n) = [grad shift | grad raw scale] written.
template <typename T>
math::AffineBwdRows<T> merge_bwd_rows(const at::Tensor& grad_out, const at::Tensor& saved,
                                      const at::Tensor& scale_or_factor, const at::Tensor& grad_x,
                                      const at::Tensor& grad_params, bool kept_first) {
  const int64_t n = saved.size(1), k = grad_out.size(1) - n;
  T* gp = grad_params.data_ptr<T>();
  return {grad_out.data_ptr<T>() + (kept_first ? k : 0), saved.data_ptr<T>(), scale_or_factor.data_ptr<T>(),
          grad_out.stride(0), saved.stride(0), scale_or_factor.stride(0), grad_x.data_ptr<T>(), gp + n, 2 * n,
          gp, 2 * n};
}

// merge_bwd_out: from the output out (B, k + n) and params (B, 2n); the rebuilt input goes to
// `input` (B, n).
template <typename T>
math::AffineBwdRows<T> merge_bwd_out_rows(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& params,
                                          const at::Tensor& input, const at::Tensor& grad_x,
                                          const at::Tensor& grad_params, bool kept_first) {
  const int64_t n = params.size(1) / 2, k = out.size(1) - n, off = kept_first ? k : 0;
  T* gp = grad_params.data_ptr<T>();
  const T* p = params.data_ptr<T>();
  return {grad_out.data_ptr<T>() + off, out.data_ptr<T>() + off, p + n, grad_out.stride(0), out.stride(0),
          params.stride(0), grad_x.data_ptr<T>(), gp + n, 2 * n, gp, 2 * n, p, params.stride(0), input.data_ptr<T>()};
}

// rq_spline: x (and grad_out) viewed as (B, N) rows, params x.shape + (3 bins - 1,) (3 bins + 1
// with learned ends), all contiguous; bins within the kernels' fixed-size knot arrays
// (math/rq_spline.h: 64); the interval lo < hi, finite.
inline void check_rq_spline_inputs(const at::Tensor& x, const at::Tensor& like_x, const at::Tensor& params,
                                   int64_t bins, double lo, double hi, bool learned_ends,
                                   const std::optional<at::Tensor>& per_row) {
  TORCH_CHECK(bins >= 1 && bins <= 64, "flowkern: the rq_spline kernels take bins in [1, 64], got ", bins);
  TORCH_CHECK(std::isfinite(lo) && std::isfinite(hi) && lo < hi && std::isfinite(hi - lo),
              "flowkern: rq_spline needs a finite interval lo < hi, got [", lo, ", ", hi, "]");
  TORCH_CHECK(x.dim() >= 1, "flowkern: rq_spline needs a batch dimension");
  TORCH_CHECK(like_x.sizes() == x.sizes(), "flowkern: rq_spline tensors differ in shape: ", x.sizes(), ", ",
              like_x.sizes());
  auto psize = x.sizes().vec();
  psize.push_back(math::rq_params_per_element(static_cast<int>(bins), learned_ends));
  TORCH_CHECK(params.sizes() == at::IntArrayRef(psize), "flowkern: rq_spline params must have shape ",
              at::IntArrayRef(psize), ", got ", params.sizes());
  TORCH_CHECK(x.scalar_type() == like_x.scalar_type() && x.scalar_type() == params.scalar_type(),
              "flowkern: rq_spline tensors differ in dtype");
  TORCH_CHECK(x.device() == like_x.device() && x.device() == params.device(),
              "flowkern: rq_spline tensors differ in device");
  TORCH_CHECK(x.is_contiguous() && like_x.is_contiguous() && params.is_contiguous(),
              "flowkern: rq_spline kernels take contiguous tensors");
  check_per_row(per_row, x.size(0), logdet_dtype(x.scalar_type()), x.device());
}

// The knot style of rq_spline (math/rq_spline.h's RqStyle), checked.
inline math::RqStyle rq_style(int64_t bins, double min_width, double min_height, double min_derivative,
                              bool exp_derivative, double log_slope, bool learned_ends) {
  TORCH_CHECK(min_width >= 0 && min_width * bins <= 1 && min_height >= 0 && min_height * bins <= 1,
              "flowkern: rq_spline needs 0 <= min_width, min_height and bins * them <= 1, got ", min_width, ", ",
              min_height, " for ", bins, " bins");
  TORCH_CHECK(min_derivative >= 0 && std::isfinite(min_derivative),
              "flowkern: rq_spline min_derivative must be >= 0 and finite, got ", min_derivative);
  TORCH_CHECK(log_slope <= 0 && std::isfinite(log_slope), "flowkern: rq_spline log_slope must be <= 0, got ",
              log_slope);
  return math::RqStyle{min_width, min_height, min_derivative, exp_derivative, log_slope, learned_ends};
}

// Every check of an rq_spline launcher (its tensors, interval and style); returns the style.
inline math::RqStyle check_rq_spline(const at::Tensor& x, const at::Tensor& like_x, const at::Tensor& params,
                                     int64_t bins, double lo, double hi, const std::optional<at::Tensor>& per_row,
                                     double min_width, double min_height, double min_derivative,
                                     bool exp_derivative, double log_slope, bool learned_ends) {
  check_rq_spline_inputs(x, like_x, params, bins, lo, hi, learned_ends, per_row);
  return rq_style(bins, min_width, min_height, min_derivative, exp_derivative, log_slope, learned_ends);
}

// Turns the runtime (mode, inverse) pair of affine_coupling into template arguments, so each
// kernel's inner loop is branch-free: f(std::integral_constant<int, MODE>, std::bool_constant<INVERSE>).
template <typename F>
void dispatch_affine_mode(int64_t mode, bool inverse, F&& f) {
  TORCH_CHECK(mode >= 0 && mode < math::kAffineModes, "flowkern: affine_coupling mode must be 0 (exp), 1 (sigmoid), "
              "2 (tanh), 3 (softplus) or 4 (rational), got ", mode);
  auto with_inv = [&](auto mode_c) {
    if (inverse) f(mode_c, std::true_type{});
    else f(mode_c, std::false_type{});
  };
  switch (mode) {
    case 0: with_inv(std::integral_constant<int, 0>{}); break;
    case 1: with_inv(std::integral_constant<int, 1>{}); break;
    case 2: with_inv(std::integral_constant<int, 2>{}); break;
    case 3: with_inv(std::integral_constant<int, 3>{}); break;
    default: with_inv(std::integral_constant<int, 4>{}); break;
  }
}

// A saved factor only for the modes whose backward takes one (math::affine_saves_factor).
inline void check_affine_factor(int64_t mode, bool uses_factor) {
  TORCH_CHECK(!uses_factor || math::affine_saves_factor(static_cast<int>(mode)),
              "flowkern: affine_coupling mode ", mode, " saves no factor (save_factor / is_factor must be false)");
}

// The launchers each device provides (csrc/cpu, csrc/cuda), with the schemas' signatures.
#define FLOWKERN_DECLARE_LAUNCHERS                                                                     \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_fwd(                                  \
      const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale_raw, int64_t mode,         \
      double clamp, bool inverse, const std::optional<at::Tensor>& logdet, bool save_factor);          \
  std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(                                              \
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& saved, \
      const at::Tensor& scale_or_factor, bool is_factor, int64_t mode, double clamp, bool inverse);   \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_merge_fwd(                            \
      const at::Tensor& kept, const at::Tensor& x, const at::Tensor& params, int64_t mode, double clamp, \
      bool inverse, const std::optional<at::Tensor>& logdet, bool save_factor, bool kept_first);       \
  std::tuple<at::Tensor, at::Tensor> affine_coupling_merge_bwd(                                        \
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& saved, \
      const at::Tensor& scale_or_factor, bool is_factor, int64_t mode, double clamp, bool inverse,    \
      bool kept_first);                                                                               \
  std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_merge_bwd_out(                        \
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& out,  \
      const at::Tensor& params, int64_t mode, double clamp, bool inverse, bool kept_first);            \
  std::tuple<at::Tensor, at::Tensor> rq_spline_fwd(                                                                \
      const at::Tensor& x, const at::Tensor& params, int64_t bins, double lo, double hi, bool inverse,            \
      const std::optional<at::Tensor>& logdet, double min_width, double min_height, double min_derivative,       \
      bool exp_derivative, double log_slope, bool learned_ends);                                                   \
  std::tuple<at::Tensor, at::Tensor> rq_spline_bwd(                                                                \
      const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& x_in,           \
      const at::Tensor& params, int64_t bins, double lo, double hi, bool inverse, double min_width,               \
      double min_height, double min_derivative, bool exp_derivative, double log_slope, bool learned_ends);

namespace cpu {
FLOWKERN_DECLARE_LAUNCHERS
}  // namespace cpu

#ifdef FLOWKERN_WITH_CUDA
namespace cuda {
FLOWKERN_DECLARE_LAUNCHERS
}  // namespace cuda
#endif

}  // namespace flowkern
