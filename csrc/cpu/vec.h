// Native-width vectors for the CPU row passes (GCC/Clang vector extensions):
// 16 floats on AVX-512, 8 on AVX2, 4 on plain x86-64. The passes keep 16
// logical lanes as kLanes / width native vectors, so the reduction order is the
// same for every instruction set.
#pragma once

#include <pgest/dtype.h>
#include <pgest/math.h>

#include <cstring>

#if defined(__SSE2__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define PGEST_VEC_BYTES 64
#elif defined(__AVX2__)
#define PGEST_VEC_BYTES 32
#else
#define PGEST_VEC_BYTES 16
#endif

PGEST_NS_BEGIN

typedef float vf32 __attribute__((vector_size(PGEST_VEC_BYTES)));
typedef int32_t vi32 __attribute__((vector_size(PGEST_VEC_BYTES)));
typedef uint32_t vu32 __attribute__((vector_size(PGEST_VEC_BYTES)));
typedef uint16_t vu16 __attribute__((vector_size(PGEST_VEC_BYTES / 2)));
typedef double vf64 __attribute__((vector_size(PGEST_VEC_BYTES)));
typedef int64_t vi64 __attribute__((vector_size(PGEST_VEC_BYTES)));

template <class Acc> struct Vec;
template <> struct Vec<float> {
  using type = vf32;
  using mask = vi32;
  static constexpr int width = PGEST_VEC_BYTES / 4;
};
template <> struct Vec<double> {
  using type = vf64;
  using mask = vi64;
  static constexpr int width = PGEST_VEC_BYTES / 8;
};

template <class V, class S> PGEST_HD V splat(S s) { return V{} + s; }

// mask ? a : b lane-wise (a blend, or a masked move on AVX-512).
template <class M, class V> PGEST_HD V select(M mask, V a, V b) { return mask ? a : b; }

#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
// GCC 12 warns from inside its own intrinsic headers (an undefined passthrough).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

template <> struct ExpOps<vf32> {
  static PGEST_HD vf32 splat(float v) { return vf32{} + v; }
#if defined(__AVX512F__)
  using Live = __mmask16;
  // vmaxps(lo, x) is lo > x ? lo : x: a NaN x stays, as in the scalar clamp
  static PGEST_HD vf32 clamp_low(vf32 x, vf32 lo) {
    return reinterpret_cast<vf32>(_mm512_max_ps(reinterpret_cast<__m512>(lo), reinterpret_cast<__m512>(x)));
  }
  static PGEST_HD Live live(vf32 x, vf32 lo) {
    return _mm512_cmp_ps_mask(reinterpret_cast<__m512>(x), reinterpret_cast<__m512>(lo), _CMP_NLT_UQ);
  }
  // y * 2^n, exact as the scalar product (normal results only), 0 off the mask
  static PGEST_HD vf32 scale_live(vf32 y, vf32 n, Live live) {
    return reinterpret_cast<vf32>(
        _mm512_maskz_scalef_ps(live, reinterpret_cast<__m512>(y), reinterpret_cast<__m512>(n)));
  }
#else
  using Live = vi32;
  static PGEST_HD vf32 clamp_low(vf32 x, vf32 lo) { return select(x < lo, lo, x); }
  static PGEST_HD Live live(vf32 x, vf32 lo) { return ~(x < lo); }
  static PGEST_HD vf32 scale_live(vf32 y, vf32 n, Live live) {
    const vi32 e = __builtin_convertvector(n, vi32) + 127;
    return select(live, y * reinterpret_cast<vf32>(e << 23), vf32{});
  }
#endif
  static PGEST_HD vf32 fma(vf32 a, vf32 b, vf32 c) {
#if defined(__AVX512F__)
    return reinterpret_cast<vf32>(_mm512_fmadd_ps(reinterpret_cast<__m512>(a), reinterpret_cast<__m512>(b),
                                                  reinterpret_cast<__m512>(c)));
#elif defined(__FMA__)
    return reinterpret_cast<vf32>(_mm256_fmadd_ps(reinterpret_cast<__m256>(a), reinterpret_cast<__m256>(b),
                                                  reinterpret_cast<__m256>(c)));
#else
    return a * b + c;
#endif
  }
};

PGEST_HD vf32 exp_nonpos(vf32 x, vf32* clamped = nullptr) { return exp_nonpos_poly(x, clamped); }

// *clamped: x where the result is positive, else 0 (the float version's
// contract: result * clamped is the entropy term with its limit at -inf).
PGEST_HD vf64 exp_nonpos(vf64 x, vf64* clamped = nullptr) {
  vf64 r{};
  for (int l = 0; l < Vec<double>::width; ++l) r[l] = exp_nonpos(double(x[l]));
  if (clamped) *clamped = select(r > 0.0, x, vf64{});
  return r;
}

