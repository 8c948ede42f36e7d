// CPU schedule of the reverse scans: threads over column ranges of the
// time-major (T, B) tensors, each thread walking t = T-1 .. 0 over its
// contiguous columns (the inner loop vectorises across environments).
#include <pgest/dtype.h>
#include <pgest/returns.h>

#include "parallel.h"

PGEST_NS_BEGIN
namespace {

// One time step over columns [begin, end). Restrict-qualified, branch-free
// bodies (the done test is a select) so the compiler vectorises across
// environments; `next` / `next_adv` are null at t = T-1 without bootstrap.
template <class F, class D>
void returns_row(const F* __restrict r, const D* __restrict d, const F* __restrict next, F gamma,
                 F* __restrict g, int64_t begin, int64_t end) {
  if (next) {
    for (int64_t b = begin; b < end; ++b) g[b] = returns_step(r[b], d[b] != D(0), gamma, next[b]);
  } else {
    for (int64_t b = begin; b < end; ++b) g[b] = returns_step(r[b], d[b] != D(0), gamma, F(0));
  }
}

// kLast: t = T-1, where next_v is last_value (or null) and A_T = 0.
template <bool kLast, class F, class D>
void gae_row(const F* __restrict r, const F* __restrict v, const D* __restrict d,
             const F* __restrict next_v, const F* __restrict next_adv, F gamma, F lam,
             F* __restrict adv, F* __restrict ret, int64_t begin, int64_t end) {
  for (int64_t b = begin; b < end; ++b) {
    const F nv = kLast ? (next_v ? next_v[b] : F(0)) : next_v[b];
    const F na = kLast ? F(0) : next_adv[b];
    const F a = gae_step(r[b], v[b], d[b] != D(0), gamma, lam, nv, na);
    adv[b] = a;
    ret[b] = a + v[b];
  }
}

template <class F, class D>
Status returns_run(const ReturnsArgs& a) {
  const D* dones = static_cast<const D*>(a.dones);
  const int64_t T = a.steps, B = a.envs;
  const F* r = static_cast<const F*>(a.rewards);
  const F* last = static_cast<const F*>(a.last_value);
  F* g = static_cast<F*>(a.out);
  const F gamma = F(a.gamma);
  const int threads = threads_for(double(T) * double(B), a.num_threads, double(1 << 16));
  parallel_rows(B, threads, [&](int64_t begin, int64_t end, const std::atomic<int64_t>&) {
    for (int64_t t = T - 1; t >= 0; --t) {
      const F* next = t + 1 < T ? g + (t + 1) * B : last;
      returns_row(r + t * B, dones + t * B, next, gamma, g + t * B, begin, end);
    }
    return ErrorInfo{};
  });
  return kOk;
}

template <class F, class D>
void gae_columns(const ReturnsArgs& a, int64_t begin, int64_t end) {
  const D* dones = static_cast<const D*>(a.dones);
  const int64_t T = a.steps, B = a.envs;
  const F* r = static_cast<const F*>(a.rewards);
  const F* v = static_cast<const F*>(a.values);
  const F* last = static_cast<const F*>(a.last_value);
  F* adv = static_cast<F*>(a.out);
  F* ret = static_cast<F*>(a.out_ret);
  const F gamma = F(a.gamma), lam = F(a.lam);
  for (int64_t t = T - 1; t >= 0; --t) {
    const int64_t o = t * B;
    if (t + 1 == T) {
      gae_row<true, F, D>(r + o, v + o, dones + o, last, nullptr, gamma, lam, adv + o, ret + o, begin, end);
    } else {
      gae_row<false, F, D>(r + o, v + o, dones + o, v + o + B, adv + o + B, gamma, lam, adv + o, ret + o,
                        begin, end);
    }
  }
}

template <class F, class D>
Status gae_run(const ReturnsArgs& a) {
  const int threads = threads_for(double(a.steps) * double(a.envs), a.num_threads, double(1 << 16));
  parallel_rows(a.envs, threads, [&](int64_t begin, int64_t end, const std::atomic<int64_t>&) {
    gae_columns<F, D>(a, begin, end);
    return ErrorInfo{};
  });
  return kOk;
}

}  // namespace

Status discounted_returns_cpu(const ReturnsArgs& a, ErrorInfo*) {
  if (a.steps == 0 || a.envs == 0) return kOk;
  return dispatch_dones(a.dones_type, [&](auto d) {
    using D = decltype(d);
    if (a.dtype == kFloat32) return returns_run<float, D>(a);
    if (a.dtype == kFloat64) return returns_run<double, D>(a);
    return kUnsupportedDtype;
  });
}

Status gae_cpu(const ReturnsArgs& a, ErrorInfo*) {
  if (a.steps == 0 || a.envs == 0) return kOk;
  return dispatch_dones(a.dones_type, [&](auto d) {
    using D = decltype(d);
    if (a.dtype == kFloat32) return gae_run<float, D>(a);
    if (a.dtype == kFloat64) return gae_run<double, D>(a);
    return kUnsupportedDtype;
  });
}

PGEST_NS_END
