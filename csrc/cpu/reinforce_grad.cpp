// CPU schedule of reinforce_grad: OpenMP threads over rows (static split, so a
// row's draw never depends on the thread count), the chunk pass of
// row_stats.h inside a row; rows of <= kLanes entries drawn once each go W at
// a time (narrow_rows.h). Compiled once per instruction set;
// PGEST_KERNEL_NS names the copy.
#include <pgest/reinforce_grad.h>

#include <cmath>
#include <cstdlib>

#include "narrow_rows.h"
#include "parallel.h"
#include "row_scratch.h"
#include "zero_fill.h"

PGEST_NS_BEGIN
namespace {

// The row's label and baseline, checked before anything is drawn.
inline Status check_row_inputs(const ReinforceGradArgs& a, int64_t i, ErrorInfo& err) {
  if (a.labels) {
    const int64_t label = a.labels[i * a.label_stride];
    if (label < 0 || label >= a.cols) { err.row = i; err.index = label; return kLabelOutOfRange; }
  }
  if (a.baseline_kind == kBaselineTensor) {
    // Rewards are float32: a baseline beyond its range is as unusable as inf.
    const double b = load_any(a.baseline, a.baseline_dtype, i * a.baseline_stride);
    if (!std::isfinite(float(b))) { err.row = i; err.value = b; return kNonFiniteBaseline; }
  }
  return kOk;
}

template <class Acc>
inline void note_unnormalised(const ReinforceGradArgs& a, const RowStats<Acc>& st) {
  if (a.unnormalised && !(std::fabs(double(st.max) + std::log(st.z)) <= a.normalised_tol))
    __atomic_store_n(a.unnormalised, 1, __ATOMIC_RELAXED);
}

// The rewards of row i's drawn actions.
inline Status reward_row(const ReinforceGradArgs& a, int64_t i, ErrorInfo& err) {
  const int64_t S = a.num_samples;
  const int64_t* actions = a.actions + i * S;
  float* rewards = a.rewards + i * S;
  for (int64_t s = 0; s < S; ++s) {
    const double r = reward_of(a, i, actions[s]);
    // Checked as the float32 the reward is stored in (a float64 table of 1e39 overflows).
    if (!std::isfinite(float(r))) { err.row = i; err.col = actions[s]; err.value = r; return kNonFiniteReward; }
    rewards[s] = float(r);
  }
  return kOk;
}

// Sample and reward one row. Returns kOk or the reason
// the row is unusable (err gets the details).
template <class T, class Acc>
Status process_row(const ReinforceGradArgs& a, int64_t i, const T* x, RowScratch<Acc>& sc,
                   ErrorInfo& err) {
  if (const Status bad = check_row_inputs(a, i, err)) return bad;
  const RowStats<Acc> st = row_stats<false>(x, a.cols, sc.weights, sc.chunk_max, sc.e);
  if (const Status bad = row_status(st, x, err)) return bad;
  note_unnormalised(a, st);
  draw_row(x, a.cols, st, a.seed, a.offset, i, a.num_samples, sc, a.actions + i * a.num_samples);
  return reward_row(a, i, err);
}

template <class T>
Status run(const ReinforceGradArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t B = a.rows, K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.log_probs);
  T* grad = static_cast<T*>(a.grad);
  const bool gather = a.col_stride != 1;
  const bool streaming = double(B) * double(K) * sizeof(T) > double(kStreamingBytes);
  const int threads = threads_for(double(B) * double(K + 16), a.num_threads);
  const ErrorInfo first = parallel_rows(B, threads, [&](int64_t begin, int64_t end,
                                                       const std::atomic<int64_t>& lowest_failed) {
    ErrorInfo err;
    RowScratch<Acc> sc(K, S, gather);
    if (!sc.ok) { err.status = kOutOfMemory; err.row = begin; return err; }
    NarrowGroup<Acc> g;
    constexpr int W = NarrowGroup<Acc>::W;
    // One draw per row from rows of <= kLanes entries: W rows at a time. A
    // group with a bad label, baseline or reward goes row by row, which
    // redraws the same actions and reports the first culprit.
    auto group = [&](int64_t i0) {
      for (int l = 0; l < W; ++l) {
        ErrorInfo scratch;
        if (check_row_inputs(a, i0 + l, scratch) != kOk) return false;
      }
      if (!narrow_stats(base, i0, a.row_stride, int(K), g)) return false;
      for (int l = 0; l < W; ++l) {
        const int64_t i = i0 + l;
        const RowStats<Acc> st = narrow_row_stats(g, l);
        note_unnormalised(a, st);
        a.actions[i] = narrow_walk(g, l, int(K), draw_uniform(nullptr, a.seed, a.offset, i, 1, 0) * st.z);
        ErrorInfo scratch;
        if (reward_row(a, i, scratch) != kOk) return false;
      }
      zero_fill(grad + i0 * K, sizeof(T) * size_t(W * K), streaming);
      return true;
    };
    auto row = [&](int64_t i) {
      const Status st = with_row(base, i, a.row_stride, a.col_stride, K, sc,
                                 [&](const auto* x) { return process_row(a, i, x, sc, err); });
      if (st != kOk) { err.status = st; err.row = i; return st; }
      zero_fill(grad + i * K, sizeof(T) * size_t(K), streaming);
      return kOk;
    };
    narrow_or_rows<W>(S == 1 && narrow_rows(K, a.col_stride), begin, end, lowest_failed, group, row);
    zero_fill_fence();
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }

  double batch_mean = 0.0;
  if (a.baseline_kind == kBaselineMean) {
    // Serial and in row order: the same mean for any thread count.
    for (int64_t j = 0; j < B * S; ++j) batch_mean += a.rewards[j];
    batch_mean /= double(B * S);
  }
  const ErrorInfo second = parallel_rows(
      B, B * S < 4096 ? 1 : a.num_threads, [&](int64_t begin, int64_t end, const std::atomic<int64_t>&) {
        ErrorInfo err;
        int64_t* order = nullptr;
        if (S > kPairwiseSamples && !(order = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * size_t(S))))) {
          err.status = kOutOfMemory; err.row = begin; return err;
        }
        for (int64_t i = begin; i < end; ++i) write_row_grad(a, i, batch_mean, grad + i * K, order);
        std::free(order);
        return err;
      });
  if (second.status != kOk) { *out_err = second; return Status(second.status); }
  return kOk;
}

}  // namespace

Status reinforce_grad_cpu(const ReinforceGradArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, err); });
}

PGEST_NS_END
