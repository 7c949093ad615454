// CPU launchers for the affine coupling: rows in parallel (at::parallel_for), each row one
// SIMD pass (at::vec::Vectorized) over the math in math/affine_coupling.h, with the row's
// log-det reduced in registers and written once. Built with the host's vector ISA flags
// (setup.py).
//
// A CPU spends its time in exp/log, not in memory traffic, so two choices differ from CUDA:
// - the forward can save the factor (m, or 1/m) for the backward, which then needs no
//   transcendental for "exp" and "sigmoid";
// - for "sigmoid" the log-det is log(prod of factors) over groups of kLogGroup vectors: one
//   log per group instead of one per element. Each factor lies in [1e-3, 1.001] (or its
//   reciprocal), so a product of kLogGroup = 8 stays within [1e-24, 1e24]: no under/overflow.
#include "vec_math.h"
#include "../math/affine_coupling.h"
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <cstring>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

namespace flowkern {
namespace cpu {
namespace {

using at::vec::Vectorized;
using namespace flowkern::math;

constexpr int kLogGroup = 8;

// Sums log(factor) over a row: directly for "exp"/"tanh" (log m is free), through grouped
// products for "sigmoid".
template <typename scalar_t, int MODE, bool INVERSE>
struct LogFactorSum {
  using Vec = Vectorized<scalar_t>;
  static constexpr bool kByProduct = MODE == kAffineSigmoid;
  Vec acc{scalar_t(0)}, prod{scalar_t(1)};
  int pending = 0;

  // `lanes` < Vec::size() on the row's tail: padding lanes must not count.
  void add(const Vec& factor, const Vec& logm, int64_t lanes) {
    if constexpr (kByProduct) {
      prod = prod * (lanes == Vec::size() ? factor : Vec::set(Vec(scalar_t(1)), factor, lanes));
      if (++pending == kLogGroup) flush();
    } else {
      const Vec signed_logm = INVERSE ? -logm : logm;
      acc = acc + (lanes == Vec::size() ? signed_logm : Vec::set(Vec(scalar_t(0)), signed_logm, lanes));
    }
  }
  void flush() {
    if (pending) acc = acc + fk_log(prod);
    prod = Vec(scalar_t(1));
    pending = 0;
  }
  scalar_t total() {
    if constexpr (kByProduct) flush();
    return hsum(acc);
  }
};

template <typename scalar_t, int MODE, bool INVERSE>
void fwd_rows(const AffineFwdRows<scalar_t>& a, scalar_t* ld_out, const scalar_t* ld_in, int64_t rows, int64_t n,
              scalar_t clamp) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool kNeedLogm = MODE != kAffineSigmoid;
  const Vec vclamp(clamp);
  at::parallel_for(0, rows, row_grain(n + a.k, 32768), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* x = a.x + r * a.x_rs;
      const scalar_t* t = a.t + r * a.t_rs;
      const scalar_t* s = a.s + r * a.s_rs;
      scalar_t* out = a.out + r * a.out_rs;
      scalar_t* factor_out = a.factor ? a.factor + r * n : nullptr;
      if (a.kept) std::memcpy(out + a.kept_at, a.kept + r * a.kept_rs, a.k * sizeof(scalar_t));
      out += a.moved_at;
      LogFactorSum<scalar_t, MODE, INVERSE> logdet;
      for (int64_t j = 0; j < n; j += W) {
        const int64_t lanes = std::min<int64_t>(W, n - j);
        Vec factor, logm;
        affine_factor<MODE, INVERSE, kNeedLogm>(Vec::loadu(s + j, lanes), vclamp, factor, logm);
        const Vec o = affine_apply<INVERSE>(Vec::loadu(x + j, lanes), Vec::loadu(t + j, lanes), factor);
        o.store(out + j, lanes);
        if (factor_out) factor.store(factor_out + j, lanes);
        logdet.add(factor, logm, lanes);
      }
      ld_out[r] = (ld_in ? ld_in[r] : scalar_t(0)) + logdet.total();
    }
  });
}

