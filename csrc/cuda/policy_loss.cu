// CUDA schedule of policy_loss: forward, one block per row (row_sampler.cuh's
// statistics) or, when sample's statistics are given, one thread per row;
// backward, one block per row writing every gradient entry once, coalesced,
// then the row's sampled entries rewritten with their one-hot terms.
#include <pgest/policy_loss.h>

#include "common.cuh"
#include "row_sampler.cuh"

namespace pgest {
namespace cuda {
namespace {

template <class T, class Acc>
__device__ Acc row_loss(const PolicyLossArgs& a, int64_t i, Acc lse, Acc entropy) {
  const T* row = static_cast<const T*>(a.logits) + i * a.row_stride;
  const Acc* w = static_cast<const Acc*>(a.weights) + i * a.num_samples;
  Acc l = -Acc(a.entropy_weight) * entropy;
  for (int64_t s = 0; s < a.num_samples; ++s) {
    const int64_t act = a.actions[i * a.num_samples + s];
    if (act == a.ignore_index || w[s] == Acc(0)) continue;
    l -= w[s] * (load<Acc>(row[act * a.col_stride]) - lse);
  }
  return l;
}

// 0: every sample ignored; 1: usable; -1: an action out of range (reported).
__device__ int check_row_actions(const PolicyLossArgs& a, int64_t i, int64_t* err_buf) {
  int live = 0;
  for (int64_t s = 0; s < a.num_samples; ++s) {
    const int64_t act = a.actions[i * a.num_samples + s];
    if (act == a.ignore_index) continue;
    if (act < 0 || act >= a.cols) {
      if (threadIdx.x == 0) report(err_buf, i, kActionOutOfRange, s);
      return -1;
    }
    live = 1;
  }
  return live;
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) forward_kernel(PolicyLossArgs a, Launch l, int64_t tile) {
  __shared__ Acc tile_w[kMaxTiles], tile_m[kMaxTiles], tile_dot[kMaxTiles];
  __shared__ Acc red[kWarps];
  __shared__ int flag;
  const BlockRow<Acc> sm{tile_w, tile_m, tile_dot, red};
  Acc* loss = static_cast<Acc*>(a.loss);
  Acc* lse = static_cast<Acc*>(a.lse);
  Acc* ent = static_cast<Acc*>(a.entropy);
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    const int live = check_row_actions(a, i, l.err_buf);
    if (live <= 0) {
      if (live == 0 && threadIdx.x == 0) { loss[i] = 0; lse[i] = 0; ent[i] = 0; }
      continue;
    }
    const T* x = static_cast<const T*>(a.logits) + i * a.row_stride;
    const DevRowStats<Acc> st = a.entropy_weight != 0.0
        ? block_row_stats<true>(x, a.cols, a.col_stride, tile, sm, &flag)
        : block_row_stats<false>(x, a.cols, a.col_stride, tile, sm, &flag);
    if (st.bad_col >= 0 || st.max == -Acc(INFINITY)) {
      if (threadIdx.x == 0) report(l.err_buf, i, st.bad_col >= 0 ? kNonFiniteInput : kAllNegInf, st.bad_col);
      continue;
    }
    if (threadIdx.x == 0) {
      const Acc log_z = log(st.z);
      lse[i] = st.max + log_z;
      ent[i] = a.entropy_weight != 0.0 ? log_z - st.ex_dot / st.z : Acc(0);
      loss[i] = row_loss<T, Acc>(a, i, lse[i], ent[i]);
    }
    __syncthreads();
  }
}

template <class T, class Acc>
__global__ void forward_given_kernel(PolicyLossArgs a, Launch l) {
  Acc* loss = static_cast<Acc*>(a.loss);
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < a.rows; i += int64_t(gridDim.x) * blockDim.x) {
    int live = 0;
    bool bad = false;
    for (int64_t s = 0; s < a.num_samples; ++s) {
      const int64_t act = a.actions[i * a.num_samples + s];
      if (act == a.ignore_index) continue;
      if (act < 0 || act >= a.cols) { report(l.err_buf, i, kActionOutOfRange, s); bad = true; break; }
      live = 1;
    }
    if (bad) continue;
    loss[i] = live ? row_loss<T, Acc>(a, i, static_cast<const Acc*>(a.lse)[i], static_cast<const Acc*>(a.entropy)[i])
                   : Acc(0);
  }
}

template <class T, class Acc>
__global__ void __launch_bounds__(kThreads) backward_kernel(PolicyLossArgs a) {
  const int64_t K = a.cols, S = a.num_samples;
  for (int64_t i = blockIdx.x; i < a.rows; i += gridDim.x) {
    T* g = static_cast<T*>(a.grad) + i * K;
    const T* x = static_cast<const T*>(a.logits) + i * a.row_stride;
    const Acc* w = static_cast<const Acc*>(a.weights) + i * S;
    const Acc up = static_cast<const Acc*>(a.grad_loss)[i];
    const Acc lse = static_cast<const Acc*>(a.lse)[i];
    const Acc h = static_cast<const Acc*>(a.entropy)[i];
    Acc wsum = 0;
    bool live = false;
    for (int64_t s = 0; s < S; ++s) {
      if (a.actions[i * S + s] == a.ignore_index) continue;
      wsum += w[s];
      live = true;
    }
    const Acc alpha = up * wsum, gamma = up * Acc(a.entropy_weight);
    for (int64_t k = threadIdx.x; k < K; k += blockDim.x)
      g[k] = live ? store<T>(policy_grad_dense(load<Acc>(x[k * a.col_stride]), lse, alpha, gamma, h)) : store<T>(0.0);
    __syncthreads();
    if (live && threadIdx.x == 0) policy_grad_one_hot(a, i, x, a.col_stride, w, up, lse, alpha, gamma, h, g);
    __syncthreads();
  }
}

template <class T>
Status forward(const PolicyLossArgs& a, const Launch& l, ErrorInfo* err) {
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
Status backward(const PolicyLossArgs& a, const Launch& l, ErrorInfo* err) {
  using Acc = typename AccOf<T>::type;
  backward_kernel<T, Acc><<<row_blocks(a.rows), kThreads, 0, static_cast<cudaStream_t>(l.stream)>>>(a);
  return check_launch(err);
}

}  // namespace

Status policy_loss_forward(const PolicyLossArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  DeviceGuard guard(l.device);
  return dispatch_float(a.dtype, [&](auto t) { return forward<typename decltype(t)::type>(a, l, err); });
}

Status policy_loss_backward(const PolicyLossArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  DeviceGuard guard(l.device);
  return dispatch_float(a.dtype, [&](auto t) { return backward<typename decltype(t)::type>(a, l, err); });
}

}  // namespace cuda
}  // namespace pgest
