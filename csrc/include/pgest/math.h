// exp for the row passes. Arguments are always x - max(row) <= 0, so only the
// negative half-line matters. One template serves scalars (the CUDA kernels,
// the CPU walk) and 16-lane vectors (the CPU chunk pass, csrc/cpu/vec.h); with
// FMA contraction off in both builds they round identically, which is what
// lets the walk recompute exactly the values the chunk pass summed.
#pragma once

#include <cmath>

#include "common.h"

PGEST_NS_BEGIN

// Below this, exp(x) is under 2^-125: such an entry is 1e-38 of the row's
// largest and can never be reached by a 53-bit uniform, so it is flushed to 0
// (which also makes exp(-inf) = 0 without a special case).
constexpr float kExpFloor = -87.0f;

// What differs between a scalar and a vector F: broadcasting a constant,
// choosing by a comparison, and building 2^n from an integral-valued n.
template <class F> struct ExpOps;
template <> struct ExpOps<float> {
  static PGEST_HD float splat(float v) { return v; }
  static PGEST_HD float sel(bool c, float a, float b) { return c ? a : b; }
  static PGEST_HD float pow2(float n) { return bits_float(uint32_t(int32_t(n) + 127) << 23); }
};

template <class F>
PGEST_HD F exp_nonpos_poly(F x) {
  using O = ExpOps<F>;
  const F lo = O::splat(kExpFloor);
  const F xc = O::sel(x < lo, lo, x);
  // n = round(x / ln2) by the 1.5 * 2^23 trick: exact for |n| < 2^22.
  const F shift = O::splat(12582912.0f);
  const F n = (xc * 1.44269504088896341f + shift) - shift;
  // Cody-Waite split of ln2 keeps r exact in fp32.
  const F r = (xc - n * 0.693359375f) - n * -2.12194440e-4f;
  F p = O::splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = (p * (r * r) + r) + 1.0f;
  const F v = y * O::pow2(n);
  return O::sel(x < lo, O::splat(0.0f), v);
}

PGEST_HD float exp_nonpos(float x) { return exp_nonpos_poly(x); }

PGEST_HD double exp_nonpos(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

PGEST_NS_END
