// Return codes of the kernel core. The Python layer turns each into an
// exception that names the argument at fault (pgest/_native.py).
#pragma once

#include <cstdint>

namespace pgest {

enum Status : int32_t {
  kOk = 0,
  kNonFiniteInput = 1,    // NaN or +inf in the scores of row `row`, column `col`
  kAllNegInf = 2,         // every score of row `row` is -inf: nothing can be sampled
  kLabelOutOfRange = 3,   // labels[row] = `index` is not in [0, K)
  kNonFiniteReward = 4,   // reward_table[row, col] is NaN or inf
  kNonFiniteBaseline = 5, // baseline[row] is NaN or inf
  kUnsupportedDtype = 6,
  kOutOfMemory = 8,
  kCudaError = 9,         // `index` holds the cudaError_t
  kActionOutOfRange = 11, // actions[row, col] = `index` is not in [0, K) nor ignore_index
  kActionOutsideKept = 12, // actions[row, col] = `index` lies outside a truncated row's kept set
};

// Where the first failure happened. With several threads the lowest failing
// row wins, so the report does not depend on the schedule.
struct ErrorInfo {
  int32_t status = kOk;
  int64_t row = -1;
  int64_t col = -1;
  int64_t index = 0;
  double value = 0.0;
};

}  // namespace pgest
