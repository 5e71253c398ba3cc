"""Statistics for results over seeds: summaries with confidence intervals, paired and unpaired tests.

Every function takes plain lists of floats (one value per seed) and answers with a small dataclass.
With fewer than two values there is no spread to estimate: standard deviations, intervals and
p-values are then None rather than a misleading 0, and callers show the single value as it is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats as _sp

ALPHA = 0.05  # significance level of `significant` flags


@dataclass(frozen=True)
class Summary:
    """Mean of n values with the sample standard deviation and a Student-t confidence interval."""

    n: int
    mean: float
    std: float | None  # sample standard deviation (ddof=1); None when n < 2
    ci_low: float | None  # confidence interval of the mean; None when n < 2
    ci_high: float | None


@dataclass(frozen=True)
class PairedResult:
    """Paired t-test of a - b (one pair per seed): the mean difference and whether it is real."""

    n: int
    mean_diff: float
    std_diff: float | None
    ci_low: float | None  # 95% interval of the mean difference
    ci_high: float | None
    t: float | None
    p: float | None  # two-sided
    significant: bool | None  # p < 0.05; None when n < 2


@dataclass(frozen=True)
class WelchResult:
    """Welch's unequal-variance t-test of mean(a) - mean(b) for two independent samples."""

    n_a: int
    n_b: int
    mean_diff: float
    df: float | None
    ci_low: float | None
    ci_high: float | None
    t: float | None
    p: float | None
    significant: bool | None


def t_quantile(confidence: float, df: float) -> float:
    """The two-sided Student-t critical value: P(|T_df| <= q) = confidence."""
    return float(_sp.t.ppf(0.5 + confidence / 2.0, df))


def _mean(values: list[float]) -> float:
    return math.fsum(values) / len(values)


def _sample_std(values: list[float]) -> float:
    m = _mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarize(values: list[float], confidence: float = 0.95) -> Summary:
    """Mean, sample std (ddof=1) and the t-interval mean +- t_{n-1} * std / sqrt(n) of the values."""
    if not values:
        raise ValueError("summarize needs at least one value")
    n, mean = len(values), _mean(values)
    if n < 2:
        return Summary(n, mean, None, None, None)
    std = _sample_std(values)
    half = t_quantile(confidence, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def _t_and_p(estimate: float, se: float, df: float) -> tuple[float, float]:
    """t statistic and two-sided p; a zero standard error means an exact, certain difference."""
    if se == 0.0:
        return (0.0, 1.0) if estimate == 0.0 else (math.copysign(math.inf, estimate), 0.0)
    t = estimate / se
    return t, float(2.0 * _sp.t.sf(abs(t), df))


def paired_test(a: list[float], b: list[float], confidence: float = 0.95) -> PairedResult:
    """Paired t-test of a[i] - b[i]; the caller aligns the lists by seed."""
    if len(a) != len(b):
        raise ValueError(f"paired_test needs lists of equal length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    s = summarize(diffs, confidence)
    if s.n < 2 or s.std is None:
        return PairedResult(s.n, s.mean, None, None, None, None, None, None)
    t, p = _t_and_p(s.mean, s.std / math.sqrt(s.n), s.n - 1)
    return PairedResult(s.n, s.mean, s.std, s.ci_low, s.ci_high, t, p, p < ALPHA)


def welch_test(a: list[float], b: list[float], confidence: float = 0.95) -> WelchResult:
    """Welch's t-test of mean(a) - mean(b), with Welch-Satterthwaite degrees of freedom.

    Use it for unpaired samples, e.g. our seeds of one cell against another set of runs. Needs at
    least two values on each side; otherwise only the difference of the means is given.
    """
    if not a or not b:
        raise ValueError("welch_test needs at least one value on each side")
    diff = _mean(a) - _mean(b)
    if len(a) < 2 or len(b) < 2:
        return WelchResult(len(a), len(b), diff, None, None, None, None, None, None)
    va, vb = _sample_std(a) ** 2 / len(a), _sample_std(b) ** 2 / len(b)
    se = math.sqrt(va + vb)
    df = float(len(a) + len(b) - 2) if se == 0.0 else (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    t, p = _t_and_p(diff, se, df)
    half = t_quantile(confidence, df) * se
    return WelchResult(len(a), len(b), diff, df, diff - half, diff + half, t, p, p < ALPHA)


def noise_bound(std: float | None, n: int, confidence: float = 0.95) -> float | None:
    """Half-width of the prediction interval for the difference of two new independent single runs.

    If one run's result has standard deviation sigma (estimated by `std` from n seeds), the
    difference of two independent runs has standard deviation sigma * sqrt(2), and
    (X1 - X2) / (std * sqrt(2)) follows Student's t with n - 1 degrees of freedom. So two runs
    differing only by seed differ by less than t_{n-1} * std * sqrt(2) in 95% of cases.
    """
    if std is None or n < 2:
        return None
    return t_quantile(confidence, n - 1) * std * math.sqrt(2.0)


def within_noise(d: float, std: float | None, n: int, confidence: float = 0.95) -> bool | None:
    """Is a difference d between two single runs within the seed-to-seed spread?

    True when |d| <= noise_bound(std, n): two runs that differ only by their seed would show a
    difference that large often enough (more than 5% of the time), so d is no evidence of a real
    effect (hardware, method, ...). None when the spread is unknown (n < 2).
    """
    bound = noise_bound(std, n, confidence)
    return None if bound is None else abs(d) <= bound
