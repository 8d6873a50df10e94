"""Rollout plans: every bad field named, transitions and their events, and guardrail verdicts with their numbers."""

from __future__ import annotations

import pytest
from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.registry.rollouts import guardrails, plans
from services.registry.rollouts.guardrails import VersionStats
from shared.errors import FailedPrecondition, InvalidArgument

VERSIONS = {"m": {"v1", "v2", "v3"}}


def plan(**kw) -> pb.RolloutPlan:
    base = dict(
        model="m",
        baseline_version="v1",
        candidate_version="v2",
        strategy=pb.ROLLOUT_STRATEGY_GRADUAL,
        steps=[10, 50, 100],
        bake_s=5,
    )
    return pb.RolloutPlan(**{**base, **kw})


def violations(p: pb.RolloutPlan) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as exc:
        plans.validate(p, VERSIONS)
    return dict(exc.value.field_violations)


def test_a_good_plan_of_each_strategy_passes():
    """Canary with one step, gradual ramp, blue-green without steps, shadow with a percent: all valid."""
    plans.validate(plan(strategy=pb.ROLLOUT_STRATEGY_CANARY, steps=[5]), VERSIONS)
    plans.validate(plan(), VERSIONS)
    plans.validate(plan(strategy=pb.ROLLOUT_STRATEGY_BLUE_GREEN, steps=[]), VERSIONS)
    plans.validate(plan(strategy=pb.ROLLOUT_STRATEGY_SHADOW, steps=[], shadow_percent=100), VERSIONS)


@pytest.mark.parametrize(
    "fields, field, needle",
    [
        (dict(steps=[10, 5, 100]), "plan.steps[1]", "must increase"),
        (dict(steps=[10, 150]), "plan.steps[1]", "(0, 100]"),
        (dict(strategy=pb.ROLLOUT_STRATEGY_CANARY, steps=[5, 10]), "plan.steps", "exactly one step"),
        (dict(strategy=pb.ROLLOUT_STRATEGY_BLUE_GREEN, steps=[50]), "plan.steps", "at once"),
        (dict(strategy=pb.ROLLOUT_STRATEGY_SHADOW, steps=[]), "plan.shadow_percent", "(0, 100]"),
        (dict(shadow_percent=10), "plan.shadow_percent", "only for the shadow"),
        (dict(candidate_version="v9"), "plan.candidate_version", "unknown version 'v9'"),
        (dict(baseline_version=""), "plan.baseline_version", "required"),
        (dict(candidate_version="v1"), "plan.candidate_version", "must differ"),
        (dict(model="nope"), "plan.model", "no replica"),
        (dict(strategy=pb.ROLLOUT_STRATEGY_UNSPECIFIED), "plan.strategy", "required"),
        (dict(bake_s=-1), "plan.bake_s", "seconds"),
        (dict(confidence=1.0), "plan.confidence", "[0.5, 1)"),
        (dict(confidence=0.3), "plan.confidence", "[0.5, 1)"),
        (dict(max_hold_s=-1), "plan.max_hold_s", "seconds"),
        (dict(on_undecided=7), "plan.on_undecided", "unknown action"),
        (
            dict(guardrails=[pb.Guardrail(metric="latency", limit=1)]),
            "plan.guardrails[0].metric",
            "unknown metric",
        ),
        (
            dict(guardrails=[pb.Guardrail(metric="error_rate", mode=pb.GUARDRAIL_MODE_RELATIVE)]),
            "plan.guardrails[0].limit",
            "factor",
        ),
        (
            dict(
                strategy=pb.ROLLOUT_STRATEGY_BLUE_GREEN,
                steps=[],
                guardrails=[pb.Guardrail(metric="error_rate", mode=pb.GUARDRAIL_MODE_RELATIVE, limit=2)],
            ),
            "plan.guardrails[0].mode",
            "absolute",
        ),
    ],
)
def test_bad_plans_name_the_field(fields, field, needle):
    """Each mistake is INVALID_ARGUMENT with a violation on the field at fault that says what is wrong."""
    got = violations(plan(**fields))
    assert field in got, got
    assert needle in got[field]


