// What the CPU offers the row kernels: the instruction set they may use (chosen once per process)
// and the floating-point mode they run in (subnormals flushed, for the time a thread runs them).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__)
// x86-64 with GCC / Clang: the AVX2 and AVX-512 kernels are compiled (each in its own target
// region, see row_dispatch.h), and MXCSR holds the subnormal mode.
#define GOPD_HAVE_AVX2_PATH 1
#include <immintrin.h>
#else
#define GOPD_HAVE_AVX2_PATH 0
#endif

namespace gopd {
namespace cpu {

// Instruction sets the kernels are built for, best last.
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

// The best of Isa the CPU supports, capped by the environment variable GOPD_CPU_ISA=baseline|avx2|avx512
// (for tests and for comparing paths; any other value is an error naming it). Detected on the first
// call; later calls return the same value.
Isa cpu_isa();

// While a thread runs a row kernel: flush subnormal results to zero and read subnormal inputs as zero
// (MXCSR FTZ + DAZ), restoring the caller's mode afterwards, so nothing leaks into torch's thread pool.
// A sharp row (logits spread over ~70 nats or more) makes the kernel's own products p * (...)
// subnormal; on microcode assists the fused forward + backward ran 1.7x slower at logit std 20 (3.3
// vs 1.9 ns per column, AVX-512). Only values below FLT_MIN change; zero_if_tiny (rows_generic.h)
// keeps the written gradient clear of the subnormal range on any CPU, with or without this mode.
// Elsewhere (not x86) it does nothing.
class SubnormalsAsZero {
 public:
  SubnormalsAsZero() {
#if GOPD_HAVE_AVX2_PATH
    saved_ = _mm_getcsr();
    _mm_setcsr(saved_ | kFtz | kDaz);
#endif
  }
  ~SubnormalsAsZero() {
#if GOPD_HAVE_AVX2_PATH
    _mm_setcsr(saved_);
#endif
  }
  SubnormalsAsZero(const SubnormalsAsZero&) = delete;
  SubnormalsAsZero& operator=(const SubnormalsAsZero&) = delete;

 private:
  static constexpr unsigned int kFtz = 0x8000, kDaz = 0x0040;
  unsigned int saved_ = 0;
};

}  // namespace cpu
}  // namespace gopd
