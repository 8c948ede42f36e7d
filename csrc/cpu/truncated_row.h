// The kept set of one row on the CPU (definitions in truncation.h): the row
// is read once, tempered into per-thread scratch, and every later pass (the
// selections, the mask, then the sampler's own passes) runs on that scratch,
// which stays in cache at vocabulary sizes. No pass sorts the row: top-k and
// top-p first estimate their boundary from a strided sample of about 1024
// entries, check the estimate in one vector pass, and select exactly among
// the entries between the two checked bounds; a failed check falls back to
// selection over the whole row.
#pragma once

#include <pgest/sampler.h>
#include <pgest/truncation.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <utility>

#include "vec.h"

PGEST_NS_BEGIN

template <class Acc>
struct TruncationScratch {
  Acc* z = nullptr;     // the tempered row; after truncate_row, -inf outside its kept set
  Acc* e = nullptr;     // exp(z - max)
  Entry<Acc>* work = nullptr;  // the selections' candidates
  bool ok = false;
  explicit TruncationScratch(int64_t cols) {
    const size_t n = size_t(cols > 0 ? cols : 1);
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

constexpr int kSample = 1024;  // entries in the strided sample
constexpr int kMargin = 8;     // sample ranks either side of the estimated boundary

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

template <class V>
inline double lane_sum(V v, int width) {
  double s = 0.0;
  for (int l = 0; l < width; ++l) s += double(v[l]);
  return s;
}

// Sums of e over z > bound for up to kBounds bounds in one vector pass:
// lanes per chunk of kChunk entries, chunks added in double.
constexpr int kBounds = 4;

template <class Acc>
inline void mass_above(const Acc* z, const Acc* e, int64_t K, const Acc* bounds, int nb, double* out) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  V vb[kBounds];
  for (int b = 0; b < kBounds; ++b) vb[b] = splat<V>(bounds[b < nb ? b : nb - 1]);
  for (int b = 0; b < nb; ++b) out[b] = 0.0;
  const V zero{};
  int64_t k = 0;
  for (; k + kChunk <= K; k += kChunk) {
    V s[kBounds] = {};
    for (int j = 0; j < kChunk; j += W) {
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
    bool any = false;
    for (int l = 0; l < W; ++l) any |= in[l] != 0;
    if (!any) continue;
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

// The k-th largest of the `live` finite entries of z (0 < k < live): its
// boundary estimated from the strided sample (twice the expected rank, so the
// check rarely fails), then an exact selection among the entries above.
template <class Acc>
inline Acc kth_largest(const Acc* z, const Acc* e, int64_t K, int64_t k, int64_t live, Entry<Acc>* work) {
  const auto desc = [](const Entry<Acc>& l, const Entry<Acc>& r) { return l.z > r.z; };
  const Acc inf = Acc(INFINITY);
  if (k * 8 < live) {
    const int64_t stride = std::max<int64_t>(1, K / kSample);
    int64_t n = 0;
    for (int64_t j = 0; j < K; j += stride)
      if (z[j] > -inf) work[n++] = Entry<Acc>{z[j], Acc(0)};
    if (n > 0) {
      const int64_t r = std::min<int64_t>(n, 2 * k * n / live + kMargin);
      std::nth_element(work, work + (r - 1), work + n, desc);
      const Acc v = work[r - 1].z;
      const int64_t c = gather_between(z, e, K, std::nextafter(v, -inf), inf, work);
      if (c >= k) {
        std::nth_element(work, work + (k - 1), work + c, desc);
        return work[k - 1].z;
      }
    }
  }
  const int64_t n = gather_between(z, e, K, -inf, inf, work);
  std::nth_element(work, work + (k - 1), work + n, desc);
  return work[k - 1].z;
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
  // rank r stands for the sample value s[r] (-1: +inf, n: -inf)
  auto value = [&](int r) { return r < 0 ? inf : (r >= n ? -inf : s[r].first); };
  int a = -1, b = n;
  double mass_a = 0.0;
  // the first probes around the sample's own estimate of the boundary
  double sample_total = 0.0;
  for (int j = 0; j < n; ++j) sample_total += double(s[j].second);
  const double goal = target / total * sample_total;
  int idx = 0;
  for (double c = 0.0; idx < n - 1; ++idx) {
    c += double(s[idx].second);
    if (c >= goal) break;
  }
  for (int pass = 0; b - a > 1 && pass < 12; ++pass) {
    int probes[kBounds];
    int np = 0;
    if (pass == 0) {
      for (int r : {idx - 2 * kMargin, idx - kMargin / 2, idx + kMargin / 2, idx + 2 * kMargin})
        if (r > a && r < b && (np == 0 || r > probes[np - 1])) probes[np++] = r;
    }
    if (np == 0) {
      for (int q = 1; q <= kBounds; ++q) {
        const int r = a + int(int64_t(b - a) * q / (kBounds + 1));
        if (r > a && r < b && (np == 0 || r > probes[np - 1])) probes[np++] = r;
      }
    }
    if (np == 0) break;
    Acc bounds[kBounds];
    double mass[kBounds];
    for (int q = 0; q < np; ++q) bounds[q] = value(probes[q]);
    mass_above(z, e, K, bounds, np, mass);
    for (int q = 0; q < np; ++q) {
      if (mass[q] < target) { a = probes[q]; mass_a = mass[q]; }
      else { b = probes[q]; break; }
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
  Acc* z = sc.z;
  // The one read of the row: tempered, its maximum, any NaN or +inf.
  V vmax = splat<V>(-inf), vlive{};
  bool bad = false;
  int64_t k = 0;
  if (cs == 1) {
    using M = typename Vec<Acc>::mask;
    const V vt = splat<V>(t), one = splat<V>(Acc(1)), zero{};
    M vbad{};
    for (; k + W <= K; k += W) {
      const V v = loadv(x + k);
      const V zv = greedy ? v : v / vt;
      storev(z + k, zv);
      vbad |= (zv != zv) | (zv == splat<V>(inf));
      vmax = select(zv > vmax, zv, vmax);
      vlive += select(zv > splat<V>(-inf), one, zero);
    }
    for (int l = 0; l < W; ++l) bad |= vbad[l] != 0;
  }
  Acc max = trunc_detail::lane_max<V, Acc>(vmax);
  int64_t live = int64_t(trunc_detail::lane_sum(vlive, W));
  for (; k < K; ++k) {
    const Acc v = load<Acc>(x[k * cs]);
    const Acc zv = greedy ? v : tempered(v, t);
    z[k] = zv;
    bad |= std::isnan(zv) || zv == inf;
    max = std::max(max, zv);
    live += zv > -inf;
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
    if (p.kept_logits) std::copy(z, z + K, static_cast<Acc*>(p.kept_logits) + i * K);
    return kOk;
  }
  const bool given = p.given_threshold != nullptr;
  double total = 0.0;
  if (given) {
    cut = static_cast<const Acc*>(p.given_threshold)[i];
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
    const int64_t top_k = p.top_k ? p.top_k[i * p.top_k_stride] : 0;
    const double top_p = p.top_p ? p.top_p[i * p.top_p_stride] : 1.0;
    const double min_p = p.min_p ? p.min_p[i * p.min_p_stride] : 0.0;
    const bool by_k = top_k > 0 && top_k < live;
    if (by_k) cut = trunc_detail::kth_largest(z, sc.e, K, top_k, live, sc.work);
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
  Acc smallest = inf;
  double mass = 0.0;
  {
    const V vc = splat<V>(cut), ninf = splat<V>(-inf), vinf = splat<V>(inf), one = splat<V>(Acc(1)), zero{};
    V vmin = vinf, vkept{};
    int64_t j = 0;
    for (; j + kChunk <= K; j += kChunk) {
      V s{};
      for (int l = 0; l < kChunk; l += W) {
        const V zv = loadv(z + j + l);
        const auto keep = (zv >= vc) & (zv > ninf);
        storev(z + j + l, select(keep, zv, ninf));
        vmin = select(keep, select(zv < vmin, zv, vmin), vmin);
        vkept += select(keep, one, zero);
        if (!given) s += select(keep, loadv(sc.e + j + l), zero);
      }
      mass += trunc_detail::lane_sum(s, W);
    }
    smallest = trunc_detail::lane_min<V, Acc>(vmin);
    kept = int64_t(trunc_detail::lane_sum(vkept, W));
    for (; j < K; ++j) {
      if (z[j] >= cut && z[j] > -inf) {
        ++kept;
        smallest = std::min(smallest, z[j]);
        if (!given) mass += double(sc.e[j]);
      } else {
        z[j] = -inf;
      }
    }
  }
  if (!given) kept_mass = mass / total;
  if (p.threshold) static_cast<Acc*>(p.threshold)[i] = smallest;
  if (p.kept) p.kept[i] = kept;
  if (p.kept_mass) p.kept_mass[i] = kept_mass;
  if (p.kept_logits) std::copy(z, z + K, static_cast<Acc*>(p.kept_logits) + i * K);
  return kept > 0 ? kOk : kAllNegInf;
}

PGEST_NS_END
