"""The row statistics' layout: rows_forward returns a [NSTATS, N] tensor, one row per statistic.

lse_m = logsumexp(z_m / T_m), lp_m = log p_m(target), E_m = sum_v p_s(v) log p_m(v), for the student (S),
teacher (T) and reference (R). The C++, CUDA and Triton kernels write the same rows in the same order.
"""

LSE_S, LSE_T, LSE_R, LP_S, LP_T, LP_R, E_S, E_T, E_R = range(9)
NSTATS = 9
