// gopd_kernels._C: the pybind11 module and the operator schemas of the G-OPD row kernels.
//
// The schemas are defined once here (TORCH_LIBRARY); each device registers its implementation
// separately (TORCH_LIBRARY_IMPL(gopd, CPU, m) in csrc/cpu/, (gopd, CUDA, m) in csrc/cuda/), so the
// Python side calls torch.ops.gopd.rows_forward / rows_backward and the dispatcher picks the device.
// The semantics are the backend contract documented in gopd_kernels/backends/__init__.py.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include "stats_layout.h"

#ifndef GOPD_VERSION
#define GOPD_VERSION "0.0.0"
#endif

TORCH_LIBRARY(gopd, m) {
  // stats [NSTATS, N] (fp64 for fp64 input, else fp32), one row per statistic (csrc/stats_layout.h).
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
  m.def(
      "stats_layout",
      []() {
        pybind11::dict d;
        d["LSE_S"] = static_cast<int>(gopd::LSE_S);
        d["LSE_T"] = static_cast<int>(gopd::LSE_T);
        d["LSE_R"] = static_cast<int>(gopd::LSE_R);
        d["LP_S"] = static_cast<int>(gopd::LP_S);
        d["LP_T"] = static_cast<int>(gopd::LP_T);
        d["LP_R"] = static_cast<int>(gopd::LP_R);
        d["E_S"] = static_cast<int>(gopd::E_S);
        d["E_T"] = static_cast<int>(gopd::E_T);
        d["E_R"] = static_cast<int>(gopd::E_R);
        d["NSTATS"] = static_cast<int>(gopd::NSTATS);
        return d;
      },
      "The row of each statistic in the [NSTATS, N] stats the row kernels return (csrc/stats_layout.h), "
      "and NSTATS: {name: index}.");
  m.attr("__version__") = GOPD_VERSION;
}
