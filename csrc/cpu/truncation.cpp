// CPU schedule of truncation: threads over rows, each row through
// truncate_row (truncated_row.h) for its record alone (the kept set's
// statistics, taken only where the kept mass is asked for, give it).
#include <pgest/truncation.h>

#include <algorithm>

#include "parallel.h"
#include "truncated_row.h"

PGEST_NS_BEGIN
namespace {

template <class T>
Status run(const TruncationArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t K = a.cols;
  const T* base = static_cast<const T*>(a.logits);
  const int threads = threads_for(double(a.rows) * double(K + 16), a.num_threads);
  const ErrorInfo first = parallel_rows(a.rows, threads, [&](int64_t begin, int64_t end,
                                                            const std::atomic<int64_t>& lowest_failed) {
    ErrorInfo err;
    TruncationScratch<Acc> sc(K);
    RowScratch<Acc> rs(K, 1, false);
    if (!sc.ok || !rs.ok) { err.status = kOutOfMemory; err.row = begin; return err; }
    for (int64_t i = begin; i < end && i < lowest_failed.load(std::memory_order_relaxed); ++i) {
      KeptRow<T, Acc> kept;
      const Status st = truncate_row<T, Acc>(base + i * a.row_stride, K, a.col_stride, a.params, i, sc, rs, kept, err,
                                             a.params.kept_mass != nullptr);
      if (st != kOk) { err.status = st; err.row = i; return err; }
    }
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

// A team of one thread for radix_truncate_row (truncation.h): the CUDA
// schedule's selection, serially.
struct SerialTeam {
  uint64_t counts[kRadixBins];
  uint64_t masses[kRadixBins];
  int rank() const { return 0; }
  int size() const { return 1; }
  void sync() {}
  void clear() {
    std::fill(counts, counts + kRadixBins, uint64_t(0));
    std::fill(masses, masses + kRadixBins, uint64_t(0));
  }
  void count(int bin) { ++counts[bin]; }
  void add_mass(int bin, uint64_t m) { masses[bin] += m; }
  template <class V> V sum(V v) const { return v; }
  template <class V> V max(V v) const { return v; }
  template <class V> V min(V v) const { return v; }
};

template <class T>
Status run_radix(const TruncationArgs& a, ErrorInfo* err) {
  using Acc = typename AccOf<T>::type;
  const T* base = static_cast<const T*>(a.logits);
  SerialTeam team;
  for (int64_t i = 0; i < a.rows; ++i) {
    int64_t bad_col = -1;
    const Status st = radix_truncate_row<T, Acc>(team, base + i * a.row_stride, a.cols, a.col_stride, a.params, i,
                                                 bad_col);
    if (st != kOk) {
      err->status = st; err->row = i; err->col = bad_col;
      if (bad_col >= 0) err->value = double(load<Acc>(base[i * a.row_stride + bad_col * a.col_stride]));
      return st;
    }
  }
  return kOk;
}

}  // namespace

Status truncation_cpu(const TruncationArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, err); });
}

Status truncation_radix_cpu(const TruncationArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return run_radix<typename decltype(t)::type>(a, err); });
}

PGEST_NS_END
