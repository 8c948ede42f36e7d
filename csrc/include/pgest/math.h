// exp for the row passes. Arguments are x - (running) max(row), so mostly the
// negative half-line matters. One template serves scalars (the CUDA kernels,
// the CPU walk) and vectors (the CPU chunk pass, csrc/cpu/vec.h). Contraction
// is off in every build and the fused multiply-adds are explicit (ExpOps::fma),
// so scalar and vector code round identically: the walk recomputes exactly the
// values the chunk pass summed, and AVX2, AVX-512 and CUDA agree bit for bit.
#pragma once

#include <cmath>

#include "common.h"

PGEST_NS_BEGIN

// Below this, exp(x) is under 2^-125: such an entry is 1e-38 of the row's
// largest and can never be reached by a 53-bit uniform, so it is flushed to 0
// (which also makes exp(-inf) = 0 without a special case).
constexpr float kExpFloor = -87.0f;

// What differs between a scalar and a vector F: broadcasting a constant, the
// clamp to the floor and the lanes above it, fused multiply-add, and scaling
// by 2^n for an integral-valued n (exact: every result is a normal float).
// AVX-512 does the clamp, the mask and the scaling in one instruction each
// (vec.h), where the generic vector forms take two or three.
template <class F> struct ExpOps;
template <> struct ExpOps<float> {
  using Live = bool;
  static PGEST_HD float splat(float v) { return v; }
  // x < lo ? lo : x (a NaN stays NaN)
  static PGEST_HD float clamp_low(float x, float lo) { return x < lo ? lo : x; }
  // !(x < lo): NaN is live, so it reaches the sums
  static PGEST_HD bool live(float x, float lo) { return !(x < lo); }
  static PGEST_HD float scale_live(float y, float n, bool live) {
    return live ? y * bits_float(uint32_t(int32_t(n) + 127) << 23) : 0.0f;
  }
  // a * b + c, rounded once where the hardware has FMA (AVX2, AVX-512, every
  // GPU: the same IEEE result everywhere), twice on plain x86-64.
  static PGEST_HD float fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#elif defined(__FMA__)
    return __builtin_fmaf(a, b, c);
#else
    return a * b + c;
#endif
  }
};

// exp(x), and in *clamped max(x, kExpFloor): where the result is 0 that is
// finite, so result * clamped is the entropy term e * x with the limit 0 at
// x = -inf, without a comparison of its own.
template <class F>
PGEST_HD F exp_nonpos_poly(F x, F* clamped = nullptr) {
  using O = ExpOps<F>;
  const F lo = O::splat(kExpFloor);
  const typename O::Live live = O::live(x, lo);
  const F xc = O::clamp_low(x, lo);
  if (clamped) *clamped = xc;
  // n = round(x / ln2) by the 1.5 * 2^23 trick: exact for |n| < 2^22.
  const F shift = O::splat(12582912.0f);
  const F n = O::fma(xc, O::splat(1.44269504088896341f), shift) - shift;
  // Cody-Waite split of ln2 keeps r exact in fp32.
  const F r = O::fma(n, O::splat(2.12194440e-4f), O::fma(n, O::splat(-0.693359375f), xc));
  F p = O::splat(1.9875691500e-4f);
  p = O::fma(p, r, O::splat(1.3981999507e-3f));
  p = O::fma(p, r, O::splat(8.3334519073e-3f));
  p = O::fma(p, r, O::splat(4.1665795894e-2f));
  p = O::fma(p, r, O::splat(1.6666665459e-1f));
  p = O::fma(p, r, O::splat(5.0000001201e-1f));
  const F y = O::fma(p, r * r, r) + 1.0f;
  return O::scale_live(y, n, live);
}

PGEST_HD float exp_nonpos(float x, float* clamped = nullptr) { return exp_nonpos_poly(x, clamped); }

PGEST_HD double exp_nonpos(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

PGEST_NS_END
