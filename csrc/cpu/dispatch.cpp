// Run-time choice among the per-instruction-set copies of the CPU kernels.
// AVX2 and AVX-512 compute bit-identical results (explicit fused
// multiply-adds, no contraction, fixed reduction trees); the baseline x86-64
// copy has no FMA and may differ in the last bit. PGEST_CPU_ISA=generic|
// avx2|avx512 in the environment, or set_isa(), forces a narrower one.
#include "dispatch.h"

#include <pgest/chunk_pass.h>
#include <pgest/log_prob.h>
#include <pgest/reinforce_grad.h>
#include <pgest/returns.h>
#include <pgest/sample.h>
#include <pgest/truncation.h>

#include <cstdlib>
#include <cstring>
#include <initializer_list>

#define PGEST_DECLARE_ISA(ns)                                                    \
  namespace pgest {                                                              \
  inline namespace ns {                                                          \
  Status reinforce_grad_cpu(const ReinforceGradArgs& args, ErrorInfo* err);       \
  Status sample_cpu(const SampleArgs& args, ErrorInfo* err);                     \
  Status log_prob_forward_cpu(const LogProbArgs& args, ErrorInfo* err);          \
  Status log_prob_backward_cpu(const LogProbArgs& args, ErrorInfo* err);         \
  Status discounted_returns_cpu(const ReturnsArgs& args, ErrorInfo* err);        \
  Status gae_cpu(const ReturnsArgs& args, ErrorInfo* err);                       \
  Status truncation_cpu(const TruncationArgs& args, ErrorInfo* err);             \
  Status truncation_radix_cpu(const TruncationArgs& args, ErrorInfo* err);       \
  Status chunk_pass_cpu(const ChunkPassArgs& args, ErrorInfo* err);              \
  }                                                                              \
  }

PGEST_DECLARE_ISA(generic)
#ifdef PGEST_HAVE_ISA_AVX2
PGEST_DECLARE_ISA(avx2)
#endif
#ifdef PGEST_HAVE_ISA_AVX512
PGEST_DECLARE_ISA(avx512)
#endif

namespace pgest {
namespace cpu {
namespace {

bool cpu_has(Isa isa) {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
             __builtin_cpu_supports("f16c");
    default: return true;
  }
#else
  return isa == Isa::kGeneric;
#endif
}

Isa best_isa() {
  Isa best = Isa::kGeneric;
#ifdef PGEST_HAVE_ISA_AVX2
  if (cpu_has(Isa::kAvx2)) best = Isa::kAvx2;
#endif
#ifdef PGEST_HAVE_ISA_AVX512
  if (cpu_has(Isa::kAvx512)) best = Isa::kAvx512;
#endif
  if (const char* env = std::getenv("PGEST_CPU_ISA")) {
    Isa wanted;
    if (parse_isa(env, &wanted) && wanted <= best) best = wanted;
  }
  return best;
}

Isa& current() {
  static Isa isa = best_isa();
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

bool parse_isa(const char* name, Isa* out) {
  for (Isa isa : {Isa::kGeneric, Isa::kAvx2, Isa::kAvx512}) {
    if (std::strcmp(name, isa_name(isa)) == 0) { *out = isa; return true; }
  }
  return false;
}

bool isa_compiled(Isa isa) {
  switch (isa) {
#ifdef PGEST_HAVE_ISA_AVX512
    case Isa::kAvx512: return true;
#endif
#ifdef PGEST_HAVE_ISA_AVX2
    case Isa::kAvx2: return true;
#endif
    case Isa::kGeneric: return true;
    default: return false;
  }
}

bool isa_usable(Isa isa) { return isa_compiled(isa) && cpu_has(isa); }

Isa get_isa() { return current(); }

bool set_isa(Isa isa) {
  if (!isa_usable(isa)) return false;
  current() = isa;
  return true;
}

#if defined(PGEST_HAVE_ISA_AVX512)
#define PGEST_CASE_AVX512(fn) case Isa::kAvx512: return avx512::fn(args, err);
#else
#define PGEST_CASE_AVX512(fn)
#endif
#if defined(PGEST_HAVE_ISA_AVX2)
#define PGEST_CASE_AVX2(fn) case Isa::kAvx2: return avx2::fn(args, err);
#else
#define PGEST_CASE_AVX2(fn)
#endif
#define PGEST_DISPATCH(name, Args, fn)              \
  Status name(const Args& args, ErrorInfo* err) {   \
    switch (current()) {                            \
      PGEST_CASE_AVX512(fn)                         \
      PGEST_CASE_AVX2(fn)                           \
      default: return generic::fn(args, err);       \
    }                                                \
  }

PGEST_DISPATCH(reinforce_grad, ReinforceGradArgs, reinforce_grad_cpu)
PGEST_DISPATCH(sample, SampleArgs, sample_cpu)
PGEST_DISPATCH(log_prob_forward, LogProbArgs, log_prob_forward_cpu)
PGEST_DISPATCH(log_prob_backward, LogProbArgs, log_prob_backward_cpu)
PGEST_DISPATCH(discounted_returns, ReturnsArgs, discounted_returns_cpu)
PGEST_DISPATCH(gae, ReturnsArgs, gae_cpu)
PGEST_DISPATCH(truncation, TruncationArgs, truncation_cpu)
PGEST_DISPATCH(truncation_radix, TruncationArgs, truncation_radix_cpu)
PGEST_DISPATCH(chunk_pass, ChunkPassArgs, chunk_pass_cpu)

}  // namespace cpu
}  // namespace pgest
