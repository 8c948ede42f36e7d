// Zero-filling the (B, K) gradient, which is most of what reinforce_grad
// writes. When the output is larger than the last-level cache, streaming
// stores skip the read-for-ownership that a plain memset pays for every line:
// the rows are not read again before they leave the cache anyway.
#pragma once

#include <pgest/common.h>

#include <cstddef>
#include <cstdint>
#include <cstring>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

PGEST_NS_BEGIN

// Past the size of a large last-level cache an output cannot stay cached until
// the caller reads it, so outputs larger than this are written around the cache.
constexpr int64_t kStreamingBytes = int64_t(16) << 20;

inline void zero_fill(void* dst, size_t bytes, bool streaming) {
#if defined(__SSE2__)
  if (streaming && bytes >= 256) {
    char* p = static_cast<char*>(dst);
    const size_t head = (16 - (reinterpret_cast<uintptr_t>(p) & 15)) & 15;
    std::memset(p, 0, head);
    const size_t body = (bytes - head) & ~size_t(15);
    const __m128i z = _mm_setzero_si128();
    for (size_t i = head; i < head + body; i += 16) _mm_stream_si128(reinterpret_cast<__m128i*>(p + i), z);
    std::memset(p + head + body, 0, bytes - head - body);
    return;
  }
#endif
  std::memset(dst, 0, bytes);
}

// Orders streaming stores before the kernel returns (they are weakly ordered).
inline void zero_fill_fence() {
#if defined(__SSE2__)
  _mm_sfence();
#endif
}

PGEST_NS_END
