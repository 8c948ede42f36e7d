// The CPU chunk pass of sampler.h: one read of a row, native vectors inside a
// chunk (vec.h). A chunk is visited twice while it sits in L1: its max first,
// then exp(x - running max) summed into 16 lane
// accumulators. Lane l holds entries l, l + 16, ... added in order, and the
// lanes meet in tree_sum, so the sum is the same for every instruction set.
//
// A `Row` is a pointer to the entries, or a view that forms them on load
// (truncated_row.h's KeptView: -inf outside a kept set) with a pointer's
// `+ k` and `[k]` and a loadv overload, so a truncated row is summed and
// walked without being written out.
#pragma once

#include <pgest/log_prob.h>
#include <pgest/sampler.h>

#include "vec.h"

#include <cmath>

PGEST_NS_BEGIN

// The lanes of a chunk meet in vector halves where the compiler has
// __builtin_shufflevector (GCC 12, Clang) and the vectors are AVX's or wider:
// the accumulators stay in registers. Elsewhere (older GCC; 16-byte vectors,
// where the 16-lane shuffles measured slower) they are taken apart one by
// one: the same additions in the same order, so the same bits.
#if defined(__has_builtin) && !defined(PGEST_NO_SHUFFLEVECTOR) && PGEST_VEC_BYTES >= 32
#if __has_builtin(__builtin_shufflevector)
#define PGEST_LANE_SHUFFLES 1
#endif
#endif

