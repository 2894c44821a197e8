// G-OPD row kernels for CUDA: one vocabulary pass per row for the forward statistics, one pass
// per row for the student-logit gradient. See rows.cuh for the contract.
//
// Forward, per row, with a_k(v) = z_k(v) * (1 / T_k) for the present models k (student s = 0 first;
// 1 / T_k is rounded to fp32 once, and the product is rounded on its own, never fused into an FMA, so
// the forward and backward see the same a_k(v)):
//   M_k  running max of a_k,  S_k = sum_v exp(a_k(v) - M_k)            -> lse_k = M_k + log S_k
//   w(v) = exp(a_s(v) - M_s)  (the student's unnormalised weight)
//   W_s  = sum_v w(v) (a_s(v) - M_s)                                    -> E_s = W_s / S_s - log S_s
//   W_k  = sum_v w(v) (a_k(v) - R_k),  R_k = a_k at the student's running argmax
//        -> E_k = sum_v p_s(v) log p_k(v) = W_k / S_s + (R_k - M_k) - log S_k.
// Keeping every W relative to the student's argmax column (instead of summing p_s * a_k and
// subtracting lse at the end) avoids cancelling two ~1e4 numbers for large logits, and when p_s is
// (numerically) one-hot, W_k is exactly 0. When the student's max grows from M to M' the sums
// scale by f = exp(M - M'); W_s gains S_s (M - M') and W_k gains S_s (R_k - R_k') before scaling.
// A model's own max only rescales its S_k. The same rescale merges the partial states of two threads
// (warp shuffles, then shared memory). The final combination is in fp64 and the statistics are fp64:
// an fp32 lse of magnitude ~1e4 is only good to ~5e-4, and every log-probability the backward
// recomputes from it would carry that error. The backward splits each lse into hi + lo floats and
// computes log p_k(v) = (a_k(v) - hi) - lo.
//
// -inf columns: a column with a_s = -inf has p_s = 0 and contributes nothing to any W (never
// 0 * -inf); a model whose column is -inf where p_s > 0 gets W = -inf (its E is -inf, as in torch).
// NaN: a NaN logit never becomes a running max (x > m is false), so it sits in a partial state whose
// max may later jump by so much that exp(M - M') = 0; that emptying keeps NaN (never drops it). A +inf
// logit makes its model's statistics NaN (inf - inf), as does a row that is -inf everywhere.
// A row whose gradient is undefined (non-finite upstream gradients, a non-finite L with g_loss != 0,
// or a non-finite lse_s) gets NaN in every column: the non-finite rule of gopd_kernels.reference.
#include "rows.cuh"

#include <cmath>
#include <cstdint>

