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
}  // namespace cpu

}  // namespace pgest

PGEST_NS_BEGIN

// The tempered value every op uses: one correctly rounded division in Acc.
template <class Acc>
PGEST_HD Acc tempered(Acc x, Acc temperature) { return x / temperature; }

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

PGEST_NS_END
