// The C++ signature of each device's kernel for the schemas in csrc/module.cpp.
//
// The dispatcher requires every kernel registered for one op to have the same C++ signature, and it
// checks that when the library is loaded: a CPU kernel taking `at::Tensor out` beside a CUDA kernel
// taking `at::Tensor& out` aborts `import gopd_kernels._C` (std::terminate in a static initializer,
// no message; seen on an H200, 2026-11-28). Each TORCH_LIBRARY_IMPL registers its kernels through
// these types, so a mismatch is a compile error instead (CI compiles the CUDA bindings too).
#pragma once

#include <ATen/ATen.h>

namespace gopd {

using RowsForwardFn = at::Tensor(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                                 const c10::optional<at::Tensor>& zr, const at::Tensor& targets, double ts,
                                 double tt, double tr, int64_t ignore_index);

using RowsBackwardFn = void(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                            const c10::optional<at::Tensor>& zr, const at::Tensor& targets, const at::Tensor& stats,
                            const at::Tensor& g_lp, const at::Tensor& g_loss, double lam, double ts, double tt,
                            double tr, int64_t ignore_index, at::Tensor out);

using RowsForwardBackwardFn = at::Tensor(const at::Tensor& zs, const c10::optional<at::Tensor>& zt,
                                         const c10::optional<at::Tensor>& zr, const at::Tensor& targets,
                                         const at::Tensor& g_lp, const at::Tensor& g_loss, double lam, double ts,
                                         double tt, double tr, int64_t ignore_index, at::Tensor out);

}  // namespace gopd
