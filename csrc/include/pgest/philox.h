// Counter-based Philox4x32-10 (Salmon et al., SC'11). A draw is a pure
// function of (seed, offset, row, sample): no state is carried between rows,
// so the result cannot depend on threads, batch splits or the device.
#pragma once

#include "common.h"

PGEST_NS_BEGIN

struct Philox4 { uint32_t x[4]; };

PGEST_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = uint64_t(a) * uint64_t(b);
  hi = uint32_t(p >> 32);
  lo = uint32_t(p);
}

PGEST_HD Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
  constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;
  constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    if (round > 0) { k0 += kW0; k1 += kW1; }
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kM0, ctr.x[0], hi0, lo0);
    mulhilo32(kM1, ctr.x[2], hi1, lo1);
    ctr = Philox4{{hi1 ^ ctr.x[1] ^ k0, lo1, hi0 ^ ctr.x[3] ^ k1, lo0}};
  }
  return ctr;
}

// 53 random bits -> a double in [0, 1). Strictly below 1, so a threshold u * Z
// always falls inside a row's total mass Z.
PGEST_HD double uniform53(uint32_t a, uint32_t b) {
  return double((uint64_t(a >> 5) << 26) | uint64_t(b >> 6)) * (1.0 / 9007199254740992.0);
}

// The uniform behind sample `s` of row `row`. One Philox block serves two
// samples, so a call that draws S samples per row consumes ceil(S / 2) offsets.
PGEST_HD double philox_uniform(uint64_t seed, uint64_t offset, int64_t row, int64_t s) {
  const uint64_t c = offset + uint64_t(s >> 1);
  const Philox4 r = philox4x32_10(
      Philox4{{uint32_t(uint64_t(row)), uint32_t(uint64_t(row) >> 32), uint32_t(c), uint32_t(c >> 32)}},
      uint32_t(seed), uint32_t(seed >> 32));
  return (s & 1) ? uniform53(r.x[2], r.x[3]) : uniform53(r.x[0], r.x[1]);
}

// The uniform of sample s of a row: `given` (R, S) when the caller supplies
// them (the fused linear head places a draw inside one vocabulary tile), else
// Philox as above. A given value is the caller's arithmetic: one outside
// [0, 1) (NaN included) would walk past the row's end, so it is pinned to
// Philox's range, the largest value below 1 being 1 - 2^-53.
PGEST_HD double draw_uniform(const double* given, uint64_t seed, uint64_t offset, int64_t row, int64_t S,
                             int64_t s) {
  if (!given) return philox_uniform(seed, offset, row, s);
  const double u = given[row * S + s];
  return u >= 0.0 ? (u < 1.0 ? u : 1.0 - 0x1p-53) : 0.0;
}

PGEST_HD uint64_t philox_offsets_per_call(int64_t num_samples) { return uint64_t(num_samples + 1) / 2; }

PGEST_NS_END
