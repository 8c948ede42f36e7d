// policy_loss: the score-function surrogate of a row of logits x, given S
// actions a_s with weights w_s (advantages):
//     loss = -sum_s w_s log softmax(x)[a_s] - beta * H(softmax(x))
// and its gradient
//     dloss/dx_k = p_k (sum_s w_s + beta (log p_k + H)) - sum_s w_s [k == a_s]
// Forward reads the row once (or not at all when the log-sum-exp and entropy
// are already known from `sample`); backward reads it once and writes the
// gradient once, with no zero-fill and no softmax kept in between.
#pragma once

#include "dtype.h"
#include "math.h"
#include "status.h"

namespace pgest {

struct PolicyLossArgs {
  const void* logits = nullptr;
  int32_t dtype = 0;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;
  const int64_t* actions = nullptr;  // (R, S); ignore_index entries count for nothing
  int64_t num_samples = 1;
  int64_t ignore_index = -100;
  const void* weights = nullptr;  // (R, S), accumulation type
  double entropy_weight = 0.0;
  // (R,) each, accumulation type. Outputs of the forward, or its inputs when
  // stats_given (then forward only gathers the S logits it needs).
  void* loss = nullptr;
  void* lse = nullptr;
  void* entropy = nullptr;
  bool stats_given = false;
  const void* grad_loss = nullptr;  // backward: (R,) upstream gradient of loss
  void* grad = nullptr;             // backward: (R, K) contiguous, dtype of logits
  int32_t num_threads = 1;
};

namespace cpu {
Status policy_loss_forward(const PolicyLossArgs& args, ErrorInfo* err);
Status policy_loss_backward(const PolicyLossArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest

PGEST_NS_BEGIN

// The dense part of the gradient at one entry: p (alpha + gamma (x - lse + H)),
// with p = exp(x - lse). An entry at -inf has p = 0 and gradient 0 (not
// 0 * -inf).
template <class Acc>
PGEST_HD Acc policy_grad_dense(Acc x, Acc lse, Acc alpha, Acc gamma, Acc entropy) {
  const Acc d = x - lse;
  const Acc p = exp_nonpos(d);
  return p > Acc(0) ? p * (alpha + gamma * (d + entropy)) : Acc(0);
}

// After the dense pass over a gradient row: each sampled action's entry is
// rewritten as its dense value plus its one-hot terms, summed in Acc before the
// single rounding to T. x is the row (column stride cs), w its S weights.
template <class T, class Acc, class X>
PGEST_HD void policy_grad_one_hot(const PolicyLossArgs& a, int64_t i, const X* x, int64_t cs, const Acc* w,
                                  Acc up, Acc lse, Acc alpha, Acc gamma, Acc entropy, T* g) {
  const int64_t S = a.num_samples;
  const int64_t* act = a.actions + i * S;
  for (int64_t s = 0; s < S; ++s) {
    if (act[s] == a.ignore_index) continue;
    bool seen = false;
    for (int64_t p = 0; p < s && !seen; ++p) seen = act[p] == act[s];
    if (seen) continue;
    Acc v = policy_grad_dense(load<Acc>(x[act[s] * cs]), lse, alpha, gamma, entropy);
    for (int64_t q = s; q < S; ++q)
      if (act[q] == act[s]) v -= up * w[q];
    g[act[s]] = store<T>(v);
  }
}

PGEST_NS_END
