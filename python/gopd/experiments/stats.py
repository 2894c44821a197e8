"""Pass rates with intervals, and paired differences between two models on the same questions (the
question as the unit) and between two arms' training runs (the seed as the unit)."""

from __future__ import annotations

import math
from statistics import NormalDist


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


def normal_quantile(q: float) -> float:
    """The standard normal quantile z_q (z_0.975 = 1.96)."""
    return NormalDist().inv_cdf(q)


def min_detectable_difference(p: float, n: int, seeds: int, alpha: float = 0.05, power: float = 0.8,
                              within: float = None) -> float:
    """Smallest true difference in pass@1 between two arms that a two-sided paired test at level alpha
    detects with probability `power`, both arms run `seeds` times on the same n questions and each
    question's outcome averaged over the seeds first.

    Model: question q passes in arm A with probability p_q^A, independently across seeds; with no
    question-level difference between the arms, d_q = mean_s a_qs - mean_s b_qs has variance
    2 w / seeds, where w = E_q[p_q (1 - p_q)] is the within-question (seed) variance. Then

        MDD = (z_{1 - alpha/2} + z_power) * sqrt(2 w / seeds) / sqrt(n).

    w is at most p (1 - p) (every question equally hard: seeds disagree as often as independent draws);
    that bound is the default. With two seeds' outcomes of one arm, w = (fraction of questions on
    which they disagree) / 2 (see seed_within_variance)."""
    if not 0.0 <= p <= 1.0 or n < 1 or seeds < 1:
        raise ValueError(f"min_detectable_difference: need 0 <= p <= 1, n >= 1, seeds >= 1; got p={p}, n={n}, "
                         f"seeds={seeds}")
    w = p * (1 - p) if within is None else within
    z = normal_quantile(1 - alpha / 2) + normal_quantile(power)
    return z * math.sqrt(2 * w / seeds / n)


def seed_within_variance(runs: list) -> float:
    """w = E_q[p_q (1 - p_q)] estimated from the 0/1 outcomes of k >= 2 seeds of one arm on the same
    questions (runs[s][q]): the mean over questions of the unbiased per-question variance
    m (k - m) / (k (k - 1)), m the number of seeds that pass q. For k = 2 it is half the discordance."""
    k = len(runs)
    if k < 2 or len({len(r) for r in runs}) != 1 or not runs[0]:
        raise ValueError(f"seed_within_variance: need >= 2 equally long non-empty outcome lists, got {k}")
    total = 0.0
    for q in range(len(runs[0])):
        m = sum(float(r[q]) for r in runs)
        total += m * (k - m) / (k * (k - 1))
    return total / len(runs[0])


# Two-sided 95% quantiles t_{0.975, df} of Student's t for df = 1..10 (from the standard table).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: the table for df <= 10, else the Cornish-Fisher expansion (within 1e-3 there)."""
    if df < 1:
        raise ValueError(f"t_quantile_975: df must be >= 1, got {df}")
    if df in _T975:
        return _T975[df]
    z = normal_quantile(0.975)
    return (z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)
            + (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / (384 * df ** 3))


def seed_level_difference(a: list, b: list) -> dict:
    """Arm A - arm B with the training run as the unit: a[s], b[s] are the two arms' pass@1 in seed s
    (same questions). The question-level interval (paired_difference) holds the trained models fixed;
    this one asks whether the difference would hold for other training runs:

        d_s = a_s - b_s,  mean d +- t_{0.975, S-1} sd(d) / sqrt(S)   (S >= 2 seeds).

    Returns per_seed (the d_s), diff, half_width (None for one seed), ci95 and verdict."""
    if len(a) != len(b) or not a:
        raise ValueError(f"seed_level_difference: need equally many seeds in both arms, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b)]
    s = len(d)
    mean = sum(d) / s
    if s < 2:
        return dict(per_seed=d, diff=mean, half_width=None, ci95=None, verdict="one seed: no interval")
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (s - 1))
    half = t_quantile_975(s - 1) * sd / math.sqrt(s)
    verdict = "higher" if mean - half > 0 else "lower" if mean + half < 0 else "no significant difference"
    return dict(per_seed=d, diff=mean, half_width=half, ci95=[mean - half, mean + half], verdict=verdict)
