// CUDA implementations of torch.ops.gopd.rows_forward / rows_backward (schemas in csrc/module.cpp).
//
// Checks the tensors, takes the current stream and calls the raw-pointer launchers of rows.cu.
// Compiled only when torch has CUDA (the extension's CMake adds csrc/cuda/* then).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "ops.h"
#include "rows.cuh"

namespace {

using gopd::NSTATS;

void check_logits(const at::Tensor& t, const at::Tensor& zs, const char* name) {
  TORCH_CHECK(t.is_cuda(), "gopd cuda backend: ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == zs.device(), "gopd cuda backend: ", name, " is on ", t.device(), " but zs on ",
              zs.device());
  TORCH_CHECK(t.dim() == 2, "gopd cuda backend: ", name, " must be [N, V], got ", t.sizes());
  TORCH_CHECK(t.sizes() == zs.sizes(), "gopd cuda backend: ", name, " must have the shape of zs ", zs.sizes(),
              ", got ", t.sizes());
  TORCH_CHECK(t.size(1) <= 1 || t.stride(1) == 1, "gopd cuda backend: ", name, " must have stride(-1) == 1");
  TORCH_CHECK(t.scalar_type() == zs.scalar_type(), "gopd cuda backend: all logits must share one dtype (",
              name, " is ", t.scalar_type(), ", zs is ", zs.scalar_type(), ")");
}

void check_common(const at::Tensor& zs, const c10::optional<at::Tensor>& zt, const c10::optional<at::Tensor>& zr,
                  const at::Tensor& targets) {
  check_logits(zs, zs, "zs");
  if (zt.has_value()) check_logits(*zt, zs, "zt");
  if (zr.has_value()) check_logits(*zr, zs, "zr");
  const auto st = zs.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf,
                   "gopd cuda backend: unsupported dtype ", st,
                   " (expected float32, bfloat16 or float16; use backend='torch' or 'cpu' for float64)");
  TORCH_CHECK(targets.device() == zs.device() && targets.scalar_type() == at::kLong && targets.dim() == 1 &&
                  targets.size(0) == zs.size(0),
              "gopd cuda backend: targets must be an int64 [N] tensor on ", zs.device());
}

// Row stride in elements (a [N, 1] or [0, V] tensor may report any stride: use V then).
int64_t row_stride(const at::Tensor& t) { return t.size(0) > 1 ? t.stride(0) : t.size(1); }

at::Tensor contiguous_f32(const at::Tensor& t, const at::Tensor& zs, int64_t n, const char* name) {
  TORCH_CHECK(t.device() == zs.device() && t.numel() == n, "gopd cuda backend: ", name,
              " must have N elements on ", zs.device());
  return t.reshape({n}).to(at::kFloat).contiguous();
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? reinterpret_cast<const T*>(t->data_ptr()) : nullptr;
}

template <typename T>
int64_t stride_or_zero(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? row_stride(*t) : 0;
}

// Call f(T{}) with T the CUDA element type of `st`.
template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(__nv_bfloat16{});
      break;
    case at::kHalf:
      f(__half{});
      break;
    default:
      TORCH_CHECK_TYPE(false, "gopd cuda backend: unsupported dtype ", st);
  }
}

at::Tensor rows_forward_cuda(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                             const c10::optional<at::Tensor>& zr, const at::Tensor& targets, double ts, double tt,
                             double tr, int64_t ignore_index) {
  check_common(zs, zt, zr, targets);
  TORCH_CHECK(ts > 0 && tt > 0 && tr > 0, "gopd cuda backend: temperatures must be > 0");
  const c10::cuda::CUDAGuard guard(zs.device());
  const int64_t n = zs.size(0), v = zs.size(1);
  auto stats = at::empty({NSTATS, n}, zs.options().dtype(at::kDouble));
  if (n == 0) return stats;
  const at::Tensor y = targets.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(zs.device().index()).stream();
  cudaError_t err = cudaSuccess;
  dispatch_dtype(zs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    err = gopd::cuda::gopd_rows_forward_launch<T>(
        reinterpret_cast<const T*>(zs.data_ptr()), row_stride(zs), ptr_or_null<T>(zt), stride_or_zero<T>(zt),
        ptr_or_null<T>(zr), stride_or_zero<T>(zr), y.data_ptr<int64_t>(), n, v, static_cast<float>(ts),
        static_cast<float>(tt), static_cast<float>(tr), ignore_index, stats.data_ptr<double>(), stream);
  });
  TORCH_CHECK(err == cudaSuccess, "gopd cuda backend: rows_forward launch failed: ", cudaGetErrorString(err));
  return stats;
}

void rows_backward_cuda(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                        const c10::optional<at::Tensor>& zr, const at::Tensor& targets, const at::Tensor& stats,
                        const at::Tensor& g_lp, const at::Tensor& g_loss, double lam, double ts, double tt,
                        double tr, int64_t ignore_index, at::Tensor out) {
  check_common(zs, zt, zr, targets);
  TORCH_CHECK(ts > 0 && tt > 0 && tr > 0, "gopd cuda backend: temperatures must be > 0");
  const int64_t n = zs.size(0), v = zs.size(1);
  TORCH_CHECK(out.device() == zs.device() && out.sizes() == zs.sizes() && out.scalar_type() == zs.scalar_type() &&
                  (v <= 1 || out.stride(1) == 1),
              "gopd cuda backend: out must be a [N, V] tensor like zs with stride(-1) == 1");
  TORCH_CHECK(stats.device() == zs.device() && stats.dim() == 2 && stats.size(0) == NSTATS &&
                  stats.size(1) == n,
              "gopd cuda backend: stats must be [", NSTATS, ", N] on ", zs.device());
  if (n == 0 || v == 0) return;
  const c10::cuda::CUDAGuard guard(zs.device());
  const at::Tensor st = stats.to(at::kDouble).contiguous();
  const at::Tensor glp = contiguous_f32(g_lp, zs, n, "g_lp");
  const at::Tensor gl = contiguous_f32(g_loss, zs, n, "g_loss");
  const at::Tensor y = targets.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(zs.device().index()).stream();
  cudaError_t err = cudaSuccess;
  dispatch_dtype(zs.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    err = gopd::cuda::gopd_rows_backward_launch<T>(
        reinterpret_cast<const T*>(zs.data_ptr()), row_stride(zs), ptr_or_null<T>(zt), stride_or_zero<T>(zt),
        ptr_or_null<T>(zr), stride_or_zero<T>(zr), y.data_ptr<int64_t>(), st.data_ptr<double>(),
        glp.data_ptr<float>(), gl.data_ptr<float>(), n, v, static_cast<float>(lam), static_cast<float>(ts),
        static_cast<float>(tt), static_cast<float>(tr), ignore_index, reinterpret_cast<T*>(out.data_ptr()),
        row_stride(out), stream);
  });
  TORCH_CHECK(err == cudaSuccess, "gopd cuda backend: rows_backward launch failed: ", cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_IMPL(gopd, CUDA, m) {
  // Through the shared signatures (csrc/ops.h): a kernel that differs from them does not compile.
  m.impl("rows_forward", static_cast<gopd::RowsForwardFn*>(&rows_forward_cuda));
  m.impl("rows_backward", static_cast<gopd::RowsBackwardFn*>(&rows_backward_cuda));
}
