// The kept set of one row on the CPU (definitions in truncation.h), and the
// row's statistics over it for the sampler. The row is read from memory
// once, by the whole row's chunk pass (its max and mass); the passes after
// it find the row in L2. The row is never rewritten masked: the kept set is
// a cut, read through KeptView, which forms -inf outside the set on load.
// No pass sorts the row. Top-k on a long row gathers the entries above a
// bound a strided sample sets (a few times k of them) and selects the k-th
// among those; elsewhere it keeps the entries above a running bound in a
// buffer it cuts to the k largest as it fills. Top-p selects among the
// entries that can be kept at all (a bound from a sample of the row, checked,
// or from the row's total mass), narrowing large candidate sets by vector
// passes over them first. The kept set's statistics must be the chunk pass
// over the masked row bit for bit (the trainer takes them so from the kept
// logits); a small set's are summed from its list of entries, a wide set's
// from the exponentials the whole row's pass stored, so neither repeats the
// row's exponentials.
#pragma once

#include <pgest/sampler.h>
#include <pgest/truncation.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <utility>

#include "row_scratch.h"
#include "vec.h"

PGEST_NS_BEGIN

template <class Acc>
struct TruncationScratch {
  Acc* z = nullptr;     // a row formed before the passes: tempered, gathered from a stride, or greedy's
  Acc* cz = nullptr;    // top-p's candidates: their z
  Acc* ce = nullptr;    // and their mass exp(z - max)
  Entry<Acc>* work = nullptr;  // the selections' working set
  int32_t* pos = nullptr;      // the candidates' columns (rows of < 2^31 entries)
  // the whole row's pass: its exponentials, chunk weights and running maxima
  Acc* e = nullptr;
  Acc* weights = nullptr;
  Acc* chunk_max = nullptr;
  bool ok = false;
  // cols = 0: nothing allocated (the sample kernel's untruncated calls).
  explicit TruncationScratch(int64_t cols) {
    if (cols <= 0) { ok = true; return; }
    const size_t n = size_t(cols), nc = size_t(num_chunks(cols));
    z = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    cz = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    ce = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    work = static_cast<Entry<Acc>*>(std::malloc(sizeof(Entry<Acc>) * n));
    if (cols < (int64_t(1) << 31)) pos = static_cast<int32_t*>(std::malloc(sizeof(int32_t) * n));
    e = static_cast<Acc*>(std::malloc(sizeof(Acc) * nc * kChunk));
    weights = static_cast<Acc*>(std::malloc(sizeof(Acc) * 2 * nc));
    chunk_max = static_cast<Acc*>(std::malloc(sizeof(Acc) * nc));
    ok = z && cz && ce && work && (pos || cols >= (int64_t(1) << 31)) && e && weights && chunk_max;
  }
  ~TruncationScratch() {
    std::free(z); std::free(cz); std::free(ce); std::free(work); std::free(pos);
    std::free(e); std::free(weights); std::free(chunk_max);
  }
  TruncationScratch(const TruncationScratch&) = delete;
  TruncationScratch& operator=(const TruncationScratch&) = delete;
};

// A row's entries at or above `cut`, -inf elsewhere, formed on load: the
// values the record's kept_logits hold, so a pass over the view gives the
// bits of the same pass over the masked row. kTempered: the row is read as
// z = x / t, by the one division every op forms z by (the trainer's
// backward reads it so, and the kept logits are never stored).
template <class T, class Acc, bool kTempered = false>
struct KeptView {
  const T* x;
  Acc cut;
  Acc t = Acc(1);  // kTempered only
  KeptView operator+(int64_t k) const { return KeptView{x + k, cut, t}; }
  Acc operator[](int64_t k) const {
    Acc v = load<Acc>(x[k]);
    if constexpr (kTempered) v = tempered(v, t);
    return v >= cut ? v : -Acc(INFINITY);
  }
};

template <class T, class Acc, bool kTempered>
inline typename Vec<Acc>::type loadv(KeptView<T, Acc, kTempered> r) {
  using V = typename Vec<Acc>::type;
  V v = loadv(r.x);
  if constexpr (kTempered) v = v / splat<V>(r.t);
  return select(v >= splat<V>(r.cut), v, splat<V>(-Acc(INFINITY)));
}

// The kept set's pass (row_stats over a KeptView) without the exponentials
// the whole row's pass (row_stats with kStore) already took: where both
// passes enter a chunk at the same running max and the chunk raises it
// only with a kept entry, every kept entry's exp(x - ref) is the one
// stored, and a left-out entry adds exactly +0 (its e is 0) to its lane, so
// the chunk's sums are the stored e's masked, in the chunk pass's order.
// Elsewhere (where the largest entries seen so far were left out) the chunk
// pass runs.
template <class Row, class Acc>
struct StoredChunks {
  Row x;                   // the row the view masks
  Acc cut;                 // the view's: kept where x >= cut
  const Acc* e;            // the whole row's pass: its stored exponentials
  const Acc* chunk_max;    // and running maxima
  bool operator()(int64_t c, Acc running_max, ChunkStats<Acc>& st) const {
    using V = typename Vec<Acc>::type;
    constexpr int W = Vec<Acc>::width, Q = kLanes / W;
    const Acc kInf = Acc(INFINITY);
    const Acc before = c ? chunk_max[c - 1] : -kInf, after = chunk_max[c];
    if (!(running_max == before) || (after > before && after < cut)) return false;
    // a raised max is a kept entry's (the same bits); else the view's lanes keep the running max's
    st = ChunkStats<Acc>{after > before ? after : running_max, Acc(0), Acc(0), false};
    if (st.max == -kInf) return true;  // all -inf so far: nothing stored, nothing to sum
    const Acc ref = sums_at_running_max(running_max, st.max) ? running_max : st.max;
    const int64_t k = c * kChunk;
    // -inf entries are never "kept" here: the chunk pass adds 0 for them
    // too, and their 0 * -inf would be NaN. A kept entry whose e underflowed
    // adds 0 * d = -0, which changes no sum.
    const V vr = splat<V>(ref), vc = splat<V>(std::max(cut, std::nextafter(-kInf, kInf)));
    V acc[Q], dot[Q];
    for (int q = 0; q < Q; ++q) { acc[q] = V{}; dot[q] = V{}; }
    for (int j = 0; j < kChunk; j += kLanes)
      for (int q = 0; q < Q; ++q) {
        const V v = loadv(x + k + j + q * W), ev = loadv(e + k + j + q * W);
        const auto keep = v >= vc;
        acc[q] += select(keep, ev, V{});
        dot[q] += select(keep, ev * (v - vr), V{});
      }
    st.sum = lanes_tree_sum<Acc>(acc);
    st.ex_dot = lanes_tree_sum<Acc>(dot);
    if (ref != st.max) rebase_chunk<true>(st, ref);
    return true;
  }
};

