// CPU schedule of log_prob forward and backward: threads over rows; the
// forward's row statistics come from the chunk pass of row_stats.h, the
// backward writes each row once with native vectors (vec.h).
#include <pgest/log_prob.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <type_traits>

#include "narrow_rows.h"
#include "parallel.h"
#include "row_scratch.h"
#include "truncated_row.h"
#include "zero_fill.h"

PGEST_NS_BEGIN
namespace {

// A row of an outside sampler's kept set formed in z (K entries): x / T at
// the listed ids, -inf elsewhere, the values the torch route's kept logits
// hold, so a pass over it gives that route's bits.
template <class Acc, class X>
void listed_row(X x, int64_t K, int64_t cs, const TruncationParams& p, int64_t i, Acc t, Acc* z) {
  std::fill(z, z + K, -Acc(INFINITY));
  for (int64_t j = p.kept_offsets[i]; j < p.kept_offsets[i + 1]; ++j) {
    const int64_t id = p.kept_ids[j];
    z[id] = tempered(load<Acc>(x[id * cs]), t);
  }
}

template <class T>
Status forward(const LogProbArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.logits);
  Acc* row_max = static_cast<Acc*>(a.row_max);
  Acc* log_z = static_cast<Acc*>(a.log_z);
  Acc* entropy = static_cast<Acc*>(a.entropy);
  const bool with_entropy = a.want_entropy;
  const TruncationParams& tp = a.truncation;
  const bool truncated = tp.temperature != nullptr;
  const int threads = a.stats_given ? 1 : threads_for(double(a.rows) * double(K + 16), a.num_threads);
  const ErrorInfo first = parallel_rows(a.rows, threads, [&](int64_t begin, int64_t end,
                                                            const std::atomic<int64_t>& lowest_failed) {
    ErrorInfo err;
    RowScratch<Acc> sc(a.stats_given ? 1 : K, 1, !a.stats_given && a.col_stride != 1 && !truncated);
    TruncationScratch<Acc> tsc(truncated ? K : 0);
    if (!sc.ok || !tsc.ok) { err.status = kOutOfMemory; err.row = begin; return err; }
    // A row's kept set (truncation): its statistics the sampler's (and the
    // chunk pass's over the kept logits), its actions read through the set's
    // view; an action outside the set has no probability, an error after the
    // range check.
    auto scored = [&](int64_t i, auto view, const RowStats<Acc>& rs) {
      for (int64_t s = 0; s < S; ++s) {
        const int64_t act = a.actions[i * S + s];
        if (!is_ignored(a, act) && !(view[act] > -Acc(INFINITY))) {
          err.col = s; err.index = act;
          return kActionOutsideKept;
        }
      }
      store_row_stats(rs, with_entropy, i, row_max, log_z, entropy);
      write_log_probs(a, i, view, 1, row_max[i], log_z[i], entropy[i]);
      return kOk;
    };
    auto kept_row = [&](int64_t i) {
      const T* x = base + i * a.row_stride;
      const double temperature = tp.temperature[i * tp.temperature_stride];
      if (tp.kept_ids && temperature != 0.0) {  // an outside sampler's set, formed in scratch
        listed_row(x, K, a.col_stride, tp, i, Acc(temperature), tsc.z);
        const Acc* z = tsc.z;
        const RowStats<Acc> rs = row_stats<true>(z, K, sc.weights, sc.chunk_max, sc.e);
        if (tp.threshold) static_cast<Acc*>(tp.threshold)[i] = -Acc(INFINITY);  // not read again
        const Status bad = row_status(rs, z, err);
        return bad ? bad : scored(i, z, rs);
      }
      KeptRow<T, Acc> kr;
      const Status st = truncate_row<T, Acc>(x, K, a.col_stride, tp, i, tsc, sc, kr, err);
      if (st != kOk) return st;
      return kr.z ? scored(i, KeptView<Acc, Acc>{kr.z, kr.cut}, kr.stats)
                  : scored(i, KeptView<T, Acc>{kr.x, kr.cut}, kr.stats);
    };
    NarrowGroup<Acc> g;
    // Rows of <= kLanes entries W at a time; a group with a padding row or a
    // bad action goes row by row (which handles and reports them).
    auto group = [&](int64_t i0) {
      for (int l = 0; l < NarrowGroup<Acc>::W; ++l) {
        int64_t live;
        ErrorInfo scratch;
        if (check_row_actions(a, i0 + l, live, scratch) != kOk || (S > 0 && live == 0)) return false;
      }
      if (!narrow_stats(base, i0, a.row_stride, int(K), g)) return false;
      for (int l = 0; l < NarrowGroup<Acc>::W; ++l) {
        const int64_t i = i0 + l;
        store_row_stats(narrow_row_stats(g, l), with_entropy, i, row_max, log_z, entropy);
        write_log_probs<T, Acc>(a, i, base + i * a.row_stride, row_max[i], log_z[i], entropy[i]);
      }
      return true;
    };
    auto row = [&](int64_t i) {
      int64_t live;
      Status st = check_row_actions(a, i, live, err);
      if (st == kOk && S > 0 && live == 0) {  // a row of padding: not read, contributes nothing
        if (!a.stats_given) { row_max[i] = Acc(0); log_z[i] = Acc(0); entropy[i] = Acc(0); }
        if (tp.threshold) static_cast<Acc*>(tp.threshold)[i] = Acc(0);
        write_log_probs<T, Acc>(a, i, base + i * a.row_stride, Acc(0), Acc(0), Acc(0));
        return kOk;
      }
      if (st == kOk && truncated) {
        if ((st = kept_row(i)) != kOk) { err.status = st; err.row = i; }
        return st;
      }
      if (st == kOk && !a.stats_given) {
        st = with_row(base, i, a.row_stride, a.col_stride, K, sc, [&](const auto* x) {
          const RowStats<Acc> rs = with_entropy
              ? row_stats<true>(x, K, sc.weights, sc.chunk_max, sc.e)
              : row_stats<false>(x, K, sc.weights, sc.chunk_max, sc.e);
          if (const Status bad = row_status(rs, x, err)) return bad;
          store_row_stats(rs, with_entropy, i, row_max, log_z, entropy);
          return kOk;
        });
      }
      if (st != kOk) { err.status = st; err.row = i; return st; }
      write_log_probs<T, Acc>(a, i, base + i * a.row_stride, row_max[i], log_z[i], entropy[i]);
      return kOk;
    };
    narrow_or_rows<NarrowGroup<Acc>::W>(!a.stats_given && !truncated && narrow_rows(K, a.col_stride), begin, end,
                                        lowest_failed, group, row);
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

// grad_dense (log_prob.h) on a vector of entries: row constants splatted
// for one row, or lane-wise for W rows (narrow_rows.h). The same operations
// in the same order as the scalar form, so either gives the same bits.
// kEntropyTerm false, for a row with gamma = 0 and alpha != 0: there
// alpha + 0 * (d + H) is alpha exactly, so its two operations (a multiply
// among them: the exponential already keeps the multipliers busy) drop out.
template <bool kEntropyTerm = true, class V>
inline V grad_dense_vec(V x, V row_max, V log_z, V entropy, V alpha, V gamma) {
  const V d = (x - row_max) - log_z;
  const V p = exp_nonpos(d);
  if constexpr (kEntropyTerm) return select(p > V{}, p * (alpha + gamma * (d + entropy)), V{});
  else return select(p > V{}, p * alpha, V{});
}

// One row of the gradient: the dense part for every entry, then the sampled
// entries rewritten with their one-hot terms added before the single
// rounding to T.
// x: a pointer, or a truncated row's kept view (then kScaled, and `scale` is
// d z / d x: a compile-time choice, so the untruncated pass has no multiply).
template <class T, class Acc, bool kScaled = false, class X>
void backward_row(const LogProbArgs& a, int64_t i, X x, T* g, bool streaming, int64_t* order, Acc scale = Acc(1)) {
  using V = typename Vec<Acc>::type;
  constexpr int W = Vec<Acc>::width;
  const int64_t K = a.cols;
  GradRow<Acc> r = grad_row<Acc>(a, i);
  r.scale = scale;
  int64_t k = 0;
  const V vm = splat<V>(r.row_max), vz = splat<V>(r.log_z), va = splat<V>(r.alpha), vg = splat<V>(r.gamma),
          vh = splat<V>(r.entropy), vs = splat<V>(scale);
  auto dense_of = [&](V xv, auto entropy_term) {
    const V v = grad_dense_vec<decltype(entropy_term)::value>(xv, vm, vz, vh, va, vg);
    if constexpr (kScaled) return v * vs;
    else return v;
  };
  auto scalar = [&](int64_t at) {
    if constexpr (kScaled) g[at] = store<T>(grad_dense(load<Acc>(x[at]), r) * scale);
    else g[at] = store<T>(grad_dense(load<Acc>(x[at]), r));
  };
  auto vectors = [&](auto entropy_term) {
    auto dense = [&](int64_t at) { return dense_of(loadv(x + at), entropy_term); };
    if constexpr (kStreamable<T>) {  // fp16 has no streaming store
      if (streaming) {
        // Scalar up to the first vector-aligned entry, then whole aligned vectors.
        for (; k < K && reinterpret_cast<uintptr_t>(g + k) % (W * sizeof(T)) != 0; ++k) scalar(k);
        for (; k + W <= K; k += W) stream_storev(g + k, dense(k));
        stream_fence();
        return;
      }
    }
    for (; k + W <= K; k += W) storev(g + k, dense(k));
  };
  if (r.gamma == Acc(0) && r.alpha != Acc(0)) vectors(std::false_type{});
  else vectors(std::true_type{});
  if (k < K) {
    // The last K - k < W entries as one vector padded with -inf (p = 0
    // there), not a scalar exp each: the same numbers, a fraction of the
    // time at the K of classic RL (K = 100: 4 of every 100 entries).
    Acc in[W], out[W];
    const int n = int(K - k);
    for (int j = 0; j < W; ++j) in[j] = j < n ? load<Acc>(x[k + j]) : -Acc(INFINITY);
    storev(out, dense_of(loadv(in), std::true_type{}));
    for (int j = 0; j < n; ++j) g[k + j] = store<T>(out[j]);
  }

  grad_one_hot(a, i, x, 1, r, g, order);
}

template <class T>
Status backward(const LogProbArgs& a, ErrorInfo* out_err) {
  using Acc = typename AccOf<T>::type;
  const int64_t K = a.cols, S = a.num_samples;
  const T* base = static_cast<const T*>(a.logits);
  T* grad = static_cast<T*>(a.grad);
  const TruncationParams& tp = a.truncation;
  const bool truncated = tp.temperature != nullptr;
  const int threads = threads_for(double(a.rows) * double(K + 16), a.num_threads);
  const bool streaming = double(a.rows) * double(K) * sizeof(T) > double(kStreamingBytes);
  const ErrorInfo first = parallel_rows(a.rows, threads, [&](int64_t begin, int64_t end,
                                                            const std::atomic<int64_t>& lowest_failed) {
    ErrorInfo err;
    RowScratch<Acc> sc(K, S, a.col_stride != 1);
    if (!sc.ok) { err.status = kOutOfMemory; err.row = begin; return err; }
    // a row's kept logits formed in scratch: a greedy row's, or an outside sampler's set
    const std::unique_ptr<Acc, decltype(&std::free)> formed(
        truncated ? static_cast<Acc*>(std::malloc(sizeof(Acc) * size_t(K))) : nullptr, &std::free);
    if (truncated && !formed) { err.status = kOutOfMemory; err.row = begin; return err; }
    NarrowGroup<Acc> ng;
    auto group = [&](int64_t i0) {
      constexpr int W = NarrowGroup<Acc>::W;
      using V = typename Vec<Acc>::type;
      GradRow<Acc> r[W];
      Acc cols[5][W];  // the rows' constants, lane-wise: max, log Z, H, alpha, gamma
      for (int l = 0; l < W; ++l) {
        int64_t live;
        ErrorInfo scratch;
        if (check_row_actions(a, i0 + l, live, scratch, backward_bound(a)) != kOk || (S > 0 && live == 0))
          return false;
        r[l] = grad_row<Acc>(a, i0 + l);
        cols[0][l] = r[l].row_max; cols[1][l] = r[l].log_z; cols[2][l] = r[l].entropy;
        cols[3][l] = r[l].alpha; cols[4][l] = r[l].gamma;
      }
      for (int l = 0; l < W; ++l) {
        const T* row = base + (i0 + l) * a.row_stride;
        for (int j = 0; j < int(K); ++j) ng.x[j][l] = load<Acc>(row[j]);
      }
      const V vm = loadv(cols[0]), vz = loadv(cols[1]), vh = loadv(cols[2]), va = loadv(cols[3]),
              vg = loadv(cols[4]);
      for (int j = 0; j < int(K); ++j) storev(ng.e[j], grad_dense_vec(loadv(ng.x[j]), vm, vz, vh, va, vg));
      for (int l = 0; l < W; ++l) {
        const int64_t i = i0 + l;
        T* g = grad + i * K;
        for (int j = 0; j < int(K); ++j) g[j] = store<T>(ng.e[j][l]);
        grad_one_hot(a, i, base + i * a.row_stride, 1, r[l], g, sc.order);
      }
      return true;
    };
    auto row = [&](int64_t i) {
      T* g = grad + i * K;
      int64_t live;
      if (const Status st = check_row_actions(a, i, live, err, backward_bound(a))) {
        err.status = st; err.row = i; return st;
      }
      if (S > 0 && live == 0) {
        std::memset(static_cast<void*>(g), 0, sizeof(T) * size_t(K));
        return kOk;
      }
      with_row(base, i, a.row_stride, a.col_stride, K, sc, [&](const auto* x) {
        if (!truncated) {
          backward_row<T, Acc>(a, i, x, g, streaming, sc.order);
          return 0;
        }
        // The kept logits read through a view (the forward's threshold:
        // its smallest kept z), and the gradient times d z / d x = Acc(1 / T),
        // as autograd takes it through the stored kept logits, bit for bit.
        const double temperature = tp.temperature[i * tp.temperature_stride];
        const Acc cut = static_cast<const Acc*>(tp.given_threshold)[i];
        if (temperature == 0.0) {
          // greedy: z is 0 at the first maximum, -inf elsewhere, and does not depend on x
          int64_t at = 0;
          while (at + 1 < K && !(load<Acc>(x[at]) == cut)) ++at;
          std::fill(formed.get(), formed.get() + K, -Acc(INFINITY));
          formed.get()[at] = Acc(0);
          backward_row<T, Acc, true>(a, i, static_cast<const Acc*>(formed.get()), g, streaming, sc.order, Acc(0));
        } else if (tp.kept_ids) {
          listed_row(x, K, 1, tp, i, Acc(temperature), formed.get());
          backward_row<T, Acc, true>(a, i, static_cast<const Acc*>(formed.get()), g, streaming, sc.order,
                                     Acc(1.0 / temperature));
        } else {
          using X = std::remove_cv_t<std::remove_pointer_t<decltype(x)>>;
          if (temperature == 1.0)  // x / 1 is x: no division
            backward_row<T, Acc>(a, i, KeptView<X, Acc>{x, cut}, g, streaming, sc.order);
          else
            backward_row<T, Acc, true>(a, i, KeptView<X, Acc, true>{x, cut, Acc(temperature)}, g, streaming,
                                       sc.order, Acc(1.0 / temperature));
        }
        return 0;
      });
      return kOk;
    };
    narrow_or_rows<NarrowGroup<Acc>::W>(!truncated && a.total_cols == 0 && narrow_rows(K, a.col_stride), begin, end,
                                        lowest_failed, group, row);
    return err;
  });
  if (first.status != kOk) { *out_err = first; return Status(first.status); }
  return kOk;
}

}  // namespace

Status log_prob_forward_cpu(const LogProbArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return forward<typename decltype(t)::type>(a, err); });
}

Status log_prob_backward_cpu(const LogProbArgs& a, ErrorInfo* err) {
  if (a.rows == 0) return kOk;
  return dispatch_float(a.dtype, [&](auto t) { return backward<typename decltype(t)::type>(a, err); });
}

PGEST_NS_END
