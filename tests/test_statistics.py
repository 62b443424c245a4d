"""The workbook's statistics are written by hand in a few lines (to be read), so they are checked here against
libraries: the Wilson interval against statsmodels, the exact McNemar test against scipy's binomial test, and
the t quantiles against scipy's Student t. scipy and statsmodels are test dependencies only. (``measure``
re-exports these names, so ``measure.wilson`` and ``stats.wilson`` are one function.)"""
import math

import pytest
import scipy.stats as stats
import statsmodels.stats.proportion as proportion

from peft_lab import measure
from peft_lab import stats as stats_mod


@pytest.mark.parametrize("correct, n", [(0, 10), (1, 10), (5, 10), (10, 10), (142, 160), (525, 640), (3, 24), (1, 1)])
def test_wilson_equals_statsmodels(correct, n):
    low, high = proportion.proportion_confint(correct, n, alpha=0.05, method="wilson")
    ours = measure.wilson(correct, n, z=stats.norm.ppf(0.975))
    assert ours == pytest.approx((max(0.0, low), min(1.0, high)), abs=1e-12)


@pytest.mark.parametrize("only_a, only_b", [(0, 0), (0, 1), (3, 0), (8, 0), (6, 2), (10, 15), (40, 61), (200, 170)])
def test_exact_mcnemar_equals_a_two_sided_binomial_test(only_a, only_b):
    n = only_a + only_b
    expected = 1.0 if n == 0 else stats.binomtest(only_a, n, 0.5, alternative="two-sided").pvalue
    assert measure.paired_test(only_a, only_b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("df", [*range(1, 41), 50, 60, 80, 100, 200, 1000])
def test_t_quantiles_are_students_t(df):
    # the table to the three decimals it keeps; beyond 30 degrees of freedom the expansion, closer still
    assert stats_mod.t95(df) == pytest.approx(stats.t.ppf(0.975, df), abs=5e-4 if df <= 30 else 1e-4)


def test_mean_interval_is_the_t_interval_of_the_mean():
    values = [0.61, 0.64, 0.70, 0.58, 0.66]
    got = measure.mean_interval(values)
    n = len(values)
    sd = stats.tstd(values)
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    assert got["mean"] == pytest.approx(sum(values) / n)
    assert (got["low"], got["high"]) == pytest.approx((got["mean"] - half, got["mean"] + half), abs=1e-3 * half)
