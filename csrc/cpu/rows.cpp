// C++ CPU row kernels of the G-OPD loss: torch.ops.gopd.rows_forward / rows_backward on CPU tensors.
//
// Contract (gopd_kernels/backends/__init__.py): for each valid row i, with z'_m = z_m / T_m and
// log p_m = z'_m - lse_m,
//   stats[:, i] = lse_s, lse_t, lse_r, log p_s(y), log p_t(y), log p_r(y),
//                 E_S = sum_v p_s log p_s, E_T = sum_v p_s log p_t, E_R = sum_v p_s log p_r
// and the backward writes
//   out(v) = ( g_loss_i p(v) (c(v) - L_i) + g_lp_i ([v == y_i] - p(v)) ) / T_s,
//   c = log p_s - lam log p_t - (1 - lam) log p_r,  L = E_S - lam E_T - (1 - lam) E_R,
// with entries below kTinyGrad (2^-100 for fp32 math) in magnitude written as 0 (see zero_if_tiny).
//
// Algorithm of the generic kernel (fp64 input, CPUs without AVX2; rows_simd.h has the vectorised
// two-pass one): one pass over the vocabulary per row, in column blocks that stay in L1. Per block we
// up-cast the (scaled) logits of the three models into fp32 buffers, take the block maxima, move the
// running maxima M_m, rescale the running sums, and accumulate with the block's fixed maxima:
//   S_m  = sum_v exp(z'_m(v) - M_m)                     (so lse_m = M_m + log S_m)
//   A_mm = sum_v w(v) (z'_s(v) - M_s),  w = exp(z'_s - M_s)          (student self term)
//   A_st = sum_v w(v) (z'_t(v) - M_t),  A_sr likewise                 (cross terms)
// Keeping every logit shifted by its own running max keeps the accumulated terms small (no
// catastrophic cancellation against lse when logits are ~1e4). At the end
//   E_S = A_ss / S_s - log S_s,  E_T = A_st / S_s - log S_t,  E_R = A_sr / S_s - log S_r.
// When M_s moves from a to b (f = exp(a - b)): S_s, A_st, A_sr scale by f and
//   A_ss <- f (A_ss + S_s (a - b)); when M_t moves from a to b: A_st += S_s (a - b).
// Columns with w = 0 (z_s = -inf) contribute nothing to the A's (select, never 0 * -inf).
//
// Rows are independent and each row's arithmetic order is fixed, so results do not depend on the
// number of threads (at::parallel_for over rows, torch's OpenMP pool, honours torch.set_num_threads).
// Accumulation is fp32 for fp16 / bf16 / fp32 input and fp64 for fp64 input; the statistics are
// written in fp64 for every input, and the backward takes each lse as hi + lo in the accumulation type.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

// Kernels and instruction sets. The generic kernels below (one online pass, any dtype incl. fp64)
// are force-inlined into two thin wrappers, one compiled for the baseline x86-64 ISA and one with
// target("avx2,fma"); keeping every helper inline (and internal) means no AVX2 code can leak into the
// baseline path. On an AVX2 or AVX-512 CPU, fp32 / bf16 / fp16 rows go to the vectorised two-pass
// kernels of rows_simd.h instead (one copy per ISA, each in its own target region). The ISA is chosen
// once per process; GOPD_CPU_ISA=baseline|avx2|avx512 caps it.
#define GOPD_INLINE inline __attribute__((always_inline))
#define GOPD_LAMBDA_INLINE __attribute__((always_inline))
#if defined(__x86_64__) && defined(__GNUC__)
#define GOPD_HAVE_AVX2_PATH 1
#define GOPD_TARGET_AVX2 __attribute__((target("avx2,fma")))
#include <immintrin.h>
#else
#define GOPD_HAVE_AVX2_PATH 0
#endif

