// G-OPD row kernels for CUDA: one vocabulary pass per row for the forward statistics, one pass
// per row for the student-logit gradient. See rows.cuh for the contract.
//
// Forward, per row and per present model m (student s first), with a_m(v) = z_m(v) / T_m:
//   M_m  running max of a_m
//   S_m  = sum_v exp(a_m(v) - M_m)                      -> lse_m = M_m + log S_m
//   W_m  = sum_v exp(a_s(v) - M_s) * (a_m(v) - M_m)      (only columns with p_s(v) > 0)
//        -> E_m = sum_v p_s(v) log p_m(v) = W_m / S_s - log S_m.
// Keeping W relative to the running maxima (instead of summing p_s * a_m and subtracting lse at
// the end) avoids the cancellation of two ~1e4 numbers for large logits. When a maximum grows
// from M to M', S_m scales by exp(M - M'), W_s becomes f (W_s + S_s (M_s - M_s')) with
// f = exp(M_s - M_s'), and every W_m picks up the student factor f and the shift -S_s (M_m' - M_m).
// The same rescale merges the partial states of two threads (warp shuffles, then shared memory).
//
// -inf columns: a column with a_s = -inf has p_s = 0 and contributes nothing to any W (never
// 0 * -inf); a model whose column is -inf where p_s > 0 gets W = -inf (its E is -inf, as in torch).
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

// Stats rows (match gopd_kernels.backends): LSE_m = m, LP_m = 3 + m, E_m = 6 + m for m in {s, t, r}.
constexpr int kLse = 0, kLp = 3, kE = 6;

__device__ __forceinline__ float neg_inf() { return -INFINITY; }

__device__ __forceinline__ float to_float(float x) { return x; }
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

// Load VEC consecutive elements (16 bytes, 16-byte aligned) as floats.
template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&x)[VecWidth<T>::value]) {
  constexpr int VEC = VecWidth<T>::value;
  union {
    uint4 raw;
    T elem[VEC];
  } u;
  u.raw = __ldg(reinterpret_cast<const uint4*>(p));
#pragma unroll
  for (int j = 0; j < VEC; ++j) x[j] = to_float(u.elem[j]);
}

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
__device__ __forceinline__ float shifted(float a, float m) { return a == -INFINITY ? -INFINITY : a - m; }

// Online state of one row for NM models (index 0 = student). See the file comment.
template <int NM>
struct RowState {
  float m[NM];
  float s[NM];
  float w[NM];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int k = 0; k < NM; ++k) {
      m[k] = neg_inf();
      s[k] = 0.f;
      w[k] = 0.f;
    }
  }

  // Re-express the state relative to new maxima mn (mn[k] >= m[k]).
  __device__ __forceinline__ void rescale(const float (&mn)[NM]) {
    if (mn[0] != m[0]) {
      const float f = (m[0] == -INFINITY) ? 0.f : expf(m[0] - mn[0]);
      if (f == 0.f) {  // nothing (or only underflowing mass) so far: the state is empty
        s[0] = 0.f;
#pragma unroll
        for (int k = 0; k < NM; ++k) w[k] = 0.f;
      } else {
        w[0] = f * (w[0] + s[0] * (m[0] - mn[0]));
        s[0] *= f;
#pragma unroll
        for (int k = 1; k < NM; ++k) w[k] *= f;
      }
      m[0] = mn[0];
    }
#pragma unroll
    for (int k = 1; k < NM; ++k) {
      if (mn[k] != m[k]) {
        // s[0] == 0 means no column with p_s > 0 yet: w[k] is 0 and stays 0 (avoids 0 * inf).
        if (s[0] > 0.f) w[k] -= s[0] * (mn[k] - m[k]);
        s[k] *= (m[k] == -INFINITY) ? 0.f : expf(m[k] - mn[k]);
        m[k] = mn[k];
      }
    }
  }

  // Add NV columns x[k][j] (already divided by the temperatures).
  template <int NV>
  __device__ __forceinline__ void update(const float (&x)[NM][NV]) {
    float mn[NM];
#pragma unroll
    for (int k = 0; k < NM; ++k) {
      mn[k] = m[k];
#pragma unroll
      for (int j = 0; j < NV; ++j) mn[k] = fmaxf(mn[k], x[k][j]);
    }
    rescale(mn);
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      const float d0 = shifted(x[0][j], m[0]);
      const float ws = expf(d0);
      s[0] += ws;
      w[0] += ws > 0.f ? ws * d0 : 0.f;
#pragma unroll
      for (int k = 1; k < NM; ++k) {
        const float d = shifted(x[k][j], m[k]);
        s[k] += expf(d);
        w[k] += ws > 0.f ? ws * d : 0.f;
      }
    }
  }

  __device__ __forceinline__ void merge(RowState& o) {
    float mn[NM];
#pragma unroll
    for (int k = 0; k < NM; ++k) mn[k] = fmaxf(m[k], o.m[k]);
    rescale(mn);
    o.rescale(mn);
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
      }
      merge(o);
    }
  }
};

