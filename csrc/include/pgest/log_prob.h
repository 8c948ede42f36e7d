// log_prob: for a row of logits x, p = softmax(x), S actions a_s and the
// entropy H = -sum p log p,
//     log_prob_s = (x[a_s] - max) - log Z,   Z = sum exp(x - max)
// and, for upstream gradients g_s of log_prob_s and g_H of H,
//     dL/dx_k = sum_s g_s (1[k = a_s] - p_k) - g_H p_k (log p_k + H)
//             = p_k (alpha + gamma (log p_k + H)) + sum_s g_s 1[k = a_s],
// alpha = -sum_s g_s, gamma = -g_H. Every objective built on (log_prob, H)
// reaches the logits through this one formula: pgest.log_prob, policy_loss
// (g_s = -up * w_s, g_H = -up * beta) and reinforce all use these kernels.
//
// log p is formed as (x - max) - log Z, as torch.log_softmax does, never as
// x - (max + log Z): with a large common offset in a row the latter rounds
// log Z away. So the saved statistics are (max, log Z), not their sum.
//
// Forward reads the row once (not at all when the statistics come from
// `sample`); backward reads it once and writes the gradient once, with no
// zero-fill and no softmax kept in between.
#pragma once

#include "action_groups.h"
#include "dtype.h"
#include "math.h"
#include "status.h"
#include "truncation.h"

