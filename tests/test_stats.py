"""Statistics against hand computations (t quantiles from printed tables)."""

from __future__ import annotations

import math

import pytest

from kdlab import stats

T_975_2 = 4.302653  # t_{0.975} with 2 degrees of freedom
T_975_3 = 3.182446  # with 3


def test_t_quantile_matches_the_tables():
    assert stats.t_quantile(0.95, 3) == pytest.approx(T_975_3, abs=1e-6)
    assert stats.t_quantile(0.95, 2) == pytest.approx(T_975_2, abs=1e-6)


def test_summarize_by_hand():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0])
    assert s.n == 4 and s.mean == pytest.approx(2.5)
    assert s.std == pytest.approx(1.2909944, abs=1e-7)  # sqrt(5/3), ddof=1
    half = T_975_3 * 1.2909944 / 2.0
    assert s.ci_low == pytest.approx(2.5 - half, abs=1e-6)
    assert s.ci_high == pytest.approx(2.5 + half, abs=1e-6)


def test_summarize_single_value_has_no_spread():
    s = stats.summarize([91.5])
    assert (s.n, s.mean, s.std, s.ci_low, s.ci_high) == (1, 91.5, None, None, None)


def test_summarize_empty_is_an_error():
    with pytest.raises(ValueError):
        stats.summarize([])


def test_paired_test_by_hand():
    # Differences 1, 2, 3: mean 2, std 1, standard error 1/sqrt(3), t = 2*sqrt(3) with 2 df.
    r = stats.paired_test([10.0, 12.0, 14.0], [9.0, 10.0, 11.0])
    t = 2.0 * math.sqrt(3.0)
    assert (r.n, r.mean_diff, r.std_diff) == (3, pytest.approx(2.0), pytest.approx(1.0))
    assert r.t == pytest.approx(t)
    # With 2 df the two-sided p-value has a closed form: 1 - t / sqrt(t^2 + 2).
    assert r.p == pytest.approx(1.0 - t / math.sqrt(t * t + 2.0), abs=1e-9)
    assert r.p == pytest.approx(0.07418, abs=1e-5)
    assert r.significant is False
    half = T_975_2 / math.sqrt(3.0)
    assert (r.ci_low, r.ci_high) == (pytest.approx(2.0 - half, abs=1e-6), pytest.approx(2.0 + half, abs=1e-6))


def test_paired_test_significant_difference():
    r = stats.paired_test([5.0, 6.1, 7.0, 8.2, 9.0], [4.0, 5.0, 6.1, 7.0, 8.0])
    assert r.significant is True and r.p < 0.001


def test_paired_test_single_pair():
    r = stats.paired_test([91.98], [91.52])
    assert r.n == 1 and r.mean_diff == pytest.approx(0.46)
    assert (r.std_diff, r.ci_low, r.t, r.p, r.significant) == (None, None, None, None, None)


def test_paired_test_constant_differences():
    exact = stats.paired_test([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])
    assert exact.p == 0.0 and exact.significant is True and exact.t == math.inf
    none = stats.paired_test([1.0, 2.0], [1.0, 2.0])
    assert none.p == 1.0 and none.significant is False


def test_paired_test_needs_aligned_lists():
    with pytest.raises(ValueError):
        stats.paired_test([1.0, 2.0], [1.0])


def test_welch_test_by_hand():
    # a: mean 2, var 1; b: mean 6, var 4; n = 3 each. se^2 = 1/3 + 4/3 = 5/3.
    r = stats.welch_test([1.0, 2.0, 3.0], [4.0, 6.0, 8.0])
    se = math.sqrt(5.0 / 3.0)
    df = (5.0 / 3.0) ** 2 / ((1.0 / 3.0) ** 2 / 2 + (4.0 / 3.0) ** 2 / 2)
    assert r.mean_diff == pytest.approx(-4.0)
    assert r.t == pytest.approx(-4.0 / se)
    assert r.df == pytest.approx(df) and df == pytest.approx(2.941176, abs=1e-6)
    from scipy import stats as sp

    assert r.p == pytest.approx(sp.ttest_ind([1, 2, 3], [4, 6, 8], equal_var=False).pvalue)
    half = stats.t_quantile(0.95, df) * se
    assert (r.ci_low, r.ci_high) == (pytest.approx(-4.0 - half), pytest.approx(-4.0 + half))


def test_welch_test_with_a_single_value():
    r = stats.welch_test([92.72], [93.4, 93.0])
    assert r.mean_diff == pytest.approx(92.72 - 93.2) and r.p is None and r.significant is None


def test_within_noise_by_hand():
    # Two single runs, seed std 0.2 from 3 seeds: bound t_{0.975,2} * 0.2 * sqrt(2) = 1.21698.
    assert stats.noise_bound(0.2, 3) == pytest.approx(T_975_2 * 0.2 * math.sqrt(2.0), abs=1e-6)
    assert stats.within_noise(0.68, 0.2, 3) is True  # e.g. the paper's vgg16 teacher, VCL vs Colab
    assert stats.within_noise(-1.0, 0.2, 3) is True  # the sign does not matter
    assert stats.within_noise(1.3, 0.2, 3) is False
    assert stats.within_noise(0.1, 0.2, 1) is None and stats.within_noise(0.1, None, 5) is None