namespace gopd {
namespace cpu {
namespace {

constexpr int kNumStats = 9;
enum Stat { LSE_S = 0, LSE_T, LSE_R, LP_S, LP_T, LP_R, E_S, E_T, E_R };
// Columns per block: three fp32 buffers of this size stay well inside L1.
constexpr int64_t kBlock = 1024;

// exp(x) for x <= ~0 (every call site passes a logit minus a max or an lse), written with plain
// arithmetic so `omp simd` loops vectorise it (libm's expf would stay scalar). Cephes-style: x =
// n ln2 + r, |r| <= ln2/2, degree-6 polynomial for e^r (about 1 ulp), 2^n from the exponent bits.
// Returns exactly 0 for x < -87.3 (incl. -inf), where the true value is a denormal or 0.
GOPD_INLINE float fast_exp(float x) {
  const float lo = -87.33654f, hi = 88.0f;
  const float xc = std::min(std::max(x, lo), hi);
  const float t = xc * 1.44269504088896341f + 0.5f;
  // floor(t) without a branch: t + 128 > 0 on the clamped range, where truncation is floor.
  const float n = static_cast<float>(static_cast<int32_t>(t + 128.0f)) - 128.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  // A multiply by 0 / 1 rather than a select keeps the loop branch-free for the vectoriser; NaN
  // input still propagates (the clamp keeps it).
  return y * scale * static_cast<float>(!(x < lo));
}

GOPD_INLINE double fast_exp(double x) { return std::exp(x); }

// Gradient entries smaller in magnitude than kTinyGrad are written as 0: 2^-100 (~7.9e-31) for fp32 /
// bf16 / fp16 output, the smallest normal double for fp64. A sharp row (logits spread over ~70 nats or
// more) has columns with p below 1e-30, and the GEMMs that consume the gradient (dH = dZ W,
// dW = dZ^T H) then meet subnormals: as inputs where the gradient itself is below FLT_MIN, and as
// products dZ * W / dZ * H below FLT_MIN where it is a little above. x86 runs both on microcode
// assists, and torch.set_flush_denormal does not reach MKL's worker threads. Measured with MKL on
// AVX-512 ([512, 49152] x [49152, 576]): dH + dW 2.5x slower with 1% subnormal entries and 18x with 10%;
// on a logit-std-20 gradient with no subnormal entry, 0.33 s with a floor of FLT_MIN, 0.29 s with
// 2^-120, 0.288 s with 2^-110 or 2^-100, as fast as an ordinary gradient. 2^-100 leaves a factor of
// 2^26 for the weights and hidden states of the products. An entry that small is far below fp32's
// resolution of any dW or dH sum it joins, and below what any optimiser step can resolve.
template <typename acc_t>
constexpr acc_t kTinyGrad = std::numeric_limits<acc_t>::min();
template <>
constexpr float kTinyGrad<float> = 0x1p-100f;

template <typename acc_t>
GOPD_INLINE acc_t zero_if_tiny(acc_t x) {
  return std::fabs(x) < kTinyGrad<acc_t> ? acc_t(0) : x;  // NaN kept (the compare is false)
}

// While a thread runs a row kernel: flush subnormal results to zero and read subnormal inputs as zero
// (MXCSR FTZ + DAZ), restoring the caller's mode afterwards, so nothing leaks into torch's thread pool.
// The same sharp rows make the kernel's own products p * (...) subnormal; on microcode assists the
// fused forward + backward ran 1.7x slower at logit std 20 (3.3 vs 1.9 ns per column, AVX-512). Only
// values below FLT_MIN change; zero_if_tiny above keeps the written gradient clear of the subnormal
// range on any CPU, with or without this mode.
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

template <typename acc_t>
constexpr acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

// dst[j] = acc_t(src[j]) * inv_t for j < n (the up-cast happens here, never math in low precision).
template <typename scalar_t, typename acc_t>
GOPD_INLINE void load_scaled(const scalar_t* src, int64_t n, acc_t inv_t, acc_t* dst) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc_t>(src[j]) * inv_t;
}

template <typename acc_t>
GOPD_INLINE acc_t block_max(const acc_t* x, int64_t n) {
  acc_t m = neg_inf<acc_t>();
#pragma omp simd reduction(max : m)
  for (int64_t j = 0; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

// Sums of per-column terms over a block, in kLanes independent partial sums per quantity (the
// vector lanes) that are then added pairwise: the rounding error grows with n / kLanes + log kLanes
// instead of n, which keeps fp32 sums over large vocabularies as accurate as torch's.
constexpr int kLanes = 16;

template <int K, typename acc_t, typename F>
GOPD_INLINE void lane_sums(int64_t n, const F& f, acc_t* total) {
  alignas(64) acc_t acc[K][kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
#pragma omp simd
    for (int l = 0; l < kLanes; ++l) f(j + l, l, acc);
  }
  for (int l = 0; j + l < n; ++l) f(j + l, l, acc);
  for (int k = 0; k < K; ++k) {
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int l = 0; l < w; ++l) acc[k][l] += acc[k][l + w];
    total[k] += acc[k][0];
  }
}

template <typename acc_t>
GOPD_INLINE acc_t block_sumexp(const acc_t* x, int64_t n, acc_t mx) {
  acc_t s = 0;
  lane_sums<1>(n, [&](int64_t j, int l, acc_t(*acc)[kLanes]) GOPD_LAMBDA_INLINE { acc[0][l] += fast_exp(x[j] - mx); }, &s);
  return s;
}

// The running state of one row.
template <typename acc_t>
struct RowState {
  acc_t m_s = neg_inf<acc_t>(), m_t = neg_inf<acc_t>(), m_r = neg_inf<acc_t>();
  acc_t s_s = 0, s_t = 0, s_r = 0;
  acc_t a_ss = 0, a_st = 0, a_sr = 0;
};

template <typename scalar_t, typename acc_t>
GOPD_INLINE void forward_row(const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, int64_t v, int64_t y,
                 acc_t inv_ts, acc_t inv_tt, acc_t inv_tr, acc_t* bs, acc_t* bt, acc_t* br, double* st) {
  RowState<acc_t> r;
  const bool has_t = zt != nullptr, has_r = zr != nullptr;
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t n = std::min(kBlock, v - start);
    load_scaled(zs + start, n, inv_ts, bs);
    if (has_t) load_scaled(zt + start, n, inv_tt, bt);
    if (has_r) load_scaled(zr + start, n, inv_tr, br);

    // Teacher / reference: move the max, rescale, add the block. A move of M_t shifts every
    // accumulated (z'_t - M_t) of A_st by (old - new), weighted by the student mass so far.
    if (has_t) {
      const acc_t mx = std::max(r.m_t, block_max(bt, n));
      if (mx != neg_inf<acc_t>()) {
        if (mx > r.m_t) {
          if (r.m_t != neg_inf<acc_t>()) {
            r.s_t *= fast_exp(r.m_t - mx);
            r.a_st += r.s_s * (r.m_t - mx);
          }
          r.m_t = mx;
        }
        r.s_t += block_sumexp(bt, n, r.m_t);
      }
    }
    if (has_r) {
      const acc_t mx = std::max(r.m_r, block_max(br, n));
      if (mx != neg_inf<acc_t>()) {
        if (mx > r.m_r) {
          if (r.m_r != neg_inf<acc_t>()) {
            r.s_r *= fast_exp(r.m_r - mx);
            r.a_sr += r.s_s * (r.m_r - mx);
          }
          r.m_r = mx;
        }
        r.s_r += block_sumexp(br, n, r.m_r);
      }
    }
    // Student: its max sets the weights w of every expectation.
    const acc_t mx = std::max(r.m_s, block_max(bs, n));
    if (mx == neg_inf<acc_t>()) continue;  // no student mass so far: nothing to add
    if (mx > r.m_s) {
      if (r.m_s != neg_inf<acc_t>()) {
        const acc_t f = fast_exp(r.m_s - mx);
        r.a_ss = f * (r.a_ss + r.s_s * (r.m_s - mx));
        r.s_s *= f;
        r.a_st *= f;
        r.a_sr *= f;
      }
      r.m_s = mx;
    }
    const acc_t ms = r.m_s, mt = r.m_t, mr = r.m_r;
    // sums[0..3] = S_s, A_ss, A_st, A_sr of this block (w = 0 columns add nothing to the A's).
    acc_t sums[4] = {0, 0, 0, 0};
    if (has_t && has_r) {
      lane_sums<4>(n, [&](int64_t j, int l, acc_t(*acc)[kLanes]) GOPD_LAMBDA_INLINE {
        const acc_t d = bs[j] - ms;
        const acc_t w = fast_exp(d);
        const bool on = w != 0;  // NaN w included: it must reach the sums
        acc[0][l] += w;
        acc[1][l] += on ? w * d : acc_t(0);
        acc[2][l] += on ? w * (bt[j] - mt) : acc_t(0);
        acc[3][l] += on ? w * (br[j] - mr) : acc_t(0);
      }, sums);
    } else if (has_t || has_r) {
      // One of teacher / reference: its cross term goes to sums[2] (teacher) or sums[3] (reference).
      const acc_t* bo = has_t ? bt : br;
      const acc_t mo = has_t ? mt : mr;
      acc_t three[3] = {0, 0, 0};
      lane_sums<3>(n, [&](int64_t j, int l, acc_t(*acc)[kLanes]) GOPD_LAMBDA_INLINE {
        const acc_t d = bs[j] - ms;
        const acc_t w = fast_exp(d);
        const bool on = w != 0;  // NaN w included: it must reach the sums
        acc[0][l] += w;
        acc[1][l] += on ? w * d : acc_t(0);
        acc[2][l] += on ? w * (bo[j] - mo) : acc_t(0);
      }, three);
      sums[0] = three[0];
      sums[1] = three[1];
      sums[has_t ? 2 : 3] = three[2];
    } else {
      lane_sums<2>(n, [&](int64_t j, int l, acc_t(*acc)[kLanes]) GOPD_LAMBDA_INLINE {
        const acc_t d = bs[j] - ms;
        const acc_t w = fast_exp(d);
        acc[0][l] += w;
        acc[1][l] += w != 0 ? w * d : acc_t(0);
      }, sums);
    }
    r.s_s += sums[0];
    r.a_ss += sums[1];
    r.a_st += sums[2];
    r.a_sr += sums[3];
  }

  // Stats are fp64 whatever acc_t: lse_m = M_m + log S_m formed in fp32 would lose the low bits of
  // every log-probability the backward recomputes from it (an ulp of |z / T|, ~1e-3 at 1e4).
  const double log_ss = std::log(static_cast<double>(r.s_s));
  const double lse_s = static_cast<double>(r.m_s) + log_ss;
  st[LSE_S] = lse_s;
  st[LP_S] = static_cast<double>(static_cast<acc_t>(zs[y]) * inv_ts - r.m_s) - log_ss;
  st[E_S] = static_cast<double>(r.a_ss) / r.s_s - log_ss;
  if (has_t) {
    const double log_st = std::log(static_cast<double>(r.s_t));
    st[LSE_T] = static_cast<double>(r.m_t) + log_st;
    st[LP_T] = static_cast<double>(static_cast<acc_t>(zt[y]) * inv_tt - r.m_t) - log_st;
    st[E_T] = static_cast<double>(r.a_st) / r.s_s - log_st;
  }
  if (has_r) {
    const double log_sr = std::log(static_cast<double>(r.s_r));
    st[LSE_R] = static_cast<double>(r.m_r) + log_sr;
    st[LP_R] = static_cast<double>(static_cast<acc_t>(zr[y]) * inv_tr - r.m_r) - log_sr;
    st[E_R] = static_cast<double>(r.a_sr) / r.s_s - log_sr;
  }
}

// Coefficients of one backward row, with every "0 coefficient drops its term" rule applied.
template <typename acc_t>
struct BackwardRow {
  acc_t lse_s, lse_t, lse_r;  // lse's of the kept terms, rounded to acc_t ...
  acc_t lo_s, lo_t, lo_r;     // ... and what that rounding lost (lse = hi + lo; 0 for fp64)
  acc_t ct, cr;               // lam and (1 - lam) where the term is kept, else 0
  bool use_t, use_r;
  acc_t g_loss, g_lp, loss, inv_ts;
};

template <typename scalar_t, typename acc_t>
GOPD_INLINE void backward_row(const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, scalar_t* out, int64_t v,
                  int64_t y, const BackwardRow<acc_t>& b, acc_t inv_ts, acc_t inv_tt, acc_t inv_tr, acc_t* __restrict bs,
                  acc_t* __restrict bt, acc_t* __restrict br) {
  const bool with_loss = b.g_loss != 0;
  const bool use_t = with_loss && b.use_t, use_r = with_loss && b.use_r;
  // out = p * (gl * (c - L) - glp) / ts, c - L = (z'_s - lse_s) - ct (z'_t - lse_t) - cr (z'_r - lse_r) - L.
  const acc_t gl = b.g_loss, glp = b.g_lp, lse_s = b.lse_s, lse_t = b.lse_t, lse_r = b.lse_r;
  const acc_t lo_s = b.lo_s, lo_t = b.lo_t, lo_r = b.lo_r;
  const acc_t ct = b.ct, cr = b.cr, loss = b.loss, its = b.inv_ts;
  for (int64_t start = 0; start < v; start += kBlock) {
    const int64_t n = std::min(kBlock, v - start);
    // Read the whole block before writing it: out may alias zs.
    load_scaled(zs + start, n, inv_ts, bs);
    if (use_t) load_scaled(zt + start, n, inv_tt, bt);
    if (use_r) load_scaled(zr + start, n, inv_tr, br);
    if (!with_loss) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) bs[j] = -glp * fast_exp((bs[j] - lse_s) - lo_s) * its;
    } else if (use_t && use_r) {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t lp = (bs[j] - lse_s) - lo_s;
        const acc_t p = fast_exp(lp);
        const acc_t c = lp - ct * ((bt[j] - lse_t) - lo_t) - cr * ((br[j] - lse_r) - lo_r);
        const acc_t g = p * (gl * (c - loss) - glp) * its;
        bs[j] = p != 0 ? g : acc_t(0);
      }
    } else if (use_t || use_r) {
      const acc_t* bo = use_t ? bt : br;
      const acc_t co = use_t ? ct : cr, lse_o = use_t ? lse_t : lse_r, lo_o = use_t ? lo_t : lo_r;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t lp = (bs[j] - lse_s) - lo_s;
        const acc_t p = fast_exp(lp);
        const acc_t c = lp - co * ((bo[j] - lse_o) - lo_o);
        const acc_t g = p * (gl * (c - loss) - glp) * its;
        bs[j] = p != 0 ? g : acc_t(0);
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) {
        const acc_t lp = (bs[j] - lse_s) - lo_s;
        const acc_t p = fast_exp(lp);
        const acc_t g = p * (gl * (lp - loss) - glp) * its;
        bs[j] = p != 0 ? g : acc_t(0);
      }
    }
    if (y >= start && y < start + n) bs[y - start] += glp * its;
    scalar_t* o = out + start;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) o[j] = static_cast<scalar_t>(zero_if_tiny(bs[j]));
  }
}

