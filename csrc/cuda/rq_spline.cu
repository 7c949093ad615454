// CUDA launchers for the rational-quadratic spline over the math in math/rq_spline.h: one
// thread per element, reading its 3K - 1 params straight from global memory (a warp's params
// are one contiguous span, so the repeated reads of the softmax passes hit L1).
// Forward/inverse: one block per row, threads stride over the row, each keeps its part of the
// row's log-det in a register, a warp-shuffle + shared-memory reduction writes it once
// (deterministic: no atomics). Backward: a flat grid-stride loop, purely elementwise.
// fp16/bf16 are loaded, computed in fp32 (at::opmath_type) and stored back. The per-thread
// softmax scratch (2 x 64 values) lives in local memory, of which only K values are touched.
#include "../math/rq_spline.h"
#include "../ops.h"
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace flowkern {
namespace cuda {
namespace {

using namespace flowkern::math;

template <typename scalar_t, typename acc_t, bool INVERSE>
__global__ void rq_spline_fwd_kernel(const scalar_t* __restrict__ x,       // (rows, n)
                                     const scalar_t* __restrict__ params,  // (rows, n, params per element)
                                     scalar_t* __restrict__ out,           // (rows, n)
                                     acc_t* __restrict__ ld_out, const acc_t* __restrict__ ld_in,  // (rows,)
                                     int64_t n,  // elements per row = row stride of x and out
                                     int bins, RqInterval<acc_t> iv, RqStyle st) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  const int np = rq_params_per_element(bins, st.learned_ends);
  acc_t sx[kRqMaxBins], sy[kRqMaxBins];
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const scalar_t* p = params + (base + j) * np;
    const auto u = [p](int i) { return static_cast<acc_t>(p[i]); };
    acc_t o, ld;
    rq_spline_forward<INVERSE>(static_cast<acc_t>(x[base + j]), u, bins, iv, st, sx, sy, o, ld);
    out[base + j] = static_cast<scalar_t>(o);
    acc += ld;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) ld_out[blockIdx.x] = (ld_in ? ld_in[blockIdx.x] : acc_t(0)) + acc;
}

template <typename scalar_t, typename acc_t, bool INVERSE>
__global__ void rq_spline_bwd_kernel(const scalar_t* __restrict__ g,    // (numel,) dL/d(out)
                                     const acc_t* __restrict__ gld,     // (rows,) dL/d(logdet), or null
                                     const scalar_t* __restrict__ x,    // (numel,) the op's input
                                     const scalar_t* __restrict__ params,  // (numel, params per element)
                                     scalar_t* __restrict__ grad_x,     // (numel,)
                                     scalar_t* __restrict__ grad_params,   // (numel, params per element)
                                     int64_t numel, int64_t n,  // n: elements per row, maps index -> row
                                     int bins, RqInterval<acc_t> iv, RqStyle st) {
  const int np = rq_params_per_element(bins, st.learned_ends);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  acc_t sx[kRqMaxBins], sy[kRqMaxBins];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const scalar_t* p = params + i * np;
    scalar_t* gp = grad_params + i * np;
    const auto u = [p](int k) { return static_cast<acc_t>(p[k]); };
    const auto store = [gp](int k, acc_t value) { gp[k] = static_cast<scalar_t>(value); };
    const acc_t row_gld = gld ? gld[i / n] : acc_t(0);
    acc_t gi;
    rq_spline_backward<INVERSE>(static_cast<acc_t>(g[i]), row_gld, static_cast<acc_t>(x[i]), u, bins, iv, st, sx,
                                sy, gi, store);
    grad_x[i] = static_cast<scalar_t>(gi);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> rq_spline_fwd(const at::Tensor& x, const at::Tensor& params, int64_t bins,
                                                 double lo, double hi, bool inverse,
                                                 const std::optional<at::Tensor>& logdet, double min_width,
                                                 double min_height, double min_derivative, bool exp_derivative,
                                                 double log_slope, bool learned_ends) {
  const RqStyle st = check_rq_spline(x, x, params, bins, lo, hi, logdet, min_width, min_height, min_derivative,
                                     exp_derivative, log_slope, learned_ends);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t n = rows == 0 ? 0 : x.numel() / rows;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "flowkern: too many rows for one launch");
  auto out = at::empty_like(x);
  auto ld = at::empty({rows}, x.options().dtype(logdet_dtype(x.scalar_type())));
  if (rows == 0) return {out, ld};
  // Narrow rows get narrow blocks (a multiple of a warp, as block_sum needs).
  const int threads = static_cast<int>(std::min<int64_t>(kThreads, std::max<int64_t>(32, (n + 31) / 32 * 32)));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flowkern_rq_spline_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ld_in = logdet.has_value() ? logdet->data_ptr<acc_t>() : nullptr;
    auto run = [&](auto inv_c) {
      rq_spline_fwd_kernel<scalar_t, acc_t, decltype(inv_c)::value><<<static_cast<unsigned>(rows), threads, 0, stream>>>(
          x.data_ptr<scalar_t>(), params.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), ld.data_ptr<acc_t>(), ld_in,
          n, static_cast<int>(bins), RqInterval<acc_t>{static_cast<acc_t>(lo), static_cast<acc_t>(hi)}, st);
    };
    if (inverse) run(std::true_type{});
    else run(std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
  const c10::cuda::CUDAGuard guard(x_in.device());
  const int64_t rows = x_in.size(0);
  const int64_t numel = x_in.numel();
  const int64_t n = rows == 0 ? 0 : numel / rows;
  auto grad_x = at::empty_like(x_in);
  auto grad_params = at::empty_like(params);
  if (numel == 0) return {grad_x, grad_params};
  const int64_t sms = multiprocessor_count(x_in.get_device());
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, sms * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_in.scalar_type(), "flowkern_rq_spline_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<acc_t>() : nullptr;
    auto run = [&](auto inv_c) {
      rq_spline_bwd_kernel<scalar_t, acc_t, decltype(inv_c)::value><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          grad_out.data_ptr<scalar_t>(), gld, x_in.data_ptr<scalar_t>(), params.data_ptr<scalar_t>(),
          grad_x.data_ptr<scalar_t>(), grad_params.data_ptr<scalar_t>(), numel, n, static_cast<int>(bins),
          RqInterval<acc_t>{static_cast<acc_t>(lo), static_cast<acc_t>(hi)}, st);
    };
    if (inverse) run(std::true_type{});
    else run(std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_x, grad_params};
}

}  // namespace cuda
}  // namespace flowkern