// Pointers of the present models, student first; id[k] in {0: s, 1: t, 2: r} picks the stats rows.
template <typename T, int NM>
struct Models {
  const T* z[NM];
  int64_t stride[NM];
  float temp[NM];
  int id[NM];
};

template <typename T, int NM>
__global__ void __launch_bounds__(kThreads)
    rows_forward_kernel(Models<T, NM> mod, const int64_t* __restrict__ targets, int64_t n, int64_t v,
                        int64_t ignore_index, float* __restrict__ stats, bool vec, bool warp_per_row) {
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
    if (tid < kNumStats) stats[static_cast<int64_t>(tid) * n + row] = 0.f;
    return;  // uniform over the block (block mode) or the warp (warp mode)
  }

  const T* zrow[NM];
#pragma unroll
  for (int k = 0; k < NM; ++k) zrow[k] = mod.z[k] + row * mod.stride[k];

  RowState<NM> st;
  st.init();
  int64_t col0 = 0;
  if (vec) {
    const int64_t nvec = v / VEC;
    for (int64_t c = tid; c < nvec; c += nthreads) {
      float x[NM][VEC];
#pragma unroll
      for (int k = 0; k < NM; ++k) {
        load_vec<T>(zrow[k] + c * VEC, x[k]);
#pragma unroll
        for (int j = 0; j < VEC; ++j) x[k][j] = x[k][j] / mod.temp[k];
      }
      st.template update<VEC>(x);
    }
    col0 = nvec * VEC;
  }
  for (int64_t c = col0 + tid; c < v; c += nthreads) {  // scalar path, or the vector path's tail
    float x[NM][1];
#pragma unroll
    for (int k = 0; k < NM; ++k) x[k][0] = to_float(zrow[k][c]) / mod.temp[k];
    st.template update<1>(x);
  }

  st.warp_reduce();
  if (!warp_per_row) {
    __shared__ float smem[3 * NM][kWarpsPerBlock];
    if (lane == 0) {
#pragma unroll
      for (int k = 0; k < NM; ++k) {
        smem[k][warp] = st.m[k];
        smem[NM + k][warp] = st.s[k];
        smem[2 * NM + k][warp] = st.w[k];
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
      }
    } else {
      st.init();
    }
    st.warp_reduce();
  }
  if (lane != 0) return;

  const bool y_ok = y >= 0 && y < v;  // out-of-range targets are the caller's error: give NaN, not a stray read
  const float log_s0 = logf(st.s[0]);
  unsigned present = 0;
#pragma unroll
  for (int k = 0; k < NM; ++k) {
    const int id = mod.id[k];
    present |= 1u << id;
    const float log_sk = logf(st.s[k]);
    const float lse = st.m[k] + log_sk;
    const float zy = y_ok ? to_float(zrow[k][y]) / mod.temp[k] : NAN;
    stats[static_cast<int64_t>(kLse + id) * n + row] = lse;
    stats[static_cast<int64_t>(kLp + id) * n + row] = zy - lse;
    stats[static_cast<int64_t>(kE + id) * n + row] = st.w[k] / st.s[0] - (k == 0 ? log_s0 : log_sk);
  }