#if GOPD_HAVE_AVX2_PATH
template <typename scalar_t, typename acc_t, typename... Args>
GOPD_TARGET_AVX2 void forward_row_avx2(Args... args) {
  forward_row<scalar_t, acc_t>(args...);
}
template <typename scalar_t, typename acc_t, typename... Args>
GOPD_TARGET_AVX2 void backward_row_avx2(Args... args) {
  backward_row<scalar_t, acc_t>(args...);
}
#endif

#if GOPD_HAVE_AVX2_PATH
// The vectorised fp32 / bf16 / fp16 kernels (rows_simd.h), one copy per ISA.
// The next row of a thread's range (nullptr: none), prefetched into L2 during a forward row's second
// sweep. That sweep (three exps per column) runs from cache, so without this the memory bus idles
// while it computes and the next row's first sweep then waits on memory; with it the two overlap.
// Measured on AVX-512 with 2 threads, [512, 49152] fp32 x 3: forward 1.2-1.3 -> 0.86-0.95 ns per
// column. The backward has no such sweep to hide a read behind (its last sweep stores the gradient,
// and prefetching there measured slower), so it does not prefetch.
template <typename scalar_t>
struct NextRow {
  const scalar_t *s = nullptr, *t = nullptr, *r = nullptr;
  GOPD_INLINE void fetch(int64_t j) const {
    if (s != nullptr) _mm_prefetch(reinterpret_cast<const char*>(s + j), _MM_HINT_T1);
    if (t != nullptr) _mm_prefetch(reinterpret_cast<const char*>(t + j), _MM_HINT_T1);
    if (r != nullptr) _mm_prefetch(reinterpret_cast<const char*>(r + j), _MM_HINT_T1);
  }
};

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
#endif

