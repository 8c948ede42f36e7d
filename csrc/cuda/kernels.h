// Host-side entry points of the CUDA kernels, callable from code that never
// sees a CUDA header (bindings.cpp). Streams are passed as opaque handles.
// Each entry sets the device, launches on `stream`, checks the launch and
// returns kCudaError (with the cudaError_t in err->index) on failure. Errors
// found in the data (NaN rows, labels out of range) are written by the kernels
// to `err_buf`, a device int64[2] the caller reads after the call or later
// (pgest/device_errors.py); the refused rows' outputs are NaN (actions -1)
// meanwhile. A null err_buf: the kernel checks no data.
#pragma once

#include <pgest/log_prob.h>
#include <pgest/reinforce_grad.h>
#include <pgest/returns.h>
#include <pgest/sample.h>
#include <pgest/truncation.h>

namespace pgest {
namespace cuda {

struct Launch {
  int device = 0;
  void* stream = nullptr;          // cudaStream_t
  int64_t* err_buf = nullptr;      // device: [packed (row << 5 | status), col]; INT64_MAX = no error
  const int64_t* seed = nullptr;   // device: [seed, offset]; overrides args.seed/offset when set
  double* scratch = nullptr;       // device: one double (the batch-mean baseline)
};

Status reinforce_grad(const ReinforceGradArgs& args, const Launch& l, ErrorInfo* err);
Status sample(const SampleArgs& args, const Launch& l, ErrorInfo* err);
Status log_prob_forward(const LogProbArgs& args, const Launch& l, ErrorInfo* err);
Status log_prob_backward(const LogProbArgs& args, const Launch& l, ErrorInfo* err);
Status discounted_returns(const ReturnsArgs& args, const Launch& l, ErrorInfo* err);
Status gae(const ReturnsArgs& args, const Launch& l, ErrorInfo* err);
Status truncation(const TruncationArgs& args, const Launch& l, ErrorInfo* err);

int device_count();
const char* error_string(int code);

}  // namespace cuda
}  // namespace pgest
