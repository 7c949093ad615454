// CUDA launchers for the per-channel ops (ActNorm, the batch-norm flow, batch statistics) over the
// math in math/channel_affine.h. fp16/bf16 are loaded, computed in fp32 (at::opmath_type) and
// stored back; float64 computes in float64.
//
// Forward: a one-block pre-pass turns the (C,) parameters into the (pre, m, post) coefficients
// and writes every row's log-det (block reduction of the C log-scales); then a flat grid-stride
// elementwise pass.
// Backward: the per-channel sums over batch and space are DETERMINISTIC, with no atomics: the rows
// are cut into chunks fixed by the shape alone, each block writes the partial sums of its chunk,
// and a finalize kernel adds them in chunk order (in float64) into the parameter gradients.
// Two shapes of reduction block: for S >= kPlaneMinS a block per (channel, chunk of rows) walks
// the chunk's planes; for small S (features, tiny images) a thread per column of a row walks the
// chunk's rows, so that loads stay coalesced along the row.
#include "../math/channel_affine.h"
#include "common.cuh"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

namespace flowkern {
namespace cuda {
namespace {

using namespace flowkern::math;

constexpr int64_t kPlaneMinS = 32;          // S from which a block per (channel, chunk) is used
constexpr int64_t kPlaneChunkElems = 4096;  // elements of one channel per plane-reduction block
constexpr int64_t kColumnChunkRows = 32;    // rows per column-reduction block
constexpr int64_t kMaxGridY = 65535;

// Where the tensors' parameters live; p2, p3 are unused by ActNorm.
template <typename scalar_t>
struct Params {
  const scalar_t* p0;  // actnorm: shift,     bn flow: mean
  const scalar_t* p1;  // actnorm: log_scale, bn flow: var
  const scalar_t* p2;  //                     bn flow: log_gamma
  const scalar_t* p3;  //                     bn flow: beta
};

template <int OP, bool INVERSE, typename T, typename scalar_t>
__device__ __forceinline__ void channel_coeffs(const Params<scalar_t>& p, T eps, int64_t c, T& pre, T& m, T& post,
                                               T& logm) {
  if constexpr (OP == kActNorm) {
    actnorm_coeffs<INVERSE>(static_cast<T>(p.p0[c]), static_cast<T>(p.p1[c]), pre, m, post, logm);
  } else {
    batchnorm_coeffs<INVERSE>(static_cast<T>(p.p0[c]), static_cast<T>(p.p1[c]), static_cast<T>(p.p2[c]),
                              static_cast<T>(p.p3[c]), eps, pre, m, post, logm);
  }
}

// One block: coef (3, C) = (pre, m, post) per channel, and (when ld_out) every row's log-det,
// ld_in + S * sum_c log m_c with the sum reduced in float64 in a fixed order.
template <int OP, bool INVERSE, typename scalar_t, typename acc_t>
__global__ void channel_coeffs_kernel(Params<scalar_t> p, acc_t eps, int64_t C, int64_t S,
                                      acc_t* __restrict__ coef,
                                      const acc_t* __restrict__ ld_in,  // null: no running log-det
                                      acc_t* __restrict__ ld_out,       // null: no log-det (backward)
                                      int64_t B) {
  double acc = 0.0;
  for (int64_t c = threadIdx.x; c < C; c += blockDim.x) {
    acc_t pre, m, post, logm;
    channel_coeffs<OP, INVERSE>(p, eps, c, pre, m, post, logm);
    coef[c] = pre;
    coef[C + c] = m;
    coef[2 * C + c] = post;
    acc += static_cast<double>(logm);
  }
  if (ld_out == nullptr) return;  // uniform across the block
  acc = block_sum(acc);
  __shared__ double total;
  if (threadIdx.x == 0) total = acc * static_cast<double>(S);
  __syncthreads();
  const acc_t add = static_cast<acc_t>(total);
  for (int64_t b = threadIdx.x; b < B; b += blockDim.x) ld_out[b] = (ld_in ? ld_in[b] : acc_t(0)) + add;
}

// out = (x + pre) m + post. index_t is uint32 when numel <= 2^31 (cheap channel divisions).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void channel_apply_kernel(const scalar_t* __restrict__ x, const acc_t* __restrict__ coef,
                                     scalar_t* __restrict__ out, index_t numel, index_t C, index_t S) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t c = (i / S) % C;
    out[i] = static_cast<scalar_t>(channel_apply(static_cast<acc_t>(x[i]), coef[c], coef[C + c], coef[2 * C + c]));
  }
}

