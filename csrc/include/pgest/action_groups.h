// The samples of one row grouped by the action they drew. A gradient row gets
// one store per distinct action, its samples' terms summed in the accumulation
// type (in sample order) before the single rounding to the gradient's dtype.
//
// Finding each action's first occurrence by a pairwise scan is O(S^2): one
// row with S = 64k samples took seconds. Above kPairwiseSamples the sample
// indices are sorted by (action, index) instead, O(S log S) with S int64 of
// scratch; both routes visit the same groups in the same sample order, so
// they give the same bits.
#pragma once

#include "common.h"

PGEST_NS_BEGIN

constexpr int64_t kPairwiseSamples = 16;

PGEST_HD bool drawn_before(const int64_t* act, int64_t l, int64_t r) {
  return act[l] < act[r] || (act[l] == act[r] && l < r);
}

// Heapsort of order[0..n) = 0..n-1 by (act, index): in place, without
// recursion or allocation, so it also runs in one GPU thread.
PGEST_HD void order_by_action(const int64_t* act, int64_t n, int64_t* order) {
  for (int64_t s = 0; s < n; ++s) order[s] = s;
  auto sift = [&](int64_t root, int64_t end) {
    while (2 * root + 1 < end) {
      int64_t child = 2 * root + 1;
      if (child + 1 < end && drawn_before(act, order[child], order[child + 1])) ++child;
      if (!drawn_before(act, order[root], order[child])) return;
      const int64_t t = order[root]; order[root] = order[child]; order[child] = t;
      root = child;
    }
  };
  for (int64_t s = n / 2 - 1; s >= 0; --s) sift(s, n);
  for (int64_t end = n - 1; end > 0; --end) {
    const int64_t t = order[0]; order[0] = order[end]; order[end] = t;
    sift(0, end);
  }
}

// visit(action, idx, m) for every distinct action of act[0..S) that skip()
// rejects not: idx[0..m) are the samples that drew it, ascending. `order` is
// scratch of S entries, needed only when S > kPairwiseSamples.
template <class Skip, class Visit>
PGEST_HD void for_each_action(const int64_t* act, int64_t S, int64_t* order, const Skip& skip, const Visit& visit) {
  if (S <= kPairwiseSamples) {
    int64_t idx[kPairwiseSamples];
    for (int64_t s = 0; s < S; ++s) {
      if (skip(act[s])) continue;
      bool seen = false;
      for (int64_t p = 0; p < s && !seen; ++p) seen = act[p] == act[s];
      if (seen) continue;
      int64_t m = 0;
      for (int64_t q = s; q < S; ++q)
        if (act[q] == act[s]) idx[m++] = q;
      visit(act[s], static_cast<const int64_t*>(idx), m);
    }
    return;
  }
  order_by_action(act, S, order);
  for (int64_t j = 0; j < S;) {
    int64_t e = j + 1;
    while (e < S && act[order[e]] == act[order[j]]) ++e;
    if (!skip(act[order[j]])) visit(act[order[j]], static_cast<const int64_t*>(order + j), e - j);
    j = e;
  }
}

PGEST_NS_END
