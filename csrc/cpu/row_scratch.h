// Per-thread scratch of the CPU row kernels and the draw of a row's samples.
#pragma once

#include <pgest/action_groups.h>
#include <pgest/philox.h>
#include <pgest/sampler.h>

#include <algorithm>
#include <cstdlib>

#include "row_stats.h"
#include "vec.h"

PGEST_NS_BEGIN

// O(K + S) per thread: the only allocation besides the outputs.
template <class Acc>
struct RowScratch {
  Acc* gathered = nullptr;  // a strided row, converted, so the passes see unit stride
  Acc* weights = nullptr;   // per chunk: mass (and entropy term)
  Acc* chunk_max = nullptr;
  Acc* e = nullptr;         // one chunk: exponentials for the walk, or padding
  Threshold* thresholds = nullptr;
  int64_t* order = nullptr;  // for_each_action, when S > kPairwiseSamples
  bool ok = false;

  RowScratch(int64_t cols, int64_t samples, bool need_gather) {
    const size_t nc = size_t(num_chunks(cols));
    if (need_gather) gathered = static_cast<Acc*>(std::malloc(sizeof(Acc) * size_t(cols)));
    weights = static_cast<Acc*>(std::malloc(sizeof(Acc) * 2 * nc));
    chunk_max = static_cast<Acc*>(std::malloc(sizeof(Acc) * nc));
    e = static_cast<Acc*>(std::malloc(sizeof(Acc) * kChunk));
    thresholds = static_cast<Threshold*>(std::malloc(sizeof(Threshold) * size_t(samples > 0 ? samples : 1)));
    if (samples > kPairwiseSamples) order = static_cast<int64_t*>(std::malloc(sizeof(int64_t) * size_t(samples)));
    ok = weights && chunk_max && e && thresholds && (gathered || !need_gather) &&
         (order || samples <= kPairwiseSamples);
  }
  ~RowScratch() {
    std::free(gathered); std::free(weights); std::free(chunk_max); std::free(e); std::free(thresholds); std::free(order);
  }
  RowScratch(const RowScratch&) = delete;
  RowScratch& operator=(const RowScratch&) = delete;
};

// The walk's chunk of exponentials with native vectors: the same values as
// ScalarChunkExps (exp_nonpos is one template for both), up to 256 of them
// per drawn chunk, which one at a time cost more than the row pass at K ~ 100.
struct VectorChunkExps {
  template <class Row, class Acc>
  void operator()(Row x, int m, Acc max, Acc* e) const {
    using V = typename Vec<Acc>::type;
    constexpr int W = Vec<Acc>::width;
    const V vm = splat<V>(max);
    int j = 0;
    for (; j + W <= m; j += W) storev(e + j, exp_nonpos(loadv(x + j) - vm));
    for (; j < m; ++j) e[j] = exp_nonpos(load<Acc>(x[j]) - max);
  }
};

// Row statistics, then S draws into actions[0..S). st must be a valid row
// (no NaN, not all -inf).
template <class Row, class Acc>
inline void draw_row(Row x, int64_t cols, const RowStats<Acc>& st, uint64_t seed, uint64_t offset,
                     int64_t row, int64_t S, RowScratch<Acc>& sc, int64_t* actions,
                     const double* given = nullptr) {
  for (int64_t s = 0; s < S; ++s) {
    sc.thresholds[s] = Threshold{draw_uniform(given, seed, offset, row, S, s) * double(st.z), s};
  }
  if (S > 1) {
    std::sort(sc.thresholds, sc.thresholds + S,
              [](const Threshold& l, const Threshold& r) { return l.t < r.t; });
  }
  row_inverse_cdf(x, cols, st.max, sc.weights, sc.thresholds, S, actions, sc.e, VectorChunkExps());
}

// A row through `fn(const U* row)`: in place when unit-stride, else gathered
// into scratch as Acc first (so every pass sees a contiguous row).
template <class T, class Acc, class Fn>
inline auto with_row(const T* base, int64_t i, int64_t row_stride, int64_t col_stride, int64_t cols,
                     RowScratch<Acc>& sc, const Fn& fn) {
  const T* row = base + i * row_stride;
  if (col_stride == 1) return fn(row);
  for (int64_t k = 0; k < cols; ++k) sc.gathered[k] = load<Acc>(row[k * col_stride]);
  return fn(static_cast<const Acc*>(sc.gathered));
}

PGEST_NS_END
