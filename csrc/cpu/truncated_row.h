// The kept set of one row on the CPU (definitions in truncation.h), and the
// row's statistics over it for the sampler. The row is never rewritten
// masked: the kept set is a cut, and the passes after the selection read the
// row through KeptView, which forms -inf outside the set on load. For the
// vocabulary sizes of language models the row then stays in L2 after its
// first read, which is the one from memory. No pass sorts the row: top-k
// keeps the entries above a running bound in a buffer it cuts to the k
// largest as it fills; top-p selects among the entries that can be kept at
// all (a bound from the row's total mass), narrowing large candidate sets by
// vector passes over them first.
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
  bool ok = false;
  // cols = 0: nothing allocated (the sample kernel's untruncated calls).
  explicit TruncationScratch(int64_t cols) {
    if (cols <= 0) { ok = true; return; }
    const size_t n = size_t(cols);
    z = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    cz = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    ce = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    work = static_cast<Entry<Acc>*>(std::malloc(sizeof(Entry<Acc>) * n));
    ok = z && cz && ce && work;
  }
  ~TruncationScratch() { std::free(z); std::free(cz); std::free(ce); std::free(work); }
  TruncationScratch(const TruncationScratch&) = delete;
  TruncationScratch& operator=(const TruncationScratch&) = delete;
};

// A row's entries at or above `cut`, -inf elsewhere, formed on load: the
// values the record's kept_logits hold, so a pass over the view gives the
// bits of the same pass over the masked row.
template <class T, class Acc>
struct KeptView {
  const T* x;
  Acc cut;
  KeptView operator+(int64_t k) const { return KeptView{x + k, cut}; }
  Acc operator[](int64_t k) const {
    const Acc v = load<Acc>(x[k]);
    return v >= cut ? v : -Acc(INFINITY);
  }
};

template <class T, class Acc>
inline typename Vec<Acc>::type loadv(KeptView<T, Acc> r) {
  using V = typename Vec<Acc>::type;
  const V v = loadv(r.x);
  return select(v >= splat<V>(r.cut), v, splat<V>(-Acc(INFINITY)));
}

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
constexpr int64_t kDirect = 1024;      // top-p candidates few enough to select among at once
constexpr double kNearOne = 1e-4;      // top-p this close to 1 takes every finite entry as a candidate
constexpr int64_t kRankBuffer = 2048;  // top-k's buffer of candidates, at least
constexpr int64_t kSmallSelect = 64;   // values few enough for a selection by partition
constexpr int64_t kSparseKept = 256;   // kept sets under 1 / kSparseKept of the row skip empty chunks

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

// Order-preserving integer keys of finite floats (a bisection over values).
template <class Acc> struct OrderKey;
template <> struct OrderKey<float> {
  using type = uint32_t;
  static type of(float v) {
    uint32_t b;
    std::memcpy(&b, &v, 4);
    return b & 0x80000000u ? ~b : b | 0x80000000u;
  }
  static float value(type k) {
    const uint32_t b = k & 0x80000000u ? k & 0x7fffffffu : ~k;
    float v;
    std::memcpy(&v, &b, 4);
    return v;
  }
};
template <> struct OrderKey<double> {
  using type = uint64_t;
  static type of(double v) {
    uint64_t b;
    std::memcpy(&b, &v, 8);
    return b & (1ull << 63) ? ~b : b | (1ull << 63);
  }
  static double value(type k) {
    const uint64_t b = k & (1ull << 63) ? k & ~(1ull << 63) : ~k;
    double v;
    std::memcpy(&v, &b, 8);
    return v;
  }
};

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
  const int64_t stride = std::max<int64_t>(1, K / kSample);
  int n = 0;
  for (int64_t j = 0; j < K && n <= kSample; j += stride)
    if (z[j] > -inf) s[n++] = {z[j], e[j]};
  std::sort(s, s + n, [](const std::pair<Acc, Acc>& l, const std::pair<Acc, Acc>& r) { return l.first > r.first; });
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

}  // namespace trunc_detail

