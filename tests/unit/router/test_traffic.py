"""The router's traffic table: which version, arm, policy and shadow copy a request gets from rollouts,
experiments and flags; shares hold over many users and stay sticky per user."""

from __future__ import annotations

from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.router.traffic import NONE, TrafficTable


def rollout(state=pb.ROLLOUT_STATE_RUNNING, percent=10.0, strategy=pb.ROLLOUT_STRATEGY_GRADUAL, **plan):
    p = pb.RolloutPlan(model="m", baseline_version="v1", candidate_version="v2", strategy=strategy, **plan)
    return pb.Rollout(rollout_id="ro-1", plan=p, state=state, candidate_percent=percent)


def table(rollouts=(), experiments=(), flags=()) -> TrafficTable:
    t = TrafficTable()
    t.apply(pb.WatchTrafficResponse(rollouts=rollouts, experiments=experiments, flags=flags))
    return t


def versions(t: TrafficTable, n: int = 4000, model: str = "m") -> list[str]:
    return [t.assign(model, "t", f"user-{i}", "", f"r{i}").version for i in range(n)]


def test_no_configuration_means_any_version():
    """A model without rollout, experiment or flag: NONE (any replica, as before rollouts existed)."""
    assert table().assign("m", "t", "u", "", "r") is NONE
    assert table([rollout()]).assign("other", "t", "u", "", "r") is NONE


def test_a_running_split_sends_its_share_sticky_per_user():
    """10%: about 10% of users get the candidate (with the baseline as fallback), each always the same."""
    t = table([rollout(percent=10.0)])
    got = versions(t)
    assert 0.08 < got.count("v2") / len(got) < 0.12
    assert got == versions(t)
    a = next(t.assign("m", "t", f"user-{i}", "", "r") for i in range(100) if got[i] == "v2")
    assert (a.version, a.fallback, a.source) == ("v2", "v1", "rollout:ro-1")


def test_terminal_states():
    """Promoted: everyone on the candidate (baseline as fallback); rolled back: everyone on the baseline with no
    fallback (a rolled-back version never gets traffic)."""
    assert set(versions(table([rollout(state=pb.ROLLOUT_STATE_PROMOTED, percent=100)]))) == {"v2"}
    back = table([rollout(state=pb.ROLLOUT_STATE_ROLLED_BACK, percent=0)])
    assert set(versions(back)) == {"v1"}
    assert back.assign("m", "t", "u", "", "r").fallback == ""


def test_shadow_keeps_live_on_the_baseline_and_samples_copies():
    """A running shadow plan at 30%: every request on v1, about 30% copied to v2; a completed one copies none."""
    t = table(
        [rollout(strategy=pb.ROLLOUT_STRATEGY_SHADOW, percent=0, shadow_percent=30, shadow_max_in_flight=4)]
    )
    got = [t.assign("m", "t", "u", "", f"req-{i}") for i in range(4000)]
    assert {a.version for a in got} == {"v1"}
    copies = [a.shadow for a in got if a.shadow is not None]
    assert 0.27 < len(copies) / len(got) < 0.33
    assert (copies[0].candidate_version, copies[0].max_in_flight) == ("v2", 4)
    done = table(
        [rollout(state=pb.ROLLOUT_STATE_COMPLETED, strategy=pb.ROLLOUT_STRATEGY_SHADOW, shadow_percent=30)]
    )
    assert all(done.assign("m", "t", "u", "", f"req-{i}").shadow is None for i in range(200))


def experiment(percent=50.0, offset=0.0, tenants=()):
    spec = pb.ExperimentSpec(
        name="e",
        model="m",
        arms=[
            pb.Arm(name="control", percent=50, variant=pb.Variant(model_version="v1")),
            pb.Arm(name="fast", percent=50, variant=pb.Variant(routing_policy="round_robin")),
        ],
        population=pb.Population(percent=percent, offset_percent=offset, tenants=tenants),
    )
    return pb.Experiment(experiment_id="exp-1", spec=spec, state=pb.EXPERIMENT_STATE_RUNNING)


def test_an_experiment_takes_its_population_and_splits_it_between_arms():
    """50% of users are in; of those, half per arm; a policy-only arm keeps the rollout's version choice."""
    t = table([rollout(percent=0)], [experiment()])
    got = [t.assign("m", "t", f"user-{i}", "", "r") for i in range(4000)]
    inside = [a for a in got if a.experiment]
    assert 0.46 < len(inside) / len(got) < 0.54
    control = [a for a in inside if a.arm == "control"]
    assert 0.45 < len(control) / len(inside) < 0.55
    fast = next(a for a in inside if a.arm == "fast")
    assert (fast.policy, fast.version, fast.base.version) == ("round_robin", "v1", "v1")
    assert {a.version for a in got if not a.experiment} == {"v1"}
    assert all(
        not a.experiment
        for a in (table([], [experiment(tenants=["acme"])]).assign("m", "globex", "u", "", "r"),)
    )


def test_flags_come_before_experiments_and_match_tenants_users_or_a_share():
    """A flag for tenant acme and user vip gives them v2 whatever the experiment says."""
    flag = pb.FeatureFlag(
        name="f", model="m", tenants=["acme"], users=["vip"], variant=pb.Variant(model_version="v2")
    )
    t = table([rollout(percent=0)], [experiment(percent=100)], [flag])
    for tenant, user in (("acme", "anyone"), ("globex", "vip")):
        a = t.assign("m", tenant, user, "", "r")
        assert (a.version, a.source, a.experiment) == ("v2", "flag:f", "")
    assert t.assign("m", "globex", "someone", "", "r").experiment == "exp-1"
    share = table(
        flags=[pb.FeatureFlag(name="g", model="m", percent=25, variant=pb.Variant(model_version="v2"))]
    )
    got = versions(share)
    assert 0.22 < got.count("v2") / len(got) < 0.28
