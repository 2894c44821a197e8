"""The stats layout is defined once per language: csrc/stats_layout.h for the C++ / CUDA kernels,
gopd_kernels/_layout.py for Python. The extension reports the header's values (_C.stats_layout()), so a
change to either side alone fails here."""

import torch

from gopd_kernels import _layout

from helpers import missing

NAMES = ("LSE_S", "LSE_T", "LSE_R", "LP_S", "LP_T", "LP_R", "E_S", "E_T", "E_R")


def _extension():
    try:
        from gopd_kernels import _C
    except ImportError as err:
        missing(f"the C++ extension gopd_kernels._C ({err})")
    return _C


def test_python_layout_is_one_row_per_statistic():
    assert sorted(getattr(_layout, name) for name in NAMES) == list(range(_layout.NSTATS))


def test_cpp_header_matches_python_layout():
    cpp = _extension().stats_layout()
    python = {name: getattr(_layout, name) for name in (*NAMES, "NSTATS")}
    assert cpp == python


def test_cpu_kernel_writes_the_rows_the_layout_names():
    """The C++ kernel's stats, read through the Python names, are the statistics those names stand for."""
    _extension()
    g = torch.Generator().manual_seed(0)
    zs, zt, zr = (torch.randn(3, 11, dtype=torch.float64, generator=g) for _ in range(3))
    y = torch.tensor([0, 4, 10])
    stats = torch.ops.gopd.rows_forward(zs, zt, zr, y, 1.0, 1.0, 1.0, -100)
    assert stats.shape == (_layout.NSTATS, 3)
    log_p = {m: torch.log_softmax(z, -1) for m, z in (("S", zs), ("T", zt), ("R", zr))}
    for m, z in (("S", zs), ("T", zt), ("R", zr)):
        torch.testing.assert_close(stats[getattr(_layout, f"LSE_{m}")], torch.logsumexp(z, -1))
        torch.testing.assert_close(stats[getattr(_layout, f"LP_{m}")], log_p[m].gather(1, y[:, None])[:, 0])
        torch.testing.assert_close(stats[getattr(_layout, f"E_{m}")], (log_p["S"].exp() * log_p[m]).sum(-1))
