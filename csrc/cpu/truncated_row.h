// The kept set of one row on the CPU (definitions in truncation.h): the row
// is read once, tempered into per-thread scratch, and every later pass (the
// selections, the mask, then the sampler's own passes) runs on that scratch,
// which stays in cache at vocabulary sizes. No pass sorts the row: top-k and
// top-p first estimate their boundary from a strided sample of about 256
// entries, check the estimate in one vector pass, and select exactly among
// the entries between the two checked bounds; a failed check falls back to
// selection over the whole row.
#pragma once

#include <pgest/sampler.h>
#include <pgest/truncation.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <utility>

#include "vec.h"

PGEST_NS_BEGIN

template <class Acc>
struct TruncationScratch {
  Acc* z = nullptr;     // the tempered row; after truncate_row, -inf outside its kept set
  Acc* e = nullptr;     // exp(z - max)
  Entry<Acc>* work = nullptr;  // the selections' candidates
  bool ok = false;
  // cols = 0: nothing allocated (the sample kernel's untruncated calls).
  explicit TruncationScratch(int64_t cols) {
    if (cols <= 0) { ok = true; return; }
    const size_t n = size_t(cols);
    z = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    e = static_cast<Acc*>(std::malloc(sizeof(Acc) * n));
    work = static_cast<Entry<Acc>*>(std::malloc(sizeof(Entry<Acc>) * n));
    ok = z && e && work;
  }
  ~TruncationScratch() { std::free(z); std::free(e); std::free(work); }
  TruncationScratch(const TruncationScratch&) = delete;
  TruncationScratch& operator=(const TruncationScratch&) = delete;
};