def test_transitions_record_events_and_percents():
    """start -> advance -> pause -> resume -> advance (promote after the last) -> rollback of a promoted one."""
    r = plans.start(plan(), "ro-1", now=100.0)
    assert (r.state, r.step, r.candidate_percent) == (plans.RUNNING, 0, 10.0)
    plans.advance(r, 110.0, "ok")
    assert (r.step, r.candidate_percent, r.step_started_at_unix) == (1, 50.0, 110.0)
    plans.pause(r, 111.0)
    with pytest.raises(FailedPrecondition):
        plans.pause(r, 112.0)
    plans.resume(r, 113.0)
    plans.advance(r, 120.0, "ok")
    plans.advance(r, 130.0, "ok")
    assert (r.state, r.candidate_percent) == (plans.PROMOTED, 100.0)
    plans.rollback(r, 140.0, "switch back")
    assert (r.state, r.candidate_percent) == (plans.ROLLED_BACK, 0.0)
    assert [e.kind for e in r.events] == [
        "started", "advanced", "paused", "resumed", "advanced", "promoted", "rolled_back"
    ]  # fmt: skip
    with pytest.raises(FailedPrecondition):
        plans.promote(r, 150.0, "again")


def test_manual_promote_holds_at_the_last_step():
    """A plan with manual_promote waits at its last step once passed, once (no event per tick)."""
    r = plans.start(plan(steps=[20], manual_promote=True), "ro-1", now=0.0)
    plans.advance(r, 10.0, "ok")
    plans.advance(r, 11.0, "ok")
    assert r.state == plans.RUNNING and r.candidate_percent == 20.0
    assert [e.kind for e in r.events] == ["started", "waiting"]


def test_blue_green_starts_switched_and_shadow_moves_nothing():
    """Blue-green sends 100% at start; a shadow plan 0% and cannot be promoted."""
    assert (
        plans.start(plan(strategy=pb.ROLLOUT_STRATEGY_BLUE_GREEN, steps=[]), "a", 0).candidate_percent == 100
    )
    s = plans.start(plan(strategy=pb.ROLLOUT_STRATEGY_SHADOW, steps=[], shadow_percent=50), "b", 0)
    assert s.candidate_percent == 0 and s.plan.shadow_max_in_flight == plans.DEFAULT_SHADOW_IN_FLIGHT
    with pytest.raises(FailedPrecondition):
        plans.promote(s, 1, "no")


def g(metric: str, limit: float, relative: bool = False, **kw) -> pb.Guardrail:
    mode = pb.GUARDRAIL_MODE_RELATIVE if relative else pb.GUARDRAIL_MODE_ABSOLUTE
    return pb.Guardrail(metric=metric, limit=limit, mode=mode, **kw)


def test_absolute_rate_guardrails_decide_on_confidence_bounds_and_wait_for_samples():
    """error_rate 20/400 breaches 0.02 (its 95% lower bound is over it); 5/100, the same 5%, is undecided and says
    how many more samples would decide; 0/300 is ok on its upper bound; fewer than min_samples is not judged; a
    latency guardrail stays on its point value."""
    check = guardrails.judge(g("error_rate", 0.02), VersionStats(requests=400, errors=20), None)
    assert check.verdict == guardrails.BREACH and check.candidate_value == pytest.approx(0.05)
    assert (check.confidence, check.effective_limit) == (0.95, 0.02)
    assert guardrails.describe(check) == "error_rate 0.05 (95% lower bound 0.0225) > limit 0.02 (400 samples)"
    cand = VersionStats(requests=100, errors=5)
    check = guardrails.judge(g("error_rate", 0.02), cand, None)
    assert check.verdict == guardrails.UNDECIDED and check.lower_bound < 0.02 < check.upper_bound
    assert guardrails.describe(check) == (
        "error_rate 0.05 (95% bounds 0.00939-0.141) undecided vs limit 0.02 (100 samples; ~207 more at this rate)"
    )
    check = guardrails.judge(g("error_rate", 0.02), VersionStats(requests=300), None)
    assert guardrails.describe(check) == "error_rate 0 (95% upper bound 0.0164) <= limit 0.02 (300 samples)"
    few = guardrails.judge(g("error_rate", 0.02, min_samples=200), cand, None)
    assert few.verdict == guardrails.INSUFFICIENT
    assert guardrails.judge(g("error_rate", 0.2), cand, None).verdict == guardrails.OK
    refusals = VersionStats(refusals=30, refusal_checked=100)
    assert guardrails.judge(g("refusal_rate", 0.1), refusals, None).verdict == guardrails.BREACH
    slow = guardrails.judge(g("tpot_p99_ms", 20), VersionStats(tpot_p99_ms=21.0, tpot_count=30), None)
    assert slow.verdict == guardrails.BREACH and slow.confidence == 0.0


