// The generic CPU row kernels (any dtype, fp64 included; the only kernels on CPUs without AVX2), and
// the scalar pieces every CPU row kernel shares (force-inline macros, fast_exp, zero_if_tiny).
//
// Everything here is inline and internal (an anonymous namespace; the one translation unit that
// includes it is bindings.cpp, through row_dispatch.h), so the copy row_dispatch.h compiles with
// target("avx2,fma") cannot leak AVX2 code into the baseline path.
//
// Algorithm: one pass over the vocabulary per row, in column blocks that stay in L1. Per block we
// up-cast the (scaled) logits of the three models into fp32 buffers, take the block maxima, move the
// running maxima M_m, rescale the running sums, and accumulate with the block's fixed maxima:
//   S_m  = sum_v exp(z'_m(v) - M_m)                     (so lse_m = M_m + log S_m)
//   A_ss = sum_v w(v) (z'_s(v) - M_s),  w = exp(z'_s - M_s)          (student self term)
//   A_st = sum_v w(v) (z'_t(v) - M_t),  A_sr likewise                 (cross terms)
// Keeping every logit shifted by its own running max keeps the accumulated terms small (no
// catastrophic cancellation against lse when logits are ~1e4). At the end
//   E_S = A_ss / S_s - log S_s,  E_T = A_st / S_s - log S_t,  E_R = A_sr / S_s - log S_r.
// When M_s moves from a to b (f = exp(a - b)): S_s, A_st, A_sr scale by f and
//   A_ss <- f (A_ss + S_s (a - b)); when M_t moves from a to b: A_st += S_s (a - b).
// Columns with w = 0 (z_s = -inf) contribute nothing to the A's (select, never 0 * -inf).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "stats_layout.h"

#define GOPD_INLINE inline __attribute__((always_inline))
#define GOPD_LAMBDA_INLINE __attribute__((always_inline))

namespace gopd {
namespace cpu {
namespace {

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
// The vectorised kernels (rows_simd.h) apply the same floor.
template <typename acc_t>
constexpr acc_t kTinyGrad = std::numeric_limits<acc_t>::min();
template <>
constexpr float kTinyGrad<float> = 0x1p-100f;

template <typename acc_t>
GOPD_INLINE acc_t zero_if_tiny(acc_t x) {
  return std::fabs(x) < kTinyGrad<acc_t> ? acc_t(0) : x;  // NaN kept (the compare is false)
}

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

// One block of the teacher or the reference (scaled logits b[0..n)) into its running max m and sum s:
// move the max, rescale, add the block. A move of m shifts every accumulated (z'_m - m) of the cross
// term a_cross (A_st or A_sr) by (old - new), weighted by the student mass s_s so far.
template <typename acc_t>
GOPD_INLINE void add_block_of_other(const acc_t* b, int64_t n, acc_t s_s, acc_t& m, acc_t& s, acc_t& a_cross) {
  const acc_t mx = std::max(m, block_max(b, n));
  if (mx == neg_inf<acc_t>()) return;
  if (mx > m) {
    if (m != neg_inf<acc_t>()) {
      s *= fast_exp(m - mx);
      a_cross += s_s * (m - mx);
    }
    m = mx;
  }
  s += block_sumexp(b, n, m);
}

// The stats of one valid row into st[] (layout of stats_layout.h; zt / zr may be nullptr: their stats
// are left untouched). bs, bt, br: kBlock-column buffers.
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

    if (has_t) add_block_of_other(bt, n, r.s_s, r.m_t, r.s_t, r.a_st);
    if (has_r) add_block_of_other(br, n, r.s_s, r.m_r, r.s_r, r.a_sr);
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

// Coefficients of one backward row, with every "0 coefficient drops its term" rule applied; the generic
// and the vectorised (rows_simd.h) backward both take them.
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

}  // namespace
}  // namespace cpu
}  // namespace gopd
