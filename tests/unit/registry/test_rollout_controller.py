"""The rollout controller on an injected clock and numbers: a breach rolls back at once, a passing step advances
only after its bake, an undecided one holds (saying how many samples it needs) and then pauses or rolls back as
the plan says (an undecided pause ends by itself once the numbers judge it ok), a candidate without replicas
holds (bake restarting), a clean ramp promotes itself, a paused one still rolls back, and the traffic configuration survives reopening the store."""

from __future__ import annotations

import pytest
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from opentelemetry.sdk.metrics import MeterProvider

from services.registry.membership import Membership
from services.registry.rollouts import plans
from services.registry.rollouts.controller import RolloutController
from services.registry.rollouts.guardrails import VersionStats
from services.registry.rollouts.traffic import TrafficState
from services.registry.store import SqliteStore
from shared.errors import Aborted

# 0 errors in 300: the error rate's 95% upper bound (0.016) is under the 2% limit; 0 in 100 would be undecided.
GOOD = VersionStats(requests=300, errors=0, tpot_p99_ms=10.0, tpot_count=300)
# 2 errors in 150: the bounds straddle 2% (undecided); 1 in 2,000 is ok.
UNSURE = VersionStats(requests=150, errors=2, tpot_p99_ms=10.0, tpot_count=150)
BAD = VersionStats(requests=100, errors=9, tpot_p99_ms=25.0, tpot_count=100)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Numbers:
    """A StatsSource whose answers the test sets per version; remembers the windows asked for."""

    def __init__(self) -> None:
        self.by_version: dict[str, VersionStats] = {}
        self.windows: list[float] = []

    async def fetch(self, model: str, version: str, window_s: float) -> VersionStats:
        self.windows.append(window_s)
        return self.by_version.get(version, VersionStats())


class Setup:
    """A membership with replicas of the given versions, a TrafficState over SQLite and a controller."""

    def __init__(self, tmp_path, replicas=("v1", "v2")) -> None:
        self.path = str(tmp_path / "r.db")
        self.clock, self.numbers = Clock(), Numbers()
        self.membership = Membership(30.0)
        for i, v in enumerate(replicas):
            self.add_replica(f"e{i}", v)
        self.traffic = TrafficState(SqliteStore(self.path))
        self.controller = RolloutController(
            self.traffic, self.membership, self.numbers, MeterProvider().get_meter("t"), clock=self.clock
        )

    def add_replica(self, rid: str, version: str) -> None:
        self.membership.register(
            reg_pb.Replica(replica_id=rid, address="h:1", model="m", model_version=version)
        )

    async def start(self, strategy=pb.ROLLOUT_STRATEGY_GRADUAL, **kw) -> str:
        await self.traffic.load()
        for v in ("v1", "v2"):
            await self.traffic.saw_version("m", v)
        fields = dict(steps=[10, 50, 100], bake_s=10) if strategy == pb.ROLLOUT_STRATEGY_GRADUAL else {}
        p = pb.RolloutPlan(
            model="m",
            baseline_version="v1",
            candidate_version="v2",
            strategy=strategy,
            guardrails=[
                pb.Guardrail(metric="error_rate", limit=0.02),
                pb.Guardrail(metric="tpot_p99_ms", limit=1.5, mode=pb.GUARDRAIL_MODE_RELATIVE),
            ]
            if strategy != pb.ROLLOUT_STRATEGY_SHADOW
            else [],
            **{**fields, **kw},
        )
        await self.traffic.save_rollout(plans.start(p, "ro-1", self.clock()))
        return "ro-1"

    async def tick(self, after_s: float = 0.0) -> pb.Rollout:
        self.clock.now += after_s
        await self.controller.tick()
        return self.traffic.rollouts["ro-1"]


async def test_a_breach_rolls_back_at_once_with_the_numbers(tmp_path):
    """Within the first step's bake, a candidate over its limits is rolled back; the reason has the numbers."""
    s = Setup(tmp_path)
    await s.start()
    s.numbers.by_version = {"v1": GOOD, "v2": BAD}
    r = await s.tick(3)
    assert (r.state, r.candidate_percent, r.step) == (plans.ROLLED_BACK, 0.0, 0)
    assert "error_rate 0.09 (95% lower bound 0.0231) > limit 0.02 (100 samples)" in r.reason
    assert "tpot_p99_ms 25 ms > 1.5 x baseline 10 ms = 15 ms" in r.reason
    assert s.numbers.windows == [3.0, 3.0]  # the step so far, for both versions


async def test_a_step_advances_only_after_its_bake_and_the_ramp_promotes(tmp_path):
    """Good numbers: no advance before bake_s; then one step per bake; after the last, promoted."""
    s = Setup(tmp_path)
    await s.start()
    s.numbers.by_version = {"v1": GOOD, "v2": GOOD}
    assert (await s.tick(5)).step == 0
    assert (await s.tick(10)).candidate_percent == 50.0
    assert (await s.tick(10)).candidate_percent == 100.0
    r = await s.tick(10)
    assert r.state == plans.PROMOTED
    assert [e.kind for e in r.events] == ["started", "advanced", "advanced", "promoted"]