#pragma unroll
  for (int id = 1; id < 3; ++id) {  // a model that is absent has zero stats
    if (!(present & (1u << id))) {
      stats[static_cast<int64_t>(kLse + id) * n + row] = 0.f;
      stats[static_cast<int64_t>(kLp + id) * n + row] = 0.f;
      stats[static_cast<int64_t>(kE + id) * n + row] = 0.f;
    }
  }
}

// Gradient of one column given the row constants. coef[k]: 1 for the student, lam for the
// teacher, 1 - lam for the reference; a zero coefficient drops the term (even if its log is -inf).
template <int NM>
struct RowConst {
  float lse[NM];
  float coef[NM];
  float loss;   // L = E_S - lam E_T - (1 - lam) E_R
  float g_lp;
  float g_loss;
  float ts;
};

template <int NM>
__device__ __forceinline__ float column_grad(const RowConst<NM>& rc, const float (&a)[NM], bool is_target) {
  const float logp_s = a[0] - rc.lse[0];
  const float p = expf(logp_s);
  float g = rc.g_lp * ((is_target ? 1.f : 0.f) - p);
  if (rc.g_loss != 0.f && p > 0.f) {
    float c = logp_s;
#pragma unroll
    for (int k = 1; k < NM; ++k) {
      if (rc.coef[k] != 0.f) c -= rc.coef[k] * (a[k] - rc.lse[k]);
    }
    g += rc.g_loss * (p * (c - rc.loss));
  }
  return g / rc.ts;
}

// grid.x = rows, grid.y = column tiles. Each thread reads column c of every model, then writes
// out(c): out may alias zs because no other thread touches that column.
template <typename T, int NM>
__global__ void __launch_bounds__(kThreads)
    rows_backward_kernel(Models<T, NM> mod, const int64_t* __restrict__ targets, const float* __restrict__ stats,
                         const float* __restrict__ g_lp, const float* __restrict__ g_loss, int64_t n, int64_t v,
                         float lam, int64_t ignore_index, T* out, int64_t out_stride, bool vec) {
  constexpr int VEC = VecWidth<T>::value;
  const int64_t row = blockIdx.x;
  const int64_t y = targets[row];
  T* orow = out + row * out_stride;
  const int64_t step = static_cast<int64_t>(gridDim.y) * kThreads;  // in columns (scalar) or vectors
  const int64_t first = static_cast<int64_t>(blockIdx.y) * kThreads + threadIdx.x;

  if (y == ignore_index) {
    const T zero = from_float<T>(0.f);
    for (int64_t c = first; c < v; c += step) orow[c] = zero;
    return;
  }

  RowConst<NM> rc;
  const float* e = stats + static_cast<int64_t>(kE) * n;
  rc.loss = 0.f;
#pragma unroll
  for (int k = 0; k < NM; ++k) {
    const int id = mod.id[k];
    rc.lse[k] = stats[static_cast<int64_t>(kLse + id) * n + row];
    rc.coef[k] = id == 0 ? 1.f : (id == 1 ? lam : 1.f - lam);
    if (rc.coef[k] != 0.f) rc.loss += rc.coef[k] * (id == 0 ? 1.f : -1.f) * e[static_cast<int64_t>(id) * n + row];
  }
  rc.g_lp = g_lp[row];
  rc.g_loss = g_loss[row];
  rc.ts = mod.temp[0];

  const T* zrow[NM];
#pragma unroll
  for (int k = 0; k < NM; ++k) zrow[k] = mod.z[k] + row * mod.stride[k];

  int64_t col0 = 0;
  if (vec) {
    const int64_t nvec = v / VEC;
    for (int64_t c = first; c < nvec; c += step) {
      float x[NM][VEC];
#pragma unroll
      for (int k = 0; k < NM; ++k) load_vec<T>(zrow[k] + c * VEC, x[k]);
      float g[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        float a[NM];
#pragma unroll
        for (int k = 0; k < NM; ++k) a[k] = x[k][j] / mod.temp[k];
        g[j] = column_grad<NM>(rc, a, c * VEC + j == y);
      }
      store_vec<T>(orow + c * VEC, g);
    }
    col0 = nvec * VEC;
  }
  for (int64_t c = col0 + first; c < v; c += step) {
    float a[NM];
#pragma unroll
    for (int k = 0; k < NM; ++k) a[k] = to_float(zrow[k][c]) / mod.temp[k];
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
      m.temp[k] = t_[k];
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

}  // namespace

template <typename T>
cudaError_t gopd_rows_forward_launch(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride,
                                     const T* zr, int64_t zr_stride, const int64_t* targets, int64_t n,
                                     int64_t v, float ts, float tt, float tr, int64_t ignore_index,
                                     float* stats, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (zs == nullptr) return cudaErrorInvalidValue;
  const bool vec = aligned16(zs, zs_stride) && (zt == nullptr || aligned16(zt, zt_stride)) &&
                   (zr == nullptr || aligned16(zr, zr_stride));
  const bool warp_per_row = v <= kWarpRowMaxV;
  const int64_t blocks = warp_per_row ? (n + kWarpsPerBlock - 1) / kWarpsPerBlock : n;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  return with_models(zs, zs_stride, zt, zt_stride, zr, zr_stride, ts, tt, tr, [&](auto m) {
    constexpr int NM = sizeof(m.id) / sizeof(m.id[0]);
    rows_forward_kernel<T, NM><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        m, targets, n, v, ignore_index, stats, vec, warp_per_row);
    return cudaGetLastError();
  });
}