#ifdef PGEST_LANE_SHUFFLES
// The 16 logical lanes held in kLanes / W native vectors (lane l in
// v[l / W][l % W]) as one 16-lane vector, by shuffles: through memory the
// accumulators would be stored at every step of the chunk loop.
template <class Acc, class V, int Q>
PGEST_HD auto lanes16(const V (&v)[Q]) {
  typedef Acc L16 __attribute__((vector_size(16 * sizeof(Acc))));
  if constexpr (Q == 1) {
    return L16(v[0]);
  } else if constexpr (Q == 2) {
    return L16(__builtin_shufflevector(v[0], v[1], 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  } else if constexpr (Q == 4) {
    const auto a = __builtin_shufflevector(v[0], v[1], 0, 1, 2, 3, 4, 5, 6, 7);
    const auto b = __builtin_shufflevector(v[2], v[3], 0, 1, 2, 3, 4, 5, 6, 7);
    return L16(__builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  } else {
    static_assert(Q == 8, "16 lanes of 2");
    const auto a = __builtin_shufflevector(v[0], v[1], 0, 1, 2, 3);
    const auto b = __builtin_shufflevector(v[2], v[3], 0, 1, 2, 3);
    const auto c = __builtin_shufflevector(v[4], v[5], 0, 1, 2, 3);
    const auto d = __builtin_shufflevector(v[6], v[7], 0, 1, 2, 3);
    const auto ab = __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7);
    const auto cd = __builtin_shufflevector(c, d, 0, 1, 2, 3, 4, 5, 6, 7);
    return L16(__builtin_shufflevector(ab, cd, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  }
}

// Folds 16 lanes in halves, combine(lo, hi) lane-wise at each level: for an
// addition, sampler.h's tree_sum's additions in its order (s[l] = v[l] +
// v[l + 8], ...).
template <class L16, class Combine>
PGEST_HD auto fold_halves(L16 v, Combine combine) {
  const auto s8 = combine(__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7),
                          __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15));
  const auto s4 = combine(__builtin_shufflevector(s8, s8, 0, 1, 2, 3), __builtin_shufflevector(s8, s8, 4, 5, 6, 7));
  const auto s2 = combine(__builtin_shufflevector(s4, s4, 0, 1), __builtin_shufflevector(s4, s4, 2, 3));
  return combine(s2[0], s2[1]);
}

// tree_sum of the lanes.
template <class Acc, class V, int Q>
PGEST_HD Acc lanes_tree_sum(const V (&v)[Q]) {
  return fold_halves(lanes16<Acc>(v), [](auto a, auto b) { return a + b; });
}

// The largest of start and the lanes (start on a tie). Lanes hold no NaN.
// Equal values differ at most in the sign of a zero, which no sum, draw or
// output tells apart: x - max and exp of it are the same either way.
template <class Acc, class V, int Q>
PGEST_HD Acc lanes_max(const V (&v)[Q], Acc start) {
  const Acc m = fold_halves(lanes16<Acc>(v), [](auto a, auto b) { return a > b ? a : b; });
  return m > start ? m : start;
}
#else
template <class Acc, class V, int Q>
inline Acc lanes_tree_sum(const V (&v)[Q]) {
  Acc lanes[kLanes];
  for (int q = 0; q < Q; ++q)
    for (int i = 0; i < int(sizeof(V) / sizeof(Acc)); ++i) lanes[q * (kLanes / Q) + i] = v[q][i];
  return tree_sum(lanes);
}

template <class Acc, class V, int Q>
inline Acc lanes_max(const V (&v)[Q], Acc start) {
  Acc r = start;
  for (int q = 0; q < Q; ++q)
    for (int i = 0; i < int(sizeof(V) / sizeof(Acc)); ++i) r = v[q][i] > r ? Acc(v[q][i]) : r;
  return r;
}
#endif

// exp(x - ref) summed over a chunk with the chunk's max tracked alongside:
// one visit per entry. Valid while max - ref <= kOptimisticRange (the sums
// stay far from overflow); the caller checks.
constexpr float kOptimisticRange = 64.0f;

// Whether a chunk entered at running_max, whose max (with running_max's)
// is chunk_max, keeps its sums relative to running_max; else they are taken
// relative to chunk_max.
template <class Acc>
PGEST_HD bool sums_at_running_max(Acc running_max, Acc chunk_max) {
  return running_max != -Acc(INFINITY) && chunk_max - running_max <= Acc(kOptimisticRange);
}

// Moves a chunk's sums from the reference they were taken at to its max
// (ref < max): e' = e * s with s = exp(ref - max);
// sum e'(x - max) = s (dot + sum (ref - max)).
template <bool kWithEntropy, class Acc>
PGEST_HD void rebase_chunk(ChunkStats<Acc>& st, Acc ref) {
  const Acc shift = ref - st.max;
  const Acc s = exp_nonpos(shift);
  if (kWithEntropy) st.ex_dot = s * (st.ex_dot + st.sum * shift);
  st.sum = st.sum * s;
}

// One chunk of `len` entries, a multiple of kLanes (a short chunk is padded
// with -inf to the next multiple, and the groups past it would add exactly
// zero to every lane, so they are skipped). kStore: each exp(x - ref) the
// chunk's sums hold goes to store[j] too (nothing where the chunk is all
// -inf), for a later pass over the same row to sum again without them.
template <bool kWithEntropy, bool kStore = false, class Row, class Acc>
PGEST_HD ChunkStats<Acc> chunk_stats(Row x, int len, Acc running_max, Acc* store = nullptr) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width, Q = kLanes / W;
  const Acc kInf = Acc(INFINITY);
  V m[Q], acc[Q], dot[Q];
  for (int q = 0; q < Q; ++q) { m[q] = splat<V>(running_max); acc[q] = V{}; dot[q] = V{}; }
  auto sum_pass = [&](Acc ref, bool track_max) {
    const V vr = splat<V>(ref);
    for (int q = 0; q < Q; ++q) { acc[q] = V{}; dot[q] = V{}; }
    for (int j = 0; j < len; j += kLanes) {
      for (int q = 0; q < Q; ++q) {
        const V v = loadv(x + j + q * W);
        if (track_max) m[q] = select(v > m[q], v, m[q]);
        V dc;  // d where e > 0; finite where e = 0, whose product's limit is 0, not 0 * -inf = NaN
        const V e = exp_nonpos(v - vr, &dc);
        if constexpr (kStore) storev(store + j + q * W, e);
        acc[q] += e;
        if (kWithEntropy) dot[q] += e * dc;
      }
    }
  };
  ChunkStats<Acc> st{running_max, Acc(0), Acc(0), false};
  Acc ref = running_max;
  bool summed = false;
  if (running_max != -kInf) {
    // Usually the row's max is behind us: sum relative to it while finding
    // this chunk's max, and redo the chunk only if it jumped far above.
    sum_pass(running_max, true);
    st.max = lanes_max<Acc>(m, running_max);
    summed = sums_at_running_max(running_max, st.max);
  } else {
    for (int j = 0; j < len; j += kLanes)
      for (int q = 0; q < Q; ++q) {
        const V v = loadv(x + j + q * W);
        m[q] = select(v > m[q], v, m[q]);  // NaN never wins: caught by the sum below
      }
    st.max = lanes_max<Acc>(m, running_max);
  }
  if (st.max == -kInf) {
    // Nothing but -inf and NaN so far: rare, so look for NaN directly.
    for (int j = 0; j < len; ++j) st.bad = st.bad || load<Acc>(x[j]) != load<Acc>(x[j]);
    return st;
  }
  if (!summed) {
    sum_pass(st.max, false);
    ref = st.max;
  }
  st.sum = lanes_tree_sum<Acc>(acc);
  if (kWithEntropy) st.ex_dot = lanes_tree_sum<Acc>(dot);
  // Each e <= exp(kOptimisticRange), so a finite chunk sums to at most
  // len * e^64: a NaN (which makes its e NaN) or a +inf (which makes the max
  // +inf and inf - inf NaN) shows up here without a test per entry.
  st.bad = !(st.sum <= Acc(len) * Acc(6.3e27));
  if (ref != st.max && !st.bad) rebase_chunk<kWithEntropy>(st, ref);
  return st;
}

// A row of at most kLanes entries: the same numbers as chunk_stats on the
// row padded with -inf (lane l holds entry l alone, the lanes meet in
// tree_sum, and the rescale to the row max is by exp(0) = 1 exactly), in
// scalar code without the vector pass's fixed cost, which is most of the
// work at the action-space sizes of classic RL (K = 2 to 16).
template <bool kWithEntropy, class Row, class Acc>
inline RowStats<Acc> small_row_stats(Row x, int64_t cols, Acc* weights, Acc* chunk_max) {
  const Acc kInf = Acc(INFINITY);
  Acc v[kLanes], e[kLanes], dot[kLanes];
  Acc m = -kInf;
  for (int j = 0; j < int(cols); ++j) {
    v[j] = load<Acc>(x[j]);
    m = v[j] > m ? v[j] : m;  // NaN never wins: caught by the sum below
  }
  RowStats<Acc> r{m, 0.0, 0.0, -1};
  if (m == -kInf) {
    for (int j = 0; j < int(cols); ++j)
      if (v[j] != v[j]) { r.bad_col = j; break; }
    return r;
  }
  for (int j = 0; j < int(cols); ++j) {
    const Acc d = v[j] - m;
    e[j] = exp_nonpos(d);
    dot[j] = e[j] > Acc(0) ? e[j] * d : Acc(0);
  }
  for (int j = int(cols); j < kLanes; ++j) e[j] = dot[j] = Acc(0);
  const Acc sum = tree_sum(e);
  if (!(sum <= Acc(kLanes) * Acc(6.3e27))) {
    for (int j = 0; j < int(cols); ++j)
      if (!(v[j] < kInf)) { r.bad_col = j; break; }
    return r;
  }
  chunk_max[0] = m;
  weights[0] = sum;
  r.z = double(sum);
  if (kWithEntropy) {
    weights[1] = tree_sum(dot);
    r.ex_dot = double(weights[1]);
  }
  return r;
}

// Whether every entry of a whole chunk is -inf (a truncated row's masked
// part): such a chunk adds exactly 0 to every lane and leaves the running
// max, so skipping its exponentials changes no bit of the row's statistics.
template <class Acc, class Row>
inline bool chunk_all_neg_inf(Row x) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const V ninf = splat<V>(-Acc(INFINITY));
  V any{};
  for (int j = 0; j < kChunk; j += W) any = select(loadv(x + j) != ninf, splat<V>(Acc(1)), any);
  for (int l = 0; l < W; ++l)
    if (any[l] != Acc(0)) return false;
  return true;
}