async def test_an_undecided_step_holds_then_pauses_for_an_operator_and_a_resume_holds_again(tmp_path):
    """Bake over with the error rate's bounds straddling the limit: one 'holding' event with the bounds and the
    samples still needed, no advance; after max_hold_s an 'undecided' event pauses it; a resume holds it another
    max_hold_s, and once the evidence is in it advances."""
    s = Setup(tmp_path)
    await s.start(max_hold_s=20)
    s.numbers.by_version = {"v1": GOOD, "v2": UNSURE}
    await s.tick()  # the candidate's replica is seen: the bake starts
    r = await s.tick(12)
    assert (r.state, r.step, r.events[-1].kind) == (plans.RUNNING, 0, "holding")
    assert [c.verdict for c in r.checks] == ["undecided", "ok"]
    held = r.events[-1].detail
    assert (
        "error_rate 0.01333 (95% bounds 0.000" in held and "undecided vs limit 0.02 (150 samples; ~" in held
    )
    assert "holding up to 20 s, then pause" in held
    r = await s.tick(10)
    assert [e.kind for e in r.events] == ["started", "holding"]  # said once
    r = await s.tick(10)
    assert (r.state, r.events[-1].kind) == (plans.PAUSED, "undecided")
    assert "paused for an operator" in r.reason and "more at this rate" in r.reason
    plans.resume(r, s.clock())
    await s.traffic.save_rollout(r)
    r = await s.tick(15)
    assert (r.state, r.events[-1].kind) == (plans.RUNNING, "holding")
    s.numbers.by_version["v2"] = VersionStats(requests=2000, errors=1, tpot_p99_ms=10.0, tpot_count=2000)
    r = await s.tick(1)
    assert (r.step, r.events[-1].kind) == (1, "advanced")
    assert "error_rate 0.0005 (95% upper bound" in r.events[-1].detail


async def test_an_undecided_pause_resumes_and_advances_by_itself_once_the_evidence_is_in(tmp_path):
    """Paused because its hold ran out undecided (not by an operator): while paused it is still judged, and the
    tick whose numbers judge every guardrail ok resumes it (saying why) and advances it; an operator's pause of the
    same rollout later is not ended by good numbers."""
    s = Setup(tmp_path)
    await s.start(max_hold_s=20)
    s.numbers.by_version = {"v1": GOOD, "v2": UNSURE}
    await s.tick()
    await s.tick(12)
    r = await s.tick(25)
    assert (r.state, r.events[-1].kind) == (plans.PAUSED, "undecided")
    r = await s.tick(30)  # still undecided: stays paused
    assert (r.state, r.step, r.events[-1].kind) == (plans.PAUSED, 0, "undecided")
    s.numbers.by_version["v2"] = VersionStats(requests=2000, errors=1, tpot_p99_ms=10.0, tpot_count=2000)
    r = await s.tick(1)
    assert (r.state, r.step) == (plans.RUNNING, 1)
    assert [e.kind for e in r.events][-3:] == ["undecided", "resumed", "advanced"]
    assert (
        "resumed at 10%: the guardrails were judged ok: error_rate 0.0005 (95% upper bound"
        in r.events[-2].detail
    )
    plans.pause(r, s.clock())
    await s.traffic.save_rollout(r)
    r = await s.tick(100)
    assert (r.state, r.step, r.events[-1].kind) == (plans.PAUSED, 1, "paused")


async def test_an_undecided_step_rolls_back_after_its_hold_when_the_plan_says_so(tmp_path):
    """on_undecided=ROLLBACK: still undecided max_hold_s after the bake, the rollout is rolled back with the
    numbers."""
    s = Setup(tmp_path)
    await s.start(max_hold_s=20, on_undecided=pb.UNDECIDED_ACTION_ROLLBACK)
    s.numbers.by_version = {"v1": GOOD, "v2": UNSURE}
    await s.tick()
    assert (await s.tick(15)).state == plans.RUNNING
    r = await s.tick(15)
    assert (r.state, r.candidate_percent) == (plans.ROLLED_BACK, 0.0)
    assert r.reason.startswith("undecided 30 s into the step at 10%: error_rate 0.01333"), r.reason