// Instruction sets the kernels are built for, best last. Chosen once per process from the CPU's
// features, capped by the environment variable GOPD_CPU_ISA=baseline|avx2|avx512 (for tests and
// for comparing paths).
enum class Isa { kBaseline = 0, kAvx2 = 1, kAvx512 = 2 };

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

Isa cpu_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

#if GOPD_HAVE_AVX2_PATH
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

template <typename Coef, typename acc_t>
Coef simd_coef(const BackwardRow<acc_t>& b, acc_t itt, acc_t itr) {
  Coef k;
  k.lse_s = b.lse_s;
  k.lse_t = b.lse_t;
  k.lse_r = b.lse_r;
  k.lo_s = b.lo_s;
  k.lo_t = b.lo_t;
  k.lo_r = b.lo_r;
  k.ct = b.ct;
  k.cr = b.cr;
  k.its = b.inv_ts;
  k.itt = itt;
  k.itr = itr;
  k.a = b.g_loss * b.inv_ts;
  k.g_lp_s = b.g_lp * b.inv_ts;
  return k;
}

template <typename scalar_t, typename acc_t>
bool simd_backward(Isa isa, const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, scalar_t* out, int64_t v,
                   int64_t y, const BackwardRow<acc_t>& b, acc_t itt, acc_t itr) {
  if constexpr (std::is_same<acc_t, float>::value && !std::is_same<scalar_t, double>::value) {
    const bool with_loss = b.g_loss != 0;
    const bool ut = with_loss && b.use_t, ur = with_loss && b.use_r;
    if (isa == Isa::kAvx512) {
      avx512::backward_row<scalar_t>(zs, zt, zr, out, v, y, simd_coef<avx512::BackwardCoef>(b, itt, itr), ut, ur,
                                     b.g_lp * b.inv_ts);
      return true;
    }
    if (isa == Isa::kAvx2) {
      avx2::backward_row<scalar_t>(zs, zt, zr, out, v, y, simd_coef<avx2::BackwardCoef>(b, itt, itr), ut, ur,
                                   b.g_lp * b.inv_ts);
      return true;
    }
  }
  return false;
}
#endif

