"""Per-version scaling on a virtual clock: which versions a model's traffic configuration (rollouts, experiments,
flags) keeps and at what share, the fallback of a candidate's share to its baseline while it has no serving
replica, a canary kept warm, the baseline scaled down as traffic ramps away, a promoted rollout's baseline
retired after retire_after_s, and one arrival history per model shared by every version's forecast."""

from __future__ import annotations

import pytest
from fleetserve.registry.v1 import rollout_service_pb2 as rpb

from services.autoscaler import versions
from services.autoscaler.model_scaler import ModelScaler, version_rates, version_signals
from services.autoscaler.signals import ModelSignals
from services.autoscaler.spec import parse_model

T0 = 1_000_000.0


def spec(**over):
    raw = {
        "min_replicas": 1,
        "max_replicas": 20,
        "replica_rps": 10,
        "scale_down_cooldown_s": 60,
        "retire_after_s": 120,
        "policies": {"capacity": {"headroom": 0.0}},
    }
    raw.update(over)
    return parse_model("m", raw)


def rollout(state, percent, strategy=rpb.ROLLOUT_STRATEGY_GRADUAL, updated=T0, **plan) -> rpb.Rollout:
    r = rpb.Rollout(rollout_id="r-1", state=state, candidate_percent=percent, updated_at_unix=updated)
    r.plan.CopyFrom(
        rpb.RolloutPlan(model="m", baseline_version="v1", candidate_version="v2", strategy=strategy, **plan)
    )
    return r


def traffic(*rollouts, experiments=(), flags=()) -> rpb.WatchTrafficResponse:
    return rpb.WatchTrafficResponse(rollouts=rollouts, experiments=experiments, flags=flags)


def shares(plans):
    return {v: (p.role, round(p.share, 3), p.warm) for v, p in plans.items()}


def test_without_a_rollout_the_spec_version_takes_all_and_versions_nobody_names_retire():
    """No traffic configuration: the spec's version serves everything; a version still running that no rollout
    names any more is retired at once."""
    assert shares(versions.plan(spec(), None)) == {"v1": ("current", 1.0, 0)}
    assert shares(versions.plan(spec(version="blue"), traffic())) == {"blue": ("current", 1.0, 0)}
    plans = versions.plan(spec(), traffic(), owned=["v1", "v0"])
    assert plans["v0"].role == "retiring" and plans["v0"].retire_at <= T0


@pytest.mark.parametrize(
    ("state", "strategy", "percent", "want"),
    [
        (
            rpb.ROLLOUT_STATE_RUNNING,
            rpb.ROLLOUT_STRATEGY_CANARY,
            10,
            {"v1": ("baseline", 0.9, 0), "v2": ("candidate", 0.1, 1)},
        ),
        (
            rpb.ROLLOUT_STATE_PAUSED,
            rpb.ROLLOUT_STRATEGY_GRADUAL,
            50,
            {"v1": ("baseline", 0.5, 0), "v2": ("candidate", 0.5, 1)},
        ),
        (
            rpb.ROLLOUT_STATE_RUNNING,
            rpb.ROLLOUT_STRATEGY_BLUE_GREEN,
            100,
            {"v1": ("baseline", 1.0, 0), "v2": ("candidate", 1.0, 1)},
        ),
        (
            rpb.ROLLOUT_STATE_PROMOTED,
            rpb.ROLLOUT_STRATEGY_GRADUAL,
            100,
            {"v2": ("current", 1.0, 0), "v1": ("retiring", 0.0, 0)},
        ),
        (
            rpb.ROLLOUT_STATE_ROLLED_BACK,
            rpb.ROLLOUT_STRATEGY_GRADUAL,
            0,
            {"v1": ("current", 1.0, 0), "v2": ("retiring", 0.0, 0)},
        ),
    ],
)
def test_a_rollout_splits_the_model_between_baseline_and_candidate(state, strategy, percent, want):
    """Canary/gradual: the candidate its percent (kept warm at 1), the baseline the rest; blue-green: both
    sized for the whole model; promoted: the candidate serves, the baseline retires; rolled back: the reverse."""
    plans = versions.plan(spec(), traffic(rollout(state, percent, strategy)), owned=["v1", "v2"])
    assert shares(plans) == want


def test_promoted_baseline_retires_after_retire_after_s_and_a_rolled_back_candidate_at_once():
    """A promoted rollout keeps its baseline for retire_after_s (a blue-green switch back finds it warm)."""
    owned = ["v1", "v2"]
    promoted = versions.plan(spec(), traffic(rollout(rpb.ROLLOUT_STATE_PROMOTED, 100, updated=T0)), owned)
    assert promoted["v1"].retire_at == T0 + 120
    back = versions.plan(spec(), traffic(rollout(rpb.ROLLOUT_STATE_ROLLED_BACK, 0, updated=T0)), owned)
    assert back["v2"].retire_at == T0
    # Once nothing of it runs, a retired version is no longer part of the model.
    assert set(versions.plan(spec(), traffic(rollout(rpb.ROLLOUT_STATE_ROLLED_BACK, 0)), ["v1"])) == {"v1"}


