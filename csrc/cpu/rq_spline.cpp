// CPU launchers for the rational-quadratic spline: rows in parallel (at::parallel_for), each
// row in groups of Vectorized<scalar_t>::size() elements over the math in math/rq_spline.h,
// one element per SIMD lane. Built with the host's vector ISA flags (setup.py).
//
// Params are element-major (3K - 1 per element); a lane needs parameter i of its own element,
// so each group's block is transposed into a small param-major stack buffer first, and the
// backward's parameter gradients are transposed back into place.
// The row's log-det is reduced in registers and written once.
#include "vec_math.h"

#include <algorithm>
#include <type_traits>

namespace flowkern {
namespace math {

std::true_type rq_exact_cumsum(const at::vec::Vectorized<float>&);
std::false_type rq_exact_cumsum(const at::vec::Vectorized<double>&);

// Sum of e[0..n) in the order of torch's vec::reduce_all (its softmax's denominator), lane by
// lane: in order below one vector's width; else per-lane partial sums, then combined in order,
// or, for float on AVX2/AVX-512, by the halving shuffles of its VecReduceAllSIMD.
template <typename T>
inline at::vec::Vectorized<T> rq_row_sum(const at::vec::Vectorized<T>* e, int n) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int W = Vec::size();
  if (n < W) {
    Vec sum = e[0];
    for (int i = 1; i < n; ++i) sum = sum + e[i];
    return sum;
  }
  Vec part[W];
  for (int l = 0; l < W; ++l) part[l] = e[l];
  for (int i = W; i < n; ++i) part[i % W] = part[i % W] + e[i];
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
  constexpr bool kTree = std::is_same_v<T, float>;
#else
  constexpr bool kTree = false;
#endif
  if constexpr (kTree) {
    for (int step = W / 2; step >= 1; step /= 2)
      for (int l = 0; l < step; ++l) part[l] = part[l] + part[l + step];
    return part[0];
  } else {
    Vec sum = part[0];
    for (int l = 1; l < W; ++l) sum = sum + part[l];
    return sum;
  }
}

}  // namespace math
}  // namespace flowkern

#include "../math/rq_spline.h"
#include "../ops.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

// GCC 12 flags the AVX-512 unpack/shuffle intrinsics' internal undefined pass-through operand
// wherever transpose16 is inlined (a false positive of its own headers): nothing is read
// uninitialized here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

namespace flowkern {
namespace cpu {
namespace {

using at::vec::Vectorized;
using namespace flowkern::math;

#if defined(CPU_CAPABILITY_AVX512)
// In-register transpose of a 16 x 16 float block (r[i] = row i in, column i out).
inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int k = 0; k < 8; ++k) {
    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 4; ++k) {
    const __m512d a = _mm512_castps_pd(t[4 * k]), b = _mm512_castps_pd(t[4 * k + 2]);
    const __m512d c = _mm512_castps_pd(t[4 * k + 1]), d = _mm512_castps_pd(t[4 * k + 3]);
    r[4 * k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
    r[4 * k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
    r[4 * k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
    r[4 * k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
  }
  for (int k = 0; k < 4; ++k) {
    t[k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88);
    t[4 + k] = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xdd);
    t[8 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88);
    t[12 + k] = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xdd);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0x88);
    r[4 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0x88);
    r[8 + k] = _mm512_shuffle_f32x4(t[k], t[8 + k], 0xdd);
    r[12 + k] = _mm512_shuffle_f32x4(t[4 + k], t[12 + k], 0xdd);
  }
}
#endif

#if defined(CPU_CAPABILITY_AVX2)
// In-register transpose of an 8 x 8 float block (r[i] = row i in, column i out).
inline void transpose8(__m256 r[8]) {
  __m256 t[8], u[8];
  for (int k = 0; k < 4; ++k) {
    t[2 * k] = _mm256_unpacklo_ps(r[2 * k], r[2 * k + 1]);
    t[2 * k + 1] = _mm256_unpackhi_ps(r[2 * k], r[2 * k + 1]);
  }
  for (int k = 0; k < 2; ++k) {
    u[4 * k] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0x44);
    u[4 * k + 1] = _mm256_shuffle_ps(t[4 * k], t[4 * k + 2], 0xee);
    u[4 * k + 2] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0x44);
    u[4 * k + 3] = _mm256_shuffle_ps(t[4 * k + 1], t[4 * k + 3], 0xee);
  }
  for (int k = 0; k < 4; ++k) {
    r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
    r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
  }
}