// Training-mode grad_x = (g + c0) m + k1 (y - beta), coef (4, C) = (c0, m, k1, beta).
template <typename scalar_t, typename acc_t, typename index_t>
__global__ void batchnorm_train_grad_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ y,
                                            const acc_t* __restrict__ coef, scalar_t* __restrict__ grad_x,
                                            index_t numel, index_t C, index_t S) {
  const index_t stride = static_cast<index_t>(gridDim.x) * blockDim.x;
  for (index_t i = static_cast<index_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < numel; i += stride) {
    const index_t c = (i / S) % C;
    grad_x[i] = static_cast<scalar_t>(batchnorm_train_grad_x(static_cast<acc_t>(g[i]), static_cast<acc_t>(y[i]),
                                                             coef[c], coef[C + c], coef[2 * C + c], coef[3 * C + c]));
  }
}

// What a reduction block sums per element:
//   kGradWrite: t1 = g, t2 = g (out - post), and writes grad_in = g m   (a = g, b = out)
//   kGrad:      the same sums, no write (training mode's first pass)
//   kStats:     t1 = x - pivot, t2 = (x - pivot)^2                      (a = x; pivot null: 0)
enum ReduceKind : int { kGradWrite = 0, kGrad = 1, kStats = 2 };

template <int KIND, typename acc_t>
__device__ __forceinline__ void reduce_terms(acc_t va, acc_t vb, acc_t m, acc_t post, acc_t& t1, acc_t& t2,
                                             acc_t& w) {
  if constexpr (KIND == kStats) {
    const acc_t d = va - post;  // post holds the pivot
    t1 += d;
    t2 += d * d;
  } else {
    acc_t r2;
    w = channel_backward(va, vb, m, post, r2);
    t1 += va;
    t2 += r2;
  }
}

// The channel's (m, post) for the gradient kinds, (unused, pivot) for the statistics.
template <int KIND, typename acc_t>
__device__ __forceinline__ void reduce_coeffs(const acc_t* coef, int64_t C, int64_t c, acc_t& m, acc_t& post) {
  if constexpr (KIND == kStats) {
    m = acc_t(1);
    post = coef ? coef[c] : acc_t(0);
  } else {
    m = coef[C + c];
    post = coef[2 * C + c];
  }
}

// Block (channel c, chunk p): the sums over the chunk's planes of channel c -> part (P, 2, C).
template <int KIND, typename scalar_t, typename acc_t>
__global__ void channel_reduce_plane_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                            const acc_t* __restrict__ coef, scalar_t* __restrict__ out,
                                            acc_t* __restrict__ part, int64_t B, int64_t C, int64_t S,
                                            int64_t chunk_rows) {
  const int64_t c = blockIdx.x, p = blockIdx.y;
  const int64_t r0 = p * chunk_rows;
  const int64_t nrows = min(chunk_rows, B - r0);
  acc_t m, post;
  reduce_coeffs<KIND>(coef, C, c, m, post);
  acc_t t1 = 0, t2 = 0;
  // nrows * S < 2^31 (host check): one 32-bit division per element, no idle threads for short planes.
  const uint32_t count = static_cast<uint32_t>(nrows * S), s32 = static_cast<uint32_t>(S);
  for (uint32_t k = threadIdx.x; k < count; k += blockDim.x) {
    const uint32_t r = k / s32;
    const int64_t i = ((r0 + r) * C + c) * S + (k - r * s32);
    acc_t w;
    reduce_terms<KIND>(static_cast<acc_t>(a[i]), KIND == kStats ? acc_t(0) : static_cast<acc_t>(b[i]), m, post, t1,
                       t2, w);
    if constexpr (KIND == kGradWrite) out[i] = static_cast<scalar_t>(w);
  }
  t1 = block_sum(t1);
  __syncthreads();  // block_sum's shared scratch is reused right away
  t2 = block_sum(t2);
  if (threadIdx.x == 0) {
    part[(2 * p) * C + c] = t1;
    part[(2 * p + 1) * C + c] = t2;
  }
}

