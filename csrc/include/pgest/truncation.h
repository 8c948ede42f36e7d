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
// top_k <= 0, top_p >= 1, min_p <= 0.
struct TruncationArgs {
  const void* logits = nullptr;
  int32_t dtype = 0;
  int64_t rows = 0, cols = 0, row_stride = 0, col_stride = 1;
  const double* temperature = nullptr;
  int64_t temperature_stride = 0;
  const int64_t* top_k = nullptr;
  int64_t top_k_stride = 0;
  const double* top_p = nullptr;
  int64_t top_p_stride = 0;
  const double* min_p = nullptr;
  int64_t min_p_stride = 0;
  void* threshold = nullptr;  // (R,) accumulation type: the smallest kept z (greedy: the max logit)
  int64_t* kept = nullptr;    // (R,) entries kept
  double* kept_mass = nullptr;  // (R,) mass of the kept set under softmax(z) (greedy: 1)
  int64_t* argmax = nullptr;  // (R,) first maximum of the row (what greedy draws)
  int32_t num_threads = 1;
};

namespace cpu {
Status truncation(const TruncationArgs& args, ErrorInfo* err);
}  // namespace cpu

}  // namespace pgest

PGEST_NS_BEGIN

template <class Acc>
struct RowTruncation {
  Acc threshold;
  int64_t kept;
  double kept_mass;
  int64_t argmax;
};

// The tempered value every op uses: one correctly rounded division in Acc.
template <class Acc>
PGEST_HD Acc tempered(Acc x, Acc temperature) { return x / temperature; }

namespace detail {

// The smallest value v of z[0, n) whose strictly larger entries hold less
// than `target` of the mass exp(z - max) (target > 0). Quickselect by mass:
// each step partitions around a pivot into (> pivot, == pivot, < pivot) and
// keeps the side that holds the boundary, so the expected work is O(n).
// `above` is the mass of the entries known to be larger than every entry of
// the range. The pivot is the median of three fixed positions, so the result
// depends on the row alone; a range that will not shrink (a pivot sequence
// built to defeat the median of three) is finished by a sort of what is left.
template <class Acc>
inline double mass_of(Acc v, Acc max) { return std::exp(double(v) - double(max)); }

template <class Acc>
inline Acc select_by_mass(Acc* z, int64_t n, Acc max, double target) {
  double above = 0.0;
  int64_t lo = 0, hi = n;
  Acc best = max;
  for (int steps = 0; hi > lo; ++steps) {
    if (steps == 64) {
      std::sort(z + lo, z + hi, [](Acc l, Acc r) { return l > r; });
      for (int64_t j = lo; j < hi;) {
        int64_t e = j;
        double equal = 0.0;
        for (; e < hi && z[e] == z[j]; ++e) equal += mass_of(z[e], max);
        if (!(above < target)) break;
        best = z[j];
        above += equal;
        j = e;
      }
      break;
    }
    const Acc a = z[lo], b = z[lo + (hi - lo) / 2], c = z[hi - 1];
    const Acc pivot = std::max(std::min(a, b), std::min(std::max(a, b), c));
    Acc* first = z + lo;
    Acc* mid = std::partition(first, z + hi, [&](Acc v) { return v > pivot; });
    Acc* last = std::partition(mid, z + hi, [&](Acc v) { return v == pivot; });
    double larger = 0.0, equal = 0.0;
    for (Acc* p = first; p < mid; ++p) larger += mass_of(*p, max);
    for (Acc* p = mid; p < last; ++p) equal += mass_of(*p, max);
    if (above + larger < target) {
      best = pivot;  // the pivot is kept; entries below it may be too
      above += larger + equal;
      if (!(above < target)) break;
      lo = int64_t(last - z);
    } else {
      hi = int64_t(mid - z);  // the boundary lies among the larger entries (not empty: they hold mass)
    }
  }
  return best;
}

}  // namespace detail

// The threshold of one row: z[0, n) holds the row's finite tempered values
// (any order; they are permuted), max the largest of them.
template <class Acc>
inline Acc row_threshold(Acc* z, int64_t n, Acc max, int64_t top_k, double top_p, double min_p) {
  Acc t = -Acc(INFINITY);
  int64_t live = n;
  if (top_k > 0 && top_k < n) {
    std::nth_element(z, z + (top_k - 1), z + n, [](Acc l, Acc r) { return l > r; });
    t = z[top_k - 1];
    live = int64_t(std::partition(z, z + n, [&](Acc v) { return v >= t; }) - z);
  }
  if (top_p < 1.0) {
    double mass = 0.0;
    for (int64_t j = 0; j < live; ++j) mass += detail::mass_of(z[j], max);
    const double target = top_p * mass;
    t = std::max(t, target > 0.0 ? detail::select_by_mass(z, live, max, target) : max);
  }
  if (min_p > 0.0) t = std::max(t, Acc(double(max) + std::log(min_p)));
  return t;
}

PGEST_NS_END