// row_stats takes every chunk by the chunk pass unless a shortcut supplies
// its statistics (truncated_row.h's StoredChunks).
struct NoShortcut {
  template <class Acc>
  bool operator()(int64_t, Acc, ChunkStats<Acc>&) const { return false; }
};

// The chunk pass over `cols` entries entering at running max `entering`
// (-inf for a whole row; a split row's chunks take the max of the columns
// before them, chunk_pass.cpp): each chunk's running max after it into
// chunk_max[c], its sums into weights[c] and weights[nc + c]; the running max
// after the last chunk (or the first bad column) in the result. No finish.
// kSkipMasked (rows mostly -inf, as truncated rows are): whole chunks of -inf
// are recognised by a comparison and skipped, with the same bits as the full
// pass. kStore: the exponentials of the chunks' sums go to store
// (num_chunks(cols) * kChunk entries). shortcut(c, running_max, st): true
// where it set whole chunk c's statistics, as the chunk pass would have.
template <bool kWithEntropy, bool kSkipMasked = false, bool kStore = false, class Row, class Acc,
          class Shortcut = NoShortcut>
inline RowStats<Acc> chunk_pass(Row x, int64_t cols, Acc entering, Acc* weights, Acc* chunk_max, Acc* pad,
                                Acc* store = nullptr, const Shortcut& shortcut = Shortcut()) {
  const Acc kInf = Acc(INFINITY);
  const int64_t nc = num_chunks(cols);
  RowStats<Acc> r{entering, 0.0, 0.0, -1};
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t k = c * kChunk;
    ChunkStats<Acc> st;
    if constexpr (kSkipMasked) {
      if (cols - k >= kChunk && chunk_all_neg_inf<Acc>(x + k)) {
        chunk_max[c] = r.max;
        weights[c] = Acc(0);
        if (kWithEntropy) weights[nc + c] = Acc(0);
        continue;
      }
    }
    if (cols - k >= kChunk) {
      if (!shortcut(c, r.max, st))
        st = chunk_stats<kWithEntropy, kStore>(x + k, kChunk, r.max, kStore ? store + k : nullptr);
    } else {
      const int n = int(cols - k);
      const int len = (n + kLanes - 1) / kLanes * kLanes;
      for (int j = 0; j < n; ++j) pad[j] = load<Acc>(x[k + j]);
      for (int j = n; j < len; ++j) pad[j] = -kInf;
      st = chunk_stats<kWithEntropy, kStore>(pad, len, r.max, kStore ? store + k : nullptr);
    }
    if (st.bad) {  // error path only: find the culprit for the message
      for (int64_t j = k; j < cols; ++j) {
        if (!(load<Acc>(x[j]) < kInf)) { r.bad_col = j; break; }
      }
      return r;
    }
    r.max = st.max;
    chunk_max[c] = st.max;
    weights[c] = st.sum;
    if (kWithEntropy) weights[nc + c] = st.ex_dot;
  }
  return r;
}

