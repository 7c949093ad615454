// Pieces every CUDA launcher shares: the block size, a cached multiprocessor count and the
// deterministic block reduction of a row's log-det.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace flowkern {
namespace cuda {

constexpr int kThreads = 256;

inline int64_t multiprocessor_count(int device) {
  static int cached[64] = {0};  // per device; a benign race writes the same value
  if (device < 0 || device >= 64) device = 0;
  if (cached[device] == 0)
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&cached[device], cudaDevAttrMultiProcessorCount, device));
  return cached[device];
}

// Sum over the block (blockDim.x a multiple of 32, at most kThreads); thread 0 gets the total.
// A fixed order of shuffles and one shared-memory pass: the same result run to run.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : acc_t(0);
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

}  // namespace cuda
}  // namespace flowkern
