// CUDA schedule of truncation: one block per row, the kept set found by
// radix descent (radix_truncate_row, truncation.h) with the block as its
// team: histograms in shared memory, exact integer masses added by atomics,
// reductions in the fixed order of block_reduce. The record only (threshold,
// kept, kept mass, cut; params.kept_logits is not written): the kept logits
// are formed from the threshold by the caller. A refused row reports its error word and gets a NaN record.
#include <pgest/truncation.h>

#include "common.cuh"

namespace pgest {
namespace cuda {
namespace {

__device__ __forceinline__ long long warp_min_ll(long long v) {
  for (int o = 16; o > 0; o >>= 1) {
    const long long w = __shfl_xor_sync(0xffffffffu, v, o);
    v = w < v ? w : v;
  }
  return v;
}

template <class Acc>
struct BlockTeam {
  unsigned long long* counts;  // shared, kRadixBins each
  unsigned long long* masses;
  double* red_d;               // shared, kWarps each: the reductions' scratch
  Acc* red_a;
  long long* red_i;
  unsigned long long* red_u;

  __device__ int rank() const { return int(threadIdx.x); }
  __device__ int size() const { return int(blockDim.x); }
  __device__ void sync() const { __syncthreads(); }
  __device__ void clear() const {
    __syncthreads();  // every thread has read the last histogram
    for (int d = threadIdx.x; d < kRadixBins; d += blockDim.x) counts[d] = masses[d] = 0ull;
    __syncthreads();
  }
  __device__ void count(int bin) const { atomicAdd(&counts[bin], 1ull); }
  __device__ void add_mass(int bin, uint64_t m) const { atomicAdd(&masses[bin], static_cast<unsigned long long>(m)); }
  __device__ double sum(double v) const { return block_sum<double>(v, red_d); }
  __device__ uint64_t sum(uint64_t v) const {
    return block_sum<unsigned long long>(static_cast<unsigned long long>(v), red_u);
  }
  __device__ int64_t sum(int64_t v) const { return block_sum<long long>(static_cast<long long>(v), red_i); }
  __device__ Acc max(Acc v) const { return block_max<Acc>(v, red_a); }
  __device__ Acc min(Acc v) const { return -block_max<Acc>(-v, red_a); }
  __device__ int64_t min(int64_t v) const {
    return block_reduce<long long, warp_min_ll>(static_cast<long long>(v), red_i, static_cast<long long>(INT64_MAX));
  }
};

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) truncation_kernel(TruncationArgs a, Launch l) {
  __shared__ unsigned long long counts[kRadixBins], masses[kRadixBins];
  __shared__ double red_d[kWarps];
  __shared__ Acc red_a[kWarps];
  __shared__ long long red_i[kWarps];
  __shared__ unsigned long long red_u[kWarps];
  BlockTeam<Acc> team{counts, masses, red_d, red_a, red_i, red_u};
  const T* base = static_cast<const T*>(a.logits);
  const TruncationParams& p = a.params;
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    int64_t bad_col = -1;
    const Status st = radix_truncate_row<T, Acc>(team, base + i * a.row_stride, a.cols, a.col_stride, p, i, bad_col);
    if (st != kOk && threadIdx.x == 0) {
      report(l.err_buf, i, st, bad_col);
      if (p.threshold) static_cast<Acc*>(p.threshold)[i] = Acc(NAN);
      if (p.kept) p.kept[i] = 0;
      if (p.kept_mass) p.kept_mass[i] = NAN;
      if (p.cut) static_cast<Acc*>(p.cut)[i] = Acc(NAN);
    }
    __syncthreads();
  }
}

template <class T>
Status run(const TruncationArgs& a, const Launch& l, ErrorInfo* err) {
  using Acc = typename AccOf<T>::type;
  truncation_kernel<T, Acc><<<row_blocks(a.rows), kThreads, 0, static_cast<cudaStream_t>(l.stream)>>>(a, l);
  return check_launch(err);
}

}  // namespace

Status truncation(const TruncationArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  DeviceGuard guard(l.device);
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, l, err); });
}

}  // namespace cuda
}  // namespace pgest