// Per-thread column buffers of the generic kernels.
template <typename acc_t>
struct Scratch {
  alignas(64) acc_t bs[kBlock], bt[kBlock], br[kBlock];
};

// The nine stats of one valid row into row[] (zt / zr may be nullptr: their stats stay 0).
template <typename scalar_t, typename acc_t>
void forward_one_row(Isa isa, const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, int64_t v, int64_t y,
                     acc_t its, acc_t itt, acc_t itr, Scratch<acc_t>& b, double* row,
                     const NextRow<scalar_t>& next = {}) {
  std::fill(row, row + kNumStats, 0.0);
#if GOPD_HAVE_AVX2_PATH
  if (simd_forward<scalar_t, acc_t>(isa, zs, zt, zr, v, y, its, itt, itr, row, next)) return;  // rows_simd.h
  if (isa != Isa::kBaseline) {  // the generic kernel's AVX2 build (fp64)
    forward_row_avx2<scalar_t, acc_t>(zs, zt, zr, v, y, its, itt, itr, &b.bs[0], &b.bt[0], &b.br[0], row);
    return;
  }
#endif
  forward_row<scalar_t, acc_t>(zs, zt, zr, v, y, its, itt, itr, b.bs, b.bt, b.br, row);
}

// What every backward row shares: the temperatures and which terms are kept.
template <typename acc_t>
struct RowCoef {
  acc_t its, itt, itr, ct, cr;
  bool use_t, use_r;
  double lam;
};

