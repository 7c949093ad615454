// CPU launchers for the affine coupling: rows in parallel (at::parallel_for), each row one
// SIMD pass (at::vec::Vectorized) over the math in math/affine_coupling.h, with the row's
// log-det reduced in registers and written once. Built with the host's vector ISA flags
// (setup.py), which is where the speed over eager PyTorch comes from.
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

// Rows per parallel chunk: about 32K elements of work, so small batches stay on one thread.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(n, 1)); }

template <typename scalar_t>
scalar_t hsum(const Vectorized<scalar_t>& v) {
  alignas(64) scalar_t buf[Vectorized<scalar_t>::size()];
  v.store(buf);
  scalar_t total = 0;
  for (int i = 0; i < Vectorized<scalar_t>::size(); ++i) total += buf[i];
  return total;
}

template <typename scalar_t, int MODE, bool INVERSE>
void fwd_rows(const scalar_t* x, const scalar_t* t, const scalar_t* s, scalar_t* out,
              scalar_t* ld_out, const scalar_t* ld_in, int64_t rows, int64_t n, scalar_t clamp) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vclamp(clamp);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      Vec acc(scalar_t(0));
      Vec logm;
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        const Vec o = affine_apply<MODE, INVERSE>(Vec::loadu(x + base + j), Vec::loadu(t + base + j),
                                                  Vec::loadu(s + base + j), vclamp, logm);
        o.store(out + base + j);
        acc = acc + logm;
      }
      if (j < n) {
        const int64_t rem = n - j;
        const Vec o = affine_apply<MODE, INVERSE>(Vec::loadu(x + base + j, rem), Vec::loadu(t + base + j, rem),
                                                  Vec::loadu(s + base + j, rem), vclamp, logm);
        o.store(out + base + j, rem);
        // Padding lanes hold s = 0, whose log m is not 0 for "sigmoid": keep them out of the sum.
        acc = acc + Vec::set(Vec(scalar_t(0)), logm, rem);
      }
      const scalar_t row = hsum(acc);
      ld_out[r] = (ld_in ? ld_in[r] : scalar_t(0)) + (INVERSE ? -row : row);
    }
  });
}

template <typename scalar_t, int MODE, bool INVERSE>
void bwd_rows(const scalar_t* g, const scalar_t* gld, const scalar_t* saved, const scalar_t* s,
              scalar_t* grad_in, scalar_t* grad_s, int64_t rows, int64_t n, scalar_t clamp) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const Vec vclamp(clamp);
  at::parallel_for(0, rows, row_grain(n), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      const Vec vgld(gld ? gld[r] : scalar_t(0));
      Vec gi, gs;
      int64_t j = 0;
      for (; j + W <= n; j += W) {
        affine_backward<MODE, INVERSE>(Vec::loadu(g + base + j), vgld, Vec::loadu(saved + base + j),
                                       Vec::loadu(s + base + j), vclamp, gi, gs);
        gi.store(grad_in + base + j);
        gs.store(grad_s + base + j);
      }
      if (j < n) {
        const int64_t rem = n - j;
        affine_backward<MODE, INVERSE>(Vec::loadu(g + base + j, rem), vgld, Vec::loadu(saved + base + j, rem),
                                       Vec::loadu(s + base + j, rem), vclamp, gi, gs);
        gi.store(grad_in + base + j, rem);
        gs.store(grad_s + base + j, rem);
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> affine_coupling_fwd(const at::Tensor& x, const at::Tensor& shift,
                                                       const at::Tensor& scale_raw, int64_t mode, double clamp,
                                                       bool inverse, const std::optional<at::Tensor>& logdet) {
  check_affine_inputs(x, shift, scale_raw, logdet);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "flowkern: the CPU affine_coupling kernel takes float32 or float64, got ", x.scalar_type());
  const int64_t rows = x.size(0);
  const int64_t n = rows == 0 ? 0 : x.numel() / rows;
  auto out = at::empty_like(x);
  auto ld = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flowkern_affine_coupling_fwd_cpu", [&] {
    const scalar_t* ld_in = logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr;
    dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
      fwd_rows<scalar_t, decltype(mode_c)::value, decltype(inv_c)::value>(
          x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale_raw.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), ld.data_ptr<scalar_t>(), ld_in, rows, n, static_cast<scalar_t>(clamp));
    });
  });
  return {out, ld};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(const at::Tensor& grad_out,
                                                       const std::optional<at::Tensor>& grad_logdet,
                                                       const at::Tensor& saved, const at::Tensor& scale_raw,
                                                       int64_t mode, double clamp, bool inverse) {
  check_affine_inputs(saved, grad_out, scale_raw, grad_logdet);
  TORCH_CHECK(saved.scalar_type() == at::kFloat || saved.scalar_type() == at::kDouble,
              "flowkern: the CPU affine_coupling kernel takes float32 or float64, got ", saved.scalar_type());
  const int64_t rows = saved.size(0);
  const int64_t n = rows == 0 ? 0 : saved.numel() / rows;
  auto grad_in = at::empty_like(saved);
  auto grad_s = at::empty_like(saved);
  AT_DISPATCH_FLOATING_TYPES(saved.scalar_type(), "flowkern_affine_coupling_bwd_cpu", [&] {
    const scalar_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<scalar_t>() : nullptr;
    dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
      bwd_rows<scalar_t, decltype(mode_c)::value, decltype(inv_c)::value>(
          grad_out.data_ptr<scalar_t>(), gld, saved.data_ptr<scalar_t>(), scale_raw.data_ptr<scalar_t>(),
          grad_in.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(), rows, n, static_cast<scalar_t>(clamp));
    });
  });
  return {grad_in, grad_s};
}

}  // namespace cpu
}  // namespace flowkern