namespace gopd {
namespace cuda {
namespace {

constexpr int kThreads = 256;              // threads per block, both kernels
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kWarpRowMaxV = 2048;     // rows this short get a warp each (8 rows per block)
constexpr int kBwdItersPerThread = 4;      // vector iterations per thread per backward tile
constexpr unsigned kFullMask = 0xffffffffu;

// The per-row math is host-callable too, so it can be exercised without a GPU.
#define GOPD_HD __host__ __device__ __forceinline__

// The stats rows of model id (0: s, 1: t, 2: r) are LSE_S + id, LP_S + id and E_S + id.
static_assert(LSE_T == LSE_S + 1 && LSE_R == LSE_S + 2 && LP_T == LP_S + 1 && LP_R == LP_S + 2 && E_T == E_S + 1 &&
                  E_R == E_S + 2,
              "stats_layout.h: each statistic's rows must run s, t, r");

GOPD_HD float neg_inf() { return -INFINITY; }

GOPD_HD float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// Elements per 16-byte vector.
template <typename T>
struct VecWidth {
  static constexpr int value = 16 / static_cast<int>(sizeof(T));
};

// 16 bytes of one model's row (VEC elements).
template <typename T>
union Vec16 {
  uint4 raw;
  T elem[VecWidth<T>::value];
};

// Load VEC consecutive elements: one 16-byte load where the model's rows are 16-byte aligned, else
// VEC scalar loads (decided per model: one misaligned model does not slow the others down).
template <typename T>
__device__ __forceinline__ void load16(const T* p, bool aligned, Vec16<T>& u) {
  if (aligned) {
    u.raw = __ldg(reinterpret_cast<const uint4*>(p));
  } else {
#pragma unroll
    for (int j = 0; j < VecWidth<T>::value; ++j) u.elem[j] = p[j];
  }
}

// x * inv_t rounded on its own: on the device never contracted into an FMA with a later subtraction,
// so every kernel (and the host emulation) sees the same scaled logit.
GOPD_HD float scale(float x, float inv_t) {
#ifdef __CUDA_ARCH__
  return __fmul_rn(x, inv_t);
#else
  return x * inv_t;
#endif
}

GOPD_HD bool finite(float x) { return fabsf(x) <= 3.402823466e38f; }   // false for +-inf and NaN
GOPD_HD bool finite(double x) { return fabs(x) <= 1.7976931348623157e308; }

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&x)[VecWidth<T>::value]) {
  constexpr int VEC = VecWidth<T>::value;
  union {
    uint4 raw;
    T elem[VEC];
  } u;
#pragma unroll
  for (int j = 0; j < VEC; ++j) u.elem[j] = from_float<T>(x[j]);
  *reinterpret_cast<uint4*>(p) = u.raw;
}

// a - m with the convention (-inf) - (anything) = -inf, so an empty state (m = -inf) never
// produces NaN from -inf - (-inf).
GOPD_HD float shifted(float a, float m) { return a == -INFINITY ? -INFINITY : a - m; }

// Online state of one row for NM models (index 0 = student). See the file comment.
template <int NM>
struct RowState {
  float m[NM];    // running max of a_k
  float s[NM];    // sum exp(a_k - m[k])
  float w[NM];    // w[0] = sum ws (a_s - m[0]);  w[k] = sum ws (a_k - ref[k]) for k >= 1
  float ref[NM];  // ref[k] = a_k at the student's running argmax (ref[0] unused: it is m[0])

  GOPD_HD void init() {
#pragma unroll
    for (int k = 0; k < NM; ++k) {
      m[k] = neg_inf();
      s[k] = 0.f;
      w[k] = 0.f;
      ref[k] = 0.f;
    }
  }

  // Move the student's maximum to mn0 (>= m[0]) and the references to refn. A -inf reference
  // means the student's argmax column has p_k = 0, so E_k = -inf and w[k] (already -inf, or
  // about to be) is not shifted; this keeps inf - inf out.
  GOPD_HD void rescale_student(float mn0, const float (&refn)[NM]) {
    const float f = (mn0 == m[0]) ? 1.f : ((m[0] == -INFINITY) ? 0.f : expf(m[0] - mn0));
    if (f == 0.f) {  // nothing (or only underflowing mass) so far: the state is empty ...
      // ... except for a NaN, which must survive (a NaN never becomes the running max, so it is
      // usually in a state whose max is about to move; 0 * NaN would keep it, but 0 * -inf must not
      // make one, hence the selects).
      s[0] = s[0] != s[0] ? s[0] : 0.f;
#pragma unroll
      for (int k = 0; k < NM; ++k) w[k] = w[k] != w[k] ? w[k] : 0.f;
    } else {
      if (mn0 != m[0]) w[0] = f * (w[0] + s[0] * (m[0] - mn0));
#pragma unroll
      for (int k = 1; k < NM; ++k) {
        float wk = w[k];
        if (s[0] > 0.f && refn[k] != ref[k] && ref[k] != -INFINITY && refn[k] != -INFINITY)
          wk += s[0] * (ref[k] - refn[k]);
        w[k] = f * wk;
      }
      s[0] *= f;
    }
    m[0] = mn0;
#pragma unroll
    for (int k = 1; k < NM; ++k) ref[k] = refn[k];
  }

  // Move model k's own maximum (its logsumexp only) to mnk >= m[k].
  GOPD_HD void rescale_model(int k, float mnk) {
    if (mnk != m[k]) {
      s[k] *= (m[k] == -INFINITY) ? 0.f : expf(m[k] - mnk);
      m[k] = mnk;
    }
  }

