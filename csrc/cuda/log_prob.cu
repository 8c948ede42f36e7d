// CUDA schedule of log_prob: forward, one block per row (row_sampler.cuh's
// statistics) or, when sample's statistics are given, one thread per row;
// backward, one block per row writing every gradient entry once, coalesced,
// then the row's sampled entries rewritten with their one-hot terms.
#include <pgest/log_prob.h>

#include "common.cuh"
#include "row_sampler.cuh"

namespace pgest {
namespace cuda {
namespace {

// A refused row's outputs, all NaN: its error is read later (deferred
// checks, pgest/device_errors.py), and until then nothing computed from the
// row may look plausible. Written by the calling thread.
template <class Acc>
__device__ void poison_row(const LogProbArgs& a, int64_t i) {
  const Acc nan = Acc(NAN);
  Acc* lp = static_cast<Acc*>(a.log_prob) + i * a.num_samples;
  for (int64_t s = 0; s < a.num_samples; ++s) lp[s] = nan;
  if (a.loss) static_cast<Acc*>(a.loss)[i] = nan;
  if (!a.stats_given) {
    static_cast<Acc*>(a.row_max)[i] = nan;
    static_cast<Acc*>(a.log_z)[i] = nan;
    static_cast<Acc*>(a.entropy)[i] = nan;
  }
}

// 0: every sample ignored; 1: usable; -1: an action out of range (reported).
__device__ int row_actions_state(const LogProbArgs& a, int64_t i, int64_t* err_buf, int64_t bound = -1) {
  int64_t live;
  ErrorInfo e;
  if (check_row_actions(a, i, live, e, bound) != kOk) {
    if (threadIdx.x == 0) report(err_buf, i, kActionOutOfRange, e.col);
    return -1;
  }
  return a.num_samples == 0 || live > 0 ? 1 : 0;
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) forward_kernel(LogProbArgs a, Launch l, int64_t tile) {
  __shared__ Acc tile_w[kMaxTiles], tile_m[kMaxTiles], tile_dot[kMaxTiles];
  __shared__ Acc red[kWarps];
  __shared__ int flag;
  const BlockRow<Acc> sm{tile_w, tile_m, tile_dot, red};
  Acc* row_max = static_cast<Acc*>(a.row_max);
  Acc* log_z = static_cast<Acc*>(a.log_z);
  Acc* ent = static_cast<Acc*>(a.entropy);
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    const T* x = static_cast<const T*>(a.logits) + i * a.row_stride;
    const int live = row_actions_state(a, i, l.err_buf);
    if (live <= 0) {
      if (live == 0 && threadIdx.x == 0) {
        row_max[i] = 0; log_z[i] = 0; ent[i] = 0;
        write_log_probs<T, Acc>(a, i, x, Acc(0), Acc(0), Acc(0));
      } else if (threadIdx.x == 0) {
        poison_row<Acc>(a, i);
      }
      continue;
    }
    const DevRowStats<Acc> st = a.want_entropy
        ? block_row_stats<true>(x, a.cols, a.col_stride, tile, sm, &flag)
        : block_row_stats<false>(x, a.cols, a.col_stride, tile, sm, &flag);
    if (st.bad_col >= 0 || st.max == -Acc(INFINITY)) {
      if (threadIdx.x == 0) {
        report(l.err_buf, i, st.bad_col >= 0 ? kNonFiniteInput : kAllNegInf, st.bad_col);
        poison_row<Acc>(a, i);
      }
      continue;
    }
    if (threadIdx.x == 0) {
      const Acc lz = log(st.z);
      row_max[i] = st.max;
      log_z[i] = lz;
      ent[i] = a.want_entropy ? entropy_of(lz, st.ex_dot, st.z) : Acc(0);
      write_log_probs<T, Acc>(a, i, x, st.max, lz, ent[i]);
    }
    __syncthreads();
  }
}

template <class T, class Acc>
__global__ void forward_given_kernel(LogProbArgs a, Launch l) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t live;
    ErrorInfo e;
    if (check_row_actions(a, i, live, e) != kOk) {
      report(l.err_buf, i, kActionOutOfRange, e.col);
      poison_row<Acc>(a, i);
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + i * a.row_stride;
    if (a.num_samples > 0 && live == 0) {
      write_log_probs<T, Acc>(a, i, x, Acc(0), Acc(0), Acc(0));
    } else {
      write_log_probs<T, Acc>(a, i, x, static_cast<const Acc*>(a.row_max)[i], static_cast<const Acc*>(a.log_z)[i],
                              static_cast<const Acc*>(a.entropy)[i]);
    }
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) backward_kernel(LogProbArgs a, Launch l) {
  const int64_t K = a.cols;
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    T* g = static_cast<T*>(a.grad) + i * K;
    const T* x = static_cast<const T*>(a.logits) + i * a.row_stride;
    const int live = row_actions_state(a, i, l.err_buf, backward_bound(a));
    if (live < 0) {  // poisoned, as the forward's outputs of the row
      for (int64_t k = threadIdx.x; k < K; k += blockDim.x) g[k] = store<T>(double(NAN));
      continue;
    }
    const GradRow<Acc> r = live ? grad_row<Acc>(a, i) : GradRow<Acc>{};
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      g[k] = live ? store<T>(grad_dense(load<Acc>(x[k * a.col_stride]), r)) : store<T>(0.0);
    __syncthreads();
    if (live && threadIdx.x == 0) grad_one_hot(a, i, x, a.col_stride, r, g, a.order ? a.order + i * a.num_samples : nullptr);
    __syncthreads();
  }
}

template <class T>
Status forward(const LogProbArgs& a, const Launch& l, ErrorInfo* err) {
  using Acc = typename AccOf<T>::type;
  const cudaStream_t stream = static_cast<cudaStream_t>(l.stream);
  if (a.stats_given) {
    forward_given_kernel<T, Acc><<<item_blocks(a.rows), 256, 0, stream>>>(a, l);
  } else {
    forward_kernel<T, Acc><<<row_blocks(a.rows), kThreads, 0, stream>>>(a, l, tile_length(a.cols));
  }
  return check_launch(err);
}

template <class T>
Status backward(const LogProbArgs& a, const Launch& l, ErrorInfo* err) {
  using Acc = typename AccOf<T>::type;
  backward_kernel<T, Acc><<<row_blocks(a.rows), kThreads, 0, static_cast<cudaStream_t>(l.stream)>>>(a, l);
  return check_launch(err);
}

}  // namespace

Status log_prob_forward(const LogProbArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  DeviceGuard guard(l.device);
  return dispatch_float(a.dtype, [&](auto t) { return forward<typename decltype(t)::type>(a, l, err); });
}

Status log_prob_backward(const LogProbArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  DeviceGuard guard(l.device);
  return dispatch_float(a.dtype, [&](auto t) { return backward<typename decltype(t)::type>(a, l, err); });
}

}  // namespace cuda
}  // namespace pgest
