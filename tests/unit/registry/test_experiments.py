"""A/B experiments: spec validation naming fields, population slices that never share users, the fixed horizon,
and the analysis (Welch, two-proportion z, chi-squared, Holm) against values computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from scipy import stats as sps

from services.registry.rollouts import experiments, stats
from services.registry.rollouts.stats import Summary
from shared.errors import InvalidArgument

VERSIONS = {"m": {"v1", "v2"}}
POLICIES = ["least_load", "round_robin"]


def spec(**kw) -> pb.ExperimentSpec:
    base = dict(
        name="faster",
        model="m",
        arms=[
            pb.Arm(name="control", variant=pb.Variant(model_version="v1")),
            pb.Arm(name="treatment", variant=pb.Variant(model_version="v2")),
        ],
        population=pb.Population(percent=50),
        primary_metric="ttft_ms",
        mde=5.0,
        expected_std=30.0,
    )
    return pb.ExperimentSpec(**{**base, **kw})


def running(s: pb.ExperimentSpec, offset: float, eid: str = "exp-1") -> pb.Experiment:
    e = pb.Experiment(experiment_id=eid, spec=s, state=pb.EXPERIMENT_STATE_RUNNING)
    e.spec.population.offset_percent = offset
    return e


def violations(s: pb.ExperimentSpec, others=()) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as exc:
        experiments.validate(s, VERSIONS, POLICIES, list(others))
    return dict(exc.value.field_violations)


def test_a_good_spec_passes_and_gets_its_horizon():
    """Valid spec; its horizon is statsmodels' TTestIndPower answer for d = mde / std."""
    s = spec()
    experiments.validate(s, VERSIONS, POLICIES, [])
    assert experiments.horizon(s) == 567  # n for d=1/6, alpha 0.05, power 0.8, two-sided
    assert experiments.horizon(spec(samples_per_arm=100)) == 100


@pytest.mark.parametrize(
    "fields, field, needle",
    [
        (dict(arms=[pb.Arm(name="a")]), "spec.arms", "two or more"),
        (
            dict(
                arms=[
                    pb.Arm(name="a", percent=30, variant=pb.Variant(model_version="v1")),
                    pb.Arm(name="b", percent=30, variant=pb.Variant(model_version="v2")),
                ]
            ),
            "spec.arms",
            "add up to 60",
        ),
        (
            dict(arms=[pb.Arm(name="a"), pb.Arm(name="b", variant=pb.Variant(model_version="v7"))]),
            "spec.arms[1].variant.model_version",
            "unknown version",
        ),
        (
            dict(arms=[pb.Arm(name="a"), pb.Arm(name="b", variant=pb.Variant(routing_policy="magic"))]),
            "spec.arms[1].variant.routing_policy",
            "unknown policy",
        ),
        (dict(arms=[pb.Arm(name="a"), pb.Arm(name="b")]), "spec.arms", "same variant"),
        (dict(primary_metric="happiness"), "spec.primary_metric", "unknown metric"),
        (dict(mde=0.0), "spec.mde", "required"),
        (dict(expected_std=0.0), "spec.expected_std", "expected_std"),
        (dict(primary_metric="error_rate", mde=0.01, expected_rate=0), "spec.expected_rate", "expected_rate"),
        (dict(population=pb.Population(percent=0)), "spec.population.percent", "(0, 100]"),
        (dict(name="bad name!"), "spec.name", "letters"),
    ],
)
def test_bad_specs_name_the_field(fields, field, needle):
    """Each mistake is INVALID_ARGUMENT with the field at fault."""
    got = violations(spec(**fields))
    assert field in got, got
    assert needle in got[field]


def test_populations_take_free_slices_and_an_overlap_is_refused():
    """A second 50% experiment on the model takes the other half; a third finds no room and is refused naming the
    one in the way; other tenants' users are free; an explicit overlapping offset is refused."""
    first = running(spec(name="one"), 0.0)
    assert experiments.place(spec(name="two"), [first]) == 50.0
    second = running(spec(name="two"), 50.0, "exp-2")
    with pytest.raises(InvalidArgument) as exc:
        experiments.place(spec(name="three", population=pb.Population(percent=10)), [first, second])
    (field, text), = exc.value.field_violations  # fmt: skip
    assert field == "spec.population" and "overlap" in text
    tenants_a = spec(name="a", population=pb.Population(percent=100, tenants=["acme"]))
    other = spec(name="b", population=pb.Population(percent=100, tenants=["globex"]))
    assert experiments.place(other, [running(tenants_a, 0.0)]) == 0.0
    with pytest.raises(InvalidArgument):
        experiments.place(spec(name="c", population=pb.Population(percent=20, offset_percent=40)), [first])
    with pytest.raises(InvalidArgument):
        experiments.validate(spec(name="one"), VERSIONS, POLICIES, [first])


