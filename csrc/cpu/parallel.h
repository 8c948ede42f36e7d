// Row-parallel loop for the CPU kernels, with first-error bookkeeping.
#pragma once

#include <pgest/common.h>
#include <pgest/status.h>

#include <atomic>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

PGEST_NS_BEGIN

constexpr int kMaxThreads = 256;

// Below `min_work` elements waking a second thread costs more than it saves.
inline int threads_for(double work, int requested, double min_work = double(1 << 14)) {
  return work < min_work ? 1 : requested;
}

// fn(begin, end, lowest_failed) processes rows [begin, end) and returns an
// ErrorInfo whose status is kOk, or the failure of its first bad row. Ranges
// are contiguous and equal (a static split), so which thread runs a row never
// changes what the row computes. Of several failures the lowest row is
// reported, whatever order the threads finish in; `lowest_failed` lets the
// others stop early.
template <class Fn>
inline ErrorInfo parallel_rows(int64_t rows, int threads, const Fn& fn) {
  std::atomic<int64_t> lowest_failed{INT64_MAX};
  int64_t nt = threads < 1 ? 1 : (threads > kMaxThreads ? kMaxThreads : threads);
  if (rows < nt) nt = rows < 1 ? 1 : rows;
  ErrorInfo results[kMaxThreads];
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(int(nt))
    {
      const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
      const int64_t begin = rows * t / n, end = rows * (t + 1) / n;
      if (begin < end) {
        results[t] = fn(begin, end, lowest_failed);
        if (results[t].status != kOk) {
          int64_t cur = lowest_failed.load();
          while (results[t].row < cur && !lowest_failed.compare_exchange_weak(cur, results[t].row)) {}
        }
      }
    }
  } else
#endif
  {
    nt = 1;
    results[0] = fn(int64_t(0), rows, lowest_failed);
  }
  ErrorInfo first;
  for (int64_t t = 0; t < nt; ++t) {
    if (results[t].status != kOk && (first.status == kOk || results[t].row < first.row)) first = results[t];
  }
  return first;
}

PGEST_NS_END
