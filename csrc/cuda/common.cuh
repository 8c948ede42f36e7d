// Shared pieces of the CUDA schedules: block reductions, error reporting,
// the device guard and launch checking.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"

namespace pgest {
namespace cuda {

constexpr int kThreads = 256;  // threads per row block
constexpr int kWarps = kThreads / 32;

template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <class T>
__device__ __forceinline__ T warp_max(T v) {
  for (int o = 16; o > 0; o >>= 1) {
    const T w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w > v ? w : v;
  }
  return v;
}

// Block-wide reduction, result in every thread. `scratch` holds kWarps values.
// The order of the operations is fixed by the launch shape, so a row's sum
// does not depend on anything but the row.
template <class T, T (*WarpOp)(T)>
__device__ __forceinline__ T block_reduce(T v, T* scratch, T identity) {
  v = WarpOp(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  return WarpOp(lane < kWarps ? scratch[lane] : identity);
}

template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) { return block_reduce<T, warp_sum<T>>(v, scratch, T(0)); }

template <class T>
__device__ __forceinline__ T block_max(T v, T* scratch) {
  return block_reduce<T, warp_max<T>>(v, scratch, -T(INFINITY));
}

// Keep the failure of the lowest row: (row << 5 | status) packed in one word.
__device__ __forceinline__ void report(int64_t* err_buf, int64_t row, int status, int64_t col) {
  if (err_buf == nullptr) return;
  const unsigned long long key = (static_cast<unsigned long long>(row) << 5) | unsigned(status);
  const unsigned long long old = atomicMin(reinterpret_cast<unsigned long long*>(err_buf), key);
  if (key < old) err_buf[1] = col;  // best effort: the column of the lowest failing row
}

__device__ __forceinline__ void seed_offset(const Launch& l, uint64_t& seed, uint64_t& offset) {
  if (l.seed != nullptr) {
    seed = static_cast<uint64_t>(l.seed[0]);
    offset = static_cast<uint64_t>(l.seed[1]);
  }
}

// Sets the input's device for the scope of a launch and restores the caller's.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    cudaGetDevice(&previous_);
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

inline Status check_launch(ErrorInfo* err) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return kOk;
  err->status = kCudaError;
  err->index = int64_t(e);
  return kCudaError;
}

// Grids for the grid-stride kernels: a block per row (capped; the kernels loop
// over the rest), or one thread per item in blocks of 256.
inline unsigned row_blocks(int64_t rows) { return unsigned(rows < 65535 * 16 ? rows : 65535 * 16); }
inline unsigned item_blocks(int64_t items) {
  const int64_t b = (items + 255) / 256;
  return unsigned(b < 65535 ? b : 65535);
}

}  // namespace cuda
}  // namespace pgest