template <typename T>
cudaError_t gopd_rows_backward_launch(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride,
                                      const T* zr, int64_t zr_stride, const int64_t* targets,
                                      const float* stats, const float* g_lp, const float* g_loss,
                                      int64_t n, int64_t v, float lam, float ts, float tt, float tr,
                                      int64_t ignore_index, T* out, int64_t out_stride,
                                      cudaStream_t stream) {
  if (n == 0 || v == 0) return cudaSuccess;
  if (zs == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (n > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  constexpr int VEC = VecWidth<T>::value;
  const bool vec = aligned16(zs, zs_stride) && aligned16(static_cast<const T*>(out), out_stride) &&
                   (zt == nullptr || aligned16(zt, zt_stride)) && (zr == nullptr || aligned16(zr, zr_stride));
  // Enough column tiles per row that each thread does ~kBwdItersPerThread vector iterations.
  const int64_t per_tile = static_cast<int64_t>(kThreads) * (vec ? VEC : 1) * kBwdItersPerThread;
  int64_t tiles = (v + per_tile - 1) / per_tile;
  if (tiles > 65535) tiles = 65535;
  const dim3 grid(static_cast<unsigned>(n), static_cast<unsigned>(tiles));
  return with_models(zs, zs_stride, zt, zt_stride, zr, zr_stride, ts, tt, tr, [&](auto m) {
    constexpr int NM = sizeof(m.id) / sizeof(m.id[0]);
    rows_backward_kernel<T, NM><<<grid, kThreads, 0, stream>>>(m, targets, stats, g_lp, g_loss, n, v, lam,
                                                               ignore_index, out, out_stride, vec);
    return cudaGetLastError();
  });
}

#define GOPD_INSTANTIATE(T)                                                                                  \
  template cudaError_t gopd_rows_forward_launch<T>(const T*, int64_t, const T*, int64_t, const T*, int64_t, \
                                                   const int64_t*, int64_t, int64_t, float, float, float,   \
                                                   int64_t, float*, cudaStream_t);                          \
  template cudaError_t gopd_rows_backward_launch<T>(                                                        \
      const T*, int64_t, const T*, int64_t, const T*, int64_t, const int64_t*, const float*, const float*,  \
      const float*, int64_t, int64_t, float, float, float, float, int64_t, T*, int64_t, cudaStream_t);

GOPD_INSTANTIATE(float)
GOPD_INSTANTIATE(__nv_bfloat16)
GOPD_INSTANTIATE(__half)

#undef GOPD_INSTANTIATE

}  // namespace cuda
}  // namespace gopd