// The single pass over a row of `cols` entries. `weights` needs
// 2 * num_chunks(cols) entries and `chunk_max` num_chunks(cols); `pad` is
// scratch for one chunk; the rest as chunk_pass (kStore: rows of more than
// kLanes entries).
template <bool kWithEntropy, bool kSkipMasked = false, bool kStore = false, class Row, class Acc,
          class Shortcut = NoShortcut>
inline RowStats<Acc> row_stats(Row x, int64_t cols, Acc* weights, Acc* chunk_max, Acc* pad, Acc* store = nullptr,
                               const Shortcut& shortcut = Shortcut()) {
  if (cols <= kLanes) return small_row_stats<kWithEntropy>(x, cols, weights, chunk_max);
  RowStats<Acc> r = chunk_pass<kWithEntropy, kSkipMasked, kStore>(x, cols, -Acc(INFINITY), weights, chunk_max, pad,
                                                                   store, shortcut);
  if (r.bad_col < 0 && r.max != -Acc(INFINITY)) finish_row_stats<kWithEntropy>(num_chunks(cols), weights, chunk_max, r);
  return r;
}

// kOk for a row that can be sampled, else why not (err gets the culprit).
template <class Row, class Acc>
inline Status row_status(const RowStats<Acc>& rs, Row x, ErrorInfo& err) {
  if (rs.bad_col >= 0) {
    err.col = rs.bad_col;
    err.value = double(load<Acc>(x[rs.bad_col]));
    return kNonFiniteInput;
  }
  return rs.max == -Acc(INFINITY) ? kAllNegInf : kOk;
}

// What a later log_prob backward needs of row i, from its chunk sums: the
// max, log Z (the log taken in double, then rounded once) and the entropy
// (0 without). Returns log Z. Shared by the sample and log_prob passes, so
// a draw's statistics are the forward's bit for bit.
template <class Acc>
inline Acc store_row_stats(const RowStats<Acc>& rs, bool with_entropy, int64_t i, Acc* row_max, Acc* log_z,
                           Acc* entropy) {
  const double lz = std::log(rs.z);
  row_max[i] = rs.max;
  log_z[i] = Acc(lz);
  entropy[i] = with_entropy ? Acc(entropy_of(lz, rs.ex_dot, rs.z)) : Acc(0);
  return log_z[i];
}

PGEST_NS_END
