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

PGEST_NS_END
