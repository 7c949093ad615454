// CUDA launchers for the affine coupling over the math in math/affine_coupling.h.
// Forward/inverse: one block per row; threads stride over the row, each thread keeps its part
// of the row's log-det in a register, a warp-shuffle + shared-memory reduction writes it once
// (deterministic: no atomics). Backward: a flat grid-stride loop, purely elementwise.
// fp16/bf16 are loaded, computed in fp32 (at::opmath_type) and stored back.
#include "../math/affine_coupling.h"
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

template <typename scalar_t, typename acc_t, int MODE, bool INVERSE>
__global__ void affine_coupling_fwd_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ t,
                                           const scalar_t* __restrict__ s, scalar_t* __restrict__ out,
                                           scalar_t* __restrict__ factor_out,  // null unless saving
                                           acc_t* __restrict__ ld_out, const acc_t* __restrict__ ld_in,
                                           int64_t n,  // elements per row = row stride of every tensor
                                           acc_t clamp) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * n;
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    acc_t factor, logm;
    affine_factor<MODE, INVERSE>(static_cast<acc_t>(s[base + j]), clamp, factor, logm);
    out[base + j] =
        static_cast<scalar_t>(affine_apply<INVERSE>(static_cast<acc_t>(x[base + j]), static_cast<acc_t>(t[base + j]), factor));
    if (factor_out) factor_out[base + j] = static_cast<scalar_t>(factor);
    acc += logm;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const acc_t prev = ld_in ? ld_in[blockIdx.x] : acc_t(0);
    ld_out[blockIdx.x] = prev + (INVERSE ? -acc : acc);
  }
}

template <typename scalar_t, typename acc_t, int MODE, bool INVERSE, bool FROM_FACTOR>
__global__ void affine_coupling_bwd_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ gld,
                                           const scalar_t* __restrict__ saved,
                                           const scalar_t* __restrict__ s,  // raw scale, or the saved factor
                                           scalar_t* __restrict__ grad_in, scalar_t* __restrict__ grad_s,
                                           int64_t numel, int64_t n,  // n: elements per row, maps index -> row
                                           acc_t clamp) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const acc_t row_gld = gld ? gld[i / n] : acc_t(0);
    acc_t gi, gs;
    affine_backward<MODE, INVERSE, FROM_FACTOR>(static_cast<acc_t>(g[i]), row_gld, static_cast<acc_t>(saved[i]),
                                   static_cast<acc_t>(s[i]), clamp, gi, gs);
    grad_in[i] = static_cast<scalar_t>(gi);
    grad_s[i] = static_cast<scalar_t>(gs);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_fwd(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale_raw, int64_t mode, double clamp,
    bool inverse, const std::optional<at::Tensor>& logdet, bool save_factor) {
  check_affine_inputs(x, shift, scale_raw, logdet);
  TORCH_CHECK(!save_factor || x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "flowkern: save_factor needs float32/float64 (a half-precision factor would cost the "
              "backward three digits); recompute from the raw scale instead");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t n = rows == 0 ? 0 : x.numel() / rows;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "flowkern: too many rows for one launch");
  auto out = at::empty_like(x);
  auto factor = save_factor ? at::empty_like(x) : at::empty({0}, x.options());
  auto ld = at::empty({rows}, x.options().dtype(logdet_dtype(x.scalar_type())));
  if (rows == 0) return {out, ld, factor};
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flowkern_affine_coupling_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* ld_in = logdet.has_value() ? logdet->data_ptr<acc_t>() : nullptr;
    dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
      affine_coupling_fwd_kernel<scalar_t, acc_t, decltype(mode_c)::value, decltype(inv_c)::value>
          <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
              x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale_raw.data_ptr<scalar_t>(),
              out.data_ptr<scalar_t>(), save_factor ? factor.data_ptr<scalar_t>() : nullptr, ld.data_ptr<acc_t>(),
              ld_in, n, static_cast<acc_t>(clamp));
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, ld, factor};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(const at::Tensor& grad_out,
                                                       const std::optional<at::Tensor>& grad_logdet,
                                                       const at::Tensor& saved, const at::Tensor& scale_or_factor,
                                                       bool is_factor, int64_t mode, double clamp, bool inverse) {
  check_affine_inputs(saved, grad_out, scale_or_factor, grad_logdet);
  const c10::cuda::CUDAGuard guard(saved.device());
  const int64_t rows = saved.size(0);
  const int64_t numel = saved.numel();
  const int64_t n = rows == 0 ? 0 : numel / rows;
  auto grad_in = at::empty_like(saved);
  auto grad_s = at::empty_like(saved);
  if (numel == 0) return {grad_in, grad_s};
  const int64_t sms = multiprocessor_count(saved.get_device());
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, sms * 32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "flowkern_affine_coupling_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<acc_t>() : nullptr;
    dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
      auto run = [&](auto from_factor_c) {
        affine_coupling_bwd_kernel<scalar_t, acc_t, decltype(mode_c)::value, decltype(inv_c)::value,
                                   decltype(from_factor_c)::value>
            <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
                grad_out.data_ptr<scalar_t>(), gld, saved.data_ptr<scalar_t>(), scale_or_factor.data_ptr<scalar_t>(),
                grad_in.data_ptr<scalar_t>(), grad_s.data_ptr<scalar_t>(), numel, n, static_cast<acc_t>(clamp));
      };
      if (is_factor) run(std::true_type{});
      else run(std::false_type{});
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {grad_in, grad_s};
}

}  // namespace cuda
}  // namespace flowkern
