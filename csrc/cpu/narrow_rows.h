// Rows of at most kNarrowCols = 2 * kLanes entries (the action spaces of
// classic RL: K = 2 to 18 for Atari, up to 32), W = Vec<Acc>::width rows at
// a time with one row per vector lane. The row-at-a-time passes pay a whole
// vector's work, a 16-lane tree and scalar exps for each such row (70-180 ns
// a row here at K <= 18); here every instruction serves W rows. Each lane
// does exactly the operations the row path does on its row: small_row_stats
// for K <= 16, the chunk pass (lane l holds entries l and l + 16) with its
// one-chunk finish for 16 < K <= 32, the same exp_nonpos, the same tree_sum
// order and the same walk in double, so a row gets the same bits whichever
// path takes it: a draw's statistics stay those of a later log_prob forward
// or backward.
#pragma once

#include <pgest/sampler.h>

#include <atomic>

#include "row_stats.h"
#include "vec.h"

PGEST_NS_BEGIN

constexpr int kNarrowCols = 2 * kLanes;

template <class Acc>
struct NarrowGroup {
  static constexpr int W = Vec<Acc>::width;
  Acc x[kNarrowCols][W];  // transposed: x[j][l] is entry j of row l
  Acc e[kNarrowCols][W];  // exp(x - max), the values the walk adds
  Acc max[W], sum[W], dot[W];
};

// Whether rows of `cols` entries with column stride `col_stride` go W at a time.
inline bool narrow_rows(int64_t cols, int64_t col_stride) {
  return cols >= 1 && cols <= kNarrowCols && col_stride == 1;
}

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
  if (cols <= kLanes) {  // small_row_stats: the max in entry order
    for (int j = 0; j < cols; ++j) {
      const V v = loadv(g.x[j]);
      m = select(v > m, v, m);  // NaN never wins: caught by the sum below
    }
  } else {  // chunk_stats: each lane's max (entries l, l + 16), then the lanes in order
    for (int l = 0; l < kLanes; ++l) {
      V ml = splat<V>(-kInf);
      for (int j = l; j < cols; j += kLanes) {
        const V v = loadv(g.x[j]);
        ml = select(v > ml, v, ml);
      }
      m = select(ml > m, ml, m);
    }
  }
  V e[kLanes], dot[kLanes];
  for (int l = 0; l < kLanes; ++l) e[l] = dot[l] = V{};
  for (int j = 0; j < cols; ++j) {  // lane j % 16 adds entry j after entry j - 16, as the chunk pass does
    V dc;  // as in chunk_stats: d where ej > 0, finite elsewhere
    const V ej = exp_nonpos(loadv(g.x[j]) - m, &dc);
    e[j % kLanes] += ej;
    dot[j % kLanes] += ej * dc;
    storev(g.e[j], ej);
  }
  const V sum = tree_sum(e), dsum = tree_sum(dot);
  // The row pass's overflow guard: kLanes entries (small_row_stats) or one
  // padded chunk of 2 * kLanes (chunk_stats).
  const Acc bound = Acc(cols <= kLanes ? kLanes : kNarrowCols) * Acc(6.3e27);
  bool ok = true;
  for (int l = 0; l < W; ++l) ok = ok && m[l] != -kInf && sum[l] <= bound;
  storev(g.max, m);
  storev(g.sum, sum);
  storev(g.dot, dsum);
  return ok;
}

// The row pass's RowStats for lane l (small_row_stats, or the one-chunk
// finish of row_stats: the chunk's own max is the row max, so its scale is 1).
template <class Acc>
inline RowStats<Acc> narrow_row_stats(const NarrowGroup<Acc>& g, int l) {
  return RowStats<Acc>{g.max[l], double(g.sum[l]), double(g.dot[l]), -1};
}

// The entry of lane l's row where threshold t (< Z) falls: row_inverse_cdf
// on a row of one chunk, group by group (a group of kLanes entries is
// skipped whole when t is past its double sum), its fallbacks included.
template <class Acc>
inline int narrow_walk(const NarrowGroup<Acc>& g, int l, int cols, double t) {
  double w = 0.0;
  int last_positive = -1;
  for (int g0 = 0; g0 < cols; g0 += kLanes) {
    const int end = g0 + kLanes < cols ? g0 + kLanes : cols;
    double gs = 0.0;
    for (int j = g0; j < end; ++j) gs += double(g.e[j][l]);
    if (gs > 0.0) last_positive = g0;
    if (!(t < w + gs)) { w += gs; continue; }
    for (int j = g0; j < end; ++j) {
      if (g.e[j][l] > Acc(0)) last_positive = j;
      w += double(g.e[j][l]);
      if (t < w) return j;
    }
  }
  // t caught between the walk's sum w and the row's mass by rounding:
  // placed in proportion to the masses (sampler.h's place_in_gap; the row
  // max's entry has e = 1, so w > 0).
  Acc e[kNarrowCols];
  for (int j = 0; j < cols; ++j) e[j] = g.e[j][l];
  const Threshold th{t, 0};
  int64_t i = 0, action = last_positive;
  place_in_gap(e, cols, 0.0, w, double(g.sum[l]), &th, i, 1, &action, 0);
  return int(action);
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
