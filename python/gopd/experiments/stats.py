"""Pass rates with intervals, and paired differences between two models on the same questions."""

from __future__ import annotations

import math


def paired_difference(a: list, b: list, z: float = 1.96) -> tuple:
    """(mean of a_i - b_i, half width of its 95% normal interval) for two models' per-question outcomes
    (0/1) on the same questions: the paired interval, sd(a_i - b_i) / sqrt(n) with the sample sd."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_difference: outcome lists must be equally long and non-empty, got "
                         f"{len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    return mean, z * math.sqrt(var / n)


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple:
    """95% Wilson score interval of a pass rate p measured on n questions."""
    if n <= 0:
        return 0.0, 1.0
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def diff_half_width(p1: float, p2: float, n: int, z: float = 1.96) -> float:
    """Half width of the normal-approximation 95% interval of p1 - p2, both measured on n questions.
    It treats the two as independent samples; they share the questions, so this is conservative."""
    return z * math.sqrt((p1 * (1 - p1) + p2 * (1 - p2)) / max(1, n))