template <typename acc_t>
RowCoef<acc_t> row_coef(bool has_t, bool has_r, double lam, double ts, double tt, double tr) {
  RowCoef<acc_t> c;
  c.its = acc_t(1) / static_cast<acc_t>(ts);
  c.itt = acc_t(1) / static_cast<acc_t>(tt);
  c.itr = acc_t(1) / static_cast<acc_t>(tr);
  // A term whose coefficient is 0 is dropped (so a -inf log never meets a 0 coefficient).
  c.use_t = has_t && lam != 0.0;
  c.use_r = has_r && lam != 1.0;
  c.ct = c.use_t ? static_cast<acc_t>(lam) : acc_t(0);
  c.cr = c.use_r ? static_cast<acc_t>(1.0 - lam) : acc_t(0);
  c.lam = lam;
  return c;
}

// out = d(g_lp lp_s + g_loss L)/d zs for one valid row, from its nine stats (fp64, as forward_one_row
// writes them). out may alias zs.
template <typename scalar_t, typename acc_t>
void backward_one_row(Isa isa, const scalar_t* zs, const scalar_t* zt, const scalar_t* zr, scalar_t* out, int64_t v,
                      int64_t y, const double* row, acc_t g_lp, acc_t g_loss, const RowCoef<acc_t>& c,
                      Scratch<acc_t>& scratch) {
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
  b.inv_ts = c.its;
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
  if (simd_backward<scalar_t, acc_t>(isa, zs, zt, zr, out, v, y, b, c.itt, c.itr)) return;  // rows_simd.h
  if (isa != Isa::kBaseline) {  // the generic kernel's AVX2 build (fp64)
    backward_row_avx2<scalar_t, acc_t>(zs, zt, zr, out, v, y, b, c.its, c.itt, c.itr, &scratch.bs[0], &scratch.bt[0],
                                       &scratch.br[0]);
    return;
  }
#endif
  backward_row<scalar_t, acc_t>(zs, zt, zr, out, v, y, b, c.its, c.itt, c.itr, scratch.bs, scratch.bt, scratch.br);
}

void check_common(const at::Tensor& zs, const c10::optional<at::Tensor>& zt, const c10::optional<at::Tensor>& zr,
                  const at::Tensor& targets) {
  TORCH_CHECK(zs.device().is_cpu(), "gopd cpu backend: zs must be a CPU tensor");
  TORCH_CHECK(zs.dim() == 2, "gopd cpu backend: zs must be [N, V], got ", zs.sizes());
  TORCH_CHECK(zs.stride(1) == 1, "gopd cpu backend: zs must have stride(-1) == 1");
  for (const auto* z : {&zt, &zr}) {
    if (!z->has_value()) continue;
    const at::Tensor& t = z->value();
    TORCH_CHECK(t.device().is_cpu(), "gopd cpu backend: teacher / reference logits must be CPU tensors");
    TORCH_CHECK(t.sizes() == zs.sizes(), "gopd cpu backend: teacher / reference logits must have the shape of zs ",
                zs.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.stride(1) == 1, "gopd cpu backend: teacher / reference logits must have stride(-1) == 1");
    TORCH_CHECK(t.scalar_type() == zs.scalar_type(), "gopd cpu backend: all logits must share one dtype");
  }
  TORCH_CHECK(targets.device().is_cpu() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == zs.size(0),
              "gopd cpu backend: targets must be a CPU int64 tensor of shape [N]");
}

void check_dtype(const at::Tensor& zs) {
  const auto dt = zs.scalar_type();
  if (dt != at::kFloat && dt != at::kDouble && dt != at::kBFloat16 && dt != at::kHalf) {
    TORCH_CHECK_TYPE(false, "gopd cpu backend: unsupported dtype ", dt,
                     " (expected float16, bfloat16, float32 or float64)");
  }
}

template <typename scalar_t>
const scalar_t* opt_ptr(const c10::optional<at::Tensor>& z) {
  return z.has_value() ? z->data_ptr<scalar_t>() : nullptr;
}

int64_t opt_stride(const c10::optional<at::Tensor>& z) { return z.has_value() ? z->stride(0) : 0; }

// The three models' [N, V] logits as raw rows (a missing model gives nullptr rows).
template <typename scalar_t>
struct Logits {
  const scalar_t *s, *t, *r;
  int64_t ss, st, sr;
  Logits(const at::Tensor& zs, const c10::optional<at::Tensor>& zt, const c10::optional<at::Tensor>& zr)
      : s(zs.data_ptr<scalar_t>()), t(opt_ptr<scalar_t>(zt)), r(opt_ptr<scalar_t>(zr)), ss(zs.stride(0)),
        st(opt_stride(zt)), sr(opt_stride(zr)) {}
  const scalar_t* s_row(int64_t i) const { return s + i * ss; }
  const scalar_t* t_row(int64_t i) const { return t ? t + i * st : nullptr; }
  const scalar_t* r_row(int64_t i) const { return r ? r + i * sr : nullptr; }
  // Row i + 1 of a thread's range [., end), for NextRow's prefetch; none after its last row.
  NextRow<scalar_t> after(int64_t i, int64_t end) const {
    NextRow<scalar_t> n;
    if (i + 1 < end) {
      n.s = s_row(i + 1);
      n.t = t_row(i + 1);
      n.r = r_row(i + 1);
    }
    return n;
  }
};

