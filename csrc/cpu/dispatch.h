// Which per-instruction-set copy of the CPU kernels runs (dispatch.cpp).
#pragma once

namespace pgest {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

const char* isa_name(Isa isa);
bool parse_isa(const char* name, Isa* out);
bool isa_compiled(Isa isa);
bool isa_usable(Isa isa);  // compiled and supported by this CPU
Isa get_isa();
bool set_isa(Isa isa);

}  // namespace cpu
}  // namespace pgest