namespace trunc_detail {

constexpr int kSample = 256;  // entries in the strided sample
constexpr int kMargin = 8;    // sample ranks of slack on top-k's estimated boundary

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
  for (; k + kBlock <= K; k += kBlock) {
    V s[kBounds] = {};
    for (int j = 0; j < kBlock; j += W) {
      const V zv = loadv(z + k + j), ev = loadv(e + k + j);
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

// The values of z at or above v into out (how many: the return value). With
// AVX-512 a vector's hits go out compressed in one whole-vector store, so out
// needs room for a vector past the last value (the caller's has K entries'
// room for K values at most: twice that).
template <class Acc>
inline int64_t gather_at_least(const Acc* z, int64_t K, Acc v, Acc* out) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const V vv = splat<V>(v);
  int64_t n = 0, k = 0;
  for (; k + W <= K; k += W) {
    const V zv = loadv(z + k);
#if defined(__AVX512F__)
    if constexpr (sizeof(Acc) == 4) {
      const __mmask16 m = _mm512_cmp_ps_mask(reinterpret_cast<__m512>(zv), reinterpret_cast<__m512>(vv), _CMP_GE_OQ);
      if (m) {  // compressed in a register, stored whole: a compressing store to memory is microcoded on Zen 4
        _mm512_storeu_ps(out + n, _mm512_maskz_compress_ps(m, reinterpret_cast<__m512>(zv)));
        n += __builtin_popcount(m);
      }
      continue;
    } else {
      const __mmask8 m = _mm512_cmp_pd_mask(reinterpret_cast<__m512d>(zv), reinterpret_cast<__m512d>(vv), _CMP_GE_OQ);
      if (m) {
        _mm512_storeu_pd(out + n, _mm512_maskz_compress_pd(m, reinterpret_cast<__m512d>(zv)));
        n += __builtin_popcount(m);
      }
      continue;
    }
#else
    if (!any_lane(zv >= vv)) continue;
    for (int l = 0; l < W; ++l) {
      out[n] = z[k + l];
      n += z[k + l] >= v;
    }
#endif
  }
  for (; k < K; ++k) {
    out[n] = z[k];
    n += z[k] >= v;
  }
  return n;
}

// The k-th largest of the `live` finite entries of z (0 < k < live): its
// boundary estimated from the strided sample (twice the expected rank, so the
// check rarely fails), then an exact selection among the entries above.
template <class Acc>
inline Acc kth_largest(const Acc* z, int64_t K, int64_t k, int64_t live, Entry<Acc>* scratch) {
  const auto desc = [](Acc l, Acc r) { return l > r; };
  const Acc inf = Acc(INFINITY);
  Acc* work = reinterpret_cast<Acc*>(scratch);  // K values in the room of K entries: a vector to spare
  if (k * 8 < live) {
    const int64_t stride = std::max<int64_t>(1, K / kSample);
    int64_t n = 0;
    for (int64_t j = 0; j < K; j += stride)
      if (z[j] > -inf) work[n++] = z[j];
    if (n > 0) {
      const int64_t r = std::min<int64_t>(n, 2 * k * n / live + kMargin);
      std::nth_element(work, work + (r - 1), work + n, desc);
      const int64_t c = gather_at_least(z, K, work[r - 1], work);
      if (c >= k) {
        std::nth_element(work, work + (k - 1), work + c, desc);
        return work[k - 1];
      }
    }
  }
  const int64_t n = gather_at_least(z, K, std::nextafter(-inf, inf), work);
  std::nth_element(work, work + (k - 1), work + n, desc);
  return work[k - 1];
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
  for (int pass = 0; b - a > 1 && pass < 12; ++pass) {
    // interpolation: where the sample's mass curve, scaled to the bracket's
    // measured ends, reaches the target; probes either side of that rank
    const double ga = cum[std::max(a, 0)], gb = cum[b];
    int guess = b;
    if (gb > ga && mass_b > mass_a) {
      const double want = ga + (target - mass_a) / (mass_b - mass_a) * (gb - ga);
      guess = int(std::lower_bound(cum + a + 1, cum + b, want) - cum);
    }
    const int w = std::max(2, (b - a) / 8);
    int probes[kBounds];
    int np = 0;
    for (int r : {guess - 1 - w, guess - 1, guess, guess + w})
      if (r > a && r < b && (np == 0 || r > probes[np - 1])) probes[np++] = r;
    if (np == 0) break;
    Acc bounds[kBounds];
    double mass[kBounds];
    for (int q = 0; q < np; ++q) bounds[q] = value(probes[q]);
    mass_above(z, e, K, bounds, np, mass);
    for (int q = 0; q < np; ++q) {
      if (mass[q] < target) { a = probes[q]; mass_a = mass[q]; }
      else { b = probes[q]; mass_b = mass[q]; break; }
    }
  }
  // the entries in (value(b), value(a)], and the smallest above value(a) (kept:
  // the mass above value(a) is under the target; none above +inf: the max)
  Acc min_above = inf;
  const int64_t c = gather_between(z, e, K, value(b), value(a), work, &min_above);
  return detail::select_by_mass(work, c, target, mass_a, min_above < inf ? min_above : max);
}

}  // namespace trunc_detail

// Row i of x (K entries, element stride cs) into sc.z: tempered, -inf outside
// its kept set; the record (threshold, kept, kept mass, kept logits) written
// where p asks for it. kNonFiniteInput with a finite err.value: x / T overflowed.
template <class T, class Acc>
inline Status truncate_row(const T* x, int64_t K, int64_t cs, const TruncationParams& p, int64_t i,
                           TruncationScratch<Acc>& sc, ErrorInfo& err) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const Acc inf = Acc(INFINITY);
  const double temperature = p.temperature[i * p.temperature_stride];
  const bool greedy = temperature == 0.0;
  const Acc t = greedy ? Acc(1) : Acc(temperature);
  const bool unit = t == Acc(1);
  Acc* z = sc.z;
  // The one read of the row: tempered, its maximum, any NaN or +inf.
  V vmax = splat<V>(-inf), vlive{}, vlow = splat<V>(inf);
  bool bad = false;
  int64_t k = 0;
  if (cs == 1) {
    using M = typename Vec<Acc>::mask;
    const V vt = splat<V>(t), one = splat<V>(Acc(1)), zero{};
    M vbad{};
    for (; k + W <= K; k += W) {
      const V v = loadv(x + k);
      const V zv = unit ? v : v / vt;  // x / 1 is x: no division
      storev(z + k, zv);
      vbad |= (zv != zv) | (zv == splat<V>(inf));
      vmax = select(zv > vmax, zv, vmax);
      vlive += select(zv > splat<V>(-inf), one, zero);
      vlow = select((zv < vlow) & (zv > splat<V>(-inf)), zv, vlow);
    }
    for (int l = 0; l < W; ++l) bad |= vbad[l] != 0;
  }
  Acc max = trunc_detail::lane_max<V, Acc>(vmax);
  Acc low = trunc_detail::lane_min<V, Acc>(vlow);  // the smallest finite entry
  int64_t live = int64_t(trunc_detail::lane_sum(vlive, W));
  for (; k < K; ++k) {
    const Acc v = load<Acc>(x[k * cs]);
    const Acc zv = unit ? v : tempered(v, t);
    z[k] = zv;
    bad |= std::isnan(zv) || zv == inf;
    max = std::max(max, zv);
    live += zv > -inf;
    if (zv > -inf) low = std::min(low, zv);
  }
  if (bad) {
    for (int64_t j = 0; j < K; ++j) {
      if (std::isnan(z[j]) || z[j] == inf) {
        err.col = j;
        err.value = double(load<Acc>(x[j * cs]));
        return kNonFiniteInput;
      }
    }
  }
  if (max == -inf) return kAllNegInf;
  Acc cut = -inf;
  double kept_mass = 1.0;
  if (greedy) {
    const int64_t argmax = int64_t(std::find(z, z + K, max) - z);
    std::fill(z, z + K, -inf);
    z[argmax] = Acc(0);
    if (p.threshold) static_cast<Acc*>(p.threshold)[i] = max;
    if (p.kept) p.kept[i] = 1;
    if (p.kept_mass) p.kept_mass[i] = 1.0;
    if (p.cut) static_cast<Acc*>(p.cut)[i] = max;
    if (p.kept_logits) std::copy(z, z + K, static_cast<Acc*>(p.kept_logits) + i * K);
    return kOk;
  }
  const bool given = p.given_threshold != nullptr;
  const int64_t top_k = p.top_k ? p.top_k[i * p.top_k_stride] : 0;
  const double top_p = p.top_p ? p.top_p[i * p.top_p_stride] : 1.0;
  const double min_p = p.min_p ? p.min_p[i * p.min_p_stride] : 0.0;
  const bool by_k = top_k > 0 && top_k < live;
  if (!given && !by_k && !(top_p < 1.0) && !(min_p > 0.0)) {  // temperature alone: every finite entry kept
    if (p.threshold) static_cast<Acc*>(p.threshold)[i] = low;
    if (p.kept) p.kept[i] = live;
    if (p.kept_mass) p.kept_mass[i] = 1.0;
    if (p.cut) static_cast<Acc*>(p.cut)[i] = -inf;
    if (p.kept_logits) std::copy(z, z + K, static_cast<Acc*>(p.kept_logits) + i * K);
    return kOk;
  }
  double total = 0.0;
  if (given) {
    // the row's maximum is always kept: a replayed value above it (logits
    // that moved by rounding) keeps the maximum, never an empty set
    cut = std::min(static_cast<const Acc*>(p.given_threshold)[i], max);
  } else {
    // exp(z - max) once, for every mass below; their sum in chunks of double
    const V vm = splat<V>(max);
    int64_t j = 0;
    for (; j + kChunk <= K; j += kChunk) {
      V s{};
      for (int l = 0; l < kChunk; l += W) {
        const V ev = exp_nonpos(loadv(z + j + l) - vm);
        storev(sc.e + j + l, ev);
        s += ev;
      }
      total += trunc_detail::lane_sum(s, W);
    }
    for (; j < K; ++j) {
      sc.e[j] = exp_nonpos(z[j] - max);
      total += double(sc.e[j]);
    }
    if (by_k) cut = trunc_detail::kth_largest(z, K, top_k, live, sc.work);
    if (top_p < 1.0) {
      if (by_k) {  // top-p over the top-k distribution: its few entries, exactly
        const int64_t n = trunc_detail::gather_between(z, sc.e, K, std::nextafter(cut, -inf), inf, sc.work);
        double mass = 0.0;
        for (int64_t j2 = 0; j2 < n; ++j2) mass += double(sc.work[j2].mass);
        const double target = top_p * mass;
        cut = std::max(cut, target > 0.0 ? detail::select_by_mass(sc.work, n, target, 0.0, max) : max);
      } else {
        const double target = top_p * total;
        cut = std::max(cut, target > 0.0 ? trunc_detail::top_p_threshold(z, sc.e, K, max, target, total, sc.work)
                                         : max);
      }
    }
    if (min_p > 0.0) cut = std::max(cut, Acc(double(max) + std::log(min_p)));
  }
  // The mask, in place, with what it keeps.
  int64_t kept = 0;
  Acc smallest = inf, dropped = -inf;
  double mass = 0.0;
  {
    const V vc = splat<V>(cut), ninf = splat<V>(-inf), vinf = splat<V>(inf), one = splat<V>(Acc(1)), zero{};
    V vmin = vinf, vkept{}, vdrop = ninf;
    int64_t j = 0;
    for (; j + kChunk <= K; j += kChunk) {
      V s{};
      for (int l = 0; l < kChunk; l += W) {
        const V zv = loadv(z + j + l);
        const auto keep = (zv >= vc) & (zv > ninf);
        storev(z + j + l, select(keep, zv, ninf));
        vmin = select(keep, select(zv < vmin, zv, vmin), vmin);
        vdrop = select(keep, vdrop, select(zv > vdrop, zv, vdrop));
        vkept += select(keep, one, zero);
        if (!given) s += select(keep, loadv(sc.e + j + l), zero);
      }
      mass += trunc_detail::lane_sum(s, W);
    }
    smallest = trunc_detail::lane_min<V, Acc>(vmin);
    dropped = trunc_detail::lane_max<V, Acc>(vdrop);
    kept = int64_t(trunc_detail::lane_sum(vkept, W));
    for (; j < K; ++j) {
      if (z[j] >= cut && z[j] > -inf) {
        ++kept;
        smallest = std::min(smallest, z[j]);
        if (!given) mass += double(sc.e[j]);
      } else {
        dropped = std::max(dropped, z[j]);
        z[j] = -inf;
      }
    }
  }
  if (!given) kept_mass = mass / total;
  if (p.threshold) static_cast<Acc*>(p.threshold)[i] = smallest;
  if (p.kept) p.kept[i] = kept;
  if (p.kept_mass) p.kept_mass[i] = kept_mass;
  if (p.cut) {  // midway, or the smallest kept value where the two are neighbouring floats
    const Acc mid = smallest / 2 + dropped / 2;
    static_cast<Acc*>(p.cut)[i] = dropped == -inf ? -inf : (mid > dropped ? mid : smallest);
  }
  if (p.kept_logits) std::copy(z, z + K, static_cast<Acc*>(p.kept_logits) + i * K);
  return kept > 0 ? kOk : kAllNegInf;
}

PGEST_NS_END