// What truncate_row leaves for the sampler: the kept set as a cut on the row
// it read (the input itself, or the row formed in scratch), and the kept
// set's statistics, whose chunk weights are in the RowScratch it was given.
template <class T, class Acc>
struct KeptRow {
  const T* x = nullptr;
  const Acc* z = nullptr;  // set: the row was formed, read it instead of x
  Acc cut = -Acc(INFINITY);
  RowStats<Acc> stats{};
};

namespace trunc_detail {

constexpr int kSample = 256;           // entries in top-p's strided sample of its candidates
constexpr int64_t kLargeCandidates = 16384;  // candidate sets this large take the whole sample, smaller half
constexpr int64_t kDirect = 1024;      // top-p candidates few enough to select among at once
constexpr double kNearOne = 1e-4;      // top-p this close to 1 takes every finite entry as a candidate
constexpr int64_t kRankBuffer = 2048;  // top-k's buffer of candidates, at least
constexpr int64_t kSmallSelect = 64;   // values few enough for a selection by partition
constexpr double kFirstProbes[4] = {1.3, 1.08, 0.92, 0.75};  // top-p's first probes: below-mass estimate scaled
constexpr int kBoundSample = 512;      // entries in top-p's sample of the row for its candidate bound
constexpr double kBoundSlack = 1e-5;   // the mass the sampled bound's candidates hold beyond p, at least
constexpr int64_t kListedKept = 16;    // kept sets under 1 / kListedKept of the row are summed from a list

template <class V, class Acc>
inline Acc lane_max(V v) {
  Acc m = v[0];
  for (int l = 1; l < Vec<Acc>::width; ++l) m = std::max(m, Acc(v[l]));
  return m;
}

template <class V, class Acc>
inline Acc lane_min(V v) {
  Acc m = v[0];
  for (int l = 1; l < Vec<Acc>::width; ++l) m = std::min(m, Acc(v[l]));
  return m;
}

// Whether any lane of a comparison's mask is set, in one test instruction (a
// lane-by-lane test compiles to one extraction per lane).
template <class M>
inline bool any_lane(M m) {
#if defined(__AVX512F__)
  static_assert(sizeof(M) == 64, "one AVX-512 register");
  const __m512i v = reinterpret_cast<__m512i>(m);
  return _mm512_test_epi64_mask(v, v) != 0;
#elif defined(__AVX2__)
  static_assert(sizeof(M) == 32, "one AVX2 register");
  const __m256i v = reinterpret_cast<__m256i>(m);
  return !_mm256_testz_si256(v, v);
#elif defined(__SSE2__)
  return _mm_movemask_epi8(reinterpret_cast<__m128i>(m)) != 0;
#else
  uint64_t w[sizeof(M) / 8];
  std::memcpy(w, &m, sizeof(M));
  uint64_t r = 0;
  for (size_t j = 0; j < sizeof(M) / 8; ++j) r |= w[j];
  return r != 0;
#endif
}

template <class V>
inline double lane_sum(V v, int width) {
  double s = 0.0;
  for (int l = 0; l < width; ++l) s += double(v[l]);
  return s;
}

// Sums of e over z > bound for up to kBounds bounds in one vector pass:
// lanes per block of kBlock entries, blocks added in double.
constexpr int kBounds = 4;
constexpr int kBlock = 2048;

template <class Acc>
inline void mass_above(const Acc* z, const Acc* e, int64_t K, const Acc* bounds, int nb, double* out) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  V vb[kBounds];
  for (int b = 0; b < kBounds; ++b) vb[b] = splat<V>(bounds[b < nb ? b : nb - 1]);
  for (int b = 0; b < nb; ++b) out[b] = 0.0;
  const V zero{};
  int64_t k = 0;
  while (k + W <= K) {
    V s[kBounds] = {};
    for (const int64_t end = std::min(K - W + 1, k + kBlock); k < end; k += W) {
      const V zv = loadv(z + k), ev = loadv(e + k);
      for (int b = 0; b < kBounds; ++b) s[b] += select(zv > vb[b], ev, zero);
    }
    for (int b = 0; b < nb; ++b) out[b] += lane_sum(s[b], W);
  }
  for (; k < K; ++k)
    for (int b = 0; b < nb; ++b)
      if (z[k] > bounds[b]) out[b] += double(e[k]);
}

// The entries with z in (lo, hi] into out (how many: the return value), and
// the smallest z above hi. A vector of W entries with none in range costs one
// comparison: the ranges asked for are narrow.
template <class Acc>
inline int64_t gather_between(const Acc* z, const Acc* e, int64_t K, Acc lo, Acc hi, Entry<Acc>* out,
                              Acc* min_above_hi = nullptr) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const V vlo = splat<V>(lo), vhi = splat<V>(hi);
  V vmin = splat<V>(Acc(INFINITY));
  int64_t n = 0, k = 0;
  for (; k + W <= K; k += W) {
    const V zv = loadv(z + k);
    const auto in = (zv > vlo) & (zv <= vhi);
    vmin = select(zv > vhi, select(zv < vmin, zv, vmin), vmin);
    if (!any_lane(in)) continue;
    for (int l = 0; l < W; ++l) {
      out[n] = Entry<Acc>{z[k + l], e[k + l]};
      n += in[l] != 0;
    }
  }
  Acc m = lane_min<V, Acc>(vmin);
  for (; k < K; ++k) {
    out[n] = Entry<Acc>{z[k], e[k]};
    n += (z[k] > lo) & (z[k] <= hi);
    if (z[k] > hi) m = std::min(m, z[k]);
  }
  if (min_above_hi) *min_above_hi = m;
  return n;
}

