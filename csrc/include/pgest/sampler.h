// Exact categorical sampling from one row of unnormalised log-probabilities,
// in a single read of the row.
//
// The row is cut into chunks (CPU: kChunk = 256 entries; CUDA: tiles of a
// thread block). Each chunk's e = exp(x - m_c) is summed relative to a running
// max m_c (on the CPU into kLanes lane accumulators, lane l taking entries
// l, l + 16, ..., reduced by one fixed tree), and the chunk keeps (m_c, sum_c).
// Afterwards finish_row_stats forms the chunk weights w_c = sum_c * exp(m_c - max)
// and their running total Z, in chunk order.
//
// A sample is the inverse CDF at t = u * Z. Its chunk is the one where the
// running total of the w_c first exceeds t (the very additions that formed Z,
// so t < Z always lands in a chunk); only that chunk's exponentials are
// recomputed and walked. Cost per row: one exp per entry, plus one per chunk.
//
// Every reduction has a fixed order and every fused multiply-add is explicit,
// so the draw is the same on AVX2, AVX-512 and (exp included) CUDA. An entry with e = 0
// (score -inf) is never chosen: the walk picks an entry only where the running
// sum strictly grows past t.
#pragma once

#include "dtype.h"
#include "math.h"

PGEST_NS_BEGIN

constexpr int kLanes = 16;
constexpr int kChunk = 256;

PGEST_HD int64_t num_chunks(int64_t cols) { return (cols + kChunk - 1) / kChunk; }

// The one reduction order used for 16 lanes, everywhere.
template <class Acc>
PGEST_HD Acc tree_sum(const Acc* v) {
  Acc s[kLanes / 2];
  for (int l = 0; l < 8; ++l) s[l] = v[l] + v[l + 8];
  for (int l = 0; l < 4; ++l) s[l] = s[l] + s[l + 4];
  for (int l = 0; l < 2; ++l) s[l] = s[l] + s[l + 2];
  return s[0] + s[1];
}

template <class Acc>
struct ChunkStats {
  Acc max;     // running max of the row up to and including this chunk
  Acc sum;     // sum of exp(x - max) over the chunk
  Acc ex_dot;  // sum of exp(x - max) * (x - max) over the chunk (entropy only)
  bool bad;    // the chunk holds a NaN or +inf
};

// The chunk masses are added in double: a row of 2^31 entries has 2^23
// chunks, and a serial float32 sum of that many terms drifts by percents.
template <class Acc>
struct RowStats {
  Acc max;          // row max
  double z;         // sum of exp(x - max)
  double ex_dot;    // sum of exp(x - max) * (x - max) (entropy only)
  int64_t bad_col;  // first NaN/+inf column, or -1
};

// After the chunk pass: rescale each chunk's mass from its running max m_c to
// the row max, in chunk order. On entry weights[c] = sum_c (and, with the
// entropy, weights[nc + c] = dot_c); on exit weights[c] = w_c.
template <bool kWithEntropy, class Acc>
PGEST_HD void finish_row_stats(int64_t nc, Acc* weights, const Acc* chunk_max, RowStats<Acc>& r) {
  r.z = 0.0;
  r.ex_dot = 0.0;
  for (int64_t c = 0; c < nc; ++c) {
    const Acc d = chunk_max[c] - r.max;
    // A chunk that was all -inf so far has m_c = -inf and sum 0.
    const Acc scale = chunk_max[c] == -Acc(INFINITY) ? Acc(0) : exp_nonpos(d);
    const Acc w = weights[c] * scale;
    weights[c] = w;
    r.z += double(w);
    // sum e'(x - m) = scale * (dot_c + sum_c * (m_c - m)) for e' = e * scale.
    if (kWithEntropy && scale > Acc(0)) r.ex_dot += double(scale * weights[nc + c] + w * d);
  }
}

// A threshold to place: t = u * Z, and the sample it belongs to.
struct Threshold {
  double t;
  int64_t sample;
};

