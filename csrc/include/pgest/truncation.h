// truncation: the kept set of a row under temperature, top-k, top-p and
// min-p, as one threshold on the tempered logits z = x / T (the smallest kept
// z), found by selection (no sort of the row) in a bounded number of passes.
//
// Definitions (ties at a boundary are all kept, so the set never depends on
// an order among equal values), applied in transformers' order:
//   top-k  keeps z >= the k-th largest z;
//   top-p  keeps z whose strictly larger kept entries hold < p of the mass of
//          the top-k distribution (mass summed in double);
//   min-p  keeps z >= max z + log(min_p)   (p_z >= min_p * p_max);
// the kept set is their intersection: z >= max of the three thresholds. The
// row's maximum is always kept. Temperature 0 is greedy: the threshold is the
// row's maximum logit and one entry (the first maximum) is kept.
//
// Every op that applies the set forms z by the same division in the
// accumulation type, so the sampler's set and the trainer's are the same
// entries bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "common.h"
#include "dtype.h"
#include "math.h"
#include "status.h"

namespace pgest {

// Per-row parameters are float64 (temperature, top_p, min_p) or int64 (top_k)
// with an element stride (0: one value for every row). Disabled filters:
// top_k <= 0, top_p >= 1, min_p <= 0. The same block rides in the sample
// kernel's arguments, which then draw from the kept set in the same read of
// the row (a null temperature: no truncation).
struct TruncationParams {
  const double* temperature = nullptr;
  int64_t temperature_stride = 0;
  const int64_t* top_k = nullptr;
  int64_t top_k_stride = 0;
  const double* top_p = nullptr;
  int64_t top_p_stride = 0;
  const double* min_p = nullptr;
  int64_t min_p_stride = 0;
  const void* given_threshold = nullptr;  // (R,) accumulation type: keep z >= it instead of selecting
  // An outside sampler's kept sets instead (the CPU log_prob kernels only):
  // row i keeps the ids kept_ids[kept_offsets[i], kept_offsets[i + 1]),
  // checked by the caller (in [0, K), at least one a row). Greedy rows keep
  // their first maximum whatever the list.
  const int64_t* kept_ids = nullptr;
  const int64_t* kept_offsets = nullptr;
  // Outputs, each optional: the record of every row.
  void* threshold = nullptr;    // (R,) accumulation type: the smallest kept z (greedy: the max logit)
  int64_t* kept = nullptr;      // (R,) entries kept
  double* kept_mass = nullptr;  // (R,) mass of the kept set under softmax(z) (greedy: 1)
  // (R,) accumulation type: midway between the smallest kept z and the
  // largest z left out (-inf: nothing left out; greedy: the max logit). A
  // replay that compares with it keeps the same set when the replayer's z
  // differ from these by less than half that gap (a cached and a full
  // forward of a model round differently); comparing with `threshold`
  // itself keeps it only on the same logits.
  void* cut = nullptr;
  void* kept_logits = nullptr;  // (R, K) accumulation type, contiguous: z, -inf outside the kept set
};

struct TruncationArgs {
  const void* logits = nullptr;
  int32_t dtype = 0;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;
  TruncationParams params;
  int32_t num_threads = 1;
};

namespace cpu {
Status truncation(const TruncationArgs& args, ErrorInfo* err);
// The CUDA schedule's selection (radix_truncate_row below) run on the CPU
// by a team of one thread: how the tests check the GPU's algorithm where no
// GPU is. Not a fast path (8 to 16 passes over each row).
Status truncation_radix(const TruncationArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest

PGEST_NS_BEGIN

// The tempered value every op uses: one correctly rounded division in Acc.
template <class Acc>
PGEST_HD Acc tempered(Acc x, Acc temperature) { return x / temperature; }

// Row i's filter parameters, read once (disabled: top_k <= 0, top_p >= 1,
// min_p <= 0).
struct RowFilters {
  int64_t top_k;
  double top_p, min_p;
};

PGEST_HD RowFilters row_filters(const TruncationParams& p, int64_t i) {
  return RowFilters{p.top_k ? p.top_k[i * p.top_k_stride] : 0, p.top_p ? p.top_p[i * p.top_p_stride] : 1.0,
                    p.min_p ? p.min_p[i * p.min_p_stride] : 0.0};
}

// The record's cut: midway between the smallest kept value and the largest
// left out, or the smallest kept value where the two are neighbouring
// floats; -inf where nothing is left out.
template <class Acc>
PGEST_HD Acc replay_cut(Acc smallest, Acc dropped) {
  const Acc mid = smallest / 2 + dropped / 2;
  return dropped == -Acc(INFINITY) ? dropped : (mid > dropped ? mid : smallest);
}

// Order-preserving unsigned keys of floats: a < b exactly when key(a) <
// key(b), for values that are not NaN (-0 below +0).
template <class Acc> struct OrderKey;
template <> struct OrderKey<float> {
  using type = uint32_t;
  static PGEST_HD type of(float v) {
    const uint32_t b = float_bits(v);
    return b & 0x80000000u ? ~b : b | 0x80000000u;
  }
  static PGEST_HD float value(type k) { return bits_float(k & 0x80000000u ? k & 0x7fffffffu : ~k); }
};
template <> struct OrderKey<double> {
  using type = uint64_t;
  static PGEST_HD type of(double v) {
    const uint64_t b = double_bits(v);
    return b & (uint64_t(1) << 63) ? ~b : b | (uint64_t(1) << 63);
  }
  static PGEST_HD double value(type k) {
    return bits_double(k & (uint64_t(1) << 63) ? k & ~(uint64_t(1) << 63) : ~k);
  }
};

// One entry of a row in a selection: its tempered value and its mass exp(z - max)
// (the CPU forms the mass once per row, with the exponential the row passes use).
template <class Acc>
struct Entry {
  Acc z;
  Acc mass;
};

namespace detail {

// The smallest z among v[0, n) whose strictly larger entries hold less than
// `target` of the mass, when `above` is the mass of the entries larger than
// every entry given and `best` the smallest of those (kept: their mass is
// under the target), so a caller may pass only the entries near the
// boundary. Quickselect by mass: each step partitions around a pivot into
// (> pivot, == pivot, < pivot) and keeps the side that holds the boundary, so
// the expected work is O(n). The pivot is the median of three fixed
// positions, so the result depends on the row alone; a range that will not
// shrink (a pivot sequence built to defeat the median of three) is finished
// by a sort of what is left.
template <class Acc>
inline Acc select_by_mass(Entry<Acc>* v, int64_t n, double target, double above, Acc best) {
  int64_t lo = 0, hi = n;
  for (int steps = 0; hi > lo; ++steps) {
    if (steps == 64) {
      std::sort(v + lo, v + hi, [](const Entry<Acc>& l, const Entry<Acc>& r) { return l.z > r.z; });
      for (int64_t j = lo; j < hi;) {
        int64_t e = j;
        double equal = 0.0;
        for (; e < hi && v[e].z == v[j].z; ++e) equal += double(v[e].mass);
        if (!(above < target)) break;
        best = v[j].z;
        above += equal;
        j = e;
      }
      break;
    }
    const Acc a = v[lo].z, b = v[lo + (hi - lo) / 2].z, c = v[hi - 1].z;
    const Acc pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    Entry<Acc>* first = v + lo;
    Entry<Acc>* mid = std::partition(first, v + hi, [&](const Entry<Acc>& x) { return x.z > pivot; });
    Entry<Acc>* last = std::partition(mid, v + hi, [&](const Entry<Acc>& x) { return x.z == pivot; });
    double larger = 0.0, equal = 0.0;
    for (Entry<Acc>* q = first; q < mid; ++q) larger += double(q->mass);
    for (Entry<Acc>* q = mid; q < last; ++q) equal += double(q->mass);
    if (above + larger < target) {
      best = pivot;  // the pivot is kept; entries below it may be too
      above += larger + equal;
      if (!(above < target)) break;
      lo = int64_t(last - v);
    } else {
      hi = int64_t(mid - v);  // the boundary lies among the larger entries (not empty: they hold mass)
    }
  }
  return best;
}

}  // namespace detail

// ---- The kept set by radix descent: the CUDA schedule's selection ----
//
// A team of threads (a CUDA block; on the CPU, in the tests, one thread)
// walks the order keys of the row's z a digit at a time from the most
// significant, histogramming the entries still in play: by count for top-k,
// by mass for top-p. A fixed number of passes over the row, no sort, no
// workspace but two histograms: in float32 the max pass (which also takes
// top-k's first histogram: counts need no max), 3 more for top-k, 4 for
// top-p (whose first histogram gives the mass its fraction is of), and the
// record's; each selection's 4 digits are 8 in float64.
// Masses are fixed-point integers, exp(z - max) * 2^s truncated, with s such
// that a whole row's sum fits in 62 bits: integer sums are exact in any
// order, so the kept set depends on the row alone, never on how the team's
// threads interleave. The descents find a value; the set is then z >= it, by
// value, so -0 and +0 (whose keys differ) are kept or left out together. It equals the CPU's set except where a cumulative mass
// is within rounding of top_p (the CPU sums float exponentials in double).
//
// Team: rank(), size(), sync(); clear() (both histograms to 0, the team
// synchronised before and after); count(bin) and add_mass(bin, m) (atomic
// adds); counts[bin], masses[bin] (uint64 histograms, read after a sync);
// sum(v) / max(v) / min(v) (every thread gets the team's result; double,
// uint64, int64 or Acc).

constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

// The fixed point of a row of K entries: 62 bits less those of K.
PGEST_HD int mass_shift(int64_t K) {
  int bits = 0;
  while (bits < 62 && (int64_t(1) << bits) <= K) ++bits;
  return 62 - bits;
}

template <class Acc>
PGEST_HD uint64_t fixed_mass(Acc z, Acc max, int shift) {
  return uint64_t(double(exp_nonpos(z - max)) * double(uint64_t(1) << shift));
}

// The most significant digit of z's order key: the first round of radix_kth.
template <class Acc>
PGEST_HD int top_digit(Acc z) {
  return int(OrderKey<Acc>::of(z) >> (8 * sizeof(typename OrderKey<Acc>::type) - kRadixBits));
}

// The k-th largest z (1 <= k <= the row's finite entries), by count.
// first_counted: the team's counts already hold the first round's
// histogram (top_digit of every entry, taken in the caller's pass).
template <class Acc, class Team, class ZAt>
PGEST_HD Acc radix_kth(Team& team, const ZAt& z_at, int64_t K, int64_t k, bool first_counted) {
  using Key = typename OrderKey<Acc>::type;
  Key prefix = 0, mask = 0;
  int64_t remaining = k;
  for (int shift = int(8 * sizeof(Key)) - kRadixBits; shift >= 0; shift -= kRadixBits) {
    if (!(first_counted && mask == 0)) {
      team.clear();
      for (int64_t j = team.rank(); j < K; j += team.size()) {
        const Key key = OrderKey<Acc>::of(z_at(j));
        if ((key & mask) == prefix) team.count(int(key >> shift) & (kRadixBins - 1));
      }
    }
    team.sync();
    int d = kRadixBins - 1;  // every thread scans the same histogram to the same digit
    for (; d > 0; --d) {
      const int64_t c = int64_t(team.counts[d]);
      if (c >= remaining) break;
      remaining -= c;
    }
    prefix |= Key(d) << shift;
    mask |= Key(kRadixBins - 1) << shift;
  }
  return OrderKey<Acc>::value(prefix);
}

// The smallest z >= floor whose strictly larger entries (>= floor) hold
// less than top_p of the fixed-point mass of the entries >= floor. The
// first round's histogram holds every entry in play, so the target comes
// from its masses (no pass of its own). Invariant: the largest entry in
// play has `above` < target (the row's max has 0); top_p 0 keeps the max.
template <class Acc, class Team, class ZAt>
PGEST_HD Acc radix_top_p(Team& team, const ZAt& z_at, int64_t K, Acc max, int shift, Acc floor, double top_p) {
  using Key = typename OrderKey<Acc>::type;
  Key prefix = 0, mask = 0;
  uint64_t above = 0;
  double target = 0.0;
  for (int at = int(8 * sizeof(Key)) - kRadixBits; at >= 0; at -= kRadixBits) {
    team.clear();
    for (int64_t j = team.rank(); j < K; j += team.size()) {
      const Acc z = z_at(j);
      if (!(z >= floor) || z == -Acc(INFINITY)) continue;
      const Key key = OrderKey<Acc>::of(z);
      if ((key & mask) != prefix) continue;
      const int d = int(key >> at) & (kRadixBins - 1);
      team.count(d);
      team.add_mass(d, fixed_mass(z, max, shift));
    }
    team.sync();
    if (prefix == 0 && mask == 0) {  // the first round: every entry in play (each thread sums the same bins)
      uint64_t in_play = 0;
      for (int d = 0; d < kRadixBins; ++d) in_play += team.masses[d];
      target = top_p * double(in_play);
      if (!(target > 0.0)) return max;
    }
    // the lowest digit in play whose larger entries hold less than the target
    uint64_t run = above;
    int chosen = kRadixBins - 1;
    for (int d = kRadixBins - 1; d >= 0; --d) {
      if (team.counts[d] == 0) continue;
      if (!(double(run) < target)) break;
      chosen = d;
      above = run;
      run += team.masses[d];
    }
    prefix |= Key(chosen) << at;
    mask |= Key(kRadixBins - 1) << at;
  }
  return OrderKey<Acc>::value(prefix);
}

// Row i (K entries, element stride cs) under p by a team: the record p asks
// for (threshold, kept, kept mass, cut; not kept_logits), written by rank 0.
// kNonFiniteInput (bad_col: the first NaN or +inf z; with a finite logit,
// x / T overflowed) or kAllNegInf otherwise.
template <class T, class Acc, class Team>
PGEST_HD Status radix_truncate_row(Team& team, const T* x, int64_t K, int64_t cs, const TruncationParams& p, int64_t i,
                                   int64_t& bad_col) {
  const Acc inf = Acc(INFINITY);
  const double temperature = p.temperature[i * p.temperature_stride];
  const bool greedy = temperature == 0.0;
  const Acc t = greedy ? Acc(1) : Acc(temperature);
  auto z_at = [&](int64_t k) { return tempered(load<Acc>(x[k * cs]), t); };
  const int64_t none = INT64_MAX;
  const RowFilters rf = row_filters(p, i);
  // top-k's first histogram needs no max: taken in this pass
  const bool count_top = !greedy && !p.given_threshold && rf.top_k > 0;
  if (count_top) team.clear();
  Acc max = -inf;
  int64_t bad = none, finite = 0;
  for (int64_t k = team.rank(); k < K; k += team.size()) {
    const Acc z = z_at(k);
    if (!(z < inf)) {
      bad = bad < k ? bad : k;
    } else {
      max = z > max ? z : max;
      finite += z > -inf;
      if (count_top) team.count(top_digit(z));
    }
  }
  bad = team.min(bad);
  max = team.max(max);
  finite = team.sum(finite);
  if (bad != none) { bad_col = bad; return kNonFiniteInput; }
  if (max == -inf) return kAllNegInf;
  const bool lead = team.rank() == 0;
  if (greedy) {  // the first maximum alone, at probability 1
    if (lead) {
      if (p.threshold) static_cast<Acc*>(p.threshold)[i] = max;
      if (p.kept) p.kept[i] = 1;
      if (p.kept_mass) p.kept_mass[i] = 1.0;
      if (p.cut) static_cast<Acc*>(p.cut)[i] = max;
    }
    return kOk;
  }
  Acc cut = -inf;
  if (p.given_threshold) {  // the row's maximum is always kept
    const Acc g = static_cast<const Acc*>(p.given_threshold)[i];
    cut = max < g ? max : g;  // std::min's order, as the CPU takes it: a NaN keeps nothing (an error)
  } else {
    if (rf.top_k > 0 && rf.top_k < finite) cut = radix_kth<Acc>(team, z_at, K, rf.top_k, true);
    if (rf.top_p < 1.0) {  // of the top-k set's mass (transformers' order)
      const Acc tp = radix_top_p<Acc>(team, z_at, K, max, mass_shift(K), cut, rf.top_p);
      cut = tp > cut ? tp : cut;
    }
    if (rf.min_p > 0.0) {
      const Acc tm = Acc(double(max) + log(rf.min_p));
      cut = tm > cut ? tm : cut;
    }
  }
  // the record: one more pass
  int64_t kept = 0;
  Acc smallest = inf, dropped = -inf;
  double total = 0.0, kept_total = 0.0;
  for (int64_t k = team.rank(); k < K; k += team.size()) {
    const Acc z = z_at(k);
    if (z == -inf) continue;
    const double m = double(exp_nonpos(z - max));
    total += m;
    if (z >= cut) {
      ++kept;
      kept_total += m;
      smallest = z < smallest ? z : smallest;
    } else {
      dropped = z > dropped ? z : dropped;
    }
  }
  kept = team.sum(kept);
  smallest = team.min(smallest);
  dropped = team.max(dropped);
  total = team.sum(total);
  kept_total = team.sum(kept_total);
  if (kept == 0) return kAllNegInf;  // a NaN replayed threshold
  if (lead) {
    if (p.threshold) static_cast<Acc*>(p.threshold)[i] = smallest;
    if (p.kept) p.kept[i] = kept;
    if (p.kept_mass) p.kept_mass[i] = dropped == -inf ? 1.0 : kept_total / total;
    if (p.cut) static_cast<Acc*>(p.cut)[i] = replay_cut(smallest, dropped);
  }
  return kOk;
}

PGEST_NS_END