// Thread per column j of a row (n = C S columns), chunk p of rows: the column's sums over the
// chunk -> part (P, 2, n). Loads are coalesced along the row.
template <int KIND, typename scalar_t, typename acc_t>
__global__ void channel_reduce_column_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                             const acc_t* __restrict__ coef, scalar_t* __restrict__ out,
                                             acc_t* __restrict__ part, int64_t B, int64_t C, int64_t S,
                                             int64_t chunk_rows) {
  const int64_t n = C * S;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t p = blockIdx.y;
  if (j >= n) return;
  acc_t m, post;
  reduce_coeffs<KIND>(coef, C, j / S, m, post);
  acc_t t1 = 0, t2 = 0;
  const int64_t r1 = min(B, (p + 1) * chunk_rows);
  for (int64_t r = p * chunk_rows; r < r1; ++r) {
    const int64_t i = r * n + j;
    acc_t w;
    reduce_terms<KIND>(static_cast<acc_t>(a[i]), KIND == kStats ? acc_t(0) : static_cast<acc_t>(b[i]), m, post, t1,
                       t2, w);
    if constexpr (KIND == kGradWrite) out[i] = static_cast<scalar_t>(w);
  }
  part[(2 * p) * n + j] = t1;
  part[(2 * p + 1) * n + j] = t2;
}

// How the rows are cut for a reduction: fixed by (B, C, S) alone.
struct Plan {
  bool planes;
  int64_t chunk_rows, chunks;
  int64_t cols;    // partial sums per channel and chunk: 1 (planes) or S (columns)
  int64_t stride;  // partial sums per chunk and term: C or C S
};

Plan make_plan(int64_t B, int64_t C, int64_t S) {
  Plan pl;
  pl.planes = S >= kPlaneMinS;
  TORCH_CHECK(S < (int64_t(1) << 30), "flowkern: spatial size too large for the per-channel CUDA kernels");
  pl.chunk_rows = pl.planes ? std::max<int64_t>(1, kPlaneChunkElems / S) : kColumnChunkRows;
  pl.chunk_rows = std::max(pl.chunk_rows, (B + kMaxGridY - 1) / kMaxGridY);  // gridDim.y <= 65535
  if (pl.planes) pl.chunk_rows = std::min(pl.chunk_rows, std::max<int64_t>(1, ((int64_t(1) << 31) - 1) / S));
  pl.chunks = C * S == 0 ? 0 : (B + pl.chunk_rows - 1) / pl.chunk_rows;  // no elements: no partial sums
  pl.cols = pl.planes ? 1 : S;
  pl.stride = pl.planes ? C : C * S;
  return pl;
}

// The channel's two sums in float64, in chunk order, then column order.
template <typename acc_t>
__device__ __forceinline__ void sum_partials(const acc_t* part, const Plan& pl, int64_t c, double& r1, double& r2) {
  r1 = 0.0;
  r2 = 0.0;
  for (int64_t p = 0; p < pl.chunks; ++p)
    for (int64_t s = 0; s < pl.cols; ++s) {
      r1 += static_cast<double>(part[(2 * p) * pl.stride + c * pl.cols + s]);
      r2 += static_cast<double>(part[(2 * p + 1) * pl.stride + c * pl.cols + s]);
    }
}

// Every block sums grad_logdet over the rows the same way; returns S * that sum to all threads.
template <typename acc_t>
__device__ double logdet_grad_term(const acc_t* gld, int64_t B, int64_t S) {
  double acc = 0.0;
  if (gld)
    for (int64_t b = threadIdx.x; b < B; b += blockDim.x) acc += static_cast<double>(gld[b]);
  acc = block_sum(acc);
  __shared__ double total;
  if (threadIdx.x == 0) total = acc * static_cast<double>(S);
  __syncthreads();
  return total;
}

