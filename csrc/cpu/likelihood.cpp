// CPU launchers for the two ends of an image flow: the fused dequantize + logit of uint8
// pixels (math/dequantize_logit.h) and the standard-normal NLL of the latent
// (math/gaussian_nll.h). Rows in parallel (at::parallel_for), each row one SIMD pass
// (at::vec::Vectorized) with its log-det / NLL reduced in registers and written once: a row's
// result never depends on the thread count. Built with the host's vector ISA flags (setup.py).
//
// The pixels (and the counter noise) are staged a block at a time into small stack buffers by
// plain loops that the compiler vectorizes (uint8 -> float widening; SplitMix64's 64-bit
// multiplies), then the block goes through the math header's templates as Vectorized values.
#include "vec_math.h"

#include <algorithm>
#include <cstring>
#include <limits>

namespace flowkern {
namespace math {

// Vectorized overloads of the helpers math/dequantize_logit.h declares for scalars; seen
// before the header's templates, like vec_math.h's.
// Natural log of float32 lanes: Cephes' logf (the mantissa reduced to [sqrt(1/2), sqrt(2)), a
// degree-8 polynomial; under 1 ulp measured over [1e-7, 4]), some 3x cheaper than Sleef's u10 log
// on the CPUs measured: the forward spends most of its time in logs. A vector with any lane
// outside the positive normal range (0, subnormal, inf, NaN, negative) goes to Sleef whole.
inline at::vec::Vectorized<float> dq_log(const at::vec::Vectorized<float>& x) {
  using Vec = at::vec::Vectorized<float>;
  using IVec = at::vec::Vectorized<int32_t>;
  const Vec normal = (x >= Vec(std::numeric_limits<float>::min())) & (x <= Vec(std::numeric_limits<float>::max()));
  if (normal.zero_mask() != 0) return x.log();
  const IVec bits = at::vec::cast<int32_t>(x);
  // k = the exponent that brings x's mantissa into [sqrt(1/2), sqrt(2)) (0x3F3504F3 = sqrt(1/2)).
  const IVec k = (bits - IVec(0x3F3504F3)) >> IVec(23);
  const Vec f = at::vec::cast<float>(bits - (k << IVec(23))) - Vec(1.0f);  // exact (Sterbenz)
  const Vec e = at::vec::convert_to_fp_of_same_size<float>(k);
  // The polynomial by Estrin's scheme (a tree of depth 4 instead of Horner's chain of 9): the
  // kernel is bound by this latency.
  const Vec z = f * f;
  const Vec z2 = z * z;
  const Vec a0 = at::vec::fmadd(f, Vec(-2.4999993993e-1f), Vec(3.3333331174e-1f));
  const Vec a1 = at::vec::fmadd(f, Vec(-1.6668057665e-1f), Vec(2.0000714765e-1f));
  const Vec a2 = at::vec::fmadd(f, Vec(-1.2420140846e-1f), Vec(1.4249322787e-1f));
  const Vec a3 = at::vec::fmadd(f, Vec(-1.1514610310e-1f), Vec(1.1676998740e-1f));
  const Vec b0 = at::vec::fmadd(a1, z, a0);
  const Vec b1 = at::vec::fmadd(a3, z, a2);
  const Vec p = at::vec::fmadd(z2, at::vec::fmadd(z2, Vec(7.0376836292e-2f), b1), b0);
  Vec y = p * (f * z);
  y = at::vec::fmadd(e, Vec(-2.12194440e-4f), y);  // ln 2 = 0.693359375 - 2.12194440e-4 (+ tiny)
  y = at::vec::fmadd(z, Vec(-0.5f), y);
  return at::vec::fmadd(e, Vec(0.693359375f), f + y);
}
inline at::vec::Vectorized<double> dq_log(const at::vec::Vectorized<double>& x) { return x.log(); }
// The largest value below top (>= 1, positive normal): its bit pattern minus one.
inline at::vec::Vectorized<float> dq_below(const at::vec::Vectorized<float>& top) {
  using namespace at::vec;
  return cast<float>(cast<int32_t>(top) - Vectorized<int32_t>(1));
}
inline at::vec::Vectorized<double> dq_below(const at::vec::Vectorized<double>& top) {
  using namespace at::vec;
  return cast<double>(cast<int64_t>(top) - Vectorized<int64_t>(1));
}
// clamp(p, 0, 255); at::vec's minimum/maximum propagate NaN, as the scalar version does.
template <typename T>
inline at::vec::Vectorized<T> dq_clamp_pixel(const at::vec::Vectorized<T>& p) {
  using Vec = at::vec::Vectorized<T>;
  return at::vec::minimum(at::vec::maximum(p, Vec(T(0))), Vec(T(255)));
}

}  // namespace math
}  // namespace flowkern