// The values of a row at or above v into out (how many: the return value).
// With AVX-512 a vector's hits go out compressed in one whole-vector store,
// which ends before the entry being read, so K values of room suffice.
template <class Row, class Acc>
inline int64_t gather_at_least(Row z, int64_t K, Acc v, Acc* out) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const V vv = splat<V>(v);
  int64_t n = 0, k = 0;
  for (; k + W <= K; k += W) {
    const V zv = loadv(z + k);
#if defined(__AVX512F__)
    if constexpr (sizeof(Acc) == 4) {
      const __mmask16 m = _mm512_cmp_ps_mask(reinterpret_cast<__m512>(zv), reinterpret_cast<__m512>(vv), _CMP_GE_OQ);
      // compressed in a register, stored whole (a compressing store to
      // memory is microcoded on Zen 4), with or without hits: a branch on
      // them mispredicts at the hit rates the selections run at
      _mm512_storeu_ps(out + n, _mm512_maskz_compress_ps(m, reinterpret_cast<__m512>(zv)));
      n += __builtin_popcount(m);
      continue;
    } else {
      const __mmask8 m = _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(zv), reinterpret_cast<__m512d>(vv), _CMP_GE_OQ);
      _mm512_storeu_pd(out + n, _mm512_maskz_compress_pd(m, reinterpret_cast<__m512d>(zv)));
      n += __builtin_popcount(m);
      continue;
    }
#else
    if (!any_lane(zv >= vv)) continue;
    for (int l = 0; l < W; ++l) {
      out[n] = zv[l];
      n += zv[l] >= v;
    }
#endif
  }
  for (; k < K; ++k) {
    out[n] = load<Acc>(z[k]);
    n += out[n] >= v;
  }
  return n;
}

// n finite (value, mass) pairs sorted by value, descending, in a few
// passes that do not branch on the values (a comparison sort mispredicts on
// every other comparison: 25k cycles for top-p's 257 pairs): least
// significant digit first over the order keys, a byte at a time; equal
// values keep their order.
template <class Acc>
inline void sort_descending(std::pair<Acc, Acc>* s, int n) {
  using Key = typename OrderKey<Acc>::type;
  constexpr int kMax = 1024;
  Key key[2][kMax];
  uint16_t at[2][kMax];
  for (int j = 0; j < n; ++j) {
    key[0][j] = Key(~OrderKey<Acc>::of(s[j].first));
    at[0][j] = uint16_t(j);
  }
  int cur = 0;
  for (int shift = 0; shift < int(8 * sizeof(Key)); shift += 8) {
    int count[257] = {};
    for (int j = 0; j < n; ++j) ++count[((key[cur][j] >> shift) & 0xff) + 1];
    if (count[((key[cur][0] >> shift) & 0xff) + 1] == n) continue;  // one digit throughout: nothing moves
    for (int d = 0; d < 256; ++d) count[d + 1] += count[d];
    for (int j = 0; j < n; ++j) {
      const int to = count[(key[cur][j] >> shift) & 0xff]++;
      key[1 - cur][to] = key[cur][j];
      at[1 - cur][to] = at[cur][j];
    }
    cur = 1 - cur;
  }
  std::pair<Acc, Acc> sorted[kMax];
  for (int j = 0; j < n; ++j) sorted[j] = s[at[cur][j]];
  std::copy(sorted, sorted + n, s);
}

// How many of v[0, n) are >= t.
template <class Acc>
inline int64_t count_at_least(const Acc* v, int64_t n, Acc t) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const V vt = splat<V>(t), one = splat<V>(Acc(1)), zero{};
  V c[4] = {};  // four chains of additions, not one
  int64_t j = 0;
  for (; j + 4 * W <= n; j += 4 * W)
    for (int q = 0; q < 4; ++q) c[q] += select(loadv(v + j + q * W) >= vt, one, zero);
  for (; j + W <= n; j += W) c[0] += select(loadv(v + j) >= vt, one, zero);
  // exact: a lane counts at most n / W (< 2^24) entries
  int64_t r = int64_t(lane_sum(c[0], W) + lane_sum(c[1], W) + lane_sum(c[2], W) + lane_sum(c[3], W));
  for (; j < n; ++j) r += v[j] >= t;
  return r;
}

// The k-th largest of n finite values (0 < k <= n; v has room for 2n): the
// largest value with at least k values at or above it, by bisection over
// the order keys, each step one vector count (branch-free per value, where a
// selection by partition mispredicts on every other value), until few
// enough values lie between the bounds to select among them.
template <class Acc>
inline Acc kth_of(Acc* v, int64_t n, int64_t k) {
  using Key = OrderKey<Acc>;
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  V vlo = splat<V>(v[0]), vhi = vlo;
  int64_t j = 0;
  for (; j + W <= n; j += W) {
    const V x = loadv(v + j);
    vlo = select(x < vlo, x, vlo);
    vhi = select(x > vhi, x, vhi);
  }
  Acc lo_v = lane_min<V, Acc>(vlo), hi_v = lane_max<V, Acc>(vhi);
  for (; j < n; ++j) {
    lo_v = std::min(lo_v, v[j]);
    hi_v = std::max(hi_v, v[j]);
  }
  typename Key::type lo = Key::of(lo_v), hi = Key::of(hi_v);
  int64_t at_lo = n, above = 0;  // count(>= value(lo)) >= k > count(>= value(hi + 1)) = above
  while (lo < hi && at_lo - above > kSmallSelect) {
    const auto mid = lo + (hi - lo + 1) / 2;
    const int64_t c = count_at_least(v, n, Key::value(mid));
    if (c >= k) { lo = mid; at_lo = c; }
    else { hi = mid - 1; above = c; }
  }
  if (lo == hi) return Key::value(lo);
  // few values left between the bounds: the (k - above)-th largest of them
  Acc* in = v + n;
  int64_t m = 0;
  const Acc a = Key::value(lo), b = Key::value(hi);
  for (int64_t j = 0; j < n; ++j) {
    in[m] = v[j];
    m += v[j] >= a && v[j] <= b;
  }
  if (k - above > m) {  // -0 and +0 on the two sides of a bound: select among all
    std::nth_element(v, v + (k - 1), v + n, [](Acc l, Acc r) { return l > r; });
    return v[k - 1];
  }
  std::nth_element(in, in + (k - above - 1), in + m, [](Acc l, Acc r) { return l > r; });
  return in[k - above - 1];
}

