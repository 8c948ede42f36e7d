// The CUDA schedule of sampler.h: one block per row. The row is read once, in
// tiles of kThreads * kPerThread entries held in registers: a block max, then
// exp(x - running max) summed by a block reduction; each tile keeps (running
// max, sum) in shared memory, as the CPU keeps its chunks. A draw places
// t = u * Z on the prefix of the rescaled tile weights (Z is that prefix's
// last entry, so t < Z lands in a tile), then a block-wide scan over the tile
// finds the entry. Entries at -inf (e = 0) can never be chosen.
#pragma once

#include <cub/block/block_scan.cuh>

#include <pgest/dtype.h>
#include <pgest/math.h>
#include <pgest/philox.h>
#include <pgest/sampler.h>

#include "common.cuh"

namespace pgest {
namespace cuda {

constexpr int kPerThread = 8;
constexpr int64_t kBaseTile = int64_t(kThreads) * kPerThread;
constexpr int kMaxTiles = 1024;  // 3 arrays of fp64 stay within 48 KiB of static shared memory

// Tile length for a row of `cols`: the base tile, or longer so that a row never
// needs more than kMaxTiles of shared memory.
inline int64_t tile_length(int64_t cols) {
  int64_t tile = kBaseTile;
  while ((cols + tile - 1) / tile > kMaxTiles) tile *= 2;
  return tile;
}

template <class Acc>
struct BlockRow {
  Acc* tile_w;    // kMaxTiles: tile sums, then their prefix relative to the row max
  Acc* tile_m;    // kMaxTiles: running max at each tile
  Acc* tile_dot;  // kMaxTiles: entropy terms
  Acc* red;       // kWarps: reduction scratch
};

template <class Acc>
struct DevRowStats {
  Acc max, z, ex_dot;
  int64_t bad_col;  // NaN/+inf column, or -1
  int64_t ntiles;
};

// Statistics of one row; on return tile_w holds the prefix sums of the tile
// weights relative to the row max (block-uniform results in every thread).
template <bool kWithEntropy, class T, class Acc>
__device__ DevRowStats<Acc> block_row_stats(const T* x, int64_t cols, int64_t cs, int64_t tile,
                                            BlockRow<Acc> sm, int* flag) {
  const Acc kInf = Acc(INFINITY);
  const int64_t nt = (cols + tile - 1) / tile;
  Acc m = -kInf;
  if (threadIdx.x == 0) *flag = INT32_MAX;
  __syncthreads();
  for (int64_t t = 0; t < nt; ++t) {
    // The tile, a sub-tile of kBaseTile at a time (tiles are longer only for huge rows).
    Acc sum = 0, dot = 0, m_new = m;
    for (int64_t sub = t * tile; sub < min(cols, (t + 1) * tile); sub += kBaseTile) {
      Acc v[kPerThread];
      Acc lm = -kInf;
      for (int j = 0; j < kPerThread; ++j) {
        const int64_t k = sub + int64_t(j) * kThreads + threadIdx.x;
        v[j] = k < cols ? load<Acc>(x[k * cs]) : -kInf;
        if (!(v[j] < kInf) && k < cols) atomicMin(flag, int(k < INT32_MAX - 1 ? k : INT32_MAX - 1));
        lm = v[j] > lm ? v[j] : lm;
      }
      const Acc bm = block_max(lm, sm.red);
      if (bm > m_new) {  // rescale what this tile summed so far
        const Acc s = m_new == -kInf ? Acc(0) : exp_nonpos(m_new - bm);
        if (kWithEntropy) dot = s * (dot + sum * (m_new - bm));
        sum *= s;
        m_new = bm;
      }
      if (m_new == -kInf) continue;
      Acc ls = 0, ld = 0;
      for (int j = 0; j < kPerThread; ++j) {
        const Acc d = v[j] - m_new;
        const Acc e = exp_nonpos(d);
        ls += e;
        if (kWithEntropy) ld += e > Acc(0) ? e * d : Acc(0);
      }
      sum += block_sum(ls, sm.red);
      if (kWithEntropy) dot += block_sum(ld, sm.red);
    }
    if (threadIdx.x == 0) { sm.tile_w[t] = sum; sm.tile_m[t] = m_new; sm.tile_dot[t] = dot; }
    m = m_new;
  }
  __syncthreads();
  DevRowStats<Acc> r{m, Acc(0), Acc(0), *flag == INT32_MAX ? -1 : int64_t(*flag), nt};
  if (r.bad_col >= 0 || m == -kInf) return r;
  if (threadIdx.x == 0) {
    // Rescale to the row max and form the prefix, in tile order.
    Acc z = 0, dot = 0;
    for (int64_t t = 0; t < nt; ++t) {
      const Acc d = sm.tile_m[t] - m;
      const Acc s = sm.tile_m[t] == -kInf ? Acc(0) : exp_nonpos(d);
      const Acc w = sm.tile_w[t] * s;
      if (kWithEntropy && s > Acc(0)) dot += s * sm.tile_dot[t] + w * d;
      z += w;
      sm.tile_w[t] = z;
    }
    sm.red[0] = z;
    sm.red[1] = dot;
  }
  __syncthreads();
  r.z = sm.red[0];
  r.ex_dot = sm.red[1];
  __syncthreads();
  return r;
}

struct DrawShared {
  typename cub::BlockScan<double, kThreads>::TempStorage scan;
  double t, before, tile_end;
  int64_t tile, found, last_live;
};

// Draw S samples of one row into actions[0..S) (written by thread 0).
template <class T, class Acc>
__device__ void block_draw(const T* x, int64_t cols, int64_t cs, int64_t tile, const DevRowStats<Acc>& st,
                           const Acc* prefix, uint64_t seed, uint64_t offset, int64_t row, int64_t S,
                           int64_t* actions, DrawShared& sh, const double* given = nullptr) {
  for (int64_t s = 0; s < S; ++s) {
    if (threadIdx.x == 0) {
      const double t = draw_uniform(given, seed, offset, row, S, s) * double(st.z);
      int64_t lo = 0, hi = st.ntiles - 1;  // first tile whose prefix exceeds t
      while (lo < hi) {
        const int64_t mid = (lo + hi) / 2;
        if (t < double(prefix[mid])) hi = mid; else lo = mid + 1;
      }
      sh.t = t;
      sh.tile = lo;
      sh.before = lo > 0 ? double(prefix[lo - 1]) : 0.0;
      sh.tile_end = double(prefix[lo]);
      sh.found = -1;
      sh.last_live = -1;
    }
    __syncthreads();
    const int64_t begin = sh.tile * tile, len = min(tile, cols - begin);
    const int64_t per = (len + kThreads - 1) / kThreads;
    const int64_t a = begin + threadIdx.x * per, b = min(begin + len, a + per);
    double seg = 0.0;
    int64_t live = -1;
    for (int64_t k = a; k < b; ++k) {
      const Acc e = exp_nonpos(load<Acc>(x[k * cs]) - st.max);
      seg += double(e);
      if (e > Acc(0)) live = k;
    }
    double excl, walked;
    cub::BlockScan<double, kThreads>(sh.scan).ExclusiveSum(seg, excl, walked);
    const double w0 = sh.before + excl;
    auto walk_to = [&](double t) {
      if (t >= w0 && t < w0 + seg) {
        double w = w0;
        for (int64_t k = a; k < b; ++k) {
          w += double(exp_nonpos(load<Acc>(x[k * cs]) - st.max));
          if (t < w) { sh.found = k; break; }
        }
      }
    };
    walk_to(sh.t);
    if (live >= 0) atomicMax(reinterpret_cast<long long*>(&sh.last_live), static_cast<long long>(live));
    __syncthreads();
    // The scan's sum and the tile weight may differ in the last bits: a
    // threshold caught between them is mapped to the same fraction of the
    // scan and placed again, in proportion to the masses (sampler.h's
    // place_in_gap), not handed whole to one entry.
    if (sh.found < 0 && walked > 0.0) {
      walked += sh.before;
      walk_to(sh.before + (sh.t - walked) / (sh.tile_end - walked) * (walked - sh.before));
      __syncthreads();
    }
    // a target rounded up to the scan's total: the tile's last live entry
    if (threadIdx.x == 0) actions[s] = sh.found >= 0 ? sh.found : sh.last_live;
    __syncthreads();
  }
}

}  // namespace cuda
}  // namespace pgest
