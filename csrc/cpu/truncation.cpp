// CPU schedule of truncation: threads over rows; per row one pass that
// tempers the row into scratch (the finite entries only), the selections of
// truncation.h on that scratch, and one pass that counts the kept set.
#include <pgest/truncation.h>

#include <cmath>
#include <cstdlib>
#include <memory>

#include "parallel.h"

PGEST_NS_BEGIN
namespace {

template <class T>
Status run(const TruncationArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t K = a.cols;
  const T* base = static_cast<const T*>(a.logits);
  Acc* threshold = static_cast<Acc*>(a.threshold);
  const int threads = threads_for(double(a.rows) * double(K + 16), a.num_threads);
  const ErrorInfo first = parallel_rows(a.rows, threads, [&](int64_t begin, int64_t end,
                                                            const std::atomic<int64_t>& lowest_failed) {
    ErrorInfo err;
    // O(K) per thread: the tempered row, permuted by the selections.
    std::unique_ptr<Acc, decltype(&std::free)> scratch(
        static_cast<Acc*>(std::malloc(sizeof(Acc) * size_t(K > 0 ? K : 1))), &std::free);
    Acc* z = scratch.get();
    if (!z) { err.status = kOutOfMemory; err.row = begin; return err; }
    for (int64_t i = begin; i < end && i < lowest_failed.load(std::memory_order_relaxed); ++i) {
      const T* x = base + i * a.row_stride;
      const double temperature = a.temperature[i * a.temperature_stride];
      const bool greedy = temperature == 0.0;
      const Acc t = greedy ? Acc(1) : Acc(temperature);
      // The first pass: the row tempered, its first maximum and its NaN or +inf.
      int64_t n = 0, argmax = -1;
      Acc max = -Acc(INFINITY), raw_max = -Acc(INFINITY);
      Status st = kOk;
      for (int64_t k = 0; k < K; ++k) {
        const Acc v = load<Acc>(x[k * a.col_stride]);
        const Acc zk = tempered(v, t);
        if (std::isnan(zk) || zk == Acc(INFINITY)) {
          st = kNonFiniteInput; err.col = k; err.value = double(v); break;  // finite v: x / T overflowed
        }
        if (zk == -Acc(INFINITY)) continue;
        if (zk > max) { max = zk; raw_max = v; argmax = k; }
        z[n++] = zk;
      }
      if (st == kOk && n == 0) st = kAllNegInf;
      if (st != kOk) { err.status = st; err.row = i; return err; }
      a.argmax[i] = argmax;
      if (greedy) {
        threshold[i] = raw_max; a.kept[i] = 1; a.kept_mass[i] = 1.0;
        continue;
      }
      double total = 0.0;
      for (int64_t j = 0; j < n; ++j) total += detail::mass_of(z[j], max);
      const Acc cut = row_threshold(z, n, max, a.top_k ? a.top_k[i * a.top_k_stride] : 0,
                                    a.top_p ? a.top_p[i * a.top_p_stride] : 1.0,
                                    a.min_p ? a.min_p[i * a.min_p_stride] : 0.0);
      // The last pass: what the cut keeps, and its smallest kept value.
      int64_t kept = 0;
      double mass = 0.0;
      Acc smallest = max;
      for (int64_t j = 0; j < n; ++j) {
        if (z[j] >= cut) {
          ++kept;
          mass += detail::mass_of(z[j], max);
          smallest = std::min(smallest, z[j]);
        }
      }
      threshold[i] = smallest; a.kept[i] = kept; a.kept_mass[i] = mass / total;
    }
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

}  // namespace

Status truncation_cpu(const TruncationArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, err); });
}

PGEST_NS_END
