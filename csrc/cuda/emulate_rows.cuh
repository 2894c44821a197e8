// Host emulation of rows_forward_kernel / rows_backward_kernel on float inputs, for testing the row
// math without a GPU (tests/test_cuda_backend.py compiles it with `nvcc -x cu -shared`; it is not
// part of the extension). It runs the kernels' own RowState / write_row_stats / make_row_const /
// column_grad / scale code, with the forward's thread layout (warp or block per row, 16-byte chunks
// of 4 fp32 or 8 bf16 / fp16 columns per thread and step, the scalar tail, the xor-shuffle tree and
// the shared-memory stage) replayed sequentially. 16-bit inputs arrive as their exact fp32 values;
// vec_width says which chunk layout the device would use for them.
#include "rows.cu"
#include <vector>
using namespace gopd::cuda;

static float inv_temp(float t) { return static_cast<float>(1.0 / static_cast<double>(t)); }

template <int NM, int VEC>
static void fwd(const float* const* z, const int64_t* stride, const float* temp, const int* id,
                const int64_t* targets, int64_t n, int64_t v, int64_t ig, double* stats, bool vec) {
  const bool warp_per_row = v <= kWarpRowMaxV;
  const int nthreads = warp_per_row ? 32 : kThreads;
  int ids[NM]; for (int k = 0; k < NM; ++k) ids[k] = id[k];
  float inv[NM]; for (int k = 0; k < NM; ++k) inv[k] = inv_temp(temp[k]);
  for (int64_t row = 0; row < n; ++row) {
    const int64_t y = targets[row];
    if (y == ig) { for (int s = 0; s < gopd::NSTATS; ++s) stats[s * n + row] = 0.0; continue; }
    std::vector<RowState<NM>> st(nthreads);
    for (int t = 0; t < nthreads; ++t) {
      st[t].init();
      int64_t col0 = 0;
      if (vec) {
        const int64_t nvec = v / VEC;
        for (int64_t c = t; c < nvec; c += nthreads) {
          float x[NM][VEC];
          for (int k = 0; k < NM; ++k) for (int j = 0; j < VEC; ++j) x[k][j] = scale(z[k][row * stride[k] + c * VEC + j], inv[k]);
          st[t].template update<VEC>(x);
        }
        col0 = nvec * VEC;
      }
      for (int64_t c = col0 + t; c < v; c += nthreads) {
        float x[NM][1];
        for (int k = 0; k < NM; ++k) x[k][0] = scale(z[k][row * stride[k] + c], inv[k]);
        st[t].template update<1>(x);
      }
    }
    auto warp_reduce = [&](std::vector<RowState<NM>>& s, int base) {
      for (int off = 16; off > 0; off >>= 1) {
        std::vector<RowState<NM>> old(s.begin() + base, s.begin() + base + 32);
        for (int l = 0; l < 32; ++l) { RowState<NM> o = old[l ^ off]; RowState<NM> me = old[l]; me.merge(o); s[base + l] = me; }
      }
    };
    for (int w = 0; w < nthreads / 32; ++w) warp_reduce(st, w * 32);
    RowState<NM> fin = st[0];
    if (!warp_per_row) {
      std::vector<RowState<NM>> s2(32);
      for (int l = 0; l < 32; ++l) { if (l < kWarpsPerBlock) s2[l] = st[l * 32]; else s2[l].init(); }
      warp_reduce(s2, 0);
      fin = s2[0];
    }
    float zy[NM];
    const bool y_ok = y >= 0 && y < v;  // as the kernel: an out-of-range target reads nothing, gives NaN
    for (int k = 0; k < NM; ++k) zy[k] = y_ok ? scale(z[k][row * stride[k] + y], inv[k]) : NAN;
    write_row_stats<NM>(fin, zy, ids, stats, n, row);
  }
}

template <int NM>
static void bwd(const float* const* z, const int64_t* stride, const float* temp, const int* id, const int64_t* targets,
                const double* stats, const float* g_lp, const float* g_loss, int64_t n, int64_t v, float lam, int64_t ig,
                float* out, int64_t out_stride) {
  int ids[NM]; for (int k = 0; k < NM; ++k) ids[k] = id[k];
  float inv[NM]; for (int k = 0; k < NM; ++k) inv[k] = inv_temp(temp[k]);
  for (int64_t row = 0; row < n; ++row) {
    const int64_t y = targets[row];
    if (y == ig) { for (int64_t c = 0; c < v; ++c) out[row * out_stride + c] = 0.f; continue; }
    const RowConst<NM> rc = make_row_const<NM>(ids, stats, g_lp, g_loss, n, row, lam, inv[0]);
    // Read the whole row before writing it: out may alias z[0].
    std::vector<float> g(v);
    for (int64_t c = 0; c < v; ++c) {
      float a[NM];
      for (int k = 0; k < NM; ++k) a[k] = scale(z[k][row * stride[k] + c], inv[k]);
      g[c] = column_grad<NM>(rc, a, c == y);
    }
    for (int64_t c = 0; c < v; ++c) out[row * out_stride + c] = g[c];
  }
}

template <int VEC>
static void fwd_nm(int nm, const float* const* z, const int64_t* stride, const float* temp, const int* id,
                   const int64_t* targets, int64_t n, int64_t v, int64_t ig, double* stats, bool vec) {
  if (nm == 1) fwd<1, VEC>(z, stride, temp, id, targets, n, v, ig, stats, vec);
  if (nm == 2) fwd<2, VEC>(z, stride, temp, id, targets, n, v, ig, stats, vec);
  if (nm == 3) fwd<3, VEC>(z, stride, temp, id, targets, n, v, ig, stats, vec);
}

// vec: the device would take the 16-byte chunk path (some model's rows are 16-byte aligned);
// vec_width: columns per chunk, 4 for fp32 and 8 for bf16 / fp16 input.
extern "C" void emu_forward(int nm, const float* const* z, const int64_t* stride, const float* temp, const int* id,
                            const int64_t* targets, int64_t n, int64_t v, int64_t ig, double* stats, int vec,
                            int vec_width) {
  if (vec_width == 8) fwd_nm<8>(nm, z, stride, temp, id, targets, n, v, ig, stats, vec);
  else fwd_nm<4>(nm, z, stride, temp, id, targets, n, v, ig, stats, vec);
}
extern "C" void emu_backward(int nm, const float* const* z, const int64_t* stride, const float* temp, const int* id,
                             const int64_t* targets, const double* stats, const float* g_lp, const float* g_loss,
                             int64_t n, int64_t v, float lam, int64_t ig, float* out, int64_t out_stride) {
  if (nm == 1) bwd<1>(z, stride, temp, id, targets, stats, g_lp, g_loss, n, v, lam, ig, out, out_stride);
  if (nm == 2) bwd<2>(z, stride, temp, id, targets, stats, g_lp, g_loss, n, v, lam, ig, out, out_stride);
  if (nm == 3) bwd<3>(z, stride, temp, id, targets, stats, g_lp, g_loss, n, v, lam, ig, out, out_stride);
}