  // Add NV columns x[k][j] (already divided by the temperatures).
  template <int NV>
  GOPD_HD void update(const float (&x)[NM][NV]) {
    float mn0 = m[0];
    float refn[NM];
#pragma unroll
    for (int k = 0; k < NM; ++k) refn[k] = ref[k];
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      if (x[0][j] > mn0) {  // new student argmax: the references follow it
        mn0 = x[0][j];
#pragma unroll
        for (int k = 1; k < NM; ++k) refn[k] = x[k][j];
      }
    }
    if (mn0 != m[0]) rescale_student(mn0, refn);
#pragma unroll
    for (int k = 1; k < NM; ++k) {
      float mk = m[k];
#pragma unroll
      for (int j = 0; j < NV; ++j) mk = fmaxf(mk, x[k][j]);
      rescale_model(k, mk);
    }
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const float d0 = shifted(x[0][j], m[0]);
      const float ws = expf(d0);
      s[0] += ws;
      w[0] += ws != 0.f ? ws * d0 : 0.f;  // != 0, not > 0: a NaN ws propagates
#pragma unroll
      for (int k = 1; k < NM; ++k) {
        const float xk = x[k][j];
        s[k] += expf(shifted(xk, m[k]));
        // ref[k] == -inf: w[k] is -inf (the argmax column), leave it so.
        const float d = xk == -INFINITY ? -INFINITY : (ref[k] == -INFINITY ? 0.f : xk - ref[k]);
        w[k] += ws != 0.f ? ws * d : 0.f;
      }
    }
  }

  GOPD_HD void merge(RowState& o) {
    // The side with the larger student max keeps its references (ties: this side).
    const bool mine = m[0] >= o.m[0];
    const float mn0 = mine ? m[0] : o.m[0];
    float refn[NM];
#pragma unroll
    for (int k = 0; k < NM; ++k) refn[k] = mine ? ref[k] : o.ref[k];
    rescale_student(mn0, refn);
    o.rescale_student(mn0, refn);
#pragma unroll
    for (int k = 1; k < NM; ++k) {
      const float mk = fmaxf(m[k], o.m[k]);
      rescale_model(k, mk);
      o.rescale_model(k, mk);
    }
#pragma unroll
    for (int k = 0; k < NM; ++k) {
      s[k] += o.s[k];
      w[k] += o.w[k];
    }
  }

  __device__ __forceinline__ void warp_reduce() {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      RowState o;
#pragma unroll
      for (int k = 0; k < NM; ++k) {
        o.m[k] = __shfl_xor_sync(kFullMask, m[k], off);
        o.s[k] = __shfl_xor_sync(kFullMask, s[k], off);
        o.w[k] = __shfl_xor_sync(kFullMask, w[k], off);
        o.ref[k] = k == 0 ? 0.f : __shfl_xor_sync(kFullMask, ref[k], off);
      }
      merge(o);
    }
  }
};

// Final statistics of one row from its reduced state, in fp64; zy[k] = a_k(target). Absent models get 0.
template <int NM>
GOPD_HD void write_row_stats(const RowState<NM>& st, const float (&zy)[NM], const int (&ids)[NM], double* stats,
                             int64_t n, int64_t row) {
  unsigned present = 0;
#pragma unroll
  for (int k = 0; k < NM; ++k) {
    const int id = ids[k];
    present |= 1u << id;
    const double log_sk = log(static_cast<double>(st.s[k]));
    const double m = st.m[k];
    stats[static_cast<int64_t>(LSE_S + id) * n + row] = m + log_sk;
    stats[static_cast<int64_t>(LP_S + id) * n + row] = (static_cast<double>(zy[k]) - m) - log_sk;
    // E_k = w_k / S_s + (R_k - M_k) - log S_k with R_s = M_s (R_k - M_k exact in fp64).
    const double r = k == 0 ? st.m[0] : st.ref[k];
    stats[static_cast<int64_t>(E_S + id) * n + row] =
        static_cast<double>(st.w[k]) / static_cast<double>(st.s[0]) + (r - m) - log_sk;
  }
#pragma unroll
  for (int id = 1; id < 3; ++id) {
    if (!(present & (1u << id))) {
      stats[static_cast<int64_t>(LSE_S + id) * n + row] = 0.0;
      stats[static_cast<int64_t>(LP_S + id) * n + row] = 0.0;
      stats[static_cast<int64_t>(E_S + id) * n + row] = 0.0;
    }
  }
}