// The k-th largest finite entry of a row (k > 0), or -inf when the row has
// at most k (all kept), in one pass: entries above a running bound are
// compressed into a buffer of `cap` values; a full buffer is cut to its k
// largest and the bound raised to the smallest of them, so the pass costs a
// comparison per vector once the bound nears the answer, and any order of
// the row at most 4/3 selections of its length.
template <class Row, class Acc>
inline Acc kth_largest(Row z, int64_t K, int64_t k, Acc* work) {
  constexpr int W = Vec<Acc>::width;
  const Acc inf = Acc(INFINITY);
  const int64_t cap = std::min(K, std::max<int64_t>(4 * k, kRankBuffer));
  Acc bound = std::nextafter(-inf, inf);
  int64_t n = 0;
  // the buffer's k largest: those above its k-th, then copies of the k-th
  auto cut_to_k = [&]() {
    const Acc t = kth_of(work, n, k);
    bound = std::nextafter(t, inf);  // an entry equal to the k-th leaves it the k-th
    n = gather_at_least(static_cast<const Acc*>(work), n, bound, work);
    std::fill(work + n, work + k, t);
    n = k;
  };
  if (cap < k + 2 * W) {  // short rows: every finite entry
    n = gather_at_least(z, K, bound, work);
  } else {
    int64_t j = 0;
    while (j + W <= K) {
      if (n + W > cap) cut_to_k();
      // vectors while the buffer has room for every entry of them
      const int64_t span = std::min((K - j) / W, (cap - n) / W) * W;
      n += gather_at_least(z + j, span, bound, work + n);
      j += span;
    }
    for (; j < K; ++j) {
      if (n == cap) cut_to_k();
      const Acc v = load<Acc>(z[j]);
      if (v >= bound) work[n++] = v;
    }
  }
  return n < k ? -inf : kth_of(work, n, k);
}

// e = exp(z - max) over n values, their sum in double: the candidates'
// masses, taken after they are gathered, so no exponential is spent on an
// entry that cannot be kept.
template <class Acc>
inline double masses(const Acc* z, int64_t n, Acc max, Acc* e) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const V vm = splat<V>(max);
  double total = 0.0;
  int64_t k = 0;
  while (k + W <= n) {
    V s{};
    for (const int64_t end = std::min(n - W + 1, k + kBlock); k < end; k += W) {
      const V ev = exp_nonpos(loadv(z + k) - vm);
      storev(e + k, ev);
      s += ev;
    }
    total += lane_sum(s, W);
  }
  for (; k < n; ++k) {
    e[k] = exp_nonpos(z[k] - max);
    total += double(e[k]);
  }
  return total;
}

// The kept set's record in one pass without exponentials: how many entries
// are kept, the smallest kept and the largest left out (-inf: none finite).
template <class Row, class Acc>
inline void kept_record(Row z, int64_t K, Acc cut, int64_t* kept, Acc* smallest, Acc* dropped) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const Acc inf = Acc(INFINITY);
  const V vc = splat<V>(cut), ninf = splat<V>(-inf), one = splat<V>(Acc(1)), zero{};
  V vmin = splat<V>(inf), vdrop = ninf, vkept{};
  int64_t k = 0, count = 0;
  while (k + W <= K) {  // counts in float lanes are exact per block of kBlock entries
    for (const int64_t end = std::min(K - W + 1, k + kBlock); k < end; k += W) {
      const V zv = loadv(z + k);
      const auto keep = (zv >= vc) & (zv > ninf);
      vmin = select(keep & (zv < vmin), zv, vmin);
      vdrop = select(keep, vdrop, select(zv > vdrop, zv, vdrop));
      vkept += select(keep, one, zero);
    }
    count += int64_t(lane_sum(vkept, W));
    vkept = zero;
  }
  Acc lo = lane_min<V, Acc>(vmin), hi = lane_max<V, Acc>(vdrop);
  for (; k < K; ++k) {
    const Acc v = load<Acc>(z[k]);
    if (v >= cut && v > -inf) {
      ++count;
      lo = std::min(lo, v);
    } else {
      hi = std::max(hi, v);
    }
  }
  *kept = count;
  *smallest = lo;
  *dropped = hi;
}

// The kept entries in column order, for statistics taken from them alone
// (kept_row_stats): the entries of z at or above cut (and finite) into
// out_z, their columns into out_pos (pos[j] for entry j where pos is given,
// else j) and, where e is given, e[j] into out_e; how many (the return
// value), the smallest kept and the largest left out (-inf: none finite).
// out may be z itself (a compaction in place: each vector is read whole
// before its kept entries are stored, at or before where it was read).
// kSparse: few entries are kept, so a vector without one skips the stores
// (the running count they wait on is the pass's critical path).
template <bool kSparse, class Row, class Acc>
inline int64_t kept_entries(Row z, int64_t K, Acc cut, const Acc* e, const int32_t* pos, Acc* out_z, Acc* out_e,
                            int32_t* out_pos, Acc* smallest, Acc* dropped) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const Acc inf = Acc(INFINITY);
  const V vc = splat<V>(std::max(cut, std::nextafter(-inf, inf))), ninf = splat<V>(-inf);
  V vmin = splat<V>(inf), vdrop = ninf;
  int64_t n = 0, k = 0;
  for (; k + W <= K; k += W) {
    const V zv = loadv(z + k);
#if defined(__AVX512F__)
    if constexpr (sizeof(Acc) == 4) {
      // The mask once, and the running min and max by masked vminps / vmaxps
      // (a < b ? a : b and a > b ? a : b: the selects below, lane for lane), so that a dense pass (gather_kept) is the mask, two
      // compressions and their stores per vector.
      const __m512 zf = reinterpret_cast<__m512>(zv);
      const __mmask16 m = _mm512_cmp_ps_mask(zf, reinterpret_cast<__m512>(vc), _CMP_GE_OQ);
      vmin = reinterpret_cast<V>(_mm512_mask_min_ps(reinterpret_cast<__m512>(vmin), m, zf, reinterpret_cast<__m512>(vmin)));
      vdrop = reinterpret_cast<V>(
          _mm512_mask_max_ps(reinterpret_cast<__m512>(vdrop), _knot_mask16(m), zf, reinterpret_cast<__m512>(vdrop)));
      if (kSparse && !m) continue;
      const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
      const __m512i at = pos ? _mm512_loadu_si512(pos + k) : _mm512_add_epi32(_mm512_set1_epi32(int32_t(k)), iota);
      const __m512 ev = e ? _mm512_loadu_ps(e + k) : _mm512_setzero_ps();
      _mm512_storeu_ps(out_z + n, _mm512_maskz_compress_ps(m, zf));
      _mm512_storeu_si512(out_pos + n, _mm512_maskz_compress_epi32(m, at));
      if (e) _mm512_storeu_ps(out_e + n, _mm512_maskz_compress_ps(m, ev));
      n += __builtin_popcount(m);
      continue;
    }
#endif
    const auto keep = zv >= vc;
    vmin = select(keep & (zv < vmin), zv, vmin);
    vdrop = select(keep, vdrop, select(zv > vdrop, zv, vdrop));
#if defined(__AVX512F__)
    if constexpr (sizeof(Acc) == 8) {
      const __mmask8 m = _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(zv), reinterpret_cast<__m512d>(vc), _CMP_GE_OQ);
      if (kSparse && !m) continue;
      const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i at = pos ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pos + k))
                             : _mm256_add_epi32(_mm256_set1_epi32(int32_t(k)), iota);
      const __m512d ev = e ? _mm512_loadu_pd(e + k) : _mm512_setzero_pd();
      _mm512_storeu_pd(out_z + n, _mm512_maskz_compress_pd(m, reinterpret_cast<__m512d>(zv)));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out_pos + n), _mm256_maskz_compress_epi32(m, at));
      if (e) _mm512_storeu_pd(out_e + n, _mm512_maskz_compress_pd(m, ev));
      n += __builtin_popcount(m);
      continue;
    }
