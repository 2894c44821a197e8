"""The layout of the [NSTATS, N] statistics a row kernel returns (docs/design.md §4.2): one row per statistic."""

LSE_S, LSE_T, LSE_R, LP_S, LP_T, LP_R, E_S, E_T, E_R = range(9)
NSTATS = 9
