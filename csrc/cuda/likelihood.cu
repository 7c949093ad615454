// CUDA launchers for the fused dequantize + logit (math/dequantize_logit.h) and the
// standard-normal NLL (math/gaussian_nll.h), in one translation unit (nvcc is slow).
// Ops with a per-row reduction (dequantize forward and inverse, the NLL): one block per row,
// threads stride over the row, each keeps its part of the row's sum in a register, and
// block_sum (warp shuffles + one shared-memory pass, no atomics) writes it once, the same
// value run to run. Backwards are flat grid-stride loops, purely elementwise.
// fp16/bf16 are loaded, computed in fp32 (at::opmath_type) and stored back; the counter noise
// is generated in the kernel, so drawing it costs no memory traffic at all.
#include "../math/dequantize_logit.h"
#include "../math/gaussian_nll.h"
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace flowkern {
namespace cuda {
namespace {

using namespace flowkern::math;

template <typename scalar_t, typename noise_t, typename acc_t, bool COUNTER>
__global__ void dequantize_logit_fwd_kernel(const uint8_t* __restrict__ x,
                                            const noise_t* __restrict__ noise,  // null with COUNTER
                                            uint64_t seed, scalar_t* __restrict__ y, acc_t* __restrict__ ld_out,
                                            const acc_t* __restrict__ ld_in,  // null without a running log-det
                                            int64_t n,  // elements per row = row stride of x, noise, y
                                            acc_t alpha, acc_t scale,
                                            acc_t row_const) {  // -D log 256 + D log(1 - 2 alpha)
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const int64_t i = base + j;
    const acc_t u = COUNTER ? counter_uniform<acc_t>(seed, static_cast<uint64_t>(i)) : static_cast<acc_t>(noise[i]);
    acc_t out, log_lo, log_hi;
    dequantize_logit_forward(static_cast<acc_t>(x[i]), u, alpha, scale, out, log_lo, log_hi);
    y[i] = static_cast<scalar_t>(out);
    acc -= log_lo + log_hi;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) ld_out[blockIdx.x] = (ld_in ? ld_in[blockIdx.x] : acc_t(0)) + (row_const + acc);
}

template <typename scalar_t, typename noise_t, typename acc_t>
__global__ void dequantize_logit_bwd_kernel(const scalar_t* __restrict__ g,  // dL/dy, y's dtype
                                            const acc_t* __restrict__ gld,   // (B,) dL/d(logdet), or null
                                            const uint8_t* __restrict__ x, const noise_t* __restrict__ noise,
                                            noise_t* __restrict__ grad_noise, int64_t numel,
                                            int64_t n,  // elements per row: maps index -> row
                                            acc_t alpha, acc_t scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t row_gld = gld ? gld[i / n] : acc_t(0);
    grad_noise[i] = static_cast<noise_t>(dequantize_logit_backward(
        static_cast<acc_t>(x[i]), static_cast<acc_t>(noise[i]), alpha, scale, static_cast<acc_t>(g[i]), row_gld));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void dequantize_logit_inv_kernel(const scalar_t* __restrict__ y, scalar_t* __restrict__ pixels,
                                            acc_t* __restrict__ ld_out, const acc_t* __restrict__ ld_in,
                                            int64_t n,  // elements per row = row stride
                                            acc_t alpha, acc_t scale,
                                            acc_t row_const) {  // D log 256 - D log(1 - 2 alpha)
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    acc_t pixel, term;
    dequantize_logit_inverse(static_cast<acc_t>(y[base + j]), alpha, scale, pixel, term);
    pixels[base + j] = static_cast<scalar_t>(pixel);
    acc += term;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) ld_out[blockIdx.x] = (ld_in ? ld_in[blockIdx.x] : acc_t(0)) + (row_const + acc);
}

template <typename scalar_t, typename acc_t>
__global__ void gaussian_nll_fwd_kernel(const scalar_t* __restrict__ z, const acc_t* __restrict__ ld_in,
                                        acc_t* __restrict__ nll, int64_t n, bool bits) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    const acc_t v = static_cast<acc_t>(z[base + j]);
    acc += v * v;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0)
    nll[blockIdx.x] = gaussian_nll_from_sumsq(acc, ld_in ? ld_in[blockIdx.x] : acc_t(0), n, bits);
}

