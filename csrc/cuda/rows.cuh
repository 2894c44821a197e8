// Host launchers of the G-OPD row kernels (CUDA backend).
//
// Raw pointers + a stream only: this header and rows.cu include no torch / ATen header, so
// nvcc compiles them without a CUDA build of torch (CI compiles them compile-only).
//
// Contract (see gopd_kernels/backends/__init__.py for the full statement):
//   zs, zt, zr : [n, v] logits of student / teacher / reference, element type T, stride(-1) == 1,
//                row strides given separately (in elements). zt and/or zr may be nullptr.
//   targets    : [n] int64, each in [0, v) or == ignore_index.
//   ts, tt, tr : temperatures (> 0); log p_m = z_m * (1 / T_m) - lse_m, computed in fp32.
//   stats      : [NSTATS, n] fp64, contiguous (fp64 so that lse_m keeps its low bits at |z / T| ~ 1e4), rows
//                LSE_S LSE_T LSE_R LP_S LP_T LP_R E_S E_T E_R (stats_layout.h)
//                with E_S = sum_v p_s log p_s, E_T = sum_v p_s log p_t, E_R = sum_v p_s log p_r.
//   Backward writes, for each valid row i and column v,
//       out(v) = ( g_loss_i * p(v) * (c(v) - L_i) + g_lp_i * ([v == y_i] - p(v)) ) / ts
//   with p = p_s, c = log p_s - lam log p_t - (1 - lam) log p_r, L = E_S - lam E_T - (1 - lam) E_R;
//   out may alias zs (same pointer and stride). Masked rows get zeros in stats / out. A row whose
//   gradient is undefined (g_lp or g_loss not finite, L not finite with g_loss != 0, or lse_s not
//   finite) gets NaN in every column.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include "stats_layout.h"

namespace gopd {
namespace cuda {

// T in {float, __nv_bfloat16, __half}. Returns the launch error (cudaSuccess when queued).
template <typename T>
cudaError_t gopd_rows_forward_launch(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride,
                                     const T* zr, int64_t zr_stride, const int64_t* targets, int64_t n,
                                     int64_t v, float ts, float tt, float tr, int64_t ignore_index,
                                     double* stats, cudaStream_t stream);

template <typename T>
cudaError_t gopd_rows_backward_launch(const T* zs, int64_t zs_stride, const T* zt, int64_t zt_stride,
                                      const T* zr, int64_t zr_stride, const int64_t* targets,
                                      const double* stats, const float* g_lp, const float* g_loss,
                                      int64_t n, int64_t v, float lam, float ts, float tt, float tr,
                                      int64_t ignore_index, T* out, int64_t out_stride,
                                      cudaStream_t stream);

}  // namespace cuda
}  // namespace gopd