#include "../math/dequantize_logit.h"
#include "../math/gaussian_nll.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

namespace flowkern {
namespace cpu {
namespace {

using at::vec::Vectorized;
using namespace flowkern::math;

// Elements staged per block: four vectors, one accumulator each (more adds in flight, and a
// shorter chain per accumulator for float32 accuracy).
template <typename scalar_t>
constexpr int64_t kBlock = 4 * Vectorized<scalar_t>::size();

// Pixels [i0, i0 + len) of a row block as scalar_t.
template <typename scalar_t>
inline void stage_pixels(const uint8_t* x, int64_t i0, int64_t len, scalar_t* out) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k] = static_cast<scalar_t>(x[i0 + k]);
}

// The counter noise of flat elements [i0, i0 + len).
template <typename scalar_t>
inline void stage_counter_noise(uint64_t seed, int64_t i0, int64_t len, scalar_t* out) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) out[k] = counter_uniform<scalar_t>(seed, static_cast<uint64_t>(i0 + k));
}

// `v` with its lanes from `lanes` on zeroed: padding lanes of a row's tail must not count.
template <typename scalar_t>
inline Vectorized<scalar_t> head(const Vectorized<scalar_t>& v, int64_t lanes) {
  using Vec = Vectorized<scalar_t>;
  return lanes == Vec::size() ? v : Vec::set(Vec(scalar_t(0)), v, lanes);
}

template <typename scalar_t>
inline scalar_t sum_accumulators(const Vectorized<scalar_t> (&acc)[4]) {
  return hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
}

// The row sum of log p, p = v' (1 - v') in (0, 1/4], for the forward's log-det.
// float: one log per kLogGroup vectors instead of one per element. Each p splits into its
// exponent (summed exactly, as int32) and its mantissa in [1, 2), multiplied into a running
// product (8 of them stay below 2^8); a group's log is the log of that product. A vector with
// a lane outside the normal range (alpha = 0 at a cell edge: p = 0 or subnormal; NaN) takes its
// logs directly. Padding lanes must hold p = 1.
constexpr int kLogGroup = 8;

template <typename scalar_t>
struct LogProductSum {  // double: plain logs (float64 is for accuracy, not speed)
  Vectorized<scalar_t> logs{scalar_t(0)};
  void add(const Vectorized<scalar_t>& p) { logs = logs + dq_log(p); }
  double total() { return hsum(logs); }
};

template <>
struct LogProductSum<float> {
  using Vec = Vectorized<float>;
  using IVec = Vectorized<int32_t>;
  Vec logs{0.0f}, mantissas{1.0f};
  IVec exponents{0};
  int pending = 0;
  // The int32 lanes hold at most kExponentFold exponents (|e| <= 126) before they are folded
  // into an int64: a row of 2e8 elements would overflow them (and the int32 sum of the lanes).
  static constexpr int64_t kExponentFold = int64_t(1) << 20;
  int64_t exponent_total = 0, exponent_adds = 0;

  void fold_exponents() {
    alignas(64) int32_t lanes[IVec::size()];
    exponents.store(lanes);
    for (int i = 0; i < IVec::size(); ++i) exponent_total += lanes[i];
    exponents = IVec(0);
    exponent_adds = 0;
  }

  void add(const Vec& p) {
    if ((p >= Vec(std::numeric_limits<float>::min())).zero_mask() != 0) {
      logs = logs + dq_log(p);
      return;
    }
    const IVec bits = at::vec::cast<int32_t>(p);
    exponents = exponents + ((bits >> IVec(23)) - IVec(127));
    if (++exponent_adds == kExponentFold) fold_exponents();
    mantissas = mantissas * at::vec::cast<float>((bits & IVec(0x007FFFFF)) | IVec(0x3F800000));
    if (++pending == kLogGroup) flush();
  }
  void flush() {
    if (pending) logs = logs + dq_log(mantissas);
    mantissas = Vec(1.0f);
    pending = 0;
  }
  double total() {
    flush();
    fold_exponents();
    return static_cast<double>(hsum(logs)) + static_cast<double>(exponent_total) * kLn2;
  }
};