namespace pgest {

struct LogProbArgs {
  const void* logits = nullptr;
  int32_t dtype = 0;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;
  // (R, S) actions; entries equal to ignore_index count for nothing, and a row
  // whose every action is ignored is not read (log_prob, entropy and gradient
  // 0). S = 0: no actions, every row is read (entropy only).
  const int64_t* actions = nullptr;
  int64_t num_samples = 0;
  int64_t ignore_index = -100;
  bool has_ignore_index = true;  // false: every action must be in [0, K) (Categorical)
  // Forward outputs, accumulation type: log_prob (R, S), entropy (R,) (may be
  // null: not computed), row_max and log_z (R,) for the backward. With
  // stats_given, row_max, log_z and entropy are inputs (from `sample`).
  void* log_prob = nullptr;
  void* entropy = nullptr;
  void* row_max = nullptr;
  void* log_z = nullptr;
  bool want_entropy = true;  // false: entropy is written as 0 (policy_loss without its term)
  bool stats_given = false;
  // Optional fused surrogate (policy_loss): loss (R,) =
  // -sum_s weights_s log_prob_s - entropy_weight * H. weights (R, S) Acc.
  const void* weights = nullptr;
  double entropy_weight = 0.0;
  void* loss = nullptr;
  // Backward: g_s = row_scale_i * log_prob_scale * grad_log_prob[i, s],
  // g_H = row_scale_i * (grad_entropy ? grad_entropy[i] : entropy_scale).
  // Null pointers read as 0 (grad_log_prob) or 1 (row_scale). Accumulation type.
  // Element strides, so that broadcast upstream gradients (a sum's backward
  // hands over an expanded scalar) are read in place, not copied first.
  // grad_log_prob_row_stride < 0 means contiguous (R, S).
  const void* grad_log_prob = nullptr;
  int64_t grad_log_prob_row_stride = -1, grad_log_prob_sample_stride = 1;
  const void* grad_entropy = nullptr;
  int64_t grad_entropy_stride = 1;
  const void* row_scale = nullptr;
  int64_t row_scale_stride = 1;
  double log_prob_scale = 1.0;
  double entropy_scale = 0.0;
  void* grad = nullptr;  // (R, K) contiguous, dtype of logits
  // Backward over one vocabulary tile (the fused linear head): the logits
  // given are columns [col_offset, col_offset + cols) of rows of total_cols
  // entries (0: cols, no tiling). Actions are global ids, checked against
  // total_cols; the statistics are the whole row's; only actions inside the
  // tile get their one-hot term here.
  int64_t col_offset = 0, total_cols = 0;
  int64_t* order = nullptr;  // CUDA backward, S > kPairwiseSamples: (R, S) scratch of for_each_action
  // With truncation.temperature set (CPU): the scores of each row's kept set
  // (truncation.h) on z = x / T, without forming the kept logits. Forward:
  // the set selected (or replayed from truncation.given_threshold), its
  // statistics the sampler's, an action outside it kActionOutsideKept, each
  // row's smallest kept z written to truncation.threshold. Backward: the
  // forward's threshold comes back as truncation.given_threshold, the set is
  // z >= it (greedy rows: the first maximum), and the gradient with respect
  // to x is the one with respect to z times Acc(1 / T) (0 on greedy rows).
  // With truncation.kept_ids (an outside sampler's sets) each row's set is
  // formed in scratch from its list, in the forward and again in the
  // backward. A row of padding is not read (nothing is selected on it).
  TruncationParams truncation;
  int32_t num_threads = 1;
};

namespace cpu {
Status log_prob_forward(const LogProbArgs& args, ErrorInfo* err);
Status log_prob_backward(const LogProbArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest

PGEST_NS_BEGIN

PGEST_HD bool is_ignored(const LogProbArgs& a, int64_t act) { return a.has_ignore_index && act == a.ignore_index; }

// Checks a row's actions before anything indexes with them: kOk with the
// number that count (not ignore_index), or the first out of range (err.col =
// its sample, err.index = its value). Forward and backward both call it: a
// backward never trusts what the forward saw (the caller may have changed
// the tensor in between).
PGEST_HD Status check_row_actions(const LogProbArgs& a, int64_t i, int64_t& live, ErrorInfo& err,
                                  int64_t bound = -1) {
  live = 0;
  const int64_t S = a.num_samples;
  const int64_t n = bound < 0 ? a.cols : bound;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t act = a.actions[i * S + s];
    if (is_ignored(a, act)) continue;
    if (act < 0 || act >= n) { err.col = s; err.index = act; return kActionOutOfRange; }
    ++live;
  }
  return kOk;
}

// log softmax(x)[k] from the saved statistics, in log_softmax's order.
template <class Acc>
PGEST_HD Acc log_prob_of(Acc x, Acc row_max, Acc log_z) { return (x - row_max) - log_z; }

// H = log Z - sum e (x - max) / Z, from the chunk pass's sums.
template <class F>
PGEST_HD F entropy_of(F log_z, F ex_dot, F z) { return log_z - ex_dot / z; }

// The upstream gradient of sample s of row i, and of the row's entropy.
template <class Acc>
PGEST_HD Acc row_scale_of(const LogProbArgs& a, int64_t i) {
  return a.row_scale ? static_cast<const Acc*>(a.row_scale)[i * a.row_scale_stride] : Acc(1);
}

template <class Acc>
PGEST_HD Acc grad_of_sample(const LogProbArgs& a, int64_t i, int64_t s) {
  if (!a.grad_log_prob) return Acc(0);
  const int64_t rs = a.grad_log_prob_row_stride < 0 ? a.num_samples : a.grad_log_prob_row_stride;
  return row_scale_of<Acc>(a, i) * Acc(a.log_prob_scale) *
         static_cast<const Acc*>(a.grad_log_prob)[i * rs + s * a.grad_log_prob_sample_stride];
}

template <class Acc>
PGEST_HD Acc grad_of_entropy(const LogProbArgs& a, int64_t i) {
  return row_scale_of<Acc>(a, i) *
         (a.grad_entropy ? static_cast<const Acc*>(a.grad_entropy)[i * a.grad_entropy_stride] : Acc(a.entropy_scale));
}

// The per-row constants of the dense part of the gradient.
// scale: d z / d x, applied to each entry's gradient in Acc before its
// rounding to T (1 but on truncated rows: z = x / T).
template <class Acc>
struct GradRow {
  Acc row_max, log_z, entropy, alpha, gamma;
  Acc scale = Acc(1);
};

template <class Acc>
PGEST_HD GradRow<Acc> grad_row(const LogProbArgs& a, int64_t i) {
  Acc gsum = 0;
  for (int64_t s = 0; s < a.num_samples; ++s)
    if (!is_ignored(a, a.actions[i * a.num_samples + s])) gsum += grad_of_sample<Acc>(a, i, s);
  return GradRow<Acc>{static_cast<const Acc*>(a.row_max)[i], static_cast<const Acc*>(a.log_z)[i],
                      static_cast<const Acc*>(a.entropy)[i], -gsum, -grad_of_entropy<Acc>(a, i)};
}

// The dense part at one entry: p (alpha + gamma (log p + H)). An entry at
// -inf has p = 0 and gradient 0 (not 0 * -inf).
template <class Acc>
PGEST_HD Acc grad_dense(Acc x, const GradRow<Acc>& r) {
  const Acc d = log_prob_of(x, r.row_max, r.log_z);
  const Acc p = exp_nonpos(d);
  return p > Acc(0) ? p * (r.alpha + r.gamma * (d + r.entropy)) : Acc(0);
}

// After the dense pass over a gradient row: each sampled action's entry is
// rewritten as its dense value plus its one-hot terms, summed in Acc before
// the single rounding to T. x is the row (column stride cs). The actions were
// checked by check_row_actions. `order`: S entries of scratch (for_each_action).
template <class T, class Acc, class X>
PGEST_HD void grad_one_hot(const LogProbArgs& a, int64_t i, X x, int64_t cs, const GradRow<Acc>& r, T* g,
                           int64_t* order) {
  const int64_t S = a.num_samples, lo = a.col_offset, hi = a.col_offset + a.cols;
  for_each_action(a.actions + i * S, S, order,
                  [&](int64_t act) { return is_ignored(a, act) || act < lo || act >= hi; },
                  [&](int64_t action, const int64_t* idx, int64_t m) {
                    const int64_t k = action - lo;
                    Acc v = grad_dense(load<Acc>(x[k * cs]), r);
                    for (int64_t j = 0; j < m; ++j) v += grad_of_sample<Acc>(a, i, idx[j]);
                    g[k] = store<T>(v * r.scale);
                  });
}

// The bound actions are checked against in the backward (the whole row's K).
PGEST_HD int64_t backward_bound(const LogProbArgs& a) { return a.total_cols > 0 ? a.total_cols : a.cols; }

// The forward's per-row outputs once (max, log Z, H) are known; the row is
// read with element stride cs (a truncated row: through its kept view).
template <class Acc, class Row>
PGEST_HD void write_log_probs(const LogProbArgs& a, int64_t i, Row row, int64_t cs, Acc row_max, Acc log_z,
                              Acc entropy) {
  const int64_t S = a.num_samples;
  Acc* lp = static_cast<Acc*>(a.log_prob) + i * S;
  const Acc* w = a.weights ? static_cast<const Acc*>(a.weights) + i * S : nullptr;
  Acc loss = -Acc(a.entropy_weight) * entropy;
  for (int64_t s = 0; s < S; ++s) {
    const int64_t act = a.actions[i * S + s];
    const Acc v = is_ignored(a, act) ? Acc(0) : log_prob_of(load<Acc>(row[act * cs]), row_max, log_z);
    lp[s] = v;
    // w * log p with w = 0 and log p = -inf (an impossible action) is 0.
    if (w && w[s] != Acc(0)) loss -= w[s] * v;
  }
  if (a.loss) static_cast<Acc*>(a.loss)[i] = loss;
}

template <class T, class Acc>
PGEST_HD void write_log_probs(const LogProbArgs& a, int64_t i, const T* row, Acc row_max, Acc log_z, Acc entropy) {
  write_log_probs(a, i, row, a.col_stride, row_max, log_z, entropy);
}

PGEST_NS_END
