// CPU schedule of the reverse scans: threads over column ranges of the
// time-major (T, B) tensors, each thread walking t = T-1 .. 0 over its
// contiguous columns (the inner loop vectorises across environments).
#include <pgest/dtype.h>
#include <pgest/returns.h>

#include "parallel.h"

PGEST_NS_BEGIN
namespace {

template <class F>
Status returns_run(const ReturnsArgs& a) {
  const int64_t T = a.steps, B = a.envs;
  const F* r = static_cast<const F*>(a.rewards);
  const F* last = static_cast<const F*>(a.last_value);
  F* g = static_cast<F*>(a.out);
  const F gamma = F(a.gamma);
  const int threads = threads_for(double(T) * double(B), a.num_threads, double(1 << 16));
  parallel_rows(B, threads, [&](int64_t begin, int64_t end, const std::atomic<int64_t>&) {
    for (int64_t t = T - 1; t >= 0; --t) {
      const F* rt = r + t * B;
      const uint8_t* dt = a.dones + t * B;
      F* gt = g + t * B;
      const F* next = t + 1 < T ? g + (t + 1) * B : last;
      for (int64_t b = begin; b < end; ++b)
        gt[b] = returns_step(rt[b], dt[b] != 0, gamma, next ? next[b] : F(0));
    }
    return ErrorInfo{};
  });
  return kOk;
}

template <class F>
Status gae_run(const ReturnsArgs& a) {
  const int64_t T = a.steps, B = a.envs;
  const F* r = static_cast<const F*>(a.rewards);
  const F* v = static_cast<const F*>(a.values);
  const F* last = static_cast<const F*>(a.last_value);
  F* adv = static_cast<F*>(a.out);
  F* ret = static_cast<F*>(a.out_ret);
  const F gamma = F(a.gamma), lam = F(a.lam);
  const int threads = threads_for(double(T) * double(B), a.num_threads, double(1 << 16));
  parallel_rows(B, threads, [&](int64_t begin, int64_t end, const std::atomic<int64_t>&) {
    for (int64_t t = T - 1; t >= 0; --t) {
      const int64_t o = t * B;
      const F* next_v = t + 1 < T ? v + o + B : last;
      for (int64_t b = begin; b < end; ++b) {
        const F next_adv = t + 1 < T ? adv[o + B + b] : F(0);
        const F nv = next_v ? next_v[b] : F(0);
        adv[o + b] = gae_step(r[o + b], v[o + b], a.dones[o + b] != 0, gamma, lam, nv, next_adv);
        ret[o + b] = adv[o + b] + v[o + b];
      }
    }
    return ErrorInfo{};
  });
  return kOk;
}

}  // namespace

Status discounted_returns_cpu(const ReturnsArgs& a, ErrorInfo*) {
  if (a.steps == 0 || a.envs == 0) return kOk;
  if (a.dtype == kFloat32) return returns_run<float>(a);
  if (a.dtype == kFloat64) return returns_run<double>(a);
  return kUnsupportedDtype;
}

Status gae_cpu(const ReturnsArgs& a, ErrorInfo*) {
  if (a.steps == 0 || a.envs == 0) return kOk;
  if (a.dtype == kFloat32) return gae_run<float>(a);
  if (a.dtype == kFloat64) return gae_run<double>(a);
  return kUnsupportedDtype;
}

PGEST_NS_END