template <typename scalar_t, bool COUNTER>
void dequantize_logit_fwd_rows(const uint8_t* x, const scalar_t* noise, uint64_t seed, scalar_t* y,
                               scalar_t* ld_out, const scalar_t* ld_in, int64_t rows, int64_t n, double alpha) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t B = kBlock<scalar_t>;
  const double scale = 1.0 - 2.0 * alpha;
  const Vec valpha(static_cast<scalar_t>(alpha)), vscale(static_cast<scalar_t>(scale));
  // -D log 256 + D log c: the per-element terms left are -log(v' (1 - v')).
  const double row_const = static_cast<double>(n) * (std::log(scale) - kLogPixelLevels);
  at::parallel_for(0, rows, row_grain(n, 16384), [&](int64_t r0, int64_t r1) {
    alignas(64) scalar_t pix[B];
    alignas(64) scalar_t ubuf[B];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      LogProductSum<scalar_t> log_products;
      for (int64_t j = 0; j < n; j += B) {
        const int64_t len = std::min<int64_t>(B, n - j);
        const int64_t i0 = base + j;
        stage_pixels(x, i0, len, pix);
        const scalar_t* u;
        if constexpr (COUNTER) {
          stage_counter_noise(seed, i0, len, ubuf);
          u = ubuf;
        } else {
          u = noise + i0;
        }
        for (int64_t q = 0; q < len; q += W) {
          const int64_t lanes = std::min<int64_t>(W, len - q);
          Vec lo, hi;
          dequantize_logit_odds(Vec::loadu(pix + q, lanes), Vec::loadu(u + q, lanes), valpha, vscale, lo, hi);
          dequantize_logit_from_odds(lo, hi).store(y + i0 + q, lanes);
          const Vec p = lo * hi;
          log_products.add(lanes == W ? p : Vec::set(Vec(scalar_t(1)), p, lanes));
        }
      }
      const double prev = ld_in ? static_cast<double>(ld_in[r]) : 0.0;
      ld_out[r] = static_cast<scalar_t>(prev + (row_const - log_products.total()));
    }
  });
}

template <typename scalar_t>
void dequantize_logit_bwd_rows(const scalar_t* g, const scalar_t* gld, const uint8_t* x, const scalar_t* noise,
                               scalar_t* grad_noise, int64_t rows, int64_t n, double alpha) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t B = kBlock<scalar_t>;
  const Vec valpha(static_cast<scalar_t>(alpha)), vscale(static_cast<scalar_t>(1.0 - 2.0 * alpha));
  at::parallel_for(0, rows, row_grain(n, 16384), [&](int64_t r0, int64_t r1) {
    alignas(64) scalar_t pix[B];
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      const Vec vgld(gld ? gld[r] : scalar_t(0));
      for (int64_t j = 0; j < n; j += B) {
        const int64_t len = std::min<int64_t>(B, n - j);
        const int64_t i0 = base + j;
        stage_pixels(x, i0, len, pix);
        for (int64_t q = 0; q < len; q += W) {
          const int64_t lanes = std::min<int64_t>(W, len - q);
          const int64_t i = i0 + q;
          // Padding lanes (x = u = g = 0) stay finite for alpha > 0 and are never stored.
          dequantize_logit_backward(Vec::loadu(pix + q, lanes), Vec::loadu(noise + i, lanes), valpha, vscale,
                                    Vec::loadu(g + i, lanes), vgld)
              .store(grad_noise + i, lanes);
        }
      }
    }
  });
}

template <typename scalar_t>
void dequantize_logit_inv_rows(const scalar_t* y, scalar_t* pixels, scalar_t* ld_out, const scalar_t* ld_in,
                               int64_t rows, int64_t n, double alpha) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t B = kBlock<scalar_t>;
  const double scale = 1.0 - 2.0 * alpha;
  const Vec valpha(static_cast<scalar_t>(alpha)), vscale(static_cast<scalar_t>(scale));
  const scalar_t row_const = static_cast<scalar_t>(static_cast<double>(n) * (kLogPixelLevels - std::log(scale)));
  at::parallel_for(0, rows, row_grain(n, 16384), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      Vec acc[4] = {Vec(scalar_t(0)), Vec(scalar_t(0)), Vec(scalar_t(0)), Vec(scalar_t(0))};
      for (int64_t j = 0; j < n; j += B) {
        const int64_t len = std::min<int64_t>(B, n - j);
        for (int64_t q = 0, a = 0; q < len; q += W, ++a) {
          const int64_t lanes = std::min<int64_t>(W, len - q);
          const int64_t i = base + j + q;
          Vec pixel, term;
          dequantize_logit_inverse(Vec::loadu(y + i, lanes), valpha, vscale, pixel, term);
          pixel.store(pixels + i, lanes);
          acc[a] = acc[a] + head(term, lanes);
        }
      }
      ld_out[r] = (ld_in ? ld_in[r] : scalar_t(0)) + (row_const + sum_accumulators(acc));
    }
  });
}

