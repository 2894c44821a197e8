// Which kernel runs a row: forward_one_row / backward_one_row pick, per row, the vectorised kernel of
// the process's ISA (rows_simd.h, one copy per ISA) for fp32 / bf16 / fp16 logits, else the generic
// kernel (rows_generic.h: fp64, or a CPU without AVX2), compiled twice: for the baseline x86-64 ISA
// and, through thin wrappers with target("avx2,fma"), for AVX2.
//
// Internal to the one translation unit that includes it (bindings.cpp), like rows_generic.h: the
// kernels inline into the entry points' row loops, and no ISA region's code reaches another's.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "cpu/isa.h"
#include "cpu/rows_generic.h"
#include "stats_layout.h"

#if GOPD_HAVE_AVX2_PATH
#define GOPD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace gopd {
namespace cpu {
namespace {

// The next row of a thread's range (nullptr: none), prefetched into L2 during a vectorised forward
// row's second sweep. That sweep (three exps per column) runs from cache, so without this the memory
// bus idles while it computes and the next row's first sweep then waits on memory; with it the two
// overlap. Measured on AVX-512 with 2 threads, [512, 49152] fp32 x 3: forward 1.2-1.3 -> 0.86-0.95 ns
// per column. The backward has no such sweep to hide a read behind (its last sweep stores the
// gradient, and prefetching there measured slower), so it does not prefetch.
template <typename scalar_t>
struct NextRow {
  const scalar_t *s = nullptr, *t = nullptr, *r = nullptr;
#if GOPD_HAVE_AVX2_PATH
  GOPD_INLINE void fetch(int64_t j) const {
    if (s != nullptr) _mm_prefetch(reinterpret_cast<const char*>(s + j), _MM_HINT_T1);
    if (t != nullptr) _mm_prefetch(reinterpret_cast<const char*>(t + j), _MM_HINT_T1);
    if (r != nullptr) _mm_prefetch(reinterpret_cast<const char*>(r + j), _MM_HINT_T1);
  }
#endif
};

#if GOPD_HAVE_AVX2_PATH
// The generic kernels' AVX2 build (forward_row / backward_row are force-inlined into these).
template <typename scalar_t, typename acc_t, typename... Args>
GOPD_TARGET_AVX2 void forward_row_avx2(Args... args) {
  forward_row<scalar_t, acc_t>(args...);
}
template <typename scalar_t, typename acc_t, typename... Args>
GOPD_TARGET_AVX2 void backward_row_avx2(Args... args) {
  backward_row<scalar_t, acc_t>(args...);
}

// The vectorised fp32 / bf16 / fp16 kernels (rows_simd.h), one copy per ISA, each in its own namespace
// and target region.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
#include "cpu/simd_avx2.h"
#include "cpu/rows_simd.h"
}  // namespace avx2
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace avx512 {
#include "cpu/simd_avx512.h"
#include "cpu/rows_simd.h"
}  // namespace avx512
#pragma GCC pop_options

// Vectorised row forward for fp32 accumulation (fp32 / bf16 / fp16 input); false if this dtype / ISA
// has no vectorised kernel (the caller then runs the generic one).
template <typename scalar_t, typename acc_t>
bool simd_forward(Isa isa, const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, int64_t v, int64_t y,
                  acc_t its, acc_t itt, acc_t itr, double* st, const NextRow<scalar_t>& next) {
  if constexpr (std::is_same<acc_t, float>::value && !std::is_same<scalar_t, double>::value) {
    if (isa == Isa::kAvx512) return avx512::forward_row<scalar_t>(zs, zt, zr, v, y, its, itt, itr, st, next), true;
    if (isa == Isa::kAvx2) return avx2::forward_row<scalar_t>(zs, zt, zr, v, y, its, itt, itr, st, next), true;
  }
  return false;
}

template <typename scalar_t, typename acc_t>
bool simd_backward(Isa isa, const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, scalar_t* out, int64_t v,
                   int64_t y, const BackwardRow<acc_t>& b, acc_t itt, acc_t itr) {
  if constexpr (std::is_same<acc_t, float>::value && !std::is_same<scalar_t, double>::value) {
    if (isa == Isa::kAvx512) return avx512::backward_row<scalar_t>(zs, zt, zr, out, v, y, b, itt, itr), true;
    if (isa == Isa::kAvx2) return avx2::backward_row<scalar_t>(zs, zt, zr, out, v, y, b, itt, itr), true;
  }
  return false;
}
#endif

// Per-thread column buffers of the generic kernels.
template <typename acc_t>
struct Scratch {
  alignas(64) acc_t bs[kBlock], bt[kBlock], br[kBlock];
};

// 1 / T of the student, teacher and reference, rounded to acc_t once: every kernel of a call scales
// the logits by these same values, so a forward's statistics and a backward's log-probabilities agree.
template <typename acc_t>
struct InvTemps {
  acc_t s, t, r;
  InvTemps(double ts, double tt, double tr)
      : s(acc_t(1) / static_cast<acc_t>(ts)), t(acc_t(1) / static_cast<acc_t>(tt)), r(acc_t(1) / static_cast<acc_t>(tr)) {}
};

// What every backward row of a call shares: which terms are kept, and their coefficients.
template <typename acc_t>
struct RowCoef {
  acc_t ct, cr;
  bool use_t, use_r;
  double lam;
  // A term whose coefficient is 0 is dropped (so a -inf log never meets a 0 coefficient).
  RowCoef(bool has_t, bool has_r, double lam_)
      : use_t(has_t && lam_ != 0.0), use_r(has_r && lam_ != 1.0), lam(lam_) {
    ct = use_t ? static_cast<acc_t>(lam) : acc_t(0);
    cr = use_r ? static_cast<acc_t>(1.0 - lam) : acc_t(0);
  }
};

// The stats of one valid row into row[NSTATS] (zt / zr may be nullptr: their stats stay 0).
template <typename scalar_t, typename acc_t>
void forward_one_row(Isa isa, const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, int64_t v, int64_t y,
                     const InvTemps<acc_t>& inv, Scratch<acc_t>& b, double* row, const NextRow<scalar_t>& next) {
  std::fill(row, row + NSTATS, 0.0);
#if GOPD_HAVE_AVX2_PATH
  if (simd_forward<scalar_t, acc_t>(isa, zs, zt, zr, v, y, inv.s, inv.t, inv.r, row, next)) return;
  if (isa != Isa::kBaseline) {
    forward_row_avx2<scalar_t, acc_t>(zs, zt, zr, v, y, inv.s, inv.t, inv.r, &b.bs[0], &b.bt[0], &b.br[0], row);
    return;
  }
#endif
  forward_row<scalar_t, acc_t>(zs, zt, zr, v, y, inv.s, inv.t, inv.r, b.bs, b.bt, b.br, row);
}

// out = d(g_lp lp_s + g_loss L)/d zs for one valid row, from its stats row[NSTATS] (fp64, as
// forward_one_row writes them). out may alias zs.
template <typename scalar_t, typename acc_t>
void backward_one_row(Isa isa, const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, scalar_t* out, int64_t v,
                      int64_t y, const double* row, acc_t g_lp, acc_t g_loss, const InvTemps<acc_t>& inv,
                      const RowCoef<acc_t>& c, Scratch<acc_t>& scratch) {
  BackwardRow<acc_t> b;
  // Each lse as hi + lo in acc_t (lo = 0 for fp64): z' - lse then keeps the statistic's precision.
  const auto split = [](double x, acc_t& hi, acc_t& lo) {
    hi = static_cast<acc_t>(x);
    lo = std::isfinite(x) ? static_cast<acc_t>(x - static_cast<double>(hi)) : acc_t(0);
  };
  split(row[LSE_S], b.lse_s, b.lo_s);
  split(c.use_t ? row[LSE_T] : 0.0, b.lse_t, b.lo_t);
  split(c.use_r ? row[LSE_R] : 0.0, b.lse_r, b.lo_r);
  b.ct = c.ct;
  b.cr = c.cr;
  b.use_t = c.use_t;
  b.use_r = c.use_r;
  b.g_lp = g_lp;
  b.g_loss = g_loss;
  b.inv_ts = inv.s;
  double loss = row[E_S];
  if (c.use_t) loss -= c.lam * row[E_T];
  if (c.use_r) loss -= (1.0 - c.lam) * row[E_R];
  b.loss = static_cast<acc_t>(loss);
  // A row whose gradient is undefined is NaN in every column (the non-finite rule of
  // gopd_kernels.reference): non-finite upstream gradients, a non-finite L that g_loss reaches, or a
  // student row that is not a distribution (lse_s not finite).
  if (!std::isfinite(static_cast<double>(g_lp)) || !std::isfinite(static_cast<double>(g_loss)) ||
      (g_loss != 0 && !std::isfinite(loss)) || !std::isfinite(row[LSE_S])) {
    std::fill(out, out + v, static_cast<scalar_t>(std::numeric_limits<acc_t>::quiet_NaN()));
    return;
  }
#if GOPD_HAVE_AVX2_PATH
  if (simd_backward<scalar_t, acc_t>(isa, zs, zt, zr, out, v, y, b, inv.t, inv.r)) return;
  if (isa != Isa::kBaseline) {
    backward_row_avx2<scalar_t, acc_t>(zs, zt, zr, out, v, y, b, inv.s, inv.t, inv.r, &scratch.bs[0],
                                       &scratch.bt[0], &scratch.br[0]);
    return;
  }
#endif
  backward_row<scalar_t, acc_t>(zs, zt, zr, out, v, y, b, inv.s, inv.t, inv.r, scratch.bs, scratch.bt,
                                scratch.br);
}

}  // namespace
}  // namespace cpu
}  // namespace gopd