PGEST_HD vf32 loadv(const float* p) { vf32 v; std::memcpy(&v, p, sizeof v); return v; }
PGEST_HD vf64 loadv(const double* p) { vf64 v; std::memcpy(&v, p, sizeof v); return v; }

PGEST_HD vf32 loadv(const bf16_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
#if defined(__AVX512F__)
  // One vpmovzxwd, where the generic conversion splits the vector in two.
  return reinterpret_cast<vf32>(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(h)), 16));
#else
  return reinterpret_cast<vf32>(__builtin_convertvector(h, vu32) << 16);
#endif
}
#if defined(__AVX512F__) && defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

// Lane-wise copy of to_float(half_t) in dtype.h.
PGEST_HD vf32 loadv(const half_t* p) {
  vu16 h;
  std::memcpy(&h, p, sizeof h);
  const vu32 w = __builtin_convertvector(h, vu32);
  const vu32 sign = (w & 0x8000u) << 16;
  const vu32 exp = (w >> 10) & 0x1fu;
  const vu32 mant = w & 0x3ffu;
  const vu32 normal = sign | ((exp + 112u) << 23) | (mant << 13);
  const vu32 special = sign | 0x7f800000u | (mant << 13);
  const vf32 sub_abs = __builtin_convertvector(mant, vf32) * 5.9604644775390625e-8f;
  const vu32 sub = reinterpret_cast<vu32>(sub_abs) | sign;
  const vu32 big = select(reinterpret_cast<vu32>(exp == 31u), special, normal);
  return reinterpret_cast<vf32>(select(reinterpret_cast<vu32>(exp == 0u), sub, big));
}

PGEST_NS_END

PGEST_NS_BEGIN

PGEST_HD void storev(float* p, vf32 v) { std::memcpy(p, &v, sizeof v); }
PGEST_HD void storev(double* p, vf64 v) { std::memcpy(p, &v, sizeof v); }

// Lane-wise copy of to_bf16 in dtype.h (round to nearest even), without its
// NaN case: the kernels store only values computed from rows already checked
// finite, and the select would cost a fifth of the backward pass. (A NaN with
// a large payload would round to a zero here.)
PGEST_HD vu16 bf16_lanes(vf32 v) {
  const vu32 x = reinterpret_cast<vu32>(v);
  return __builtin_convertvector((x + (0x7fffu + ((x >> 16) & 1u))) >> 16, vu16);
}

PGEST_HD void storev(bf16_t* p, vf32 v) {
  const vu16 h = bf16_lanes(v);
  std::memcpy(p, &h, sizeof h);
}

PGEST_HD void storev(half_t* p, vf32 v) {
  for (int l = 0; l < Vec<float>::width; ++l) p[l] = to_half(v[l]);
}

PGEST_NS_END

PGEST_NS_BEGIN

// Streaming (non-temporal) stores of one vector, for outputs larger than the
// cache: no read-for-ownership of lines that are overwritten whole. `p` must be
// aligned to the bytes stored. Only the types in kStreamable have one.

#if defined(__AVX512F__)
PGEST_HD void stream_storev(float* p, vf32 v) { _mm512_stream_ps(p, reinterpret_cast<__m512>(v)); }
PGEST_HD void stream_storev(double* p, vf64 v) { _mm512_stream_pd(p, reinterpret_cast<__m512d>(v)); }
PGEST_HD void stream_storev(bf16_t* p, vf32 v) {
  _mm256_stream_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(bf16_lanes(v)));
}
#elif defined(__AVX__)
PGEST_HD void stream_storev(float* p, vf32 v) { _mm256_stream_ps(p, reinterpret_cast<__m256>(v)); }
PGEST_HD void stream_storev(double* p, vf64 v) { _mm256_stream_pd(p, reinterpret_cast<__m256d>(v)); }
PGEST_HD void stream_storev(bf16_t* p, vf32 v) {
  _mm_stream_si128(reinterpret_cast<__m128i*>(p), reinterpret_cast<__m128i>(bf16_lanes(v)));
}
#elif defined(__SSE2__)
PGEST_HD void stream_storev(float* p, vf32 v) { _mm_stream_ps(p, reinterpret_cast<__m128>(v)); }
PGEST_HD void stream_storev(double* p, vf64 v) { _mm_stream_pd(p, reinterpret_cast<__m128d>(v)); }
PGEST_HD void stream_storev(bf16_t* p, vf32 v) {
  long long q;
  const vu16 h = bf16_lanes(v);
  std::memcpy(&q, &h, sizeof q);
  _mm_stream_si64(reinterpret_cast<long long*>(p), q);
}
#endif

// Types with a streaming store; the store needs width * sizeof(T) alignment.
template <class T> constexpr bool kStreamable = false;
#if defined(__SSE2__)
template <> constexpr bool kStreamable<float> = true;
template <> constexpr bool kStreamable<double> = true;
template <> constexpr bool kStreamable<bf16_t> = true;
#endif

PGEST_HD void stream_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

PGEST_NS_END
