// CUDA schedule of the reverse scans: one thread per environment column,
// walking t = T-1 .. 0; neighbouring threads read neighbouring columns, so
// every step's loads and stores are coalesced.
#include <pgest/dtype.h>
#include <pgest/returns.h>

#include "common.cuh"

namespace pgest {
namespace cuda {
namespace {

template <class F, class D>
__global__ void returns_kernel(ReturnsArgs a) {
  const D* dones = static_cast<const D*>(a.dones);
  const int64_t T = a.steps, B = a.envs;
  const F* r = static_cast<const F*>(a.rewards);
  const F* last = static_cast<const F*>(a.last_value);
  F* g = static_cast<F*>(a.out);
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += int64_t(gridDim.x) * blockDim.x) {
    F next = last ? last[b] : F(0);
    for (int64_t t = T - 1; t >= 0; --t) {
      next = returns_step(r[t * B + b], dones[t * B + b] != D(0), F(a.gamma), next);
      g[t * B + b] = next;
    }
  }
}

template <class F, class D>
__global__ void gae_kernel(ReturnsArgs a) {
  const D* dones = static_cast<const D*>(a.dones);
  const int64_t T = a.steps, B = a.envs;
  const F* r = static_cast<const F*>(a.rewards);
  const F* v = static_cast<const F*>(a.values);
  const F* last = static_cast<const F*>(a.last_value);
  F* adv = static_cast<F*>(a.out);
  F* ret = static_cast<F*>(a.out_ret);
  for (int64_t b = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; b < B; b += int64_t(gridDim.x) * blockDim.x) {
    F next_v = last ? last[b] : F(0), next_adv = 0;
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t o = t * B + b;
      next_adv = gae_step(r[o], v[o], dones[o] != D(0), F(a.gamma), F(a.lam), next_v, next_adv);
      adv[o] = next_adv;
      ret[o] = next_adv + v[o];
      next_v = v[o];
    }
  }
}

}  // namespace

Status discounted_returns(const ReturnsArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.steps == 0 || a.envs == 0) return kOk;
  DeviceGuard guard(l.device);
  const cudaStream_t stream = static_cast<cudaStream_t>(l.stream);
  const Status st = dispatch_dones(a.dones_type, [&](auto d) {
    using D = decltype(d);
    if (a.dtype == kFloat32) returns_kernel<float, D><<<item_blocks(a.envs), 256, 0, stream>>>(a);
    else if (a.dtype == kFloat64) returns_kernel<double, D><<<item_blocks(a.envs), 256, 0, stream>>>(a);
    else return kUnsupportedDtype;
    return kOk;
  });
  return st != kOk ? st : check_launch(err);
}

Status gae(const ReturnsArgs& a, const Launch& l, ErrorInfo* err) {
  if (a.steps == 0 || a.envs == 0) return kOk;
  DeviceGuard guard(l.device);
  const cudaStream_t stream = static_cast<cudaStream_t>(l.stream);
  const Status st = dispatch_dones(a.dones_type, [&](auto d) {
    using D = decltype(d);
    if (a.dtype == kFloat32) gae_kernel<float, D><<<item_blocks(a.envs), 256, 0, stream>>>(a);
    else if (a.dtype == kFloat64) gae_kernel<double, D><<<item_blocks(a.envs), 256, 0, stream>>>(a);
    else return kUnsupportedDtype;
    return kOk;
  });
  return st != kOk ? st : check_launch(err);
}

}  // namespace cuda
}  // namespace pgest