template <typename scalar_t, typename acc_t>
__global__ void gaussian_nll_bwd_kernel(const acc_t* __restrict__ g,  // (B,) dL/d(nll)
                                        const scalar_t* __restrict__ z, scalar_t* __restrict__ grad_z,
                                        int64_t numel, int64_t n, bool bits) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride)
    grad_z[i] = static_cast<scalar_t>(gaussian_nll_grad_factor(g[i / n], n, bits) * static_cast<acc_t>(z[i]));
}

int64_t per_row(const at::Tensor& t) { return t.size(0) == 0 ? 0 : t.numel() / t.size(0); }

unsigned row_blocks(int64_t rows) {
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "flowkern: too many rows for one launch");
  return static_cast<unsigned>(rows);
}

unsigned flat_blocks(int64_t numel, int device) {
  return static_cast<unsigned>(std::min<int64_t>((numel + kThreads - 1) / kThreads, multiprocessor_count(device) * 32));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> dequantize_logit_fwd(const at::Tensor& x, const std::optional<at::Tensor>& noise,
                                                        int64_t seed, double alpha, at::ScalarType dtype,
                                                        const std::optional<at::Tensor>& logdet) {
  check_dequantize_pixels(x);
  check_dequantize_alpha(alpha);
  TORCH_CHECK(at::isFloatingType(dtype), "flowkern: dequantize_logit dtype must be floating, got ", dtype);
  const at::ScalarType compute = dequantize_compute_dtype(dtype);
  if (noise.has_value()) check_dequantize_like("noise", *noise, x, dtype, compute);
  check_per_row(logdet, x.size(0), compute, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = per_row(x);
  auto y = at::empty(x.sizes(), x.options().dtype(dtype));
  auto ld = at::empty({rows}, x.options().dtype(compute));
  if (rows == 0) return {y, ld};
  const double scale = 1.0 - 2.0 * alpha;
  const double row_const = static_cast<double>(n) * (std::log(scale) - kLogPixelLevels);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "flowkern_dequantize_logit_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ld_in = logdet.has_value() ? logdet->data_ptr<acc_t>() : nullptr;
    auto launch = [&](auto noise_c, auto counter_c) {
      using noise_t = decltype(noise_c);
      dequantize_logit_fwd_kernel<scalar_t, noise_t, acc_t, decltype(counter_c)::value>
          <<<row_blocks(rows), kThreads, 0, stream>>>(
              x.data_ptr<uint8_t>(), counter_c ? nullptr : noise->data_ptr<noise_t>(), static_cast<uint64_t>(seed),
              y.data_ptr<scalar_t>(), ld.data_ptr<acc_t>(), ld_in, n, static_cast<acc_t>(alpha),
              static_cast<acc_t>(scale), static_cast<acc_t>(row_const));
    };
    if (!noise.has_value()) launch(acc_t{}, std::true_type{});
    else if (noise->scalar_type() == compute) launch(acc_t{}, std::false_type{});
    else if constexpr (!std::is_same_v<scalar_t, acc_t>) launch(scalar_t{}, std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, ld};
}

at::Tensor dequantize_logit_bwd(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet,
                                const at::Tensor& x, const at::Tensor& noise, double alpha) {
  check_dequantize_pixels(x);
  check_dequantize_alpha(alpha);
  TORCH_CHECK(at::isFloatingType(grad_out.scalar_type()), "flowkern: dequantize_logit grad_out must be floating");
  const at::ScalarType compute = dequantize_compute_dtype(grad_out.scalar_type());
  check_dequantize_like("grad_out", grad_out, x, grad_out.scalar_type(), grad_out.scalar_type());
  check_dequantize_like("noise", noise, x, grad_out.scalar_type(), compute);
  check_per_row(grad_logdet, x.size(0), compute, x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t numel = x.numel();
  auto grad_noise = at::empty_like(noise);
  if (numel == 0) return grad_noise;
  const double scale = 1.0 - 2.0 * alpha;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(),
                                  "flowkern_dequantize_logit_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<acc_t>() : nullptr;
    auto launch = [&](auto noise_c) {
      using noise_t = decltype(noise_c);
      dequantize_logit_bwd_kernel<scalar_t, noise_t, acc_t>
          <<<flat_blocks(numel, x.get_device()), kThreads, 0, stream>>>(
              grad_out.data_ptr<scalar_t>(), gld, x.data_ptr<uint8_t>(), noise.data_ptr<noise_t>(),
              grad_noise.data_ptr<noise_t>(), numel, per_row(x), static_cast<acc_t>(alpha),
              static_cast<acc_t>(scale));
    };
    if (noise.scalar_type() == compute) launch(acc_t{});
    else if constexpr (!std::is_same_v<scalar_t, acc_t>) launch(scalar_t{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_noise;
}

std::tuple<at::Tensor, at::Tensor> dequantize_logit_inv(const at::Tensor& y, double alpha,
                                                        const std::optional<at::Tensor>& logdet) {
  TORCH_CHECK(y.dim() >= 1 && y.is_contiguous(), "flowkern: dequantize_logit_inv takes contiguous y (B, ...)");
  TORCH_CHECK(at::isFloatingType(y.scalar_type()), "flowkern: dequantize_logit_inv takes floating y");
  check_dequantize_alpha(alpha);
  const at::ScalarType compute = dequantize_compute_dtype(y.scalar_type());
  check_per_row(logdet, y.size(0), compute, y.device());
  const c10::cuda::CUDAGuard guard(y.device());
  const int64_t rows = y.size(0), n = per_row(y);
  auto pixels = at::empty_like(y);
  auto ld = at::empty({rows}, y.options().dtype(compute));
  if (rows == 0) return {pixels, ld};
  const double scale = 1.0 - 2.0 * alpha;
  const double row_const = static_cast<double>(n) * (kLogPixelLevels - std::log(scale));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "flowkern_dequantize_logit_inv_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    dequantize_logit_inv_kernel<scalar_t, acc_t><<<row_blocks(rows), kThreads, 0, stream>>>(
        y.data_ptr<scalar_t>(), pixels.data_ptr<scalar_t>(), ld.data_ptr<acc_t>(),
        logdet.has_value() ? logdet->data_ptr<acc_t>() : nullptr, n, static_cast<acc_t>(alpha),
        static_cast<acc_t>(scale), static_cast<acc_t>(row_const));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {pixels, ld};
}

at::Tensor gaussian_nll_fwd(const at::Tensor& z, const std::optional<at::Tensor>& logdet, bool bits) {
  check_gaussian_nll_z(z);
  check_per_row(logdet, z.size(0), logdet_dtype(z.scalar_type()), z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t rows = z.size(0);
  auto nll = at::empty({rows}, z.options().dtype(logdet_dtype(z.scalar_type())));
  if (rows == 0) return nll;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "flowkern_gaussian_nll_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gaussian_nll_fwd_kernel<scalar_t, acc_t><<<row_blocks(rows), kThreads, 0, stream>>>(
        z.data_ptr<scalar_t>(), logdet.has_value() ? logdet->data_ptr<acc_t>() : nullptr, nll.data_ptr<acc_t>(),
        per_row(z), bits);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return nll;
}

at::Tensor gaussian_nll_bwd(const at::Tensor& grad, const at::Tensor& z, bool bits) {
  check_gaussian_nll_z(z);
  check_per_row("gaussian_nll grad", grad, z.size(0), logdet_dtype(z.scalar_type()), z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const int64_t numel = z.numel();
  auto grad_z = at::empty_like(z);
  if (numel == 0) return grad_z;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "flowkern_gaussian_nll_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    gaussian_nll_bwd_kernel<scalar_t, acc_t><<<flat_blocks(numel, z.get_device()), kThreads, 0, stream>>>(
        grad.data_ptr<acc_t>(), z.data_ptr<scalar_t>(), grad_z.data_ptr<scalar_t>(), numel, per_row(z), bits);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_z;
}

}  // namespace cuda
}  // namespace flowkern

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("dequantize_logit_fwd", &flowkern::cuda::dequantize_logit_fwd);
  m.impl("dequantize_logit_bwd", &flowkern::cuda::dequantize_logit_bwd);
  m.impl("dequantize_logit_inv", &flowkern::cuda::dequantize_logit_inv);
  m.impl("gaussian_nll_fwd", &flowkern::cuda::gaussian_nll_fwd);
  m.impl("gaussian_nll_bwd", &flowkern::cuda::gaussian_nll_bwd);
}