namespace trunc_detail {

// Row i's filter parameters, read once (disabled: top_k <= 0, top_p >= 1,
// min_p <= 0).
struct RowFilters {
  int64_t top_k;
  double top_p, min_p;
};

inline RowFilters row_filters(const TruncationParams& p, int64_t i) {
  return RowFilters{p.top_k ? p.top_k[i * p.top_k_stride] : 0, p.top_p ? p.top_p[i * p.top_p_stride] : 1.0,
                    p.min_p ? p.min_p[i * p.min_p_stride] : 0.0};
}

// The selected cut on a row whose statistics (max, total mass) are known.
// *candidates: how many entries top-p gathered into sc.cz (every kept entry
// among them), or -1 where it did not run.
template <class Row, class Acc>
inline Acc select_cut(Row z, int64_t K, const TruncationParams& p, const RowFilters& rf, int64_t i, Acc max,
                      double total, TruncationScratch<Acc>& sc, int64_t* candidates) {
  *candidates = -1;
  const Acc inf = Acc(INFINITY);
  if (p.given_threshold) {
    // the row's maximum is always kept: a replayed value above it (logits
    // that moved by rounding) keeps the maximum, never an empty set
    return std::min(static_cast<const Acc*>(p.given_threshold)[i], max);
  }
  const int64_t top_k = rf.top_k;
  const double top_p = rf.top_p, min_p = rf.min_p;
  Acc cut = -inf;
  if (top_k > 0) cut = kth_largest(z, K, top_k, reinterpret_cast<Acc*>(sc.work));
  if (top_p < 1.0) {
    // Without top-k, an entry whose mass is under (1 - p) * total / K cannot
    // be kept: the entries at or below it hold less than 1 - p together, so
    // the larger ones hold more than p. Half that bound, for the rounding of
    // the sums, leaves the candidates (all finite entries where 1 - p is
    // near the sums' own rounding).
    Acc lo = cut;
    if (lo == -inf && top_p < 1.0 - kNearOne) {
      const double bound = 0.5 * (1.0 - top_p) * total / double(K);
      lo = bound > 0.0 ? Acc(double(max) + std::log(bound)) : -inf;
    }
    const int64_t n = gather_at_least(z, K, std::max(lo, std::nextafter(-inf, inf)), sc.cz);
    *candidates = n;
    const double mass = masses(sc.cz, n, max, sc.ce);
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
// return it holds the kept set's chunk weights. kNonFiniteInput with a
// finite err.value: x / T overflowed.
template <class T, class Acc>
inline Status truncate_row(const T* x, int64_t K, int64_t cs, const TruncationParams& p, int64_t i,
                           TruncationScratch<Acc>& sc, RowScratch<Acc>& rs, KeptRow<T, Acc>& out, ErrorInfo& err) {
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
  const trunc_detail::RowFilters rf = trunc_detail::row_filters(p, i);
  const bool filtered = p.given_threshold || rf.top_k > 0 || rf.top_p < 1.0 || rf.min_p > 0.0;
  auto rest = [&](auto row) -> Status {
    // the whole row's statistics: its max, its mass, any NaN or +inf
    const RowStats<Acc> all = filtered ? row_stats<false>(row, K, rs.weights, rs.chunk_max, rs.e)
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
      out.stats = row_stats<true, true>(static_cast<const Acc*>(z), K, rs.weights, rs.chunk_max, rs.e);
      if (p.threshold) static_cast<Acc*>(p.threshold)[i] = max;
      if (p.kept) p.kept[i] = 1;
      if (p.kept_mass) p.kept_mass[i] = 1.0;
      if (p.cut) static_cast<Acc*>(p.cut)[i] = max;
      if (p.kept_logits) std::copy(z, z + K, static_cast<Acc*>(p.kept_logits) + i * K);
      return kOk;
    }
    int64_t candidates = -1;
    cut = trunc_detail::select_cut(row, K, p, rf, i, max, all.z, sc, &candidates);
    int64_t kept = 0;
    Acc smallest = inf, dropped = -inf;
    // Top-p's candidates hold every kept entry and lie above every other
    // entry, so where one of them is left out their record is the row's.
    if (candidates >= 0)
      trunc_detail::kept_record(static_cast<const Acc*>(sc.cz), candidates, cut, &kept, &smallest, &dropped);
    if (candidates < 0 || dropped == -inf) trunc_detail::kept_record(row, K, cut, &kept, &smallest, &dropped);
    if (kept == 0) return kAllNegInf;
    out.cut = cut;
    const KeptView<std::remove_cv_t<std::remove_pointer_t<decltype(row)>>, Acc> view{row, cut};
    double kept_mass = 1.0;
    if (dropped == -inf && !filtered) {
      out.stats = all;
    } else {
      // Whole chunks of -inf are found and skipped where the kept set is
      // small enough to leave many (the same bits either way); a check of
      // every chunk of a wide set costs a fifth of the pass for nothing.
      out.stats = kept * trunc_detail::kSparseKept < K
                      ? row_stats<true, true>(view, K, rs.weights, rs.chunk_max, rs.e)
                      : row_stats<true>(view, K, rs.weights, rs.chunk_max, rs.e);
      kept_mass = dropped == -inf ? 1.0 : out.stats.z / all.z;
    }
    if (p.threshold) static_cast<Acc*>(p.threshold)[i] = smallest;
    if (p.kept) p.kept[i] = kept;
    if (p.kept_mass) p.kept_mass[i] = kept_mass;
    if (p.cut) {  // midway, or the smallest kept value where the two are neighbouring floats
      const Acc mid = smallest / 2 + dropped / 2;
      static_cast<Acc*>(p.cut)[i] = dropped == -inf ? -inf : (mid > dropped ? mid : smallest);
    }
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