// FROM_OUTPUT: the backward from the op's output (AffineBwdRows' t and input set), which also
// rebuilds the input; s is then the raw scale.
template <typename scalar_t, int MODE, bool INVERSE, bool FROM_FACTOR, bool FROM_OUTPUT = false>
void bwd_rows(const AffineBwdRows<scalar_t>& a, const scalar_t* gld, int64_t rows, int64_t n, scalar_t clamp) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vclamp(clamp);
  at::parallel_for(0, rows, row_grain(n, 32768), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* g = a.g + r * a.g_rs;
      const scalar_t* saved = a.saved + r * a.saved_rs;
      const scalar_t* s = a.s + r * a.s_rs;
      scalar_t* grad_in = a.grad_in + r * n;
      scalar_t* grad_s = a.grad_s + r * a.grad_s_rs;
      scalar_t* grad_shift = a.grad_shift ? a.grad_shift + r * a.grad_shift_rs : nullptr;
      const Vec vgld(gld ? gld[r] : scalar_t(0));
      for (int64_t j = 0; j < n; j += W) {
        const int64_t lanes = std::min<int64_t>(W, n - j);
        // Padding lanes of a tail load are 0; a zero factor only feeds lanes never stored.
        const Vec vg = Vec::loadu(g + j, lanes);
        Vec gi, gs;
        if constexpr (FROM_OUTPUT) {
          Vec input;
          affine_backward_from_output<MODE, INVERSE>(vg, vgld, Vec::loadu(saved + j, lanes),
                                                     Vec::loadu(a.t + r * a.t_rs + j, lanes), Vec::loadu(s + j, lanes),
                                                     vclamp, input, gi, gs);
          input.store(a.input + r * n + j, lanes);
        } else {
          affine_backward<MODE, INVERSE, FROM_FACTOR>(vg, vgld, Vec::loadu(saved + j, lanes),
                                                      Vec::loadu(s + j, lanes), vclamp, gi, gs);
        }
        gi.store(grad_in + j, lanes);
        gs.store(grad_s + j, lanes);
        if (grad_shift) affine_shift_grad<INVERSE>(vg, gi).store(grad_shift + j, lanes);
      }
    }
  });
}

void check_cpu_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "flowkern: the CPU affine_coupling kernel takes float32 or float64, got ", t.scalar_type());
}

}  // namespace

namespace {

template <typename scalar_t>
void run_fwd(AffineFwdRows<scalar_t> a, const std::optional<at::Tensor>& logdet, at::Tensor& ld, int64_t mode,
             bool inverse, int64_t rows, int64_t n, double clamp) {
  const scalar_t* ld_in = logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr;
  check_affine_factor(mode, a.factor != nullptr);
  dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
    fwd_rows<scalar_t, decltype(mode_c)::value, decltype(inv_c)::value>(a, ld.data_ptr<scalar_t>(), ld_in, rows, n,
                                                                          static_cast<scalar_t>(clamp));
  });
}