template <typename scalar_t>
void gaussian_nll_fwd_rows(const scalar_t* z, const scalar_t* ld_in, scalar_t* nll, int64_t rows, int64_t n,
                           bool bits) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  constexpr int64_t B = kBlock<scalar_t>;
  at::parallel_for(0, rows, row_grain(n, 32768), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* zr = z + r * n;
      Vec acc[4] = {Vec(scalar_t(0)), Vec(scalar_t(0)), Vec(scalar_t(0)), Vec(scalar_t(0))};
      int64_t j = 0;
      for (; j + B <= n; j += B) {
        for (int a = 0; a < 4; ++a) {
          const Vec v = Vec::loadu(zr + j + a * W);
          acc[a] = at::vec::fmadd(v, v, acc[a]);
        }
      }
      for (int a = 0; j < n; j += W, ++a) {
        const Vec v = Vec::loadu(zr + j, std::min<int64_t>(W, n - j));  // zero-filled past the row
        acc[a] = at::vec::fmadd(v, v, acc[a]);
      }
      nll[r] = gaussian_nll_from_sumsq(sum_accumulators(acc), ld_in ? ld_in[r] : scalar_t(0), n, bits);
    }
  });
}

template <typename scalar_t>
void gaussian_nll_bwd_rows(const scalar_t* g, const scalar_t* z, scalar_t* grad_z, int64_t rows, int64_t n,
                           bool bits) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  at::parallel_for(0, rows, row_grain(n, 32768), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const Vec k(gaussian_nll_grad_factor(g[r], n, bits));
      for (int64_t j = r * n, end = (r + 1) * n; j < end; j += W) {
        const int64_t lanes = std::min<int64_t>(W, end - j);
        (k * Vec::loadu(z + j, lanes)).store(grad_z + j, lanes);
      }
    }
  });
}

void check_cpu_dtype(const char* op, at::ScalarType t) {
  TORCH_CHECK(t == at::kFloat || t == at::kDouble, "flowkern: the CPU ", op,
              " kernel computes in float32 or float64, got ", t, " (flowkern.ops upcasts half types)");
}

int64_t per_row(const at::Tensor& t) { return t.size(0) == 0 ? 0 : t.numel() / t.size(0); }

}  // namespace

std::tuple<at::Tensor, at::Tensor> dequantize_logit_fwd(const at::Tensor& x, const std::optional<at::Tensor>& noise,
                                                        int64_t seed, double alpha, at::ScalarType dtype,
                                                        const std::optional<at::Tensor>& logdet) {
  check_dequantize_pixels(x);
  check_dequantize_alpha(alpha);
  check_cpu_dtype("dequantize_logit", dtype);
  if (noise.has_value()) check_dequantize_like("noise", *noise, x, dtype, dtype);
  check_per_row(logdet, x.size(0), dtype, x.device());
  const int64_t rows = x.size(0), n = per_row(x);
  auto y = at::empty(x.sizes(), x.options().dtype(dtype));
  auto ld = at::empty({rows}, x.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES(dtype, "flowkern_dequantize_logit_fwd_cpu", [&] {
    const scalar_t* ld_in = logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr;
    const uint64_t useed = static_cast<uint64_t>(seed);  // two's complement bits
    if (noise.has_value())
      dequantize_logit_fwd_rows<scalar_t, false>(x.data_ptr<uint8_t>(), noise->data_ptr<scalar_t>(), useed,
                                                 y.data_ptr<scalar_t>(), ld.data_ptr<scalar_t>(), ld_in, rows, n,
                                                 alpha);
    else
      dequantize_logit_fwd_rows<scalar_t, true>(x.data_ptr<uint8_t>(), nullptr, useed, y.data_ptr<scalar_t>(),
                                                ld.data_ptr<scalar_t>(), ld_in, rows, n, alpha);
  });
  return {y, ld};
}

at::Tensor dequantize_logit_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet,
                                const at::Tensor& x, const at::Tensor& noise, double alpha) {
  check_dequantize_pixels(x);
  check_dequantize_alpha(alpha);
  check_cpu_dtype("dequantize_logit", noise.scalar_type());
  check_dequantize_like("noise", noise, x, noise.scalar_type(), noise.scalar_type());
  check_dequantize_like("grad_out", grad_out, x, noise.scalar_type(), noise.scalar_type());
  check_per_row(grad_logdet, x.size(0), noise.scalar_type(), x.device());
  auto grad_noise = at::empty_like(noise);
  AT_DISPATCH_FLOATING_TYPES(noise.scalar_type(), "flowkern_dequantize_logit_bwd_cpu", [&] {
    dequantize_logit_bwd_rows<scalar_t>(grad_out.data_ptr<scalar_t>(),
                                        grad_logdet.has_value() ? grad_logdet->data_ptr<scalar_t>() : nullptr,
                                        x.data_ptr<uint8_t>(), noise.data_ptr<scalar_t>(),
                                        grad_noise.data_ptr<scalar_t>(), x.size(0), per_row(x), alpha);
  });
  return grad_noise;
}

