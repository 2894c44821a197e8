// gopd_kernels._C: the pybind11 module and the operator schemas of the G-OPD row kernels.
//
// The schemas are defined once here (TORCH_LIBRARY); each device registers its implementation
// separately (TORCH_LIBRARY_IMPL(gopd, CPU, m) in csrc/cpu/, (gopd, CUDA, m) in csrc/cuda/), so the
// Python side calls torch.ops.gopd.rows_forward / rows_backward and the dispatcher picks the device.
// The semantics are the backend contract documented in gopd_kernels/backends/__init__.py.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#ifndef GOPD_VERSION
#define GOPD_VERSION "0.0.0"
#endif

TORCH_LIBRARY(gopd, m) {
  // stats [9, N] (fp64 for fp64 input, else fp32): LSE_S LSE_T LSE_R LP_S LP_T LP_R E_S E_T E_R.
  m.def("rows_forward(Tensor zs, Tensor? zt, Tensor? zr, Tensor targets, float ts, float tt, float tr, "
        "int ignore_index) -> Tensor");
  // Writes d(g_lp . lp_s + g_loss . L)/d zs into out ([N, V], dtype of zs); out may be zs itself.
  m.def("rows_backward(Tensor zs, Tensor? zt, Tensor? zr, Tensor targets, Tensor stats, Tensor g_lp, "
        "Tensor g_loss, float lam, float ts, float tt, float tr, int ignore_index, Tensor(a!) out) -> ()");
  // rows_forward then rows_backward, row by row (CPU only): for per-token gradients known before the
  // forward; returns the stats and writes the gradient into out.
  m.def("rows_forward_backward(Tensor zs, Tensor? zt, Tensor? zr, Tensor targets, Tensor g_lp, Tensor g_loss, "
        "float lam, float ts, float tt, float tr, int ignore_index, Tensor(a!) out) -> Tensor");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gopd_kernels C++/CUDA extension: registers torch.ops.gopd.rows_forward / rows_backward";
  m.def(
      "built_with_cuda",
      []() {
#ifdef GOPD_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "Whether the CUDA kernels were compiled into this build.");
  m.attr("__version__") = GOPD_VERSION;
}