// exp(x[j] - max) for j < m, one at a time (a CPU caller passes a vector
// version: exp_nonpos gives the same bits either way).
struct ScalarChunkExps {
  template <class Row, class Acc>
  void operator()(Row x, int m, Acc max, Acc* e) const {
    for (int j = 0; j < m; ++j) e[j] = exp_nonpos(load<Acc>(x[j]) - max);
  }
};

// The chunk's walk (double sums of the recomputed e, from `cum` to `walked`)
// fell short of its mass (float lanes, from `cum` to `next`) by rounding, and
// th[i].t lies in that gap [walked, next). The gap is spread over the chunk's
// entries in proportion to their mass: each such threshold is mapped to the
// same fraction of the walk, and the walk is taken again to it. Handing the
// whole gap to one entry instead (the last live one) gave a token of
// probability 1e-36 a draw in 1.2e6.
template <class Acc>
PGEST_HD void place_in_gap(const Acc* e, int m, double cum, double walked, double next, const Threshold* th,
                           int64_t& i, int64_t n, int64_t* actions, int64_t k) {
  double run = cum;
  int j = -1, last_live = -1;
  while (i < n && th[i].t < next) {
    const double target = cum + (th[i].t - walked) / (next - walked) * (walked - cum);
    while (j + 1 < m && !(target < run)) {
      ++j;
      run += double(e[j]);
      if (e[j] > Acc(0)) last_live = j;
    }
    // the entry whose running sum first exceeds the target (it has mass);
    // a target rounded up to the walk's total: the last entry with mass
    actions[th[i++].sample] = k + (target < run ? j : last_live);
  }
}

// `th` holds n thresholds sorted ascending, each < Z. Writes the column each
// one falls on to actions[th[i].sample]. `e` is scratch for kChunk values.
// `before`: the running total entering the first chunk (a split row's chunk
// walked alone: the total of the chunks before it, as the whole row's walk
// would have added them).
template <class Row, class Acc, class Exps = ScalarChunkExps>
inline void row_inverse_cdf(Row x, int64_t cols, Acc max, const Acc* weights, const Threshold* th, int64_t n,
                            int64_t* actions, Acc* e, const Exps& exps = Exps(), double before = 0.0) {
  double cum = before;
  int64_t i = 0;
  const int64_t nc = num_chunks(cols);
  for (int64_t c = 0; c < nc && i < n; ++c) {
    const double next = cum + double(weights[c]);  // the very additions that formed Z
    if (!(th[i].t < next)) { cum = next; continue; }
    const int64_t k = c * kChunk;
    const int m = cols - k < kChunk ? int(cols - k) : kChunk;
    exps(x + k, m, max, e);
    // Two levels keep the dependent chain of additions short: whole groups of
    // kLanes entries first, then the entries of the group a threshold is in.
    double w = cum;
    bool has_mass = false;  // some e of the chunk is positive (a walked group always is)
    for (int g = 0; g < m && i < n; g += kLanes) {
      const int end = g + kLanes < m ? g + kLanes : m;
      double gs = 0.0;
      for (int j = g; j < end; ++j) gs += double(e[j]);
      has_mass = has_mass || gs > 0.0;
      if (!(th[i].t < w + gs)) { w += gs; continue; }
      for (int j = g; j < end; ++j) {
        w += double(e[j]);
        while (i < n && th[i].t < w) actions[th[i++].sample] = k + j;
      }
    }
    // The walk's sum and the chunk weight may differ in the last bits: a
    // threshold caught between them (the loop above then ran to the chunk's
    // end, so w is the walk's total) is placed in proportion to the masses.
    if (i < n && th[i].t < next) {
      if (has_mass) {
        place_in_gap(e, m, cum, w, next, th, i, n, actions, k);
      } else {
        // Every e underflowed relative to the row max while the chunk weight
        // did not (a mass near 1e-38 of the row): take the chunk's largest.
        int largest = 0;
        for (int j = 1; j < m; ++j)
          if (load<Acc>(x[k + j]) > load<Acc>(x[k + largest])) largest = j;
        while (i < n && th[i].t < next) actions[th[i++].sample] = k + largest;
      }
    }
    cum = next;
  }
}

PGEST_NS_END