std::tuple<at::Tensor, at::Tensor> dequantize_logit_inv(const at::Tensor& y, double alpha,
                                                        const std::optional<at::Tensor>& logdet) {
  TORCH_CHECK(y.dim() >= 1 && y.is_contiguous(), "flowkern: dequantize_logit_inv takes contiguous y (B, ...)");
  check_dequantize_alpha(alpha);
  check_cpu_dtype("dequantize_logit_inv", y.scalar_type());
  check_per_row(logdet, y.size(0), y.scalar_type(), y.device());
  const int64_t rows = y.size(0);
  auto pixels = at::empty_like(y);
  auto ld = at::empty({rows}, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "flowkern_dequantize_logit_inv_cpu", [&] {
    dequantize_logit_inv_rows<scalar_t>(y.data_ptr<scalar_t>(), pixels.data_ptr<scalar_t>(), ld.data_ptr<scalar_t>(),
                                        logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr, rows,
                                        per_row(y), alpha);
  });
  return {pixels, ld};
}

at::Tensor gaussian_nll_fwd(const at::Tensor& z, const std::optional<at::Tensor>& logdet, bool bits) {
  check_gaussian_nll_z(z);
  check_cpu_dtype("gaussian_nll", z.scalar_type());
  check_per_row(logdet, z.size(0), logdet_dtype(z.scalar_type()), z.device());
  auto nll = at::empty({z.size(0)}, z.options());
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "flowkern_gaussian_nll_fwd_cpu", [&] {
    gaussian_nll_fwd_rows<scalar_t>(z.data_ptr<scalar_t>(),
                                    logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr,
                                    nll.data_ptr<scalar_t>(), z.size(0), per_row(z), bits);
  });
  return nll;
}

at::Tensor gaussian_nll_bwd(const at::Tensor& grad, const at::Tensor& z, bool bits) {
  check_gaussian_nll_z(z);
  check_cpu_dtype("gaussian_nll", z.scalar_type());
  check_per_row("gaussian_nll grad", grad, z.size(0), logdet_dtype(z.scalar_type()), z.device());
  auto grad_z = at::empty_like(z);
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "flowkern_gaussian_nll_bwd_cpu", [&] {
    gaussian_nll_bwd_rows<scalar_t>(grad.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(),
                                    z.size(0), per_row(z), bits);
  });
  return grad_z;
}

}  // namespace cpu
}  // namespace flowkern

TORCH_LIBRARY_IMPL(flowkern, CPU, m) {
  m.impl("dequantize_logit_fwd", &flowkern::cpu::dequantize_logit_fwd);
  m.impl("dequantize_logit_bwd", &flowkern::cpu::dequantize_logit_bwd);
  m.impl("dequantize_logit_inv", &flowkern::cpu::dequantize_logit_inv);
  m.impl("gaussian_nll_fwd", &flowkern::cpu::gaussian_nll_fwd);
  m.impl("gaussian_nll_bwd", &flowkern::cpu::gaussian_nll_bwd);
}
