// CUDA schedule of reinforce_grad: one block per row (grid-stride over rows,
// so any batch fits the grid) draws the row's samples, rewards them and
// zero-fills its gradient row; a second, O(B * S) kernel applies the baseline
// and writes the gradient entries (write_row_grad of the shared header).
#include <pgest/reinforce_grad.h>

#include "common.cuh"
#include "row_sampler.cuh"

namespace pgest {
namespace cuda {
namespace {

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) rows_kernel(ReinforceGradArgs a, Launch l, int64_t tile) {
  __shared__ Acc tile_w[kMaxTiles], tile_m[kMaxTiles];
  __shared__ Acc red[kWarps];
  __shared__ int flag;
  __shared__ DrawShared draw;
  const BlockRow<Acc> sm{tile_w, tile_m, tile_m, red};  // no entropy: tile_dot is never written
  uint64_t seed = a.seed, offset = a.offset;
  seed_offset(l, seed, offset);
  const int64_t K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.log_probs);
  T* grad = static_cast<T*>(a.grad);
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    int status = kOk;
    int64_t col = 0;
    if (a.labels) {
      const int64_t label = a.labels[i * a.label_stride];
      if (label < 0 || label >= K) status = kLabelOutOfRange, col = label;
    }
    if (status == kOk && a.baseline_kind == kBaselineTensor &&
        !isfinite(float(load_any(a.baseline, a.baseline_dtype, i * a.baseline_stride))))
      status = kNonFiniteBaseline;
    const T* x = base + i * a.row_stride;
    DevRowStats<Acc> st{};
    if (status == kOk) {  // block-uniform: every thread takes the same branch
      st = block_row_stats<false>(x, K, a.col_stride, tile, sm, &flag);
      if (st.bad_col >= 0 || st.max == -Acc(INFINITY)) status = st.bad_col >= 0 ? kNonFiniteInput : kAllNegInf, col = st.bad_col;
    }
    if (status != kOk) {
      // Refused, poisoned until the deferred error is read: NaN gradient and
      // rewards, actions -1, which grad_kernel skips (they index nothing).
      if (threadIdx.x == 0) report(l.err_buf, i, status, col);
      for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
        a.actions[i * S + s] = -1;
        a.rewards[i * S + s] = NAN;
      }
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) grad[i * K + k] = store<T>(double(NAN));
      __syncthreads();
      continue;
    }
    if (a.unnormalised && threadIdx.x == 0 && !(fabs(double(st.max) + log(double(st.z))) <= a.normalised_tol))
      *a.unnormalised = 1;
    int64_t* actions = a.actions + i * S;
    block_draw(x, K, a.col_stride, tile, st, tile_w, seed, offset, i, S, actions, draw);
    for (int64_t s = threadIdx.x; s < S; s += blockDim.x) {
      const double r = reward_of(a, i, actions[s]);
      if (!isfinite(float(r))) report(l.err_buf, i, kNonFiniteReward, actions[s]);
      a.rewards[i * S + s] = float(r);
    }
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x) grad[i * K + k] = store<T>(0.0);
    __syncthreads();
  }
}

__global__ void mean_kernel(const float* r, int64_t n, double* out) {
  __shared__ double red[kWarps];
  double s = 0;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += r[j];
  s = block_sum(s, red);
  if (threadIdx.x == 0) *out = s / double(n);
}

template <class T>
__global__ void grad_kernel(ReinforceGradArgs a, const double* mean) {
  const double m = mean ? *mean : 0.0;
  T* grad = static_cast<T*>(a.grad);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows; i += int64_t(gridDim.x) * blockDim.x)
    if (a.actions[i * a.num_samples] >= 0)  // -1: a refused row, already NaN
      write_row_grad(a, i, m, grad + i * a.cols, a.order ? a.order + i * a.num_samples : nullptr);
}

template <class T>
Status run(const ReinforceGradArgs& a, const Launch& l, ErrorInfo* err) {
  using Acc = typename AccOf<T>::type;
  const cudaStream_t stream = static_cast<cudaStream_t>(l.stream);
  const int64_t tile = tile_length(a.cols);
  rows_kernel<T, Acc><<<row_blocks(a.rows), kThreads, 0, stream>>>(a, l, tile);
  if (check_launch(err) != kOk) return kCudaError;
  const bool mean = a.baseline_kind == kBaselineMean;
  if (mean) {
    mean_kernel<<<1, kThreads, 0, stream>>>(a.rewards, a.rows * a.num_samples, l.scratch);
    if (check_launch(err) != kOk) return kCudaError;
  }
  grad_kernel<T><<<item_blocks(a.rows), 256, 0, stream>>>(a, mean ? l.scratch : nullptr);
  return check_launch(err);
}

}  // namespace

Status reinforce_grad(const ReinforceGradArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  DeviceGuard guard(l.device);
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, l, err); });
}

int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // no driver or no device: clear the sticky error
    return 0;
  }
  return n;
}

const char* error_string(int code) { return cudaGetErrorString(static_cast<cudaError_t>(code)); }

}  // namespace cuda
}  // namespace pgest