#else
    if (!any_lane(keep)) continue;
    for (int l = 0; l < W; ++l) {
      const int64_t j = k + l;
      const bool in = zv[l] >= vc[l];
      out_pos[n] = pos ? pos[j] : int32_t(j);
      if (e) out_e[n] = e[j];
      out_z[n] = zv[l];
      n += in;
    }
#endif
  }
  Acc lo = lane_min<V, Acc>(vmin), hi = lane_max<V, Acc>(vdrop);
  for (; k < K; ++k) {
    const Acc v = load<Acc>(z[k]);
    const int32_t at = pos ? pos[k] : int32_t(k);
    const Acc ek = e ? e[k] : Acc(0);
    if (v >= cut && v > -inf) {
      out_z[n] = v;
      out_pos[n] = at;
      if (e) out_e[n] = ek;
      ++n;
      lo = std::min(lo, v);
    } else {
      hi = std::max(hi, v);
    }
  }
  *smallest = lo;
  *dropped = hi;
  return n;
}

// kept_entries of a whole row into out_z / out_pos, sparse where under this
// fraction of it is expected kept. Above it the branch per vector
// mispredicts more than the stores it saves (AVX-512, 32000 entries: 1.9
// against 2.9 ns per 16 entries at 0.3% kept, 4.9 against 3.2 at 2%;
// bench/results/cpu-kept-entries-2026-12-07.txt).
constexpr double kSparseKept = 0.01;

template <class Row, class Acc>
inline int64_t gather_kept(double expected, Row z, int64_t K, Acc cut, Acc* out_z, int32_t* out_pos) {
  Acc smallest, dropped;
  const Acc* none = nullptr;
  return expected < kSparseKept
             ? kept_entries<true>(z, K, cut, none, nullptr, out_z, static_cast<Acc*>(nullptr), out_pos, &smallest,
                                  &dropped)
             : kept_entries<false>(z, K, cut, none, nullptr, out_z, static_cast<Acc*>(nullptr), out_pos, &smallest,
                                   &dropped);
}

// row_stats<true> of a row masked to its kept set (-inf elsewhere), bit for
// bit, from the n kept entries alone (kept_entries: z in column order at
// columns pos, e = exp_nonpos(z - max), max the row's and so the kept set's
// max), so a kept set of a tenth of the row costs about a tenth of the
// exponentials. In the full pass a masked entry adds exactly +0 to its lane
// and never raises a lane's max, so each lane's sum is the sum of its kept
// entries in column order, and each chunk's reference (sums_at_running_max)
// and rebase are the full pass's. Chunks after the row's max sum at it,
// where e is the full pass's exponential; the others take theirs again.
// `scratch` holds kChunk values.
template <class Acc>
inline RowStats<Acc> kept_row_stats(const Acc* z, const Acc* e, const int32_t* pos, int64_t n, int64_t cols, Acc max,
                                    Acc* weights, Acc* chunk_max, Acc* scratch) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const Acc kInf = Acc(INFINITY);
  const int64_t nc = num_chunks(cols);
  RowStats<Acc> r{-kInf, 0.0, 0.0, -1};
  int64_t j = 0;
  for (int64_t c = 0; c < nc; ++c) {
    const int64_t b = j, end = (c + 1) * kChunk;
    while (j < n && pos[j] < end) ++j;
    ChunkStats<Acc> st{r.max, Acc(0), Acc(0), false};
    if (j > b) {
      if (r.max != max) {  // the row's max not yet behind: the lanes' maxima, met in the full pass's order
        Acc lane_max[kLanes];
        for (int l = 0; l < kLanes; ++l) lane_max[l] = r.max;
        for (int64_t q = b; q < j; ++q) {
          Acc& m = lane_max[uint32_t(pos[q]) % kLanes];
          m = z[q] > m ? z[q] : m;
        }
        for (int l = 0; l < kLanes; ++l) st.max = lane_max[l] > st.max ? lane_max[l] : st.max;
      }
      const Acc ref = sums_at_running_max(r.max, st.max) ? r.max : st.max;
      const Acc* ev = e + b;
      if (ref != max) {  // whole vectors (the last one padded): a scalar exponential costs a vector's
        const V vr = splat<V>(ref);
        for (int64_t q = b; q < j; q += W) {
          Acc v[W] = {};
          std::copy(z + q, z + std::min(j, q + W), v);
          storev(scratch + (q - b), exp_nonpos(loadv(v) - vr));
        }
        ev = scratch;
      }
      Acc sums[kLanes] = {}, dots[kLanes] = {};
      for (int64_t q = b; q < j; ++q) {
        const uint32_t l = uint32_t(pos[q]) % kLanes;
        const Acc eq = ev[q - b];
        sums[l] += eq;
        dots[l] += eq > Acc(0) ? eq * (z[q] - ref) : Acc(0);
      }
      st.sum = tree_sum(sums);
      st.ex_dot = tree_sum(dots);
      if (ref != st.max) rebase_chunk<true>(st, ref);
    }
    r.max = st.max;
    chunk_max[c] = st.max;
    weights[c] = st.sum;
    weights[nc + c] = st.ex_dot;
  }
  if (r.max != -kInf) finish_row_stats<true>(nc, weights, chunk_max, r);
  return r;
}