template <typename scalar_t>
void run_bwd(const AffineBwdRows<scalar_t>& a, const std::optional<at::Tensor>& grad_logdet, bool is_factor, int64_t mode,
             bool inverse, int64_t rows, int64_t n, double clamp) {
  const scalar_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<scalar_t>() : nullptr;
  check_affine_factor(mode, is_factor);
  dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
    auto run = [&](auto from_factor_c) {
      bwd_rows<scalar_t, decltype(mode_c)::value, decltype(inv_c)::value, decltype(from_factor_c)::value>(
          a, gld, rows, n, static_cast<scalar_t>(clamp));
    };
    if (a.input) {
      bwd_rows<scalar_t, decltype(mode_c)::value, decltype(inv_c)::value, false, true>(a, gld, rows, n,
                                                                                       static_cast<scalar_t>(clamp));
    } else if (is_factor) {
      if constexpr (affine_saves_factor(decltype(mode_c)::value)) run(std::true_type{});
    } else {
      run(std::false_type{});
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_fwd(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale_raw, int64_t mode, double clamp,
    bool inverse, const std::optional<at::Tensor>& logdet, bool save_factor) {
  check_affine_inputs(x, shift, scale_raw, logdet);
  check_cpu_dtype(x);
  const int64_t rows = x.size(0);
  const int64_t n = rows == 0 ? 0 : x.numel() / rows;
  auto out = at::empty_like(x);
  auto factor = save_factor ? at::empty_like(x) : at::empty({0}, x.options());
  auto ld = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flowkern_affine_coupling_fwd_cpu", [&] {
    AffineFwdRows<scalar_t> a{x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale_raw.data_ptr<scalar_t>(), n, n, n,
                        out.data_ptr<scalar_t>(), n, 0, save_factor ? factor.data_ptr<scalar_t>() : nullptr};
    run_fwd(a, logdet, ld, mode, inverse, rows, n, clamp);
  });
  return {out, ld, factor};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(const at::Tensor& grad_out,
                                                       const std::optional<at::Tensor>& grad_logdet,
                                                       const at::Tensor& saved, const at::Tensor& scale_or_factor,
                                                       bool is_factor, int64_t mode, double clamp, bool inverse) {
  check_affine_inputs(saved, grad_out, scale_or_factor, grad_logdet);
  check_cpu_dtype(saved);
  const int64_t rows = saved.size(0);
  const int64_t n = rows == 0 ? 0 : saved.numel() / rows;
  auto grad_in = at::empty_like(saved);
  auto grad_s = at::empty_like(saved);
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "flowkern_affine_coupling_bwd_cpu", [&] {
    AffineBwdRows<scalar_t> a{grad_out.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(), scale_or_factor.data_ptr<scalar_t>(),
                        n, n, n, grad_in.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(), n};
    run_bwd(a, grad_logdet, is_factor, mode, inverse, rows, n, clamp);
  });
  return {grad_in, grad_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_merge_fwd(
    const at::Tensor& kept, const at::Tensor& x, const at::Tensor& params, int64_t mode, double clamp, bool inverse,
    const std::optional<at::Tensor>& logdet, bool save_factor, bool kept_first) {
  check_affine_merge_inputs(kept, x, params, logdet);
  check_cpu_dtype(x);
  const int64_t rows = x.size(0), n = x.size(1), k = kept.size(1);
  auto out = at::empty({rows, k + n}, x.options());
  auto factor = save_factor ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  auto ld = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flowkern_affine_coupling_merge_fwd_cpu", [&] {
    run_fwd(merge_fwd_rows<scalar_t>(kept, x, params, out, save_factor ? factor.data_ptr<scalar_t>() : nullptr,
                                     kept_first),
            logdet, ld, mode, inverse, rows, n, clamp);
  });
  return {out, ld, factor};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_merge_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& saved,
    const at::Tensor& scale_or_factor, bool is_factor, int64_t mode, double clamp, bool inverse, bool kept_first) {
  check_affine_merge_grads(grad_out, grad_logdet, saved, scale_or_factor);
  check_cpu_dtype(saved);
  const int64_t rows = saved.size(0), n = saved.size(1);
  auto grad_x = at::empty({rows, n}, saved.options());
  auto grad_params = at::empty({rows, 2 * n}, saved.options());
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "flowkern_affine_coupling_merge_bwd_cpu", [&] {
    run_bwd(merge_bwd_rows<scalar_t>(grad_out, saved, scale_or_factor, grad_x, grad_params, kept_first), grad_logdet,
            is_factor, mode, inverse, rows, n, clamp);
  });
  return {grad_x, grad_params};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_merge_bwd_out(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& out,
    const at::Tensor& params, int64_t mode, double clamp, bool inverse, bool kept_first) {
  check_affine_merge_bwd_out(grad_out, grad_logdet, out, params);
  check_cpu_dtype(out);
  const int64_t rows = out.size(0), n = params.size(1) / 2;
  auto input = at::empty({rows, n}, out.options());
  auto grad_x = at::empty({rows, n}, out.options());
  auto grad_params = at::empty({rows, 2 * n}, out.options());
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "flowkern_affine_coupling_merge_bwd_out_cpu", [&] {
    run_bwd(merge_bwd_out_rows<scalar_t>(grad_out, out, params, input, grad_x, grad_params, kept_first), grad_logdet,
            false, mode, inverse, rows, n, clamp);
  });
  return {input, grad_x, grad_params};
}

}  // namespace cpu
}  // namespace flowkern