// Pointers of the present models, student first; id[k] in {0: s, 1: t, 2: r} picks the stats rows.
template <typename T, int NM>
struct Models {
  const T* z[NM];
  int64_t stride[NM];
  float inv_temp[NM];  // 1 / T_k, rounded to fp32 once
  int id[NM];
};

// One row of the present models as a thread reads it: pointers, 1 / T_k, and whether model k's rows
// take 16-byte loads (bit k of the launcher's vec_mask).
template <typename T, int NM>
struct RowModels {
  const T* z[NM];
  float inv[NM];
  bool aligned[NM];
  __device__ __forceinline__ RowModels(const Models<T, NM>& mod, int64_t row, unsigned vec_mask) {
#pragma unroll
    for (int k = 0; k < NM; ++k) {
      z[k] = mod.z[k] + row * mod.stride[k];
      inv[k] = mod.inv_temp[k];
      aligned[k] = (vec_mask >> k) & 1u;
    }
  }
};

// The present models' scaled columns of 16-byte chunks u[k] into the online state.
template <typename T, int NM>
__device__ __forceinline__ void update_chunk(RowState<NM>& st, const Vec16<T> (&u)[NM], const float (&inv)[NM]) {
  constexpr int VEC = VecWidth<T>::value;
  float x[NM][VEC];
#pragma unroll
  for (int k = 0; k < NM; ++k) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) x[k][j] = scale(to_float(u[k].elem[j]), inv[k]);
  }
  st.template update<VEC>(x);
}

template <typename T, int NM>
__global__ void __launch_bounds__(kThreads)
    rows_forward_kernel(Models<T, NM> mod, const int64_t* __restrict__ targets, int64_t n, int64_t v,
                        int64_t ignore_index, double* __restrict__ stats, unsigned vec_mask, bool warp_per_row) {
  constexpr int VEC = VecWidth<T>::value;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t row = warp_per_row ? static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + warp
                                   : static_cast<int64_t>(blockIdx.x);
  const int tid = warp_per_row ? lane : static_cast<int>(threadIdx.x);
  const int nthreads = warp_per_row ? 32 : kThreads;
  if (row >= n) return;  // warp-per-row tail only: uniform per warp, no block barrier follows
  const int64_t y = targets[row];

  if (y == ignore_index) {  // masked row: zero stats, no vocabulary pass
    if (tid < NSTATS) stats[static_cast<int64_t>(tid) * n + row] = 0.0;
    return;  // uniform over the block (block mode) or the warp (warp mode)
  }

  const RowModels<T, NM> rm(mod, row, vec_mask);

  RowState<NM> st;
  st.init();
  int64_t col0 = 0;
  if (vec_mask != 0) {  // 16-byte chunks (vector loads for the aligned models)
    const int64_t nvec = v / VEC;
    int64_t c = tid;
    // Two chunks per iteration, every load issued before either chunk is processed. The chunks are
    // processed in the same order as one at a time (c, then c + nthreads).
    for (; c + nthreads < nvec; c += 2 * static_cast<int64_t>(nthreads)) {
      Vec16<T> u0[NM], u1[NM];
#pragma unroll
      for (int k = 0; k < NM; ++k) load16<T>(rm.z[k] + c * VEC, rm.aligned[k], u0[k]);
#pragma unroll
      for (int k = 0; k < NM; ++k) load16<T>(rm.z[k] + (c + nthreads) * VEC, rm.aligned[k], u1[k]);
      update_chunk<T, NM>(st, u0, rm.inv);
      update_chunk<T, NM>(st, u1, rm.inv);
    }
    if (c < nvec) {
      Vec16<T> u0[NM];
#pragma unroll
      for (int k = 0; k < NM; ++k) load16<T>(rm.z[k] + c * VEC, rm.aligned[k], u0[k]);
      update_chunk<T, NM>(st, u0, rm.inv);
    }
    col0 = nvec * VEC;
  }
  for (int64_t c = col0 + tid; c < v; c += nthreads) {  // scalar path, or the chunked path's tail
    float x[NM][1];
#pragma unroll
    for (int k = 0; k < NM; ++k) x[k][0] = scale(to_float(rm.z[k][c]), rm.inv[k]);
    st.template update<1>(x);
  }

  st.warp_reduce();
  if (!warp_per_row) {
    __shared__ float smem[4 * NM][kWarpsPerBlock];
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < NM; ++k) {
        smem[k][warp] = st.m[k];
        smem[NM + k][warp] = st.s[k];
        smem[2 * NM + k][warp] = st.w[k];
        smem[3 * NM + k][warp] = st.ref[k];
      }
    }
    __syncthreads();
    if (warp != 0) return;
    if (lane < kWarpsPerBlock) {
#pragma unroll
      for (int k = 0; k < NM; ++k) {
        st.m[k] = smem[k][lane];
        st.s[k] = smem[NM + k][lane];
        st.w[k] = smem[2 * NM + k][lane];
        st.ref[k] = smem[3 * NM + k][lane];
      }
    } else {
      st.init();
    }
    st.warp_reduce();
  }
  if (lane != 0) return;

  const bool y_ok = y >= 0 && y < v;  // out-of-range targets are the caller's error: give NaN, not a stray read
  float zy[NM];