def test_shadow_experiments_and_flags_keep_their_versions_warm():
    """A shadow plan's candidate is sized for its copies; an experiment arm's version for its users' share; a
    flag's for its percent (0 when it names tenants or users: measured arrivals size it); all warm at 1."""
    shadow = rollout(rpb.ROLLOUT_STATE_RUNNING, 0, rpb.ROLLOUT_STRATEGY_SHADOW, shadow_percent=20)
    exp = rpb.Experiment(state=rpb.EXPERIMENT_STATE_RUNNING)
    exp.spec.CopyFrom(
        rpb.ExperimentSpec(
            name="e",
            model="m",
            arms=[
                rpb.Arm(name="control", variant=rpb.Variant(model_version="v1")),
                rpb.Arm(name="t", variant=rpb.Variant(model_version="v3")),
            ],
            population=rpb.Population(percent=40),
        )
    )
    flags = [
        rpb.FeatureFlag(name="f", model="m", percent=5, variant=rpb.Variant(model_version="v4")),
        rpb.FeatureFlag(name="g", model="m", tenants=["acme"], variant=rpb.Variant(model_version="v5")),
        rpb.FeatureFlag(name="off", model="m", disabled=True, variant=rpb.Variant(model_version="v6")),
        rpb.FeatureFlag(name="other", model="x", percent=50, variant=rpb.Variant(model_version="v7")),
    ]
    plans = versions.plan(spec(), traffic(shadow, experiments=[exp], flags=flags))
    assert shares(plans) == {
        "v1": ("current", 1.0, 1),  # also the control arm: the larger of its roles' warm counts
        "v2": ("shadow", 0.2, 1),
        "v3": ("experiment", 0.2, 1),
        "v4": ("flag", 0.05, 1),
        "v5": ("flag", 0.0, 1),
    }


def test_a_candidate_without_a_serving_replica_leaves_its_share_to_the_baseline():
    """The routers fall back to the baseline while the candidate has no routable replica: the baseline is sized
    for both until the candidate serves; a version's measured arrivals count where they are more."""
    plans = versions.plan(spec(), traffic(rollout(rpb.ROLLOUT_STATE_RUNNING, 25)))
    assert version_rates(plans, 100.0, {}, {"v1": 10}) == {"v1": 100.0, "v2": 25.0}
    assert version_rates(plans, 100.0, {}, {"v1": 10, "v2": 1}) == {"v1": 75.0, "v2": 25.0}
    assert version_rates(plans, 100.0, {"v2": 40.0}, {"v1": 10, "v2": 1})["v2"] == 40.0


class Fleet:
    """Replicas per version that serve `cold_s` after the autoscaler asked for them (virtual clock)."""

    def __init__(self, cold_s: float) -> None:
        self.cold_s = cold_s
        self.starts: dict[str, list[float]] = {}

    def apply(self, now: float, version: str, desired: int) -> None:
        starts = self.starts.setdefault(version, [])
        while len(starts) < desired:
            starts.append(now)
        del starts[desired:]

    def serving(self, now: float, version: str) -> int:
        return sum(1 for t in self.starts.get(version, []) if now - t >= self.cold_s)

    def starting(self, now: float, version: str) -> int:
        return len(self.starts.get(version, [])) - self.serving(now, version)


def run(scaler: ModelScaler, fleet: Fleet, now: float, tr, rate: float) -> dict[str, int]:
    """One autoscaler round as the loop does it: plan, rates with fallback, a decision per version."""
    plans = versions.plan(scaler.spec, tr, owned=set(scaler.deciders))
    serving = {v: fleet.serving(now, v) for v in plans}
    rates = version_rates(plans, rate, {}, serving)
    scaler.observe(now, rate)
    base = ModelSignals(now=now, serving=0)
    out = {}
    for v, vp in plans.items():
        s = version_signals(
            base, rates[v], rate, vp.share, serving=serving[v], starting=fleet.starting(now, v)
        )
        d = scaler.decide(vp, s, serving)
        assert d.version == v and d.reason
        fleet.apply(now, v, d.desired)
        out[v] = d.desired
        if vp.role == "retiring" and d.desired == 0:
            scaler.forget(v)
    return out


