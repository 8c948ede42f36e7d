// CPU schedule of sample: threads over rows, one chunk pass per row
// (row_stats.h, with the entropy term), then the draws (row_scratch.h);
// rows of <= kLanes entries drawn once each go W at a time (narrow_rows.h).
#include <pgest/log_prob.h>
#include <pgest/sample.h>

#include <cmath>

#include "narrow_rows.h"
#include "parallel.h"
#include "row_scratch.h"
#include "truncated_row.h"

PGEST_NS_BEGIN
namespace {

template <class T>
Status run(const SampleArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.logits);
  Acc* log_prob = static_cast<Acc*>(a.log_prob);
  Acc* entropy = static_cast<Acc*>(a.entropy);
  Acc* row_max = static_cast<Acc*>(a.row_max);
  Acc* log_z = static_cast<Acc*>(a.log_z);
  const int threads = threads_for(double(a.rows) * double(K + 16), a.num_threads);
  const ErrorInfo first = parallel_rows(a.rows, threads, [&](int64_t begin, int64_t end,
                                                            const std::atomic<int64_t>& lowest_failed) {
    ErrorInfo err;
    const bool truncated = a.truncation.temperature != nullptr;
    RowScratch<Acc> sc(K, S, a.col_stride != 1 && !truncated);
    TruncationScratch<Acc> tsc(truncated ? K : 0);
    if (!sc.ok || !tsc.ok) { err.status = kOutOfMemory; err.row = begin; return err; }
    NarrowGroup<Acc> g;
    // One draw per row from rows of <= kLanes entries: W rows at a time.
    auto group = [&](int64_t i0) {
      if (!narrow_stats(base, i0, a.row_stride, int(K), g)) return false;
      for (int l = 0; l < NarrowGroup<Acc>::W; ++l) {
        const int64_t i = i0 + l;
        const RowStats<Acc> rs = narrow_row_stats(g, l);
        const Acc lz = store_row_stats(rs, true, i, row_max, log_z, entropy);
        const int act = narrow_walk(g, l, int(K), draw_uniform(a.uniforms, a.seed, a.offset, i, 1, 0) * rs.z);
        a.actions[i] = act;
        log_prob[i] = log_prob_of(g.x[act][l], rs.max, lz);
      }
      return true;
    };
    // The draws from a row whose statistics are known (a truncated row's:
    // its kept set's, read through the view the statistics were taken on).
    auto draw_with = [&](int64_t i, auto x, const RowStats<Acc>& rs) {
      if (const Status bad = row_status(rs, x, err)) return bad;
      int64_t* actions = a.actions + i * S;
      draw_row(x, K, rs, a.seed, a.offset, i, S, sc, actions, a.uniforms);
      const Acc lz = store_row_stats(rs, true, i, row_max, log_z, entropy);
      for (int64_t s = 0; s < S; ++s) log_prob[i * S + s] = log_prob_of(load<Acc>(x[actions[s]]), rs.max, lz);
      return kOk;
    };
    auto row = [&](int64_t i) {
      Status st;
      if (truncated) {
        KeptRow<T, Acc> kr;
        st = truncate_row<T, Acc>(base + i * a.row_stride, K, a.col_stride, a.truncation, i, tsc, sc, kr, err);
        if (st == kOk) {
          st = kr.z ? draw_with(i, KeptView<Acc, Acc>{kr.z, kr.cut}, kr.stats)
                    : draw_with(i, KeptView<T, Acc>{kr.x, kr.cut}, kr.stats);
        }
      } else {
        st = with_row(base, i, a.row_stride, a.col_stride, K, sc, [&](const auto* x) {
          return draw_with(i, x, row_stats<true>(x, K, sc.weights, sc.chunk_max, sc.e));
        });
      }
      if (st != kOk) { err.status = st; err.row = i; }
      return st;
    };
    narrow_or_rows<NarrowGroup<Acc>::W>(!truncated && S == 1 && narrow_rows(K, a.col_stride), begin, end,
                                        lowest_failed, group, row);
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

}  // namespace

Status sample_cpu(const SampleArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return run<typename decltype(t)::type>(a, err); });
}

PGEST_NS_END
