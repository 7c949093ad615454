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
void fwd_rows(const scalar_t* x, const scalar_t* t, const scalar_t* s, scalar_t* out, scalar_t* factor_out,
              scalar_t* ld_out, const scalar_t* ld_in, int64_t rows, int64_t n, scalar_t clamp) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr bool kNeedLogm = MODE != kAffineSigmoid;
  const Vec vclamp(clamp);
  at::parallel_for(0, rows, row_grain(n, 32768), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      LogFactorSum<scalar_t, MODE, INVERSE> logdet;
      for (int64_t j = 0; j < n; j += W) {
        const int64_t lanes = std::min<int64_t>(W, n - j);
        const int64_t i = base + j;
        Vec factor, logm;
        affine_factor<MODE, INVERSE, kNeedLogm>(Vec::loadu(s + i, lanes), vclamp, factor, logm);
        const Vec o = affine_apply<INVERSE>(Vec::loadu(x + i, lanes), Vec::loadu(t + i, lanes), factor);
        o.store(out + i, lanes);
        if (factor_out) factor.store(factor_out + i, lanes);
        logdet.add(factor, logm, lanes);
      }
      ld_out[r] = (ld_in ? ld_in[r] : scalar_t(0)) + logdet.total();
    }
  });
}

template <typename scalar_t, int MODE, bool INVERSE, bool FROM_FACTOR>
void bwd_rows(const scalar_t* g, const scalar_t* gld, const scalar_t* saved, const scalar_t* s_or_factor,
              scalar_t* grad_in, scalar_t* grad_s, int64_t rows, int64_t n, scalar_t clamp) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vclamp(clamp);
  at::parallel_for(0, rows, row_grain(n, 32768), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      const Vec vgld(gld ? gld[r] : scalar_t(0));
      for (int64_t j = 0; j < n; j += W) {
        const int64_t lanes = std::min<int64_t>(W, n - j);
        const int64_t i = base + j;
        // Padding lanes of a tail load are 0; a zero factor only feeds lanes never stored.
        Vec gi, gs;
        affine_backward<MODE, INVERSE, FROM_FACTOR>(Vec::loadu(g + i, lanes), vgld, Vec::loadu(saved + i, lanes),
                                                    Vec::loadu(s_or_factor + i, lanes), vclamp, gi, gs);
        gi.store(grad_in + i, lanes);
        gs.store(grad_s + i, lanes);
      }
    }
  });
}

void check_cpu_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "flowkern: the CPU affine_coupling kernel takes float32 or float64, got ", t.scalar_type());
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
    const scalar_t* ld_in = logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr;
    scalar_t* factor_out = save_factor ? factor.data_ptr<scalar_t>() : nullptr;
    dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
      fwd_rows<scalar_t, decltype(mode_c)::value, decltype(inv_c)::value>(
          x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale_raw.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), factor_out, ld.data_ptr<scalar_t>(), ld_in, rows, n,
          static_cast<scalar_t>(clamp));
    });
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
    const scalar_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<scalar_t>() : nullptr;
    dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
      auto run = [&](auto from_factor_c) {
        bwd_rows<scalar_t, decltype(mode_c)::value, decltype(inv_c)::value, decltype(from_factor_c)::value>(
            grad_out.data_ptr<scalar_t>(), gld, saved.data_ptr<scalar_t>(), scale_or_factor.data_ptr<scalar_t>(),
            grad_in.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(), rows, n, static_cast<scalar_t>(clamp));
      };
      if (is_factor) run(std::true_type{});
      else run(std::false_type{});
    });
  });
  return {grad_in, grad_s};
}

}  // namespace cpu
}  // namespace flowkern
