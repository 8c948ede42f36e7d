// Macros shared by every kernel-core header. Nothing here includes torch.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define PGEST_HD __host__ __device__ __forceinline__
#else
// Forced: the CPU passes call these on 16-lane vectors, which must stay in
// registers rather than cross a call boundary in memory.
#define PGEST_HD inline __attribute__((always_inline))
#endif

// The CPU kernels are compiled once per instruction set (see CMakeLists.txt).
// Everything with a body lives in an inline namespace named after that set, so
// the linker can never merge an AVX-512 copy of a helper into the generic path.
#ifndef PGEST_KERNEL_NS
#define PGEST_KERNEL_NS generic
#endif
#define PGEST_NS_BEGIN namespace pgest { inline namespace PGEST_KERNEL_NS {
#define PGEST_NS_END } }

PGEST_NS_BEGIN

PGEST_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PGEST_HD float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PGEST_HD uint64_t double_bits(double f) {
#if defined(__CUDA_ARCH__)
  return static_cast<uint64_t>(__double_as_longlong(f));
#else
  uint64_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

PGEST_HD double bits_double(uint64_t u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(static_cast<long long>(u));
#else
  double f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

PGEST_NS_END