#pragma unroll
  for (int k = 0; k < NM; ++k) zy[k] = y_ok ? scale(to_float(rm.z[k][y]), rm.inv[k]) : NAN;
  write_row_stats<NM>(st, zy, mod.id, stats, n, row);
}

// Gradient of one column given the row constants. coef[k]: 1 for the student, lam for the
// teacher, 1 - lam for the reference; a zero coefficient drops the term (even if its log is -inf).
template <int NM>
struct RowConst {
  float hi, lo;            // lse_s = hi + lo (lo = 0 where lse_s is +-inf; NaN stays NaN)
  float khi[NM], klo[NM];  // K_k = lse_k + E_k, so that log p_k(v) - E_k = a_k(v) - K_k
  float coef[NM];
  float g_lp;
  float g_loss;
  float inv_ts;
  bool bad;                // the row's gradient is undefined: NaN in every column
};

GOPD_HD void split_f64(double x, float& hi, float& lo) {
  hi = static_cast<float>(x);
  lo = static_cast<double>(hi) == x ? 0.f : static_cast<float>(x - static_cast<double>(hi));
}

// c(v) - L = sum_k coef_k (log p_k(v) - E_k) (teacher and reference with a minus sign), and
// log p_k(v) - E_k = a_k(v) - (lse_k + E_k): with K_k = lse_k + E_k split into two floats, no term of the
// backward is a difference of two large numbers rounded to fp32. (When p_s is one-hot, K_k is a_k at
// the argmax to fp64 precision, so c - L vanishes there as it should; an fp32 L would cancel two
// numbers of the size of log p_t at the argmax.)
template <int NM>
GOPD_HD RowConst<NM> make_row_const(const int (&ids)[NM], const double* stats, const float* g_lp,
                                    const float* g_loss, int64_t n, int64_t row, float lam, float inv_ts) {
  RowConst<NM> rc;
  const double lse_s = stats[static_cast<int64_t>(LSE_S) * n + row];
  split_f64(lse_s, rc.hi, rc.lo);
  double loss = 0.0;  // L, only for the rule on undefined rows
#pragma unroll
  for (int k = 0; k < NM; ++k) {
    const int id = ids[k];
    const double e = stats[static_cast<int64_t>(E_S + id) * n + row];
    split_f64(stats[static_cast<int64_t>(LSE_S + id) * n + row] + e, rc.khi[k], rc.klo[k]);
    rc.coef[k] = id == 0 ? 1.f : (id == 1 ? lam : 1.f - lam);
    if (rc.coef[k] != 0.f) loss += (id == 0 ? 1.0 : -static_cast<double>(rc.coef[k])) * e;
  }
  rc.g_lp = g_lp[row];
  rc.g_loss = g_loss[row];
  rc.inv_ts = inv_ts;
  rc.bad = !finite(rc.g_lp) || !finite(rc.g_loss) || (rc.g_loss != 0.f && !finite(loss)) || !finite(lse_s);
  return rc;
}