def test_a_gradual_rollout_moves_replicas_from_baseline_to_candidate_and_retires_the_baseline():
    """100 req/s at 10 per replica: v1 has 10. A 10% canary gets its one replica at once while v1 keeps all 10
    (it serves v2's share until v2 serves); at 50% v2 grows at once and v1 shrinks only after the scale-down
    window; once promoted v2 takes all and v1 is held for retire_after_s, and until v2 serves all it wants,
    then drained to zero and forgotten."""
    scaler = ModelScaler(spec())
    fleet = Fleet(cold_s=30)
    t = T0
    assert run(scaler, fleet, t, traffic(), 100.0) == {"v1": 10}
    canary = traffic(rollout(rpb.ROLLOUT_STATE_RUNNING, 10))
    t += 40  # v1 serves
    assert run(scaler, fleet, t, canary, 100.0) == {"v1": 10, "v2": 1}
    t += 40  # v2 serves now
    assert run(scaler, fleet, t, canary, 100.0) == {"v1": 10, "v2": 1}
    half = traffic(rollout(rpb.ROLLOUT_STATE_RUNNING, 50, updated=t))
    t += 10
    got = run(scaler, fleet, t, half, 100.0)
    assert got == {"v1": 10, "v2": 5}  # the baseline waits out its scale-down window
    for _ in range(8):
        t += 10
        got = run(scaler, fleet, t, half, 100.0)
    assert got == {"v1": 6, "v2": 5}  # 50 req/s: going down keeps the capacity policy's 10% tolerance
    promoted_at = t + 10
    done = traffic(rollout(rpb.ROLLOUT_STATE_PROMOTED, 100, updated=promoted_at))
    t = promoted_at
    assert run(scaler, fleet, t, done, 100.0) == {"v2": 10, "v1": 6}  # held: a switch back finds it warm
    t = promoted_at + 110
    assert run(scaler, fleet, t, done, 100.0)["v1"] == 6
    slow = Fleet(cold_s=1000)  # the same moment, had v2's new replicas not started serving yet
    slow.starts = {v: list(ts) for v, ts in fleet.starts.items()}
    slow.starts["v2"] = [promoted_at] * 10
    held = ModelScaler(spec())
    held.decider("v2", initial=10)
    held.decider("v1", initial=6)
    assert run(held, slow, promoted_at + 120, done, 100.0) == {"v2": 10, "v1": 6}
    t = promoted_at + 120
    assert run(scaler, fleet, t, done, 100.0) == {"v2": 10, "v1": 0}
    assert "v1" not in scaler.deciders
    t += 10
    assert run(scaler, fleet, t, done, 100.0) == {"v2": 10}


def test_version_bounds_override_the_models_and_a_canary_is_warm_without_traffic():
    """versions.<v>.min/max bound that version; a running canary keeps a replica even with no arrivals."""
    s = spec(versions={"v2": {"max_replicas": 3, "min_replicas": 2}})
    scaler = ModelScaler(s)
    fleet = Fleet(cold_s=0)
    canary = traffic(rollout(rpb.ROLLOUT_STATE_RUNNING, 90))
    got = run(scaler, fleet, T0, canary, 100.0)
    assert got["v2"] == 3 and got["v1"] == 10  # v2 capped at 3; v1 sized for v2's share while v2 starts
    quiet = ModelScaler(spec())
    assert run(quiet, Fleet(cold_s=0), T0, traffic(rollout(rpb.ROLLOUT_STATE_RUNNING, 5)), 0.0)["v2"] == 1


def test_every_version_forecasts_from_the_models_one_history():
    """A version that appears after a season of the model's history forecasts from it at once: the predictive
    policy asks for its share of the model's forecast peak one cold start ahead."""
    s = spec(policies={"predictive": {"period_s": 600, "bucket_s": 10, "headroom": 0.0, "lead_margin_s": 0}})
    scaler = ModelScaler(s)
    for i in range(60):  # one season: 20 req/s, then 200 req/s at 300-330 s
        t = T0 + 10 * i
        scaler.observe(t, 200.0 if 300 <= (t - T0) < 330 else 20.0)
    plans = versions.plan(s, traffic(rollout(rpb.ROLLOUT_STATE_RUNNING, 50)))
    now = T0 + 600 + 250  # one cold start (60 s) before the spike comes round again
    s_v2 = version_signals(ModelSignals(now=now, serving=0), 10.0, 20.0, 0.5, serving=1)
    d = scaler.decide(plans["v2"], s_v2)
    assert d.policy == "predictive" and d.desired == 10  # 200 req/s x 0.5 / 10 per replica
    assert d.numbers["share"] == 0.5


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"versions": {"v2": {"min_replicas": 5, "max_replicas": 2}}}, "models.m.versions.v2.min_replicas"),
        ({"versions": {"v2": {"max": 2}}}, "models.m.versions.v2"),
        ({"versions": {"v 2": {}}}, "models.m.versions"),
        ({"versions": ["v2"]}, "models.m.versions"),
        ({"version": ""}, "models.m.version"),
        ({"retire_after_s": -1}, "models.m.retire_after_s"),
    ],
)
def test_bad_version_configuration_is_refused_naming_the_field(raw, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        parse_model("m", {"policies": {"reactive": {}}, **raw})