// Lanes [0, n) of an AVX2 mask register (n in [0, 8]).
inline __m256i lanes_mask8(int n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif

// src: the group's `lanes` elements' params, element-major (np each); dst[i * W + lane] =
// param i of lane. float on AVX-512: 16 x 16 register transposes (2x faster than ATen's
// transpose_mxn here, 8x faster than gathers); float on AVX2: 8 x 8 ones, with masked loads
// and stores at a row's end; else scalar copies. Lanes past `lanes` keep whatever the buffer
// held (finite: earlier params or zeros); their results are never stored.
template <typename scalar_t>
void load_params(const scalar_t* src, int64_t lanes, int np, scalar_t* dst) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int i0 = 0; i0 < np; i0 += 16) {
      const __mmask16 cols = static_cast<__mmask16>((1u << std::min(16, np - i0)) - 1);
      __m512 r[16];
      for (int64_t e = 0; e < 16; ++e)
        r[e] = e < lanes ? _mm512_maskz_loadu_ps(cols, src + e * np + i0) : _mm512_setzero_ps();
      transpose16(r);
      for (int c = 0; c < std::min(16, np - i0); ++c) _mm512_store_ps(dst + (i0 + c) * W, r[c]);
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int i0 = 0; i0 < np; i0 += 8) {
      const int n_cols = std::min(8, np - i0);
      const __m256i cols = lanes_mask8(n_cols);
      __m256 r[8];
      for (int64_t e = 0; e < 8; ++e) {
        const float* row = src + e * np + i0;
        r[e] = e >= lanes ? _mm256_setzero_ps() : n_cols == 8 ? _mm256_loadu_ps(row) : _mm256_maskload_ps(row, cols);
      }
      transpose8(r);
      for (int c = 0; c < n_cols; ++c) _mm256_store_ps(dst + (i0 + c) * W, r[c]);
    }
    return;
  }
#endif
  for (int64_t e = 0; e < lanes; ++e)
    for (int i = 0; i < np; ++i) dst[i * W + e] = src[e * np + i];
}

// The inverse of load_params for the first `lanes` lanes.
template <typename scalar_t>
void store_params(const scalar_t* src, int64_t lanes, int np, scalar_t* dst) {
  constexpr int64_t W = Vectorized<scalar_t>::size();
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int i0 = 0; i0 < np; i0 += 16) {
      const int n_cols = std::min(16, np - i0);
      const __mmask16 cols = static_cast<__mmask16>((1u << n_cols) - 1);
      __m512 r[16];
      for (int c = 0; c < 16; ++c) r[c] = c < n_cols ? _mm512_load_ps(src + (i0 + c) * W) : _mm512_setzero_ps();
      transpose16(r);
      for (int64_t e = 0; e < lanes; ++e) _mm512_mask_storeu_ps(dst + e * np + i0, cols, r[e]);
    }
    return;
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int i0 = 0; i0 < np; i0 += 8) {
      const int n_cols = std::min(8, np - i0);
      const __m256i cols = lanes_mask8(n_cols);
      __m256 r[8];
      for (int c = 0; c < 8; ++c) r[c] = c < n_cols ? _mm256_load_ps(src + (i0 + c) * W) : _mm256_setzero_ps();
      transpose8(r);
      for (int64_t e = 0; e < lanes; ++e) {
        float* row = dst + e * np + i0;
        if (n_cols == 8) _mm256_storeu_ps(row, r[e]);
        else _mm256_maskstore_ps(row, cols, r[e]);
      }
    }
    return;
  }
#endif
  for (int64_t e = 0; e < lanes; ++e)
    for (int i = 0; i < np; ++i) dst[e * np + i] = src[i * W + e];
}

template <typename scalar_t, bool INVERSE>
void fwd_rows(const scalar_t* x, const scalar_t* params, scalar_t* out, scalar_t* ld_out, const scalar_t* ld_in,
              int64_t rows, int64_t n, int bins, scalar_t lo, scalar_t hi, const RqStyle& st) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int np = rq_params_per_element(bins, st.learned_ends);
  const RqInterval<Vec> iv{Vec(lo), Vec(hi)};
  at::parallel_for(0, rows, row_grain(n, 4096), [&](int64_t r0, int64_t r1) {
    alignas(64) scalar_t pbuf[kRqMaxParams * W];
    std::fill_n(pbuf, np * W, scalar_t(0));
    Vec sx[kRqMaxBins], sy[kRqMaxBins];
    const auto u = [&](int i) { return Vec::loadu(pbuf + i * W); };
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      Vec acc(scalar_t(0));
      for (int64_t j = 0; j < n; j += W) {
        const int64_t lanes = std::min<int64_t>(W, n - j);
        const int64_t i = base + j;
        load_params(params + i * np, lanes, np, pbuf);
        Vec o, ld;
        rq_spline_forward<INVERSE>(Vec::loadu(x + i, lanes), u, bins, iv, st, sx, sy, o, ld);
        o.store(out + i, lanes);
        acc = acc + (lanes == W ? ld : Vec::set(Vec(scalar_t(0)), ld, lanes));
      }
      ld_out[r] = (ld_in ? ld_in[r] : scalar_t(0)) + hsum(acc);
    }
  });
}