// Thread per channel: the parameter gradients from the partial sums.
//   ActNorm:          g0 = grad_shift, g1 = grad_log_scale
//   bn flow:          g0 = grad_mean, g1 = grad_var, g2 = grad_log_gamma, g3 = grad_beta
//   bn flow, TRAIN:   g2, g3 only, and coef_out (4, C) = (c0, m, k1, beta) for the grad_x pass
template <int OP, bool INVERSE, bool TRAIN, typename scalar_t, typename acc_t>
__global__ void channel_grads_finalize_kernel(const acc_t* __restrict__ part, Plan pl, const acc_t* __restrict__ gld,
                                              int64_t B, int64_t C, int64_t S, Params<scalar_t> p, double eps,
                                              scalar_t* g0, scalar_t* g1, scalar_t* g2, scalar_t* g3,
                                              acc_t* __restrict__ coef_out) {
  const double sg = logdet_grad_term(gld, B, S);
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double r1, r2;
  sum_partials(part, pl, c, r1, r2);
  double pre, m, post, logm;
  channel_coeffs<OP, INVERSE>(p, eps, c, pre, m, post, logm);
  if constexpr (OP == kActNorm) {
    double dt, ds;
    actnorm_param_grads<INVERSE>(r1, r2, sg, m, dt, ds);
    g0[c] = static_cast<scalar_t>(dt);
    g1[c] = static_cast<scalar_t>(ds);
  } else if constexpr (!TRAIN) {
    double dm, dv, dlg, db;
    batchnorm_param_grads<INVERSE>(r1, r2, sg, m, static_cast<double>(p.p1[c]), eps, dm, dv, dlg, db);
    g0[c] = static_cast<scalar_t>(dm);
    g1[c] = static_cast<scalar_t>(dv);
    g2[c] = static_cast<scalar_t>(dlg);
    g3[c] = static_cast<scalar_t>(db);
  } else {
    double dlg, db, c0, k1;
    batchnorm_train_grads(r1, r2, sg, static_cast<double>(B * S), static_cast<double>(p.p1[c]),
                          static_cast<double>(p.p2[c]), eps, dlg, db, c0, k1);
    g2[c] = static_cast<scalar_t>(dlg);
    g3[c] = static_cast<scalar_t>(db);
    // m as the forward rounded it (acc_t), so grad_x scales g exactly as the forward scaled x.
    acc_t pre_a, m_a, post_a, logm_a;
    channel_coeffs<OP, false>(p, static_cast<acc_t>(eps), c, pre_a, m_a, post_a, logm_a);
    coef_out[c] = static_cast<acc_t>(c0);
    coef_out[C + c] = m_a;
    coef_out[2 * C + c] = static_cast<acc_t>(k1);
    coef_out[3 * C + c] = post_a;
  }
}

// Thread per channel: the statistics' sums around pivot -> (LAST) mean and var, or (first pass)
// the mean as the next pass's pivot.
template <bool LAST, typename scalar_t, typename acc_t>
__global__ void batch_stats_finalize_kernel(const acc_t* __restrict__ part, Plan pl, int64_t C, double n,
                                            acc_t* __restrict__ pivot, scalar_t* __restrict__ mean,
                                            scalar_t* __restrict__ var) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s1, s2;
  sum_partials(part, pl, c, s1, s2);
  if constexpr (!LAST) {
    pivot[c] = static_cast<acc_t>(s1 / n);
  } else {
    double mu, v;
    batch_stats_finalize(static_cast<double>(pivot[c]), s1, s2, n, mu, v);
    mean[c] = static_cast<scalar_t>(mu);
    var[c] = static_cast<scalar_t>(v);
  }
}

int64_t spatial_size(const at::Tensor& x) {
  int64_t S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) S *= x.size(d);
  return S;
}

unsigned blocks_for(int64_t work, int device) {
  const int64_t sms = multiprocessor_count(device);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((work + kThreads - 1) / kThreads, sms * 32)));
}

