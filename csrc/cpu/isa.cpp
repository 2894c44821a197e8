// Instruction-set detection for the CPU row kernels (see isa.h).
#include "cpu/isa.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace gopd {
namespace cpu {
namespace {

Isa detect_isa() {
#if GOPD_HAVE_AVX2_PATH
  __builtin_cpu_init();
  Isa best = Isa::kBaseline;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::kAvx512;
  const char* env = std::getenv("GOPD_CPU_ISA");
  if (env == nullptr || env[0] == '\0') return best;
  const std::string want(env);
  Isa cap;
  if (want == "baseline") cap = Isa::kBaseline;
  else if (want == "avx2") cap = Isa::kAvx2;
  else if (want == "avx512") cap = Isa::kAvx512;
  else TORCH_CHECK(false, "GOPD_CPU_ISA: expected baseline, avx2 or avx512, got '", want, "'");
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
#else
  return Isa::kBaseline;
#endif
}

}  // namespace

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

}  // namespace cpu
}  // namespace gopd
