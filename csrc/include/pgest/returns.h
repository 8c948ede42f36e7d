// Reverse scans over time-major (T, B) rollouts: discounted returns
//     G_t = r_t + gamma * (1 - done_t) * G_{t+1},             G_T = last_value
// and generalised advantage estimation
//     delta_t = r_t + gamma * (1 - done_t) * V_{t+1} - V_t,   V_T = last_value
//     A_t = delta_t + gamma * lam * (1 - done_t) * A_{t+1},   A_T = 0
//     ret_t = A_t + V_t
// done_t means the episode ended after r_t: nothing flows back across it.
// One step of each is below; schedules run t = T-1 .. 0 over many columns.
#pragma once

#include "common.h"
#include "status.h"

namespace pgest {

struct ReturnsArgs {
  int32_t dtype = 0;  // kFloat32 or kFloat64, for every float tensor
  int64_t steps = 0, envs = 0;  // T, B; all (T, B) tensors contiguous
  const void* rewards = nullptr;
  const void* values = nullptr;      // GAE only
  const void* dones = nullptr;       // nonzero = done, of dones_type
  int32_t dones_type = 0;            // DonesType: read in place, no conversion pass
  const void* last_value = nullptr;  // (B,) or null (0)
  double gamma = 0.99, lam = 0.95;
  void* out = nullptr;      // returns, or advantages
  void* out_ret = nullptr;  // GAE: advantages + values
  int32_t num_threads = 1;
};

// bool/uint8/int8 (one byte) and the float types rollouts keep dones in.
enum DonesType : int32_t { kDonesByte = 0, kDonesFloat32 = 1, kDonesFloat64 = 2 };

namespace cpu {
Status discounted_returns(const ReturnsArgs& args, ErrorInfo* err);
Status gae(const ReturnsArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest

PGEST_NS_BEGIN

// fn(D{}) with D the element type of the dones.
template <class Fn>
inline Status dispatch_dones(int32_t type, const Fn& fn) {
  if (type == kDonesByte) return fn(uint8_t{});
  if (type == kDonesFloat32) return fn(float{});
  if (type == kDonesFloat64) return fn(double{});
  return kUnsupportedDtype;
}

template <class F>
PGEST_HD F returns_step(F reward, bool done, F gamma, F next_return) {
  return reward + (done ? F(0) : gamma * next_return);
}

// Returns the new advantage; `next_value` is V_{t+1} (last_value at t = T-1).
// A select, not a multiplication by (1 - done): 0 * NaN is NaN, and a NaN or
// inf value after an episode end must not flow back across it.
template <class F>
PGEST_HD F gae_step(F reward, F value, bool done, F gamma, F lam, F next_value, F next_adv) {
  const F bootstrap = done ? F(0) : gamma * next_value;
  const F carried = done ? F(0) : gamma * lam * next_adv;
  return (reward + bootstrap - value) + carried;
}

PGEST_NS_END
