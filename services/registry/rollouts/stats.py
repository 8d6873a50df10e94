"""A/B statistics on per-arm summaries: Welch's t-test for means, the two-proportion z-test for rates, a
chi-squared test across more than two arms, confidence intervals of the difference, Holm's correction, and the
fixed-horizon sample size for a minimum detectable effect at a power. scipy and statsmodels do the statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# scipy and statsmodels are imported where used: together they take seconds to import, and the registry that
# imports this module should not start that much slower for analyses it may never run.

# Outcome metrics of an experiment, by kind: means are compared with Welch's t-test, rates (a share of requests
# or ratings) with the two-proportion z-test.
MEAN_METRICS = ("ttft_ms", "tpot_ms", "e2e_ms", "output_tokens", "cost_usd", "feedback_rating")
RATE_METRICS = ("error_rate", "refusal_rate", "success_rate")
METRICS = MEAN_METRICS + RATE_METRICS
WELCH, Z_TEST, CHI_SQUARED = "welch_t", "two_proportion_z", "chi_squared"


@dataclass(frozen=True, slots=True)
class Summary:
    """One arm's samples of one metric: count, mean (a rate for rate metrics) and sample standard deviation."""

    count: int
    mean: float
    std: float = 0.0

    @property
    def successes(self) -> int:
        """For rates: how many of count were 1."""
        return round(self.mean * self.count)


@dataclass(frozen=True, slots=True)
class Result:
    """A treatment arm against the control: the difference (treatment - control), its confidence interval, the
    two-sided p-value and a standardized effect size (Cohen's d or h)."""

    test: str
    difference: float
    relative_difference: float
    ci_low: float
    ci_high: float
    p_value: float
    effect_size: float


def warm_up() -> None:
    """Import scipy and statsmodels now (seconds of work: call it in a thread at start), so that the first
    analysis answers in milliseconds."""
    import scipy.stats  # noqa: F401
    import statsmodels.stats.multitest  # noqa: F401
    import statsmodels.stats.power  # noqa: F401
    import statsmodels.stats.proportion  # noqa: F401


def is_rate(metric: str) -> bool:
    return metric in RATE_METRICS


def compare(metric: str, control: Summary, treatment: Summary, alpha: float) -> Result | None:
    """The right test for metric; None when an arm has too few samples for it (fewer than 2)."""
    if control.count < 2 or treatment.count < 2:
        return None
    return two_proportions(control, treatment, alpha) if is_rate(metric) else welch(control, treatment, alpha)


def _relative(diff: float, base: float) -> float:
    return diff / base if base else 0.0


def welch(control: Summary, treatment: Summary, alpha: float) -> Result:
    """Welch's unequal-variances t-test and the Welch-Satterthwaite interval of the difference of means."""
    from scipy import stats as sps

    diff = treatment.mean - control.mean
    v_c, v_t = control.std**2 / control.count, treatment.std**2 / treatment.count
    se = math.sqrt(v_c + v_t)
    if se == 0.0:
        # No spread at all: the difference is exact.
        p = 1.0 if diff == 0.0 else 0.0
        return Result(
            WELCH, diff, _relative(diff, control.mean), diff, diff, p, 0.0 if diff == 0 else math.inf
        )
    _, p = sps.ttest_ind_from_stats(
        treatment.mean,
        treatment.std,
        treatment.count,
        control.mean,
        control.std,
        control.count,
        equal_var=False,
    )
    df = (v_c + v_t) ** 2 / (v_c**2 / (control.count - 1) + v_t**2 / (treatment.count - 1))
    half = float(sps.t.ppf(1.0 - alpha / 2.0, df)) * se
    pooled = math.sqrt((control.std**2 + treatment.std**2) / 2.0)
    d = diff / pooled if pooled else 0.0
    return Result(WELCH, diff, _relative(diff, control.mean), diff - half, diff + half, float(p), d)


def two_proportions(control: Summary, treatment: Summary, alpha: float) -> Result:
    """Two-proportion z-test (pooled) with Newcombe's interval of the difference of rates."""
    from statsmodels.stats.proportion import (
        confint_proportions_2indep,
        proportion_effectsize,
        proportions_ztest,
    )

    x_c, x_t = control.successes, treatment.successes
    p_c, p_t = x_c / control.count, x_t / treatment.count
    diff = p_t - p_c
    if x_c + x_t in (0, control.count + treatment.count):
        p = 1.0  # every outcome the same in both arms: no evidence of a difference
    else:
        _, p = proportions_ztest([x_t, x_c], [treatment.count, control.count])
    low, high = confint_proportions_2indep(
        x_t, treatment.count, x_c, control.count, method="newcomb", compare="diff", alpha=alpha
    )
    h = float(proportion_effectsize(p_t, p_c))
    return Result(Z_TEST, diff, _relative(diff, p_c), float(low), float(high), float(p), h)


def chi_squared(arms: Sequence[Summary]) -> float | None:
    """p-value of the chi-squared test that a rate is the same in every arm; None when it cannot be computed
    (an arm without samples, or no variation at all)."""
    from scipy import stats as sps

    table = [[a.successes, a.count - a.successes] for a in arms]
    if any(a.count == 0 for a in arms) or any(sum(col) == 0 for col in zip(*table, strict=True)):
        return None
    return float(sps.chi2_contingency(table).pvalue)


def holm(p_values: Sequence[float], alpha: float) -> list[float]:
    """Holm-adjusted p-values (the family: one comparison per treatment arm)."""
    from statsmodels.stats.multitest import multipletests

    if not p_values:
        return []
    if len(p_values) == 1:
        # Holm over one test is that test. Said without statsmodels because its Holm runs gc.collect() on every
        # call: 0.1-0.4 s of a registry's loop per metric analysed (an A/B has one comparison per metric).
        return [float(p_values[0])]
    return [float(p) for p in multipletests(list(p_values), alpha=alpha, method="holm")[1]]


def samples_per_arm(
    metric: str,
    mde: float,
    *,
    alpha: float,
    power: float,
    expected_std: float = 0.0,
    expected_rate: float = 0.0,
    comparisons: int = 1,
) -> int:
    """The fixed horizon: samples per arm to detect an absolute difference mde at the power, two-sided, at alpha
    split over the comparisons (Bonferroni, which Holm's analysis never needs more than). ValueError when the
    expectation it needs (expected_std for means, expected_rate for rates) is missing or makes no sense."""
    from statsmodels.stats.power import NormalIndPower, TTestIndPower
    from statsmodels.stats.proportion import proportion_effectsize

    level = alpha / max(1, comparisons)
    if is_rate(metric):
        if not 0.0 < expected_rate < 1.0:
            raise ValueError("expected_rate must be in (0, 1) to size a rate experiment")
        target = expected_rate + mde
        if not 0.0 < target < 1.0:
            raise ValueError(f"expected_rate + mde = {target:g} is not a rate in (0, 1)")
        effect = abs(float(proportion_effectsize(target, expected_rate)))
        n = NormalIndPower().solve_power(effect_size=effect, alpha=level, power=power, ratio=1.0)
    else:
        if not expected_std > 0.0:
            raise ValueError("expected_std must be > 0 to size a mean experiment")
        n = TTestIndPower().solve_power(effect_size=mde / expected_std, alpha=level, power=power, ratio=1.0)
    return max(2, math.ceil(float(n)))