template <int NM>
GOPD_HD float column_grad(const RowConst<NM>& rc, const float (&a)[NM], bool is_target) {
  if (rc.bad) return NAN;  // uniform per row
  const float p = expf((a[0] - rc.hi) - rc.lo);
  float g = rc.g_lp * ((is_target ? 1.f : 0.f) - p);
  if (rc.g_loss != 0.f && p != 0.f) {  // NaN p: NaN gradient, as in torch
    float d = (a[0] - rc.khi[0]) - rc.klo[0];
#pragma unroll
    for (int k = 1; k < NM; ++k) {
      if (rc.coef[k] != 0.f) d -= rc.coef[k] * ((a[k] - rc.khi[k]) - rc.klo[k]);
    }
    g += rc.g_loss * (p * d);
  }
  return g * rc.inv_ts;
}

// grid.x = rows, grid.y = column tiles. Each thread reads column c of every model, then writes
// out(c): out may alias zs because no other thread touches that column. vec_mask bit 0: zs and out
// are 16-byte aligned (the chunked path); bit k >= 1: model k's rows are (vector loads).
template <typename T, int NM>
__global__ void __launch_bounds__(kThreads)
    rows_backward_kernel(Models<T, NM> mod, const int64_t* __restrict__ targets, const double* __restrict__ stats,
                         const float* __restrict__ g_lp, const float* __restrict__ g_loss, int64_t n, int64_t v,
                         float lam, int64_t ignore_index, T* out, int64_t out_stride, unsigned vec_mask) {
  constexpr int VEC = VecWidth<T>::value;
  const int64_t row = blockIdx.x;
  const int64_t y = targets[row];
  T* orow = out + row * out_stride;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kThreads;  // in columns (scalar) or chunks
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;

  if (y == ignore_index) {
    const T zero = from_float<T>(0.f);
    for (int64_t c = first; c < v; c += step) orow[c] = zero;
    return;
  }

  const RowConst<NM> rc = make_row_const<NM>(mod.id, stats, g_lp, g_loss, n, row, lam, mod.inv_temp[0]);

  const RowModels<T, NM> rm(mod, row, vec_mask);

  int64_t col0 = 0;
  if (vec_mask & 1u) {
    const int64_t nvec = v / VEC;
    for (int64_t c = first; c < nvec; c += step) {
      Vec16<T> u[NM];
#pragma unroll
      for (int k = 0; k < NM; ++k) load16<T>(rm.z[k] + c * VEC, rm.aligned[k], u[k]);
      float g[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float a[NM];
#pragma unroll
        for (int k = 0; k < NM; ++k) a[k] = scale(to_float(u[k].elem[j]), rm.inv[k]);
        g[j] = column_grad<NM>(rc, a, c * VEC + j == y);
      }
      store_vec<T>(orow + c * VEC, g);
    }
    col0 = nvec * VEC;
  }
  for (int64_t c = col0 + first; c < v; c += step) {
    float a[NM];
#pragma unroll
    for (int k = 0; k < NM; ++k) a[k] = scale(to_float(rm.z[k][c]), rm.inv[k]);
    orow[c] = from_float<T>(column_grad<NM>(rc, a, c == y));
  }
}

template <typename T>
bool aligned16(const T* p, int64_t stride) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0 && (stride * static_cast<int64_t>(sizeof(T))) % 16 == 0;
}

// Collect the present models (student first) and call f(Models<T, NM>) with the right NM.
template <typename T, typename F>
cudaError_t with_models(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride, const T* zr,
                        int64_t zr_stride, float ts, float tt, float tr, F&& f) {
  const T* ptr[3] = {zs, zt, zr};
  const int64_t stride[3] = {zs_stride, zt_stride, zr_stride};
  const float temp[3] = {ts, tt, tr};
  int nm = 0;
  const T* p_[3];
  int64_t s_[3];
  float t_[3];
  int id_[3];
  for (int id = 0; id < 3; ++id) {
    if (ptr[id] == nullptr) continue;
    p_[nm] = ptr[id];
    s_[nm] = stride[id];
    t_[nm] = temp[id];
    id_[nm] = id;
    ++nm;
  }
  auto fill = [&](auto& m, int count) {
    for (int k = 0; k < count; ++k) {
      m.z[k] = p_[k];
      m.stride[k] = s_[k];
      m.inv_temp[k] = static_cast<float>(1.0 / static_cast<double>(t_[k]));
      m.id[k] = id_[k];
    }
  };
  switch (nm) {
    case 1: {
      Models<T, 1> m;
      fill(m, 1);
      return f(m);
    }
    case 2: {
      Models<T, 2> m;
      fill(m, 2);
      return f(m);
    }
    case 3: {
      Models<T, 3> m;
      fill(m, 3);
      return f(m);
    }
    default:
      return cudaErrorInvalidValue;  // the student pointer is missing
  }
}