def test_relative_rate_guardrails_hold_the_candidate_to_the_baselines_point_value():
    """error_rate<=2x+0.01 against a baseline at 1%: the limit is max(2 x 0.01, 0.01 + 0.01) = 0.02, decided by the
    candidate's bounds."""
    base = VersionStats(requests=5000, errors=50)
    check = guardrails.judge(
        g("error_rate", 2.0, relative=True, min_gap=0.01), VersionStats(requests=400, errors=20), base
    )
    assert check.verdict == guardrails.BREACH and check.effective_limit == pytest.approx(0.02)
    assert (
        "(95% lower bound 0.0225) > 2 x baseline 0.01 = 0.02 (gap 0.01) (400 samples)"
        in guardrails.describe(check)
    )


def test_relative_guardrails_compare_with_the_baseline_and_respect_the_gap():
    """tpot p99 2x the baseline breaches a 1.5x limit; feedback (higher is better) breaches below; a gap
    keeps tiny differences from counting."""
    base = VersionStats(tpot_p99_ms=10.0, tpot_count=50, feedback_count=30, feedback_mean=4.5)
    slow = VersionStats(tpot_p99_ms=20.0, tpot_count=50, feedback_count=30, feedback_mean=3.0)
    check = guardrails.judge(g("tpot_p99_ms", 1.5, relative=True), slow, base)
    assert check.verdict == guardrails.BREACH and check.baseline_value == 10.0
    assert "= 15 ms" in guardrails.describe(check)
    assert guardrails.judge(g("feedback_rating", 0.9, relative=True), slow, base).verdict == guardrails.BREACH
    assert (
        guardrails.judge(g("tpot_p99_ms", 1.5, relative=True, min_gap=15), slow, base).verdict
        == guardrails.OK
    )
    thin = VersionStats(tpot_p99_ms=10.0, tpot_count=5)
    assert (
        guardrails.judge(g("tpot_p99_ms", 1.5, relative=True), slow, thin).verdict == guardrails.INSUFFICIENT
    )


def test_median_guardrails_catch_a_uniformly_slower_version_whose_tail_is_noise():
    """A version 2x slower per token whose p99 drowns in the host's noise (baseline p99 27 ms, its own 23 ms)
    passes a p99 guardrail; its median (5.5 -> 11 ms) breaches a relative p50 one, and a same-speed version does
    not."""
    base = VersionStats(tpot_p99_ms=27.0, tpot_p50_ms=5.5, tpot_count=60)
    slow = VersionStats(tpot_p99_ms=23.0, tpot_p50_ms=11.0, tpot_count=60)
    same = VersionStats(tpot_p99_ms=30.0, tpot_p50_ms=6.0, tpot_count=60)
    assert guardrails.judge(g("tpot_p99_ms", 1.8, relative=True), slow, base).verdict == guardrails.OK
    check = guardrails.judge(g("tpot_p50_ms", 1.5, relative=True, min_gap=2), slow, base)
    assert check.verdict == guardrails.BREACH
    assert "tpot_p50_ms 11 ms > 1.5 x baseline 5.5 ms = 8.25 ms (gap 2)" in guardrails.describe(check)
    assert (
        guardrails.judge(g("tpot_p50_ms", 1.5, relative=True, min_gap=2), same, base).verdict == guardrails.OK
    )
    assert "ttft_p50_ms" in guardrails.METRICS
