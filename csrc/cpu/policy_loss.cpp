// CPU schedule of policy_loss forward and backward: threads over rows; the
// forward's row statistics come from the chunk pass of row_stats.h, the
// backward writes each row once with native vectors (vec.h).
#include <pgest/policy_loss.h>

#include <cmath>

#include "parallel.h"
#include "row_scratch.h"
#include "zero_fill.h"

PGEST_NS_BEGIN
namespace {

// The row's samples that count (not ignore_index); reports an action out of range.
inline Status check_actions(const PolicyLossArgs& a, int64_t i, int64_t& live, ErrorInfo& err) {
  live = 0;
  for (int64_t s = 0; s < a.num_samples; ++s) {
    const int64_t act = a.actions[i * a.num_samples + s];
    if (act == a.ignore_index) continue;
    if (act < 0 || act >= a.cols) { err.col = s; err.index = act; return kActionOutOfRange; }
    ++live;
  }
  return kOk;
}

template <class T>
Status forward(const PolicyLossArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.logits);
  const Acc* w = static_cast<const Acc*>(a.weights);
  Acc* loss = static_cast<Acc*>(a.loss);
  Acc* lse = static_cast<Acc*>(a.lse);
  Acc* entropy = static_cast<Acc*>(a.entropy);
  const Acc beta = Acc(a.entropy_weight);
  const bool with_entropy = a.entropy_weight != 0.0;
  const int threads = a.stats_given ? 1 : threads_for(double(a.rows) * double(K + 16), a.num_threads);
  const ErrorInfo first = parallel_rows(a.rows, threads, [&](int64_t begin, int64_t end,
                                                            const std::atomic<int64_t>& lowest_failed) {
    ErrorInfo err;
    RowScratch<Acc> sc(a.stats_given ? 1 : K, 1, !a.stats_given && a.col_stride != 1);
    if (!sc.ok) { err.status = kOutOfMemory; err.row = begin; return err; }
    for (int64_t i = begin; i < end; ++i) {
      if (lowest_failed.load(std::memory_order_relaxed) < i) break;
      int64_t live;
      Status st = check_actions(a, i, live, err);
      if (st == kOk && live == 0) {  // an ignored row contributes nothing
        loss[i] = Acc(0);
        if (!a.stats_given) { lse[i] = Acc(0); entropy[i] = Acc(0); }
        continue;
      }
      if (st == kOk && !a.stats_given) {
        st = with_row(base, i, a.row_stride, a.col_stride, K, sc, [&](const auto* x) {
          const RowStats<Acc> rs = with_entropy
              ? row_stats<true>(x, K, sc.weights, sc.chunk_max, sc.e)
              : row_stats<false>(x, K, sc.weights, sc.chunk_max, sc.e);
          if (const Status bad = row_status(rs, x, err)) return bad;
          const Acc log_z = std::log(rs.z);
          lse[i] = rs.max + log_z;
          entropy[i] = with_entropy ? log_z - rs.ex_dot / rs.z : Acc(0);
          return kOk;
        });
      }
      if (st != kOk) { err.status = st; err.row = i; return err; }
      Acc l = -beta * entropy[i];
      const T* row = base + i * a.row_stride;
      for (int64_t s = 0; s < S; ++s) {
        const int64_t act = a.actions[i * S + s];
        if (act == a.ignore_index) continue;
        const Acc logp = load<Acc>(row[act * a.col_stride]) - lse[i];
        // w * log p with w = 0 and log p = -inf (an impossible action) is 0.
        if (w[i * S + s] != Acc(0)) l -= w[i * S + s] * logp;
      }
      loss[i] = l;
    }
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

// One row of the gradient: the dense softmax part for every entry, then the
// sampled entries rewritten with their one-hot terms added before the single
// rounding to T.
template <class T, class Acc, class X>
void backward_row(const PolicyLossArgs& a, int64_t i, const X* x, T* g, bool streaming) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const int64_t K = a.cols, S = a.num_samples;
  const Acc* w = static_cast<const Acc*>(a.weights) + i * S;
  const Acc up = static_cast<const Acc*>(a.grad_loss)[i];
  const Acc lse = static_cast<const Acc*>(a.lse)[i];
  const Acc h = static_cast<const Acc*>(a.entropy)[i];
  Acc wsum = 0;
  for (int64_t s = 0; s < S; ++s)
    if (a.actions[i * S + s] != a.ignore_index) wsum += w[s];
  const Acc alpha = up * wsum, gamma = up * Acc(a.entropy_weight);

  int64_t k = 0;
  const V vl = splat<V>(lse), va = splat<V>(alpha), vg = splat<V>(gamma), vh = splat<V>(h);
  auto dense = [&](int64_t at) {
    const V d = loadv(x + at) - vl;
    const V p = exp_nonpos(d);
    return select(p > Acc(0), p * (va + vg * (d + vh)), V{});
  };
  auto scalar = [&](int64_t at) { g[at] = store<T>(policy_grad_dense(load<Acc>(x[at]), lse, alpha, gamma, h)); };
  bool streamed = false;
  if constexpr (kStreamable<T>) {  // fp16 has no streaming store
    if (streaming) {
      // Scalar up to the first vector-aligned entry, then whole aligned vectors.
      for (; k < K && reinterpret_cast<uintptr_t>(g + k) % (W * sizeof(T)) != 0; ++k) scalar(k);
      for (; k + W <= K; k += W) stream_storev(g + k, dense(k));
      stream_fence();
      streamed = true;
    }
  }
  if (!streamed)
    for (; k + W <= K; k += W) storev(g + k, dense(k));
  for (; k < K; ++k) scalar(k);

  policy_grad_one_hot(a, i, x, 1, w, up, lse, alpha, gamma, h, g);
}

template <class T>
Status backward(const PolicyLossArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const int threads = threads_for(double(a.rows) * double(K + 16), a.num_threads);
  const bool streaming = double(a.rows) * double(K) * sizeof(T) > double(kStreamingBytes);
  const ErrorInfo first = parallel_rows(a.rows, threads, [&](int64_t begin, int64_t end,
                                                            const std::atomic<int64_t>&) {
    ErrorInfo err;
    RowScratch<Acc> sc(K, 1, a.col_stride != 1);
    if (!sc.ok) { err.status = kOutOfMemory; err.row = begin; return err; }
    for (int64_t i = begin; i < end; ++i) {
      T* g = grad + i * K;
      bool live = false;
      for (int64_t s = 0; s < S && !live; ++s) live = a.actions[i * S + s] != a.ignore_index;
      if (!live) {
        std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(K));
        continue;
      }
      with_row(base, i, a.row_stride, a.col_stride, K, sc, [&](const auto* x) {
        backward_row<T, Acc>(a, i, x, g, streaming);
        return 0;
      });
    }
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

}  // namespace

Status policy_loss_forward_cpu(const PolicyLossArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return forward<typename decltype(t)::type>(a, err); });
}

Status policy_loss_backward_cpu(const PolicyLossArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return backward<typename decltype(t)::type>(a, err); });
}

PGEST_NS_END
