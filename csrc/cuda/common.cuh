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

// Block-wide sum / max, result in every thread. `scratch` holds kWarps values.
// The order of additions is fixed by the launch shape, so a row's sum does not
// depend on anything but the row.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < kWarps ? scratch[lane] : T(0);
  return warp_sum(r);
}

template <class T>
__device__ __forceinline__ T block_max(T v, T* scratch) {
  v = warp_max(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  T r = lane < kWarps ? scratch[lane] : -T(INFINITY);
  return warp_max(r);
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

// Rows beyond the 65535 limit of grid.y/z go to grid.x (2^31 - 1).
inline dim3 row_grid(int64_t rows) { return dim3(unsigned(rows)); }

}  // namespace cuda
}  // namespace pgest
