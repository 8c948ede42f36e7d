// CUDA schedule of sample: one block per row (row_sampler.cuh) with the
// entropy term, then the draws and their log-probabilities.
#include <pgest/log_prob.h>
#include <pgest/sample.h>

#include "common.cuh"
#include "row_sampler.cuh"

namespace pgest {
namespace cuda {
namespace {

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleArgs a, Launch l, int64_t tile) {
  __shared__ Acc tile_w[kMaxTiles], tile_m[kMaxTiles], tile_dot[kMaxTiles];
  __shared__ Acc red[kWarps];
  __shared__ int flag;
  __shared__ DrawShared draw;
  const BlockRow<Acc> sm{tile_w, tile_m, tile_dot, red};
  uint64_t seed = a.seed, offset = a.offset;
  seed_offset(l, seed, offset);
  const int64_t K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.logits);
  Acc* log_prob = static_cast<Acc*>(a.log_prob);
  Acc* entropy = static_cast<Acc*>(a.entropy);
  Acc* row_max = static_cast<Acc*>(a.row_max);
  Acc* log_z = static_cast<Acc*>(a.log_z);
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    const T* x = base + i * a.row_stride;
    const DevRowStats<Acc> st = block_row_stats<true>(x, K, a.col_stride, tile, sm, &flag);
    int64_t* actions = a.actions + i * S;
    if (st.bad_col >= 0 || st.max == -Acc(INFINITY)) {
      // A refused row, poisoned until its deferred error is read: action -1
      // (no op takes it for an index), NaN statistics and log-probabilities.
      if (threadIdx.x == 0) {
        report(l.err_buf, i, st.bad_col >= 0 ? kNonFiniteInput : kAllNegInf, st.bad_col);
        row_max[i] = log_z[i] = entropy[i] = Acc(NAN);
      }
      for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
        actions[s] = -1;
        log_prob[i * S + s] = Acc(NAN);
      }
      continue;
    }
    block_draw(x, K, a.col_stride, tile, st, tile_w, seed, offset, i, S, actions, draw, a.uniforms);
    const Acc lz = log(st.z);
    if (threadIdx.x == 0) {
      row_max[i] = st.max;
      log_z[i] = lz;
      entropy[i] = entropy_of(lz, st.ex_dot, st.z);
    }
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x)
      log_prob[i * S + s] = log_prob_of(load<Acc>(x[actions[s] * a.col_stride]), st.max, lz);
    __syncthreads();
  }
}

template <class T>
Status run(const SampleArgs& a, const Launch& l, ErrorInfo* err) {
  using Acc = typename AccOf<T>::type;
  sample_kernel<T, Acc><<<row_blocks(a.rows), kThreads, 0, static_cast<cudaStream_t>(l.stream)>>>(a, l, tile_length(a.cols));
  return check_launch(err);
}

}  // namespace

Status sample(const SampleArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  DeviceGuard guard(l.device);
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, l, err); });
}

}  // namespace cuda
}  // namespace pgest