// Bit k: model k (in the present models' order, student first) has 16-byte aligned rows.
template <typename T>
unsigned aligned_mask(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride, const T* zr, int64_t zr_stride) {
  unsigned mask = 0;
  int k = 0;
  const T* ptr[3] = {zs, zt, zr};
  const int64_t stride[3] = {zs_stride, zt_stride, zr_stride};
  for (int id = 0; id < 3; ++id) {
    if (ptr[id] == nullptr) continue;
    if (aligned16(ptr[id], stride[id])) mask |= 1u << k;
    ++k;
  }
  return mask;
}

}  // namespace

template <typename T>
cudaError_t gopd_rows_forward_launch(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride,
                                     const T* zr, int64_t zr_stride, const int64_t* targets, int64_t n,
                                     int64_t v, float ts, float tt, float tr, int64_t ignore_index,
                                     double* stats, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (zs == nullptr) return cudaErrorInvalidValue;
  const unsigned vec_mask = aligned_mask(zs, zs_stride, zt, zt_stride, zr, zr_stride);
  const bool warp_per_row = v <= kWarpRowMaxV;
  const int64_t blocks = warp_per_row ? (n + kWarpsPerBlock - 1) / kWarpsPerBlock : n;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return with_models(zs, zs_stride, zt, zt_stride, zr, zr_stride, ts, tt, tr, [&](auto m) {
    constexpr int NM = sizeof(m.id) / sizeof(m.id[0]);
    rows_forward_kernel<T, NM><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        m, targets, n, v, ignore_index, stats, vec_mask, warp_per_row);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t gopd_rows_backward_launch(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride,
                                      const T* zr, int64_t zr_stride, const int64_t* targets,
                                      const double* stats, const float* g_lp, const float* g_loss,
                                      int64_t n, int64_t v, float lam, float ts, float tt, float tr,
                                      int64_t ignore_index, T* out, int64_t out_stride,
                                      cudaStream_t stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  if (zs == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (n > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  constexpr int VEC = VecWidth<T>::value;
  // Bit 0 (the chunked path) needs zs and out aligned; the other models then load per their own bit.
  unsigned vec_mask = aligned_mask(zs, zs_stride, zt, zt_stride, zr, zr_stride);
  if (!aligned16(static_cast<const T*>(out), out_stride)) vec_mask &= ~1u;
  const bool vec = vec_mask & 1u;
  // Enough column tiles per row that each thread does ~kBwdItersPerThread vector iterations.
  const int64_t per_tile = static_cast<int64_t>(kThreads) * (vec ? VEC : 1) * kBwdItersPerThread;
  int64_t tiles = (v + per_tile - 1) / per_tile;
  if (tiles > 65535) tiles = 65535;
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(tiles));
  return with_models(zs, zs_stride, zt, zt_stride, zr, zr_stride, ts, tt, tr, [&](auto m) {
    constexpr int NM = sizeof(m.id) / sizeof(m.id[0]);
    rows_backward_kernel<T, NM><<<grid, kThreads, 0, stream>>>(m, targets, stats, g_lp, g_loss, n, v, lam,
                                                               ignore_index, out, out_stride, vec_mask);
    return cudaGetLastError();
  });
}

#define GOPD_INSTANTIATE(T)                                                                                  \
  template cudaError_t gopd_rows_forward_launch<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, \
                                                   const int64_t*, int64_t, int64_t, float, float, float,   \
                                                   int64_t, double*, cudaStream_t);                         \
  template cudaError_t gopd_rows_backward_launch<T>(                                                        \
      const T*, int64_t, const T*, int64_t, const T*, int64_t, const int64_t*, const double*, const float*, \
      const float*, int64_t, int64_t, float, float, float, float, int64_t, T*, int64_t, cudaStream_t);

GOPD_INSTANTIATE(float)
GOPD_INSTANTIATE(__nv_bfloat16)
GOPD_INSTANTIATE(__half)

#undef GOPD_INSTANTIATE

}  // namespace cuda
}  // namespace gopd