def test_welch_matches_scipy_on_raw_samples_and_its_interval_covers():
    """Welch on summaries gives scipy's p-value on the raw samples; the interval is the Welch-Satterthwaite one."""
    rng = np.random.default_rng(1)
    a, b = rng.normal(100, 30, 400), rng.normal(108, 45, 300)
    r = stats.welch(Summary(a.size, a.mean(), a.std(ddof=1)), Summary(b.size, b.mean(), b.std(ddof=1)), 0.05)
    expect = sps.ttest_ind(b, a, equal_var=False)
    assert r.p_value == pytest.approx(expect.pvalue, rel=1e-9)
    ci = expect.confidence_interval(0.95)
    assert (r.ci_low, r.ci_high) == (pytest.approx(ci.low, rel=1e-9), pytest.approx(ci.high, rel=1e-9))


def test_two_proportions_and_chi_squared():
    """The z-test of 20/1000 vs 35/1000 (p ~ 0.040) with an interval of the difference; chi-squared of two arms
    without continuity correction equals the z-test; identical arms give p = 1."""
    c, t = Summary(1000, 0.020), Summary(1000, 0.035)
    r = stats.two_proportions(c, t, 0.05)
    assert r.difference == pytest.approx(0.015) and r.p_value == pytest.approx(0.0403, abs=1e-3)
    assert r.ci_low < 0.015 < r.ci_high
    assert stats.two_proportions(Summary(50, 0.0), Summary(60, 0.0), 0.05).p_value == 1.0
    assert stats.chi_squared([c, t, Summary(1000, 0.02)]) == pytest.approx(0.0461, abs=1e-3)


def test_holm_matches_statsmodels_and_one_test_is_itself():
    """Holm's adjustment is statsmodels' for several treatment arms; over a single test it is that test's p."""
    from statsmodels.stats.multitest import multipletests

    ps = [0.01, 0.04, 0.03]
    assert stats.holm(ps, 0.05) == pytest.approx(list(multipletests(ps, method="holm")[1]))
    assert stats.holm([0.037], 0.05) == [0.037] == list(multipletests([0.037], method="holm")[1])
    assert stats.holm([], 0.05) == []


def analysed(arms, horizon=100, peek=False, primary="ttft_ms"):
    s = spec(
        primary_metric=primary,
        arms=[
            pb.Arm(name="control", variant=pb.Variant(model_version="v1")),
            pb.Arm(name="treatment", variant=pb.Variant(model_version="v2")),
        ],
    )
    e = pb.Experiment(experiment_id="exp-1", spec=s, samples_per_arm=horizon)
    return experiments.analyze(e, arms, [a.get(primary, Summary(0, 0)).count for a in arms], peek)


def test_no_verdict_before_the_horizon_and_a_peek_is_marked():
    """Before every arm has horizon samples: no comparisons and a verdict saying so; a peek shows the tests and
    says it decides nothing."""
    arms = [{"ttft_ms": Summary(60, 100, 30)}, {"ttft_ms": Summary(100, 130, 30)}]
    resp = analysed(arms)
    assert not resp.horizon_reached and not resp.comparisons
    assert "no verdict before the fixed horizon: control 60/100" in resp.verdict
    peek = analysed(arms, peek=True)
    assert peek.peek and peek.comparisons and peek.verdict.startswith("PEEK")


def test_at_the_horizon_the_verdict_names_effect_interval_and_p_value():
    """A slower treatment is 'significantly worse' on ttft with its CI and p; an equal one 'no significant
    difference'; other metrics are compared too."""
    slower = analysed(
        [
            {"ttft_ms": Summary(100, 100, 20), "error_rate": Summary(100, 0.0)},
            {"ttft_ms": Summary(100, 120, 20), "error_rate": Summary(100, 0.05)},
        ]
    )
    assert slower.horizon_reached and not slower.peek
    first = slower.comparisons[0]
    assert (first.metric, first.test, first.arm) == ("ttft_ms", "welch_t", "treatment")
    assert first.significant and first.difference == 20 and math.isclose(first.effect_size, 1.0)
    assert "significantly worse" in slower.verdict and "CI [" in slower.verdict
    assert {c.metric for c in slower.comparisons} == {"ttft_ms", "error_rate"}
    same = analysed([{"ttft_ms": Summary(100, 100, 20)}, {"ttft_ms": Summary(100, 101, 20)}])
    assert "no significant difference" in same.verdict