// A candidate bound for top-p from a strided sample of the row: the
// largest value below which the sample's mass exp(z - max), scaled to the
// row, is at most `below` (bisection over values, above `floor`, the
// row-wide bound), and the share of the sample at or above it. An
// estimate: the caller checks what it keeps.
template <class Row, class Acc>
inline Acc sampled_bound(Row z, int64_t K, Acc max, double below, Acc floor, double* share) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  *share = 1.0;
  if (K < 8 * kBoundSample) return floor;
  alignas(64) Acc zs[kBoundSample], es[kBoundSample];
  const int64_t stride = K / kBoundSample;
  for (int j = 0; j < kBoundSample; ++j) zs[j] = load<Acc>(z[j * stride]);
  VectorChunkExps()(static_cast<const Acc*>(zs), kBoundSample, max, es);
  const double budget = below * kBoundSample / double(K);
  auto mass_below = [&](Acc v) {
    const V vv = splat<V>(v);
    V sum{};
    for (int j = 0; j < kBoundSample; j += W) sum += select(loadv(zs + j) < vv, loadv(es + j), V{});
    return lane_sum(sum, W);
  };
  // mass_below(lo) within the budget, mass_below(hi) over it or hi the
  // sample's largest value: above that the sample knows nothing (a peaked
  // row's few large entries are rarely in it)
  Acc lo = floor, hi = *std::max_element(zs, zs + kBoundSample);
  for (int step = 0; step < 12 && lo < hi; ++step) {  // to 1/4096 of the range: an estimate anyway
    const Acc mid = lo + (hi - lo) / 2;
    if (mid <= lo || mid >= hi) break;
    (mass_below(mid) <= budget ? lo : hi) = mid;
  }
  *share = double(std::count_if(zs, zs + kBoundSample, [&](Acc v) { return v >= lo; })) / kBoundSample;
  return lo;
}

// The top-p threshold over the whole row (mass target = p * total). The
// sorted strided sample gives candidate bounds; vector passes of mass_above
// narrow a bracket of sample ranks (a, b), with the mass above sample value
// a below the target and above sample value b at or over it, to adjacent
// ranks; the entries between those two values are then selected exactly.
template <class Acc>
inline Acc top_p_threshold(const Acc* z, const Acc* e, int64_t K, Acc max, double target, double total,
                           Entry<Acc>* work) {
  const Acc inf = Acc(INFINITY);
  std::pair<Acc, Acc> s[kSample + 1];
  // half the sample for fewer candidates: its sort is a fifth of the search there
  const int size = K < kLargeCandidates ? kSample / 2 : kSample;
  const int64_t stride = std::max<int64_t>(1, K / size);
  int n = 0;
  for (int64_t j = 0; j < K && n <= size; j += stride)
    if (z[j] > -inf) s[n++] = {z[j], e[j]};
  static_assert(kSample + 1 <= 1024, "sort_descending's room");
  sort_descending(s, n);
  // rank r stands for the sample value s[r] (-1: +inf, n: -inf); f(r), the
  // row's mass above value(r), rises with r. Bracket: f(a) < target <= f(b).
  auto value = [&](int r) { return r < 0 ? inf : (r >= n ? -inf : s[r].first); };
  double cum[kSample + 2];  // cum[r]: the sample's mass above rank r (ties aside)
  cum[0] = 0.0;
  for (int j = 0; j < n; ++j) cum[j + 1] = cum[j] + double(s[j].second);
  int a = -1, b = n;
  double mass_a = 0.0, mass_b = total;
  bool spread = false;
  for (int pass = 0; b - a > 1 && pass < 12; ++pass) {
    int want[kBounds];
    if (spread) {
      // the last probes all fell on one side: the interpolation is off (the
      // sample misses where the mass is), so split the bracket evenly
      for (int q = 0; q < kBounds; ++q) want[q] = a + int(int64_t(b - a) * (q + 1) / (kBounds + 1));
    } else if (pass == 0 && n == size + 1) {
      // First, from below: the mass under the boundary, total - target, is
      // spread over many entries of similar mass, which the sample scaled
      // by K / n estimates well (the mass above it, a sum over a few large
      // entries, it does not). Probes where the estimate is off by -25% to +30%.
      for (int q = 0; q < kBounds; ++q) {
        const double under = (total - target) * kFirstProbes[q] * n / double(K);
        want[q] = int(std::lower_bound(cum, cum + n, cum[n] - under) - cum);
      }
    } else {
      // interpolation: where the sample's mass curve, scaled to the
      // bracket's measured ends, reaches the target; probes either side
      const double ga = cum[std::max(a, 0)], gb = cum[b];
      int guess = b;
      if (gb > ga && mass_b > mass_a) {
        const double t = ga + (target - mass_a) / (mass_b - mass_a) * (gb - ga);
        guess = int(std::lower_bound(cum + a + 1, cum + b, t) - cum);
      }
      const int w = std::max(2, (b - a) / 8);
      // first, the sample's largest value too: a peaked row (a language
      // model's) holds its mass in a few entries the sample rarely contains
      want[0] = pass == 0 ? 0 : guess - 1 - w;
      want[1] = guess - 1;
      want[2] = guess;
      want[3] = guess + w;
    }
    int probes[kBounds];
    int np = 0;
    for (int r : want)
      if (r > a && r < b && (np == 0 || r > probes[np - 1])) probes[np++] = r;
    if (np == 0) break;
    Acc bounds[kBounds];
    double mass[kBounds];
    for (int q = 0; q < np; ++q) bounds[q] = value(probes[q]);
    mass_above(z, e, K, bounds, np, mass);
    int below = 0;
    for (int q = 0; q < np; ++q) {
      if (mass[q] < target) { a = probes[q]; mass_a = mass[q]; ++below; }
      else { b = probes[q]; mass_b = mass[q]; break; }
    }
    spread = below == 0 || below == np;
  }
  // the entries in (value(b), value(a)], and the smallest above value(a) (kept:
  // the mass above value(a) is under the target; none above +inf: the max)
  Acc min_above = inf;
  const int64_t c = gather_between(z, e, K, value(b), value(a), work, &min_above);
  return detail::select_by_mass(work, c, target, mass_a, min_above < inf ? min_above : max);
}

// The entries a selection gathered into sc.cz: every kept entry, and above
// every entry left out of them.
struct Candidates {
  int64_t n = -1;       // how many (-1: none gathered)
  bool placed = false;  // their columns are in sc.pos (a set that may be listed)
  bool massed = false;  // their masses exp(z - max) are in sc.ce
};

// The top-k candidates of a long row with a small k, in one sparse pass:
// the entries at or above a bound that a strided sample of the row puts
// below about 2 (k + 1) + 8 K / kBoundSample of them, with their columns;
// how many, or -1 where the row holds k or fewer (the sample's bound was too
// high: the caller selects over the row).
template <class Row, class Acc>
inline int64_t top_k_candidates(Row z, int64_t K, int64_t k, TruncationScratch<Acc>& sc) {
  const Acc inf = Acc(INFINITY);
  alignas(64) Acc zs[2 * kBoundSample];  // kth_of's room
  const int64_t stride = K / kBoundSample;
  int m = 0;
  for (int j = 0; j < kBoundSample; ++j) {
    zs[m] = load<Acc>(z[j * stride]);
    m += zs[m] > -inf;
  }
  const int64_t r = std::min<int64_t>(m, 2 * (k + 1) * kBoundSample / K + 8);
  if (r == 0) return -1;
  const Acc bound = kth_of(zs, m, r);
  const int64_t n = gather_kept(double(r) / double(m), z, K, bound, sc.cz, sc.pos);
  return n > k ? n : -1;
}

