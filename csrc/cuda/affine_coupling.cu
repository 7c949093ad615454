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

// One block per row. Rows sit at their tensors' row strides (AffineFwdRows); `kept`, when
// set, is copied into the row of `out` beside the transformed part.
template <typename scalar_t, typename acc_t, int MODE, bool INVERSE>
__global__ void affine_coupling_fwd_kernel(const AffineFwdRows<scalar_t> a, acc_t* __restrict__ ld_out,
                                           const acc_t* __restrict__ ld_in, int64_t n, acc_t clamp) {
  const int64_t r = blockIdx.x;
  const scalar_t* __restrict__ x = a.x + r * a.x_rs;
  const scalar_t* __restrict__ t = a.t + r * a.t_rs;
  const scalar_t* __restrict__ s = a.s + r * a.s_rs;
  scalar_t* __restrict__ out = a.out + r * a.out_rs;
  scalar_t* __restrict__ factor_out = a.factor ? a.factor + r * n : nullptr;
  if (a.kept) {
    const scalar_t* __restrict__ kept = a.kept + r * a.kept_rs;
    for (int64_t j = threadIdx.x; j < a.k; j += blockDim.x) out[a.kept_at + j] = kept[j];
  }
  out += a.moved_at;
  acc_t acc = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    acc_t factor, logm;
    affine_factor<MODE, INVERSE>(static_cast<acc_t>(s[j]), clamp, factor, logm);
    out[j] = static_cast<scalar_t>(affine_apply<INVERSE>(static_cast<acc_t>(x[j]), static_cast<acc_t>(t[j]), factor));
    if (factor_out) factor_out[j] = static_cast<scalar_t>(factor);
    acc += logm;
  }
  acc = block_sum(acc);
  if (threadIdx.x == 0) {
    const acc_t prev = ld_in ? ld_in[r] : acc_t(0);
    ld_out[r] = prev + (INVERSE ? -acc : acc);
  }
}

// Purely elementwise: a flat grid-stride loop over rows * n, each index split into (row, col)
// to find the element at its tensor's row stride.
// FROM_OUTPUT: from the op's output (AffineBwdRows' t and input set), rebuilding the input.
template <typename scalar_t, typename acc_t, int MODE, bool INVERSE, bool FROM_FACTOR, bool FROM_OUTPUT>
__global__ void affine_coupling_bwd_kernel(const AffineBwdRows<scalar_t> a, const acc_t* __restrict__ gld,
                                           int64_t numel, int64_t n, acc_t clamp) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const int64_t r = i / n, c = i - r * n;
    const acc_t g = static_cast<acc_t>(a.g[r * a.g_rs + c]);
    acc_t gi, gs;
    if constexpr (FROM_OUTPUT) {
      acc_t input;
      affine_backward_from_output<MODE, INVERSE>(g, gld ? gld[r] : acc_t(0), static_cast<acc_t>(a.saved[r * a.saved_rs + c]),
                                                 static_cast<acc_t>(a.t[r * a.t_rs + c]),
                                                 static_cast<acc_t>(a.s[r * a.s_rs + c]), clamp, input, gi, gs);
      a.input[i] = static_cast<scalar_t>(input);
    } else {
      affine_backward<MODE, INVERSE, FROM_FACTOR>(g, gld ? gld[r] : acc_t(0), static_cast<acc_t>(a.saved[r * a.saved_rs + c]),
                                                  static_cast<acc_t>(a.s[r * a.s_rs + c]), clamp, gi, gs);
    }
    a.grad_in[i] = static_cast<scalar_t>(gi);
    a.grad_s[r * a.grad_s_rs + c] = static_cast<scalar_t>(gs);
    if (a.grad_shift) a.grad_shift[r * a.grad_shift_rs + c] = static_cast<scalar_t>(affine_shift_grad<INVERSE>(g, gi));
  }
}

