// Storage types and their conversions. Inputs in fp16/bf16/fp32 are
// accumulated in fp32, fp64 inputs in fp64.
#pragma once

#include "common.h"
#include "status.h"

namespace pgest {

enum DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

struct half_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

}  // namespace pgest

PGEST_NS_BEGIN

template <class T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// Written with selects rather than branches so that a row loop over fp16
// still vectorises.
PGEST_HD float to_float(half_t h) {
  const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
  const uint32_t exp = (h.bits >> 10) & 0x1fu;
  const uint32_t mant = h.bits & 0x3ffu;
  const uint32_t normal = sign | ((exp + 112u) << 23) | (mant << 13);
  const uint32_t special = sign | 0x7f800000u | (mant << 13);
  // Subnormal halves are mant * 2^-24 exactly; the product is exact in fp32.
  const float sub = float(mant) * 5.9604644775390625e-8f;
  const float sub_signed = sign ? -sub : sub;
  return exp == 0 ? sub_signed : bits_float(exp == 31 ? special : normal);
}

PGEST_HD float to_float(bf16_t b) { return bits_float(uint32_t(b.bits) << 16); }
PGEST_HD float to_float(float f) { return f; }
PGEST_HD double to_float(double d) { return d; }

template <class Acc, class T> PGEST_HD Acc load(const T& v) { return Acc(to_float(v)); }

// Round to nearest even, as torch's own conversions do.
PGEST_HD half_t to_half(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) return half_t{uint16_t(sign | 0x7c00u | (x > 0x7f800000u ? 0x200u : 0u))};
  if (x >= 0x477ff000u) return half_t{uint16_t(sign | 0x7c00u)};  // rounds past 65504
  if (x < 0x38800000u) {  // below 2^-14: a subnormal half, rounded by the fp32 adder
    const float r = (bits_float(x) * 16777216.0f + 8388608.0f) - 8388608.0f;
    return half_t{uint16_t(sign | uint16_t(r))};
  }
  x += 0xc8000fffu + ((x >> 13) & 1u);  // rebias exponent 127 -> 15 and round
  return half_t{uint16_t(sign | (x >> 13))};
}

PGEST_HD bf16_t to_bf16(float f) {
  uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return bf16_t{uint16_t((x >> 16) | 0x40u)};  // quiet NaN
  x += 0x7fffu + ((x >> 16) & 1u);
  return bf16_t{uint16_t(x >> 16)};
}

template <class T> PGEST_HD T store(double v);
template <> PGEST_HD float store<float>(double v) { return float(v); }
template <> PGEST_HD double store<double>(double v) { return v; }
template <> PGEST_HD half_t store<half_t>(double v) { return to_half(float(v)); }
template <> PGEST_HD bf16_t store<bf16_t>(double v) { return to_bf16(float(v)); }

template <class T> struct TypeTag { using type = T; };

// Calls fn(TypeTag<T>{}) for the storage type named by a dtype code: the one
// place a kernel entry turns a run-time dtype into a template argument.
template <class Fn>
inline Status dispatch_float(int32_t dtype, Fn&& fn) {
  switch (dtype) {
    case kFloat32: return fn(TypeTag<float>{});
    case kFloat64: return fn(TypeTag<double>{});
    case kFloat16: return fn(TypeTag<half_t>{});
    case kBFloat16: return fn(TypeTag<bf16_t>{});
    default: return kUnsupportedDtype;
  }
}

// Scalar read of a small side input (rewards, baselines) whose dtype is only
// known at run time. Not for row loops.
PGEST_HD double load_any(const void* base, int32_t dtype, int64_t index) {
  switch (dtype) {
    case kFloat32: return static_cast<const float*>(base)[index];
    case kFloat64: return static_cast<const double*>(base)[index];
    case kFloat16: return to_float(static_cast<const half_t*>(base)[index]);
    case kBFloat16: return to_float(static_cast<const bf16_t*>(base)[index]);
    default: return 0.0;
  }
}

PGEST_NS_END