// The selected cut on a row whose statistics (max, total mass) are known,
// and the candidates the selection gathered.
template <class Row, class Acc>
inline Acc select_cut(Row z, int64_t K, const TruncationParams& p, const RowFilters& rf, int64_t i, Acc max,
                      double total, TruncationScratch<Acc>& sc, Candidates& cands) {
  cands = Candidates{};
  const Acc inf = Acc(INFINITY);
  if (p.given_threshold) {
    // the row's maximum is always kept: a replayed value above it (logits
    // that moved by rounding) keeps the maximum, never an empty set
    return std::min(static_cast<const Acc*>(p.given_threshold)[i], max);
  }
  const int64_t top_k = rf.top_k;
  const double top_p = rf.top_p, min_p = rf.min_p;
  Acc cut = -inf;
  if (top_k > 0) {
    const int64_t n = sc.pos && top_k * kListedKept <= K && K >= 8 * kBoundSample
                          ? top_k_candidates(z, K, top_k, sc) : -1;
    if (n > 0) {
      Acc* v = reinterpret_cast<Acc*>(sc.work);
      std::copy(sc.cz, sc.cz + n, v);
      cut = kth_of(v, n, top_k);
      cands.n = n;
      cands.placed = true;
    } else {
      cut = kth_largest(z, K, top_k, reinterpret_cast<Acc*>(sc.work));
    }
  }
  if (top_p < 1.0) {
    int64_t n;
    double mass;
    if (cands.placed) {
      // top-p over the top-k distribution (transformers' order): its
      // candidates are the top-k candidates at or above the top-k cut
      Acc smallest, dropped;
      const Acc* none = nullptr;
      n = kept_entries<false>(static_cast<const Acc*>(sc.cz), cands.n, cut, none, sc.pos, sc.cz,
                              static_cast<Acc*>(nullptr), sc.pos, &smallest, &dropped);
      mass = masses(sc.cz, n, max, sc.ce);
    } else {
      // Without top-k, an entry whose mass is under (1 - p) * total / K cannot
      // be kept: the entries at or below it hold less than 1 - p together, so
      // the larger ones hold more than p. Half that bound, for the rounding of
      // the sums, leaves the candidates (all finite entries where 1 - p is
      // near the sums' own rounding).
      Acc lo = cut, row_wide = -inf;
      double share = cut > -inf ? double(top_k) / double(K) : 1.0;  // of the row expected among the candidates
      if (lo == -inf && top_p < 1.0 - kNearOne) {
        const double bound = 0.5 * (1.0 - top_p) * total / double(K);
        lo = row_wide = bound > 0.0 ? Acc(double(max) + std::log(bound)) : -inf;
        // Usually far fewer: below a bound whose entries a sample of the row
        // says hold three quarters of 1 - p. Where the entries above it do not
        // hold p (a sample that missed), the row-wide bound is taken after all.
        if (row_wide > -inf) lo = sampled_bound(z, K, max, 0.75 * (1.0 - top_p) * total, row_wide, &share);
      }
      // columns only for a set that may be listed: the compressions are the gather's cost
      cands.placed = sc.pos && (share * kListedKept <= 1.0 || K < 8 * kBoundSample);
      // (sparse, skipping the vectors without one, where few are expected: gather_kept)
      auto gather = [&](Acc bound, double expected) {
        if (!cands.placed) return gather_at_least(z, K, bound, sc.cz);
        return gather_kept(expected, z, K, bound, sc.cz, sc.pos);
      };
      n = gather(std::max(lo, std::nextafter(-inf, inf)), share);
      mass = masses(sc.cz, n, max, sc.ce);
      if (lo > row_wide && row_wide > -inf && !(mass >= top_p * total * (1.0 + kBoundSlack))) {
        n = gather(row_wide, 1.0);
        mass = masses(sc.cz, n, max, sc.ce);
      }
    }
    cands.n = n;
    cands.massed = true;
    // top-p over the top-k distribution when both are set (transformers' order)
    const double target = top_p * (cut > -inf ? mass : total);
    Acc t = max;
    if (target > 0.0 && n > kDirect) {
      t = top_p_threshold(sc.cz, sc.ce, n, max, target, mass, sc.work);
    } else if (target > 0.0) {
      for (int64_t j = 0; j < n; ++j) sc.work[j] = Entry<Acc>{sc.cz[j], sc.ce[j]};
      t = detail::select_by_mass(sc.work, n, target, 0.0, max);
    }
    cut = std::max(cut, t);
  }
  if (min_p > 0.0) cut = std::max(cut, Acc(double(max) + std::log(min_p)));
  return cut;
}

}  // namespace trunc_detail