template <typename scalar_t, bool INVERSE>
void bwd_rows(const scalar_t* g, const scalar_t* gld, const scalar_t* x, const scalar_t* params, scalar_t* grad_x,
              scalar_t* grad_params, int64_t rows, int64_t n, int bins, scalar_t lo, scalar_t hi, const RqStyle& st) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t W = Vec::size();
  const int np = rq_params_per_element(bins, st.learned_ends);
  const RqInterval<Vec> iv{Vec(lo), Vec(hi)};
  at::parallel_for(0, rows, row_grain(n, 4096), [&](int64_t r0, int64_t r1) {
    alignas(64) scalar_t pbuf[kRqMaxParams * W];
    alignas(64) scalar_t gbuf[kRqMaxParams * W];
    std::fill_n(pbuf, np * W, scalar_t(0));
    Vec sx[kRqMaxBins], sy[kRqMaxBins];
    const auto u = [&](int i) { return Vec::loadu(pbuf + i * W); };
    const auto store = [&](int i, const Vec& value) { value.store(gbuf + i * W); };
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t base = r * n;
      const Vec vgld(gld ? gld[r] : scalar_t(0));
      for (int64_t j = 0; j < n; j += W) {
        const int64_t lanes = std::min<int64_t>(W, n - j);
        const int64_t i = base + j;
        load_params(params + i * np, lanes, np, pbuf);
        Vec gi;
        rq_spline_backward<INVERSE>(Vec::loadu(g + i, lanes), vgld, Vec::loadu(x + i, lanes), u, bins, iv, st,
                                    sx, sy, gi, store);
        gi.store(grad_x + i, lanes);
        store_params(gbuf, lanes, np, grad_params + i * np);
      }
    }
  });
}

void check_cpu_dtype(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble,
              "flowkern: the CPU rq_spline kernel takes float32 or float64, got ", t.scalar_type());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rq_spline_fwd(const at::Tensor& x, const at::Tensor& params, int64_t bins,
                                                 double lo, double hi, bool inverse,
                                                 const std::optional<at::Tensor>& logdet, double min_width,
                                                 double min_height, double min_derivative, bool exp_derivative,
                                                 double log_slope, bool learned_ends) {
  const RqStyle st = check_rq_spline(x, x, params, bins, lo, hi, logdet, min_width, min_height, min_derivative,
                                     exp_derivative, log_slope, learned_ends);
  check_cpu_dtype(x);
  const int64_t rows = x.size(0);
  const int64_t n = rows == 0 ? 0 : x.numel() / rows;
  auto out = at::empty_like(x);
  auto ld = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "flowkern_rq_spline_fwd_cpu", [&] {
    const scalar_t* ld_in = logdet.has_value() ? logdet->data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto inv_c) {
      fwd_rows<scalar_t, decltype(inv_c)::value>(x.data_ptr<scalar_t>(), params.data_ptr<scalar_t>(),
                                                 out.data_ptr<scalar_t>(), ld.data_ptr<scalar_t>(), ld_in, rows, n,
                                                 static_cast<int>(bins), static_cast<scalar_t>(lo),
                                                 static_cast<scalar_t>(hi), st);
    };
    if (inverse) run(std::true_type{});
    else run(std::false_type{});
  });
  return {out, ld};
}

std::tuple<at::Tensor, at::Tensor> rq_spline_bwd(const at::Tensor& grad_out,
                                                 const std::optional<at::Tensor>& grad_logdet, const at::Tensor& x_in,
                                                 const at::Tensor& params, int64_t bins, double lo, double hi,
                                                 bool inverse, double min_width, double min_height,
                                                 double min_derivative, bool exp_derivative, double log_slope,
                                                 bool learned_ends) {
  const RqStyle st = check_rq_spline(x_in, grad_out, params, bins, lo, hi, grad_logdet, min_width, min_height,
                                     min_derivative, exp_derivative, log_slope, learned_ends);
  check_cpu_dtype(x_in);
  const int64_t rows = x_in.size(0);
  const int64_t n = rows == 0 ? 0 : x_in.numel() / rows;
  auto grad_x = at::empty_like(x_in);
  auto grad_params = at::empty_like(params);
  AT_DISPATCH_FLOATING_TYPES(x_in.scalar_type(), "flowkern_rq_spline_bwd_cpu", [&] {
    const scalar_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<scalar_t>() : nullptr;
    auto run = [&](auto inv_c) {
      bwd_rows<scalar_t, decltype(inv_c)::value>(grad_out.data_ptr<scalar_t>(), gld, x_in.data_ptr<scalar_t>(),
                                                 params.data_ptr<scalar_t>(), grad_x.data_ptr<scalar_t>(),
                                                 grad_params.data_ptr<scalar_t>(), rows, n, static_cast<int>(bins),
                                                 static_cast<scalar_t>(lo), static_cast<scalar_t>(hi), st);
    };
    if (inverse) run(std::true_type{});
    else run(std::false_type{});
  });
  return {grad_x, grad_params};
}

}  // namespace cpu
}  // namespace flowkern