async def test_the_plans_confidence_decides_the_rate(tmp_path):
    """6 errors in 100 against 2%: undecided at the default 95%, a breach at 50% confidence."""
    five = VersionStats(requests=100, errors=6, tpot_p99_ms=10.0, tpot_count=100)
    s = Setup(tmp_path)
    await s.start()
    s.numbers.by_version = {"v1": GOOD, "v2": five}
    r = await s.tick(1)
    assert (r.state, r.checks[0].verdict, r.checks[0].confidence) == (plans.RUNNING, "undecided", 0.95)
    (tmp_path / "b").mkdir()
    s2 = Setup(tmp_path / "b")
    await s2.start(confidence=0.5)
    s2.numbers.by_version = {"v1": GOOD, "v2": five}
    r = await s2.tick(1)
    assert r.state == plans.ROLLED_BACK and "error_rate 0.06 (50% lower bound 0.0214)" in r.reason, r.reason


async def test_unjudged_guardrails_hold_the_step(tmp_path):
    """Too few samples: the bake passes but the step holds until the guardrails can judge."""
    s = Setup(tmp_path)
    await s.start()
    s.numbers.by_version = {"v1": GOOD, "v2": VersionStats(requests=5, tpot_count=5, tpot_p99_ms=10)}
    r = await s.tick(30)
    assert (r.state, r.step) == (plans.RUNNING, 0)
    assert {c.verdict for c in r.checks} == {"insufficient_data"}


async def test_a_candidate_without_replicas_holds_and_its_bake_restarts(tmp_path):
    """No SERVING replica of the candidate: a 'waiting' event once, the step holds, and the bake starts over when
    a replica registers."""
    s = Setup(tmp_path, replicas=("v1",))
    await s.start()
    s.numbers.by_version = {"v1": GOOD, "v2": GOOD}
    for _ in range(3):
        r = await s.tick(20)
    assert (r.step, r.candidate_replicas) == (0, 0)
    assert [e.kind for e in r.events] == ["started", "waiting"]
    s.add_replica("e9", "v2")
    r = await s.tick(5)
    assert r.step == 0 and r.candidate_replicas == 1
    assert (await s.tick(10)).step == 1


async def test_a_paused_rollout_holds_but_still_rolls_back(tmp_path):
    """Paused: no advance however long; a breach still rolls it back."""
    s = Setup(tmp_path)
    await s.start()
    r = s.traffic.rollouts["ro-1"]
    plans.pause(r, s.clock())
    await s.traffic.save_rollout(r)
    s.numbers.by_version = {"v1": GOOD, "v2": GOOD}
    r = await s.tick(100)
    assert (r.state, r.step) == (plans.PAUSED, 0)
    s.numbers.by_version["v2"] = BAD
    assert (await s.tick()).state == plans.ROLLED_BACK


async def test_a_shadow_plan_completes_after_its_bake(tmp_path):
    """A shadow plan ends COMPLETED after bake_s, having never moved traffic."""
    s = Setup(tmp_path)
    await s.start(pb.ROLLOUT_STRATEGY_SHADOW, shadow_percent=100, bake_s=10)
    r = await s.tick(10)
    assert (r.state, r.candidate_percent) == (plans.COMPLETED, 0.0)


async def test_a_write_lost_to_another_registry_is_aborted_and_reloaded(tmp_path):
    """Two TrafficStates over one store: the one that read an older version loses its compare-and-set
    (ABORTED) and holds the winner's rollout afterwards."""
    s = Setup(tmp_path)
    await s.start()
    other = TrafficState(s.traffic.store)
    await other.load()
    mine, theirs = s.traffic.rollouts["ro-1"], other.rollouts["ro-1"]
    plans.pause(theirs, s.clock())
    await other.save_rollout(theirs)
    plans.rollback(mine, s.clock(), "mine")
    with pytest.raises(Aborted):
        await s.traffic.save_rollout(mine)
    assert s.traffic.rollouts["ro-1"].state == plans.PAUSED


async def test_state_survives_reopening_the_store_and_watchers_see_changes(tmp_path):
    """Rollouts, flags and seen versions are read back from the database; a watcher is woken by a change and
    gets the latest rollout per model."""
    s = Setup(tmp_path)
    await s.start()
    traffic = s.traffic
    await traffic.saw_version("org/model:x", "2024-06")
    await traffic.save_flag(
        pb.FeatureFlag(name="f", model="m", users=["u1"], variant=pb.Variant(model_version="v2"))
    )
    w = traffic.watch()
    first = pb.WatchTrafficResponse.FromString(await traffic.next_snapshot(w))
    assert [x.rollout_id for x in first.rollouts] == ["ro-1"] and [f.name for f in first.flags] == ["f"]
    r = traffic.rollouts["ro-1"]
    plans.pause(r, s.clock())
    await traffic.save_rollout(r)
    second = pb.WatchTrafficResponse.FromString(await traffic.next_snapshot(w))
    assert second.rollouts[0].state == plans.PAUSED
    await traffic.store.close()
    again = TrafficState(SqliteStore(s.path))
    await again.load()
    assert again.rollouts["ro-1"].state == plans.PAUSED
    assert again.flags["f"].users == ["u1"]
    assert again.versions == {"m": {"v1", "v2"}, "org/model:x": {"2024-06"}}