int64_t grain_rows(int64_t v) { return std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(v, 1)); }

// body(begin, end, scratch) over ranges of the N rows on torch's thread pool (results do not depend on
// the split: rows are independent), each range with its own scratch and with subnormals flushed while
// it runs (SubnormalsAsZero). Every op's row loop goes through here.
template <typename acc_t, typename F>
void parallel_rows(int64_t n, int64_t v, const F& body) {
  at::parallel_for(0, n, grain_rows(v), [&](int64_t begin, int64_t end) {
    const SubnormalsAsZero ftz;
    Scratch<acc_t> scratch;
    body(begin, end, scratch);
  });
}

void check_target(int64_t y, int64_t v) {
  TORCH_CHECK(y >= 0 && y < v, "gopd cpu backend: target ", y, " out of range [0, ", v, ")");
}

// Checks a backward's out ([N, V], dtype of zs, stride(-1) == 1) and its upstream gradients ([N] each);
// returns the gradients as contiguous [N] tensors in the accumulation dtype (fp64 for fp64 logits).
std::pair<at::Tensor, at::Tensor> checked_out_and_grads(const at::Tensor& zs, const at::Tensor& out,
                                                        const at::Tensor& g_lp, const at::Tensor& g_loss) {
  TORCH_CHECK(out.device().is_cpu() && out.sizes() == zs.sizes() && out.scalar_type() == zs.scalar_type() &&
                  out.stride(1) == 1,
              "gopd cpu backend: out must be a CPU tensor with the shape and dtype of zs and stride(-1) == 1");
  const int64_t n = zs.size(0);
  TORCH_CHECK(g_lp.numel() == n && g_loss.numel() == n, "gopd cpu backend: g_lp and g_loss must have N elements");
  const auto acc_dtype = zs.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {g_lp.to(acc_dtype).contiguous().reshape({n}), g_loss.to(acc_dtype).contiguous().reshape({n})};
}

at::Tensor rows_forward_cpu(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                            const c10::optional<at::Tensor>& zr, const at::Tensor& targets, double ts, double tt,
                            double tr, int64_t ignore_index) {
  check_common(zs, zt, zr, targets);
  check_dtype(zs);
  const int64_t n = zs.size(0), v = zs.size(1);
  // fp64 statistics for every input dtype (see forward_row: an fp32 lse loses log-prob bits).
  at::Tensor stats = at::zeros({kNumStats, n}, zs.options().dtype(at::kDouble));
  if (n == 0) return stats;
  const at::Tensor tg = targets.contiguous();
  const int64_t* y = tg.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs.scalar_type(), "gopd_rows_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const Logits<scalar_t> z(zs, zt, zr);
    double* out = stats.data_ptr<double>();
    const acc_t its = acc_t(1) / static_cast<acc_t>(ts), itt = acc_t(1) / static_cast<acc_t>(tt),
                itr = acc_t(1) / static_cast<acc_t>(tr);
    const Isa isa = cpu_isa();
    parallel_rows<acc_t>(n, v, [&](int64_t begin, int64_t end, Scratch<acc_t>& scratch) {
      double row[kNumStats];
      for (int64_t i = begin; i < end; ++i) {
        if (y[i] == ignore_index) continue;  // masked: stats stay 0, no vocabulary pass
        check_target(y[i], v);
        forward_one_row<scalar_t, acc_t>(isa, z.s_row(i), z.t_row(i), z.r_row(i), v, y[i], its, itt, itr, scratch, row,
                                         z.after(i, end));
        for (int k = 0; k < kNumStats; ++k) out[k * n + i] = row[k];
      }
    });
  });
  return stats;
}