template <typename scalar_t>
void launch_fwd(const AffineFwdRows<scalar_t>& a, const std::optional<at::Tensor>& logdet, at::Tensor& ld,
                int64_t mode, bool inverse, int64_t rows, int64_t n, double clamp) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* ld_in = logdet.has_value() ? logdet->data_ptr<acc_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  check_affine_factor(mode, a.factor != nullptr);
  dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
    affine_coupling_fwd_kernel<scalar_t, acc_t, decltype(mode_c)::value, decltype(inv_c)::value>
        <<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(a, ld.data_ptr<acc_t>(), ld_in, n,
                                                                static_cast<acc_t>(clamp));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void launch_bwd(const AffineBwdRows<scalar_t>& a, const std::optional<at::Tensor>& grad_logdet, bool is_factor,
                int64_t mode, bool inverse, int64_t rows, int64_t n, double clamp, int device) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t numel = rows * n;
  check_affine_factor(mode, is_factor);
  if (numel == 0) return;
  const int64_t blocks = std::min<int64_t>((numel + kThreads - 1) / kThreads, multiprocessor_count(device) * 32);
  const acc_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<acc_t>() : nullptr;
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_affine_mode(mode, inverse, [&](auto mode_c, auto inv_c) {
    auto run = [&](auto from_factor_c, auto from_output_c) {
      affine_coupling_bwd_kernel<scalar_t, acc_t, decltype(mode_c)::value, decltype(inv_c)::value,
                                 decltype(from_factor_c)::value, decltype(from_output_c)::value>
          <<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(a, gld, numel, n, static_cast<acc_t>(clamp));
    };
    if (a.input) run(std::false_type{}, std::true_type{});
    else if (is_factor) {
      if constexpr (affine_saves_factor(decltype(mode_c)::value)) run(std::true_type{}, std::false_type{});
    } else run(std::false_type{}, std::false_type{});
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_save_factor(bool save_factor, const at::Tensor& x) {
  TORCH_CHECK(!save_factor || x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "flowkern: save_factor needs float32/float64 (a half-precision factor would cost the "
              "backward three digits); recompute from the raw scale instead");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_fwd(
    const at::Tensor& x, const at::Tensor& shift, const at::Tensor& scale_raw, int64_t mode, double clamp,
    bool inverse, const std::optional<at::Tensor>& logdet, bool save_factor) {
  check_affine_inputs(x, shift, scale_raw, logdet);
  check_save_factor(save_factor, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0);
  const int64_t n = rows == 0 ? 0 : x.numel() / rows;
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "flowkern: too many rows for one launch");
  auto out = at::empty_like(x);
  auto factor = save_factor ? at::empty_like(x) : at::empty({0}, x.options());
  auto ld = at::empty({rows}, x.options().dtype(logdet_dtype(x.scalar_type())));
  if (rows == 0) return {out, ld, factor};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flowkern_affine_coupling_fwd_cuda", [&] {
    AffineFwdRows<scalar_t> a{x.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), scale_raw.data_ptr<scalar_t>(), n, n,
                              n, out.data_ptr<scalar_t>(), n, 0, save_factor ? factor.data_ptr<scalar_t>() : nullptr};
    launch_fwd(a, logdet, ld, mode, inverse, rows, n, clamp);
  });
  return {out, ld, factor};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_bwd(const at::Tensor& grad_out,
                                                       const std::optional<at::Tensor>& grad_logdet,
                                                       const at::Tensor& saved, const at::Tensor& scale_or_factor,
                                                       bool is_factor, int64_t mode, double clamp, bool inverse) {
  check_affine_inputs(saved, grad_out, scale_or_factor, grad_logdet);
  const c10::cuda::CUDAGuard guard(saved.device());
  const int64_t rows = saved.size(0);
  const int64_t n = rows == 0 ? 0 : saved.numel() / rows;
  auto grad_in = at::empty_like(saved);
  auto grad_s = at::empty_like(saved);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "flowkern_affine_coupling_bwd_cuda", [&] {
    AffineBwdRows<scalar_t> a{grad_out.data_ptr<scalar_t>(), saved.data_ptr<scalar_t>(),
                              scale_or_factor.data_ptr<scalar_t>(), n, n, n, grad_in.data_ptr<scalar_t>(),
                              grad_s.data_ptr<scalar_t>(), n};
    launch_bwd(a, grad_logdet, is_factor, mode, inverse, rows, n, clamp, saved.get_device());
  });
  return {grad_in, grad_s};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_merge_fwd(
    const at::Tensor& kept, const at::Tensor& x, const at::Tensor& params, int64_t mode, double clamp, bool inverse,
    const std::optional<at::Tensor>& logdet, bool save_factor, bool kept_first) {
  check_affine_merge_inputs(kept, x, params, logdet);
  check_save_factor(save_factor, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t rows = x.size(0), n = x.size(1), k = kept.size(1);
  TORCH_CHECK(rows <= std::numeric_limits<int32_t>::max(), "flowkern: too many rows for one launch");
  auto out = at::empty({rows, k + n}, x.options());
  auto factor = save_factor ? at::empty({rows, n}, x.options()) : at::empty({0}, x.options());
  auto ld = at::empty({rows}, x.options().dtype(logdet_dtype(x.scalar_type())));
  if (rows == 0) return {out, ld, factor};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flowkern_affine_coupling_merge_fwd_cuda", [&] {
    launch_fwd(merge_fwd_rows<scalar_t>(kept, x, params, out, save_factor ? factor.data_ptr<scalar_t>() : nullptr,
                                        kept_first),
               logdet, ld, mode, inverse, rows, n, clamp);
  });
  return {out, ld, factor};
}

std::tuple<at::Tensor, at::Tensor> affine_coupling_merge_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& saved,
    const at::Tensor& scale_or_factor, bool is_factor, int64_t mode, double clamp, bool inverse, bool kept_first) {
  check_affine_merge_grads(grad_out, grad_logdet, saved, scale_or_factor);
  const c10::cuda::CUDAGuard guard(saved.device());
  const int64_t rows = saved.size(0), n = saved.size(1);
  auto grad_x = at::empty({rows, n}, saved.options());
  auto grad_params = at::empty({rows, 2 * n}, saved.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saved.scalar_type(), "flowkern_affine_coupling_merge_bwd_cuda", [&] {
    launch_bwd(merge_bwd_rows<scalar_t>(grad_out, saved, scale_or_factor, grad_x, grad_params, kept_first),
               grad_logdet, is_factor, mode, inverse, rows, n, clamp, saved.get_device());
  });
  return {grad_x, grad_params};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_coupling_merge_bwd_out(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& out,
    const at::Tensor& params, int64_t mode, double clamp, bool inverse, bool kept_first) {
  check_affine_merge_bwd_out(grad_out, grad_logdet, out, params);
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t rows = out.size(0), n = params.size(1) / 2;
  auto input = at::empty({rows, n}, out.options());
  auto grad_x = at::empty({rows, n}, out.options());
  auto grad_params = at::empty({rows, 2 * n}, out.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "flowkern_affine_coupling_merge_bwd_out_cuda", [&] {
    launch_bwd(merge_bwd_out_rows<scalar_t>(grad_out, out, params, input, grad_x, grad_params, kept_first),
               grad_logdet, false, mode, inverse, rows, n, clamp, out.get_device());
  });
  return {input, grad_x, grad_params};
}

}  // namespace cuda
}  // namespace flowkern
