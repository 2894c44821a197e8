"""The fused loss's option names that gopd's training loops accept (the trainer's config, the TRL
integration), derived from gopd_kernels' own lists so that a name is defined once, there.

Both loops minimise a scalar loss whose batch-global denominator they supply themselves (the step's
response tokens, or its responses, over every micro-batch and rank), so they take the normalised
reductions only: "none" is not a scalar and "sum" grows with the batch size.
"""

from __future__ import annotations

import gopd_kernels as gk

ADVANTAGE_FROM = gk.ADVANTAGE_FROM
SEQUENCE_REDUCTIONS = gk.SEQUENCE_REDUCTIONS
REDUCTIONS = tuple(r for r in gk.REDUCTIONS if r not in ("none", "sum"))

__all__ = ["ADVANTAGE_FROM", "REDUCTIONS", "SEQUENCE_REDUCTIONS"]
