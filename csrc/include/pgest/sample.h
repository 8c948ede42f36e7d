// sample: S draws per row of logits, with each draw's log-probability, the
// row's entropy and its log-sum-exp, from one read of the row.
#pragma once

#include "status.h"
#include "truncation.h"

namespace pgest {

// Strides in elements. The float outputs are in the accumulation type:
// float64 for float64 logits, float32 otherwise (stats_f64 says which).
struct SampleArgs {
  const void* logits = nullptr;
  int32_t dtype = 0;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;
  int64_t num_samples = 1;
  uint64_t seed = 0, offset = 0;
  const double* uniforms = nullptr;  // (R, S) in [0, 1): used instead of Philox when given
  int64_t* actions = nullptr;  // (R, S)
  void* log_prob = nullptr;    // (R, S)
  void* entropy = nullptr;     // (R,)
  void* row_max = nullptr;     // (R,)  max and log sum exp(x - max): the statistics
  void* log_z = nullptr;       // (R,)  a later log_prob backward needs (log_prob.h)
  // With truncation.temperature set: draw from each row's kept set
  // (truncation.h), found and applied in the same read of the row; the
  // statistics above are then those of the tempered, truncated row.
  TruncationParams truncation;
  int32_t num_threads = 1;
};

namespace cpu {
Status sample(const SampleArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest
