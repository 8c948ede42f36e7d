// reinforce_grad: sample S actions per row, reward them, subtract a baseline
// and emit the seed's one-hot score gradient
//     grad[i, a] = sum_s [a_is == a] (b_is - r_is) / (B * S)
// in one pass over the rows. Only `grad` is (B, K); everything else is O(B * S).
#pragma once

#include "action_groups.h"
#include "dtype.h"
#include "philox.h"
#include "status.h"

namespace pgest {

enum BaselineKind : int32_t {
  kBaselineNone = 0,      // b = 0
  kBaselineConstant = 1,  // b = baseline_value
  kBaselineTensor = 2,    // b = baseline[i], a (B,) tensor of any float dtype
  kBaselineMean = 3,      // b = mean of all B * S rewards
  kBaselineRloo = 4,      // b_is = mean of the other S - 1 rewards of row i
};

// Plain data handed over by the binding; strides are in elements.
struct ReinforceGradArgs {
  const void* log_probs = nullptr;
  int32_t dtype = kFloat32;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;

  const int64_t* labels = nullptr;  // rewards from labels: r = [a == labels[i]]
  int64_t label_stride = 1;
  const void* reward_table = nullptr;  // or from a table: r = table[i, a]
  int32_t reward_dtype = kFloat32;
  int64_t reward_row_stride = 0, reward_col_stride = 1;  // row stride 0: one (K,) table

  int32_t baseline_kind = kBaselineNone;
  double baseline_value = 0.0;
  const void* baseline = nullptr;
  int32_t baseline_dtype = kFloat32;
  int64_t baseline_stride = 1;

  int64_t num_samples = 1;
  uint64_t seed = 0, offset = 0;

  int64_t* actions = nullptr;  // (B, S)
  float* rewards = nullptr;    // (B, S)
  void* grad = nullptr;        // (B, K) contiguous, dtype of log_probs
  int64_t* order = nullptr;    // CUDA, S > kPairwiseSamples: (B, S) scratch of for_each_action

  // Set to 1 when a row's log Z = log sum exp(log_probs) is further than
  // normalised_tol from 0 (the input is not log-probabilities); may be null.
  int32_t* unnormalised = nullptr;
  double normalised_tol = 1e-3;

  int32_t num_threads = 1;
};

namespace cpu {
// Picks the widest instruction set this CPU has (csrc/cpu/dispatch.cpp).
Status reinforce_grad(const ReinforceGradArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest

PGEST_NS_BEGIN

// The reward of action `a` in row `i`, or NaN-checked by the caller.
PGEST_HD double reward_of(const ReinforceGradArgs& a, int64_t i, int64_t action) {
  if (a.labels) return a.labels[i * a.label_stride] == action ? 1.0 : 0.0;
  return load_any(a.reward_table, a.reward_dtype, i * a.reward_row_stride + action * a.reward_col_stride);
}

// Baseline of sample s of row i. `row_rewards` are that row's S rewards,
// `row_total` their sum in double (kBaselineRloo: O(1) a sample, not O(S))
// and `batch_mean` the mean over the batch (kBaselineMean).
PGEST_HD double baseline_of(const ReinforceGradArgs& a, int64_t i, int64_t s,
                            const float* row_rewards, double row_total, double batch_mean) {
  switch (a.baseline_kind) {
    case kBaselineConstant: return a.baseline_value;
    case kBaselineTensor: return load_any(a.baseline, a.baseline_dtype, i * a.baseline_stride);
    case kBaselineMean: return batch_mean;
    case kBaselineRloo: return (row_total - row_rewards[s]) / double(a.num_samples - 1);
    default: return 0.0;
  }
}

// Writes row i's S gradient entries into a zeroed grad row. Samples that drew
// the same action are summed in double before the single rounding to T.
// `order`: S entries of scratch (for_each_action).
template <class T>
PGEST_HD void write_row_grad(const ReinforceGradArgs& a, int64_t i, double batch_mean, T* grad_row, int64_t* order) {
  const int64_t S = a.num_samples;
  const int64_t* act = a.actions + i * S;
  const float* rew = a.rewards + i * S;
  const double scale = 1.0 / (double(a.rows) * double(S));
  double row_total = 0.0;
  if (a.baseline_kind == kBaselineRloo)
    for (int64_t j = 0; j < S; ++j) row_total += rew[j];
  for_each_action(act, S, order, [](int64_t) { return false; }, [&](int64_t action, const int64_t* idx, int64_t m) {
    double g = 0.0;
    for (int64_t j = 0; j < m; ++j)
      g += (baseline_of(a, i, idx[j], rew, row_total, batch_mean) - double(rew[idx[j]])) * scale;
    grad_row[action] = store<T>(g);
  });
}

PGEST_NS_END
