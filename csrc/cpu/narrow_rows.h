// Rows of at most kLanes entries (the action spaces of classic RL, K = 2 to
// 16), W = Vec<Acc>::width rows at a time with one row per vector lane. The
// row-at-a-time passes pay a whole vector's work, a 16-lane tree and scalar
// exps for each such row (70-110 ns a row here at K <= 18); here every
// instruction serves W rows. Each lane does exactly the operations of
// small_row_stats and row_inverse_cdf on its row (the same exp_nonpos, the
// same tree_sum order over 16 logical entries, the same walk in double), so a
// row gets the same bits whichever path takes it: a draw's statistics stay
// those of a later log_prob forward or backward.
#pragma once

#include <pgest/sampler.h>

#include <atomic>

#include "row_stats.h"
#include "vec.h"

PGEST_NS_BEGIN

template <class Acc>
struct NarrowGroup {
  static constexpr int W = Vec<Acc>::width;
  Acc x[kLanes][W];  // transposed: x[j][l] is entry j of row l
  Acc e[kLanes][W];  // exp(x - max), the values the walk adds
  Acc max[W], sum[W], dot[W];
};

// Whether rows of `cols` entries with column stride `col_stride` go W at a time.
inline bool narrow_rows(int64_t cols, int64_t col_stride) { return cols >= 1 && cols <= kLanes && col_stride == 1; }

// Loads rows [i0, i0 + W) (unit column stride) and forms each row's max, sum
// of exp(x - max) and sum of exp(x - max) (x - max). False when some row is
// irregular (NaN, +inf, all -inf): the caller then takes the group one row at
// a time, and the row pass finds and reports the culprit.
template <class T, class Acc>
inline bool narrow_stats(const T* base, int64_t i0, int64_t row_stride, int cols, NarrowGroup<Acc>& g) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const Acc kInf = Acc(INFINITY);
  for (int l = 0; l < W; ++l) {
    const T* row = base + (i0 + l) * row_stride;
    for (int j = 0; j < cols; ++j) g.x[j][l] = load<Acc>(row[j]);
  }
  V m = splat<V>(-kInf);
  for (int j = 0; j < cols; ++j) {
    const V v = loadv(g.x[j]);
    m = select(v > m, v, m);  // NaN never wins: caught by the sum below
  }
  V e[kLanes], dot[kLanes];
  for (int j = 0; j < cols; ++j) {
    const V d = loadv(g.x[j]) - m;
    e[j] = exp_nonpos(d);
    dot[j] = select(e[j] > Acc(0), e[j] * d, V{});
    storev(g.e[j], e[j]);
  }
  for (int j = cols; j < kLanes; ++j) e[j] = dot[j] = V{};
  const V sum = tree_sum(e), dsum = tree_sum(dot);
  bool ok = true;
  for (int l = 0; l < W; ++l) ok = ok && m[l] != -kInf && sum[l] <= Acc(kLanes) * Acc(6.3e27);
  storev(g.max, m);
  storev(g.sum, sum);
  storev(g.dot, dsum);
  return ok;
}

// small_row_stats' result for lane l.
template <class Acc>
inline RowStats<Acc> narrow_row_stats(const NarrowGroup<Acc>& g, int l) {
  return RowStats<Acc>{g.max[l], double(g.sum[l]), double(g.dot[l]), -1};
}

// The entry of lane l's row where threshold t (< Z) falls: row_inverse_cdf
// on a row of one chunk and one group, without its branches.
template <class Acc>
inline int narrow_walk(const NarrowGroup<Acc>& g, int l, int cols, double t) {
  double w = 0.0;
  int act = -1;
  for (int j = 0; j < cols; ++j) {
    w += double(g.e[j][l]);
    act = (act < 0 && t < w) ? j : act;
  }
  if (act >= 0) return act;
  // t at the walk's total by rounding: row_inverse_cdf skips the group and
  // takes its first entry, or its last live one if the first is dead.
  if (g.e[0][l] > Acc(0)) return 0;
  for (int j = 0; j < cols; ++j)
    if (g.e[j][l] > Acc(0)) act = j;
  return act;
}

// Rows [begin, end) through `group(i0)` W at a time where `narrow`, the rest
// (the tail, and a group that declines) through `row(i)`, in row order.
// `row` returns kOk or stops the loop with its status (err filled by it).
template <int W, class Group, class Row>
inline Status narrow_or_rows(bool narrow, int64_t begin, int64_t end, const std::atomic<int64_t>& lowest_failed,
                             const Group& group, const Row& row) {
  for (int64_t i = begin; i < end;) {
    if (lowest_failed.load(std::memory_order_relaxed) < i) break;
    const bool whole = narrow && end - i >= W;
    if (whole && group(i)) { i += W; continue; }
    for (const int64_t stop = whole ? i + W : i + 1; i < stop; ++i)
      if (const Status st = row(i)) return st;
  }
  return kOk;
}

PGEST_NS_END
