"""Triton kernels for G-OPD (imported lazily by ``gopd_kernels.backends.triton``).

rows_forward / rows_backward implement the row contract of ``gopd_kernels.backends``:
one pass over the vocabulary per token row with online logsumexp for the three models.
"""

from .rows import rows_backward, rows_forward

__all__ = ["rows_forward", "rows_backward"]
