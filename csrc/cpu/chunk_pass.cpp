// CPU schedule of chunk_pass (chunk_pass.h): threads over rows; each part is
// the single pass's own code (row_stats.h's chunk_pass, sampler.h's
// finish_row_stats and row_inverse_cdf), so a split row gets its bits.
#include <pgest/chunk_pass.h>
#include <pgest/log_prob.h>

#include <cmath>
#include <new>
#include <vector>

#include "parallel.h"
#include "row_scratch.h"

PGEST_NS_BEGIN
namespace {

template <class T, class Acc>
ErrorInfo stats_rows(const ChunkPassArgs& a, int64_t begin, int64_t end) {
  ErrorInfo err;
  const int64_t nc = num_chunks(a.cols);
  std::vector<Acc> weights(2 * nc), chunk_max(nc), pad(kChunk);
  const T* base = static_cast<const T*>(a.logits);
  Acc* table = static_cast<Acc*>(a.table);
  for (int64_t i = begin; i < end; ++i) {
    const T* x = base + i * a.row_stride;
    const RowStats<Acc> r = chunk_pass<true>(x, a.cols, static_cast<const Acc*>(a.entering)[i], weights.data(),
                                             chunk_max.data(), pad.data());
    if (r.bad_col >= 0) {
      err.status = kNonFiniteInput;
      err.row = i;
      err.col = r.bad_col;
      err.value = double(load<Acc>(x[r.bad_col]));
      return err;
    }
    for (int64_t c = 0; c < nc; ++c) {
      Acc* t = table + (i * nc + c) * 3;
      t[0] = chunk_max[c];
      t[1] = weights[c];
      t[2] = weights[nc + c];
    }
  }
  return err;
}

template <class Acc>
ErrorInfo finish_rows(const ChunkPassArgs& a, int64_t begin, int64_t end) {
  ErrorInfo err;
  const int64_t nc = a.chunks;
  std::vector<Acc> weights(2 * nc), chunk_max(nc);
  const Acc* table = static_cast<const Acc*>(a.table);
  Acc* out_w = static_cast<Acc*>(a.weights);
  for (int64_t i = begin; i < end; ++i) {
    for (int64_t c = 0; c < nc; ++c) {
      const Acc* t = table + (i * nc + c) * 3;
      chunk_max[c] = t[0];
      weights[c] = t[1];
      weights[nc + c] = t[2];
    }
    RowStats<Acc> r{nc ? chunk_max[nc - 1] : -Acc(INFINITY), 0.0, 0.0, -1};
    if (r.max == -Acc(INFINITY)) {
      err.status = kAllNegInf;
      err.row = i;
      return err;
    }
    finish_row_stats<true>(nc, weights.data(), chunk_max.data(), r);
    store_row_stats(r, true, i, static_cast<Acc*>(a.row_max), static_cast<Acc*>(a.log_z),
                    static_cast<Acc*>(a.entropy));
    double* cum = a.cum + i * (nc + 1);
    cum[0] = 0.0;
    for (int64_t c = 0; c < nc; ++c) {  // the additions row_inverse_cdf makes (their total is r.z)
      out_w[i * nc + c] = weights[c];
      cum[c + 1] = cum[c] + double(weights[c]);
    }
  }
  return err;
}

template <class T, class Acc>
ErrorInfo walk_rows(const ChunkPassArgs& a, int64_t begin, int64_t end) {
  ErrorInfo err;
  const int64_t S = a.num_samples;
  std::vector<Threshold> th(S);
  std::vector<Acc> e(kChunk);
  const T* base = static_cast<const T*>(a.logits);
  for (int64_t i = begin; i < end; ++i) {
    int64_t n = 0;
    for (int64_t s = 0; s < S; ++s) {
      const double t = a.thresholds[i * S + s];
      a.actions[i * S + s] = -1;
      if (t < INFINITY) th[n++] = Threshold{t, s};
    }
    row_inverse_cdf(base + i * a.row_stride, a.cols, static_cast<const Acc*>(a.row_max)[i],
                    static_cast<const Acc*>(a.weights) + i, th.data(), n, a.actions + i * S, e.data(),
                    VectorChunkExps(), a.cum[i]);
  }
  return err;
}

template <class T>
Status run(const ChunkPassArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const double work = double(a.rows) * double(a.mode == kChunkFinish ? a.chunks * 8 : a.cols + 16);
  const ErrorInfo first = parallel_rows(a.rows, threads_for(work, a.num_threads),
                                        [&](int64_t begin, int64_t end, const std::atomic<int64_t>&) {
    try {  // the scratch is a few chunks' worth; no exception may leave a parallel region
      switch (a.mode) {
        case kChunkStats: return stats_rows<T, Acc>(a, begin, end);
        case kChunkFinish: return finish_rows<Acc>(a, begin, end);
        default: return walk_rows<T, Acc>(a, begin, end);
      }
    } catch (const std::bad_alloc&) {
      ErrorInfo err;
      err.status = kOutOfMemory;
      err.row = begin;
      return err;
    }
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

}  // namespace

Status chunk_pass_cpu(const ChunkPassArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, err); });
}

PGEST_NS_END