void rows_backward_cpu(const at::Tensor& zs, const c10::optional<at::Tensor>& zt, const c10::optional<at::Tensor>& zr,
                       const at::Tensor& targets, const at::Tensor& stats, const at::Tensor& g_lp,
                       const at::Tensor& g_loss, double lam, double ts, double tt, double tr, int64_t ignore_index,
                       at::Tensor out) {
  check_common(zs, zt, zr, targets);
  check_dtype(zs);
  const int64_t n = zs.size(0), v = zs.size(1);
  TORCH_CHECK(stats.device().is_cpu() && stats.dim() == 2 && stats.size(0) == kNumStats && stats.size(1) == n,
              "gopd cpu backend: stats must be [9, N] on CPU");
  const auto grads = checked_out_and_grads(zs, out, g_lp, g_loss);
  const at::Tensor &glp_c = grads.first, &gl_c = grads.second;
  if (n == 0) return;
  // Statistics are read in fp64 (as rows_forward writes them; fp32 stats from elsewhere are widened).
  const at::Tensor st_c = stats.to(at::kDouble).contiguous();
  const at::Tensor tg = targets.contiguous();
  const int64_t* y = tg.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs.scalar_type(), "gopd_rows_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const Logits<scalar_t> z(zs, zt, zr);
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t so = out.stride(0);
    const double* S = st_c.data_ptr<double>();
    const acc_t* GLP = glp_c.data_ptr<acc_t>();
    const acc_t* GL = gl_c.data_ptr<acc_t>();
    const Isa isa = cpu_isa();
    const RowCoef<acc_t> coef = row_coef<acc_t>(z.t != nullptr, z.r != nullptr, lam, ts, tt, tr);
    parallel_rows<acc_t>(n, v, [&](int64_t begin, int64_t end, Scratch<acc_t>& scratch) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* o = po + i * so;
        if (y[i] == ignore_index) {
          std::fill(o, o + v, static_cast<scalar_t>(0));
          continue;
        }
        check_target(y[i], v);
        double row[kNumStats];
        for (int k = 0; k < kNumStats; ++k) row[k] = S[k * n + i];
        backward_one_row<scalar_t, acc_t>(isa, z.s_row(i), z.t_row(i), z.r_row(i), o, v, y[i], row, GLP[i], GL[i], coef,
                                          scratch);
      }
    });
  });
}

// rows_forward, then rows_backward with the given (g_lp, g_loss), row by row: each row's backward reads
// the logits its forward has just brought into this core's cache, so the [N, V] logits are read from
// memory once instead of twice. For callers whose per-token gradients do not depend on the statistics
// (known before the forward). Returns the stats; out may be zs itself.
at::Tensor rows_forward_backward_cpu(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                                     const c10::optional<at::Tensor>& zr, const at::Tensor& targets,
                                     const at::Tensor& g_lp, const at::Tensor& g_loss, double lam, double ts, double tt,
                                     double tr, int64_t ignore_index, at::Tensor out) {
  check_common(zs, zt, zr, targets);
  check_dtype(zs);
  const int64_t n = zs.size(0), v = zs.size(1);
  const auto grads = checked_out_and_grads(zs, out, g_lp, g_loss);
  const at::Tensor &glp_c = grads.first, &gl_c = grads.second;
  at::Tensor stats = at::zeros({kNumStats, n}, zs.options().dtype(at::kDouble));
  if (n == 0) return stats;
  const at::Tensor tg = targets.contiguous();
  const int64_t* y = tg.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zs.scalar_type(), "gopd_rows_forward_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;
    const Logits<scalar_t> z(zs, zt, zr);
    scalar_t* po = out.data_ptr<scalar_t>();
    const int64_t so = out.stride(0);
    double* S = stats.data_ptr<double>();
    const acc_t* GLP = glp_c.data_ptr<acc_t>();
    const acc_t* GL = gl_c.data_ptr<acc_t>();
    const Isa isa = cpu_isa();
    const RowCoef<acc_t> coef = row_coef<acc_t>(z.t != nullptr, z.r != nullptr, lam, ts, tt, tr);
    parallel_rows<acc_t>(n, v, [&](int64_t begin, int64_t end, Scratch<acc_t>& scratch) {
      double row[kNumStats];
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* o = po + i * so;
        if (y[i] == ignore_index) {  // masked: stats stay 0, gradient 0
          std::fill(o, o + v, static_cast<scalar_t>(0));
          continue;
        }
        check_target(y[i], v);
        const scalar_t *zsi = z.s_row(i), *zti = z.t_row(i), *zri = z.r_row(i);
        forward_one_row<scalar_t, acc_t>(isa, zsi, zti, zri, v, y[i], coef.its, coef.itt, coef.itr, scratch, row,
                                         z.after(i, end));
        for (int k = 0; k < kNumStats; ++k) S[k * n + i] = row[k];
        backward_one_row<scalar_t, acc_t>(isa, zsi, zti, zri, o, v, y[i], row, GLP[i], GL[i], coef, scratch);
      }
    });
  });
  return stats;
}

}  // namespace

TORCH_LIBRARY_IMPL(gopd, CPU, m) {
  // Through the shared signatures (csrc/ops.h): a kernel that differs from them does not compile.
  m.impl("rows_forward", static_cast<gopd::RowsForwardFn*>(&rows_forward_cpu));
  m.impl("rows_backward", static_cast<gopd::RowsBackwardFn*>(&rows_backward_cpu));
  m.impl("rows_forward_backward", static_cast<gopd::RowsForwardBackwardFn*>(&rows_forward_backward_cpu));
}

}  // namespace cpu
}  // namespace gopd