template <typename F>
void dispatch_inverse(bool inverse, F&& f) {
  if (inverse) f(std::true_type{});
  else f(std::false_type{});
}

// Calls f with index_t = uint32_t when every index and index + grid stride fits, else int64_t.
template <typename F>
void dispatch_index(int64_t numel, F&& f) {
  if (numel <= (int64_t(1) << 31)) f(uint32_t{});
  else f(int64_t{});
}

template <int KIND, typename scalar_t, typename acc_t>
void launch_reduce(const Plan& pl, const scalar_t* a, const scalar_t* b, const acc_t* coef, scalar_t* out,
                   acc_t* part, int64_t B, int64_t C, int64_t S, cudaStream_t stream) {
  if (pl.chunks == 0 || C * S == 0) return;
  if (pl.planes) {
    channel_reduce_plane_kernel<KIND, scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>(C), static_cast<unsigned>(pl.chunks)), kThreads, 0, stream>>>(
            a, b, coef, out, part, B, C, S, pl.chunk_rows);
  } else {
    const int64_t n = C * S;
    channel_reduce_column_kernel<KIND, scalar_t, acc_t>
        <<<dim3(static_cast<unsigned>((n + kThreads - 1) / kThreads), static_cast<unsigned>(pl.chunks)), kThreads, 0,
           stream>>>(a, b, coef, out, part, B, C, S, pl.chunk_rows);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The forward of either op: coefficients + log-det, then the elementwise pass.
template <int OP>
std::tuple<at::Tensor, at::Tensor> launch_forward(const at::Tensor& x, std::initializer_list<at::Tensor> params,
                                                   double eps, bool inverse,
                                                   const std::optional<at::Tensor>& logdet) {
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), S = spatial_size(x), numel = x.numel();
  auto out = at::empty_like(x);
  auto ld = at::empty({B}, x.options().dtype(logdet_dtype(x.scalar_type())));
  const auto* pt = params.begin();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flowkern_channel_fwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Params<scalar_t> p{pt[0].data_ptr<scalar_t>(), pt[1].data_ptr<scalar_t>(),
                             OP == kActNorm ? nullptr : pt[2].data_ptr<scalar_t>(),
                             OP == kActNorm ? nullptr : pt[3].data_ptr<scalar_t>()};
    auto coef = at::empty({3 * C}, x.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
    const acc_t* ld_in = logdet.has_value() ? logdet->data_ptr<acc_t>() : nullptr;
    dispatch_inverse(inverse, [&](auto inv_c) {
      channel_coeffs_kernel<OP, decltype(inv_c)::value, scalar_t, acc_t><<<1, kThreads, 0, stream>>>(
          p, static_cast<acc_t>(eps), C, S, coef.data_ptr<acc_t>(), ld_in, ld.data_ptr<acc_t>(), B);
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (numel == 0) return;
    dispatch_index(numel, [&](auto idx) {
      using index_t = decltype(idx);
      channel_apply_kernel<scalar_t, acc_t, index_t><<<blocks_for(numel, x.get_device()), kThreads, 0, stream>>>(
          x.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(), out.data_ptr<scalar_t>(), static_cast<index_t>(numel),
          static_cast<index_t>(C), static_cast<index_t>(S));
    });
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, ld};
}

// The backward of either op; TRAIN (bn flow, forward): through the batch statistics too.
// Returns grad_in and the parameter gradients in g[0..3] (see channel_grads_finalize_kernel).
template <int OP>
void launch_backward(const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& out,
                      std::initializer_list<at::Tensor> params, double eps, bool inverse, bool train,
                      at::Tensor& grad_in, std::array<at::Tensor, 4>& g) {
  const c10::cuda::CUDAGuard guard(out.device());
  const int64_t B = out.size(0), C = out.size(1), S = spatial_size(out), numel = out.numel();
  const Plan pl = make_plan(B, C, S);
  const auto* pt = params.begin();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "flowkern_channel_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = out.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    const Params<scalar_t> p{pt[0].data_ptr<scalar_t>(), pt[1].data_ptr<scalar_t>(),
                             OP == kActNorm ? nullptr : pt[2].data_ptr<scalar_t>(),
                             OP == kActNorm ? nullptr : pt[3].data_ptr<scalar_t>()};
    auto coef = at::empty({3 * C}, acc_opts);
    auto coef_train = at::empty({train ? 4 * C : 0}, acc_opts);
    auto part = at::empty({std::max<int64_t>(1, 2 * pl.chunks * pl.stride)}, acc_opts);
    const acc_t* gld = grad_logdet.has_value() ? grad_logdet->data_ptr<acc_t>() : nullptr;
    auto ptr = [](at::Tensor& t) -> scalar_t* { return t.numel() ? t.data_ptr<scalar_t>() : nullptr; };
    auto run = [&](auto inv_c, auto train_c) {
      constexpr bool INV = decltype(inv_c)::value, TRAIN = decltype(train_c)::value;
      channel_coeffs_kernel<OP, INV, scalar_t, acc_t><<<1, kThreads, 0, stream>>>(
          p, static_cast<acc_t>(eps), C, S, coef.data_ptr<acc_t>(), nullptr, nullptr, B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      launch_reduce<TRAIN ? kGrad : kGradWrite, scalar_t, acc_t>(pl, grad_out.data_ptr<scalar_t>(),
                                                                 out.data_ptr<scalar_t>(), coef.data_ptr<acc_t>(),
                                                                 grad_in.data_ptr<scalar_t>(), part.data_ptr<acc_t>(),
                                                                 B, C, S, stream);
      if (C > 0) {
        channel_grads_finalize_kernel<OP, INV, TRAIN, scalar_t, acc_t>
            <<<static_cast<unsigned>((C + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
                part.data_ptr<acc_t>(), pl, gld, B, C, S, p, eps, ptr(g[0]), ptr(g[1]), ptr(g[2]), ptr(g[3]),
                TRAIN ? coef_train.data_ptr<acc_t>() : nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      if (TRAIN && numel > 0) {
        dispatch_index(numel, [&](auto idx) {
          using index_t = decltype(idx);
          batchnorm_train_grad_kernel<scalar_t, acc_t, index_t>
              <<<blocks_for(numel, out.get_device()), kThreads, 0, stream>>>(
                  grad_out.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), coef_train.data_ptr<acc_t>(),
                  grad_in.data_ptr<scalar_t>(), static_cast<index_t>(numel), static_cast<index_t>(C),
                  static_cast<index_t>(S));
        });
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    };
    if (train) run(std::false_type{}, std::true_type{});
    else dispatch_inverse(inverse, [&](auto inv_c) { run(inv_c, std::false_type{}); });
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> actnorm_fwd(const at::Tensor& x, const at::Tensor& shift,
                                               const at::Tensor& log_scale, bool inverse,
                                               const std::optional<at::Tensor>& logdet) {
  check_channel_inputs("actnorm", x, {shift, log_scale}, logdet);
  return launch_forward<kActNorm>(x, {shift, log_scale}, 0.0, inverse, logdet);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> actnorm_bwd(const at::Tensor& grad_out,
                                                           const std::optional<at::Tensor>& grad_logdet,
                                                           const at::Tensor& out, const at::Tensor& shift,
                                                           const at::Tensor& log_scale, bool inverse) {
  check_channel_inputs("actnorm", out, {shift, log_scale}, grad_logdet);
  check_channel_grad("actnorm", grad_out, out);
  auto grad_in = at::empty_like(out);
  std::array<at::Tensor, 4> g{at::empty_like(shift), at::empty_like(log_scale), at::Tensor(), at::Tensor()};
  g[2] = at::empty({0}, shift.options());
  g[3] = at::empty({0}, shift.options());
  launch_backward<kActNorm>(grad_out, grad_logdet, out, {shift, log_scale}, 0.0, inverse, false, grad_in, g);
  return {grad_in, g[0], g[1]};
}

std::tuple<at::Tensor, at::Tensor> batch_stats(const at::Tensor& x) {
  check_channel_inputs("batch_stats", x, {}, std::nullopt);
  TORCH_CHECK(x.size(1) == 0 || x.numel() > 0, "flowkern: batch_stats needs at least one value per channel, got x of "
              "shape ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), C = x.size(1), S = spatial_size(x);
  auto mean = at::empty({C}, x.options());
  auto var = at::empty({C}, x.options());
  if (C == 0) return {mean, var};
  const Plan pl = make_plan(B, C, S);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "flowkern_batch_stats_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc_opts = x.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
    auto pivot = at::empty({C}, acc_opts);
    auto part = at::empty({2 * pl.chunks * pl.stride}, acc_opts);
    const unsigned cblocks = static_cast<unsigned>((C + kThreads - 1) / kThreads);
    const double n = static_cast<double>(B * S);
    // Two passes, as PyTorch's batch norm: the mean, then the sums around it.
    launch_reduce<kStats, scalar_t, acc_t>(pl, x.data_ptr<scalar_t>(), nullptr, nullptr, nullptr,
                                           part.data_ptr<acc_t>(), B, C, S, stream);
    batch_stats_finalize_kernel<false, scalar_t, acc_t><<<cblocks, kThreads, 0, stream>>>(
        part.data_ptr<acc_t>(), pl, C, n, pivot.data_ptr<acc_t>(), nullptr, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_reduce<kStats, scalar_t, acc_t>(pl, x.data_ptr<scalar_t>(), nullptr, pivot.data_ptr<acc_t>(), nullptr,
                                           part.data_ptr<acc_t>(), B, C, S, stream);
    batch_stats_finalize_kernel<true, scalar_t, acc_t><<<cblocks, kThreads, 0, stream>>>(
        part.data_ptr<acc_t>(), pl, C, n, pivot.data_ptr<acc_t>(), mean.data_ptr<scalar_t>(), var.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> batchnorm_flow_fwd(const at::Tensor& x, const at::Tensor& mean,
                                                      const at::Tensor& var, const at::Tensor& log_gamma,
                                                      const at::Tensor& beta, double eps, bool inverse,
                                                      const std::optional<at::Tensor>& logdet) {
  check_channel_inputs("batchnorm_flow", x, {mean, var, log_gamma, beta}, logdet);
  return launch_forward<kBatchNormFlow>(x, {mean, var, log_gamma, beta}, eps, inverse, logdet);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> batchnorm_flow_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_logdet, const at::Tensor& out,
    const at::Tensor& mean, const at::Tensor& var, const at::Tensor& log_gamma, const at::Tensor& beta, double eps,
    bool inverse, bool batch_stats) {
  check_channel_inputs("batchnorm_flow", out, {mean, var, log_gamma, beta}, grad_logdet);
  check_channel_grad("batchnorm_flow", grad_out, out);
  TORCH_CHECK(!(batch_stats && inverse), "flowkern: batchnorm_flow's batch-statistics backward is forward-only");
  auto grad_in = at::empty_like(out);
  std::array<at::Tensor, 4> g{batch_stats ? at::empty({0}, mean.options()) : at::empty_like(mean),
                              batch_stats ? at::empty({0}, var.options()) : at::empty_like(var),
                              at::empty_like(log_gamma), at::empty_like(beta)};
  launch_backward<kBatchNormFlow>(grad_out, grad_logdet, out, {mean, var, log_gamma, beta}, eps, inverse,
                                   batch_stats, grad_in, g);
  return {grad_in, g[0], g[1], g[2], g[3]};
}

}  // namespace cuda
}  // namespace flowkern

TORCH_LIBRARY_IMPL(flowkern, CUDA, m) {
  m.impl("actnorm_fwd", &flowkern::cuda::actnorm_fwd);
  m.impl("actnorm_bwd", &flowkern::cuda::actnorm_bwd);
  m.impl("batch_stats", &flowkern::cuda::batch_stats);
  m.impl("batchnorm_flow_fwd", &flowkern::cuda::batchnorm_flow_fwd);
  m.impl("batchnorm_flow_bwd", &flowkern::cuda::batchnorm_flow_bwd);
}