// Row i of x (K entries, element stride cs): its kept set under p, the
// record p asks for (threshold, kept, kept mass, cut, kept logits), and in
// `out` what the sampler draws from. rs is the sampler's row scratch: on
// return it holds the kept set's chunk weights. need_stats false (no draw,
// no kept mass asked for: the trainer's kept logits): out.stats is left
// unset, and no pass takes them. kNonFiniteInput with a finite err.value:
// x / T overflowed.
template <class T, class Acc>
inline Status truncate_row(const T* x, int64_t K, int64_t cs, const TruncationParams& p, int64_t i,
                           TruncationScratch<Acc>& sc, RowScratch<Acc>& rs, KeptRow<T, Acc>& out, ErrorInfo& err,
                           bool need_stats = true) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const Acc inf = Acc(INFINITY);
  const double temperature = p.temperature[i * p.temperature_stride];
  const bool greedy = temperature == 0.0;
  const Acc t = greedy ? Acc(1) : Acc(temperature);
  // A row read as it is (unit stride, T = 1) is read from memory once; one
  // that must be formed is formed once, into scratch.
  out.x = x;
  out.z = nullptr;
  if (t != Acc(1) || cs != 1 || greedy) {
    Acc* z = sc.z;
    int64_t k = 0;
    if (cs == 1) {
      const V vt = splat<V>(t);
      for (; k + W <= K; k += W) storev(z + k, loadv(x + k) / vt);
    }
    for (; k < K; ++k) z[k] = tempered(load<Acc>(x[k * cs]), t);
    out.z = z;
  }
  // Whether a filter may leave entries out; without one (temperature alone)
  // the whole row's statistics, entropy included, are the sampler's.
  const RowFilters rf = row_filters(p, i);
  const bool filtered = p.given_threshold || rf.top_k > 0 || rf.top_p < 1.0 || rf.min_p > 0.0;
  // A small top-k set is listed (below); a wide set's pass reuses the whole
  // row's exponentials, kept for it.
  const bool small_top_k = sc.pos && !p.given_threshold && rf.top_k > 0 && rf.top_k * trunc_detail::kListedKept <= K;
  const bool stored = need_stats && filtered && !small_top_k && K > kLanes;
  auto rest = [&](auto row) -> Status {
    // the whole row's statistics: its max, its mass, any NaN or +inf
    const RowStats<Acc> all = stored     ? row_stats<false, false, true>(row, K, sc.weights, sc.chunk_max, rs.e, sc.e)
                              : filtered ? row_stats<false>(row, K, sc.weights, sc.chunk_max, rs.e)
                                         : row_stats<true>(row, K, rs.weights, rs.chunk_max, rs.e);
    if (all.bad_col >= 0) {
      err.col = all.bad_col;
      err.value = double(load<Acc>(x[all.bad_col * cs]));
      return kNonFiniteInput;
    }
    if (all.max == -inf) return kAllNegInf;
    const Acc max = all.max;
    Acc cut = -inf;
    if (greedy) {  // the first maximum alone, at 0: probability 1
      Acc* z = sc.z;
      const int64_t argmax = int64_t(std::find(z, z + K, max) - z);
      std::fill(z, z + K, -inf);
      z[argmax] = Acc(0);
      if (need_stats) out.stats = row_stats<true, true>(static_cast<const Acc*>(z), K, rs.weights, rs.chunk_max, rs.e);
      if (p.threshold) static_cast<Acc*>(p.threshold)[i] = max;
      if (p.kept) p.kept[i] = 1;
      if (p.kept_mass) p.kept_mass[i] = 1.0;
      if (p.cut) static_cast<Acc*>(p.cut)[i] = max;
      if (p.kept_logits) std::copy(z, z + K, static_cast<Acc*>(p.kept_logits) + i * K);
      return kOk;
    }
    trunc_detail::Candidates cands;
    cut = trunc_detail::select_cut(row, K, p, rf, i, max, all.z, sc, cands);
    int64_t kept = 0;
    Acc smallest = inf, dropped = -inf;
    // The kept entries themselves, where few enough to cost less than a
    // pass over the row (top-p's candidates, compacted in place: they hold
    // every kept entry and lie above every other, so where one of them is
    // left out their record is the row's; a small top-k set, gathered).
    bool listed = false;
    if (cands.placed) {
      Acc* ce = cands.massed ? sc.ce : nullptr;
      const Acc* cz = sc.cz;
      kept = trunc_detail::kept_entries<false>(cz, cands.n, cut, static_cast<const Acc*>(ce), sc.pos, sc.cz, ce, sc.pos,
                                               &smallest, &dropped);
      if (!cands.massed && need_stats) trunc_detail::masses(sc.cz, kept, max, sc.ce);
      listed = kept * trunc_detail::kListedKept <= K;
    } else if (cands.n >= 0) {
      trunc_detail::kept_record(static_cast<const Acc*>(sc.cz), cands.n, cut, &kept, &smallest, &dropped);
    } else if (small_top_k) {
      const Acc* none = nullptr;
      kept = double(rf.top_k) < trunc_detail::kSparseKept * double(K)
                 ? trunc_detail::kept_entries<true>(row, K, cut, none, nullptr, sc.cz, static_cast<Acc*>(nullptr),
                                                    sc.pos, &smallest, &dropped)
                 : trunc_detail::kept_entries<false>(row, K, cut, none, nullptr, sc.cz, static_cast<Acc*>(nullptr),
                                                     sc.pos, &smallest, &dropped);
      if (need_stats) trunc_detail::masses(sc.cz, kept, max, sc.ce);
      listed = kept * trunc_detail::kListedKept <= K;  // not so where ties at the k-th value are many
    } else {
      trunc_detail::kept_record(row, K, cut, &kept, &smallest, &dropped);
    }
    // every candidate kept: the largest entry left out is among the rest
    if (cands.n >= 0 && dropped == -inf) trunc_detail::kept_record(row, K, cut, &kept, &smallest, &dropped);
    if (kept == 0) return kAllNegInf;
    out.cut = cut;
    const KeptView<std::remove_cv_t<std::remove_pointer_t<decltype(row)>>, Acc> view{row, cut};
    double kept_mass = 1.0;
    if (dropped == -inf && !filtered) {
      out.stats = all;
    } else if (need_stats) {
      // The kept set's statistics as the chunk pass over the masked row
      // takes them (the trainer's, from the kept logits), bit for bit: from
      // the listed kept entries, or from the whole row's exponentials.
      using Row = std::remove_cv_t<std::remove_pointer_t<decltype(row)>>;
      const Acc *cz = sc.cz, *ce = sc.ce;
      out.stats = listed   ? trunc_detail::kept_row_stats(cz, ce, sc.pos, kept, K, max, rs.weights, rs.chunk_max, rs.e)
                  : stored ? row_stats<true>(view, K, rs.weights, rs.chunk_max, rs.e, static_cast<Acc*>(nullptr),
                                             StoredChunks<const Row*, Acc>{row, cut, sc.e, sc.chunk_max})
                           : row_stats<true>(view, K, rs.weights, rs.chunk_max, rs.e);
      kept_mass = dropped == -inf ? 1.0 : out.stats.z / all.z;
    }
    if (p.threshold) static_cast<Acc*>(p.threshold)[i] = smallest;
    if (p.kept) p.kept[i] = kept;
    if (p.kept_mass) p.kept_mass[i] = kept_mass;
    if (p.cut) static_cast<Acc*>(p.cut)[i] = replay_cut(smallest, dropped);
    if (p.kept_logits) {
      Acc* kl = static_cast<Acc*>(p.kept_logits) + i * K;
      int64_t k = 0;
      for (; k + W <= K; k += W) storev(kl + k, loadv(view + k));
      for (; k < K; ++k) kl[k] = view[k];
    }
    return kOk;
  };
  return out.z ? rest(static_cast<const Acc*>(out.z)) : rest(x);
}

PGEST_NS_END
