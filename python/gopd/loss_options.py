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

__all__ = ["ADVANTAGE_FROM", "REDUCTIONS", "SEQUENCE_REDUCTIONS", "first_problem"]


def first_problem(mode: str, reduction: str, advantage_from: str, modes=gk.MODES):
    """The first of these options that a training loop cannot take, as (key, what is wrong), else None;
    `modes`: the modes that loop supports."""
    if mode not in modes:
        return "mode", f"expected one of {', '.join(modes)}, got {mode!r}"
    if reduction not in REDUCTIONS:
        return "reduction", f"expected one of {', '.join(REDUCTIONS)}, got {reduction!r}"
    if advantage_from not in ADVANTAGE_FROM:
        return "advantage_from", f"expected one of {', '.join(ADVANTAGE_FROM)}, got {advantage_from!r}"
    if advantage_from != "current" and mode != "sampled":
        return "advantage_from", (f"{advantage_from!r} applies to mode 'sampled' (the only mode with an advantage), "
                                  f"got mode {mode!r}")
    return None
