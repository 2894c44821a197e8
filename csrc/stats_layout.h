// The layout of the [NSTATS, N] statistics a row kernel returns (docs/design.md §4.2): one row per
// statistic, stats[k * N + i] for statistic k of row i.
//
// Defined once for the C++ code: the CPU kernels, the CUDA kernels and their bindings include this
// header. The Python side's definition is gopd_kernels/_layout.py; the extension exposes this one as
// _C.stats_layout() so that tests/test_stats_layout.py can hold the two equal. No torch or CUDA header:
// nvcc compiles it without a CUDA build of torch.
#pragma once

namespace gopd {

// LSE_m = logsumexp(z_m / T_m), LP_m = log p_m(target), E_m = sum_v p_s(v) log p_m(v), for the student
// (S), teacher (T) and reference (R).
enum Stat : int { LSE_S = 0, LSE_T, LSE_R, LP_S, LP_T, LP_R, E_S, E_T, E_R, NSTATS };

}  // namespace gopd
