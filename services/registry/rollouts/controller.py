"""The rollout controller: on every tick, judges each running rollout's guardrails over its current step, rolls
back on a breach, holds while the candidate has no replica, advances a step once its bake time passed with every
guardrail judged ok, holds a step whose guardrails are still undecided (then pauses it for an operator or rolls it
back, as the plan says; such a pause ends by itself once the evidence judges every guardrail ok), and promotes
after the last step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import structlog
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from opentelemetry import metrics

from services.registry.membership import Membership
from services.registry.rollouts import guardrails, plans
from services.registry.rollouts.guardrails import VersionStats
from services.registry.rollouts.metrics_source import StatsSource
from services.registry.rollouts.traffic import TrafficState
from shared.errors import Aborted

log = structlog.get_logger(__name__)

# The shortest window judged (a step that just began has too little to say).
MIN_WINDOW_S = 1.0


def _baseline_need(plan: pb.RolloutPlan) -> int:
    """Samples the baseline needs for the plan's relative guardrails (0 when it has none)."""
    return max((guardrails.min_samples(g) for g in plan.guardrails if guardrails.relative(g)), default=0)


class RolloutController:
    """Moves rollouts along. tick() is the whole decision (tests call it with an injected clock and source)."""

    def __init__(
        self,
        traffic: TrafficState,
        membership: Membership,
        source: StatsSource | None,
        meter: metrics.Meter,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.traffic = traffic
        self.membership = membership
        self.source = source
        self._clock = clock
        self._events = meter.create_counter(
            "fleetserve.registry.rollout_events",
            unit="{event}",
            description="Rollout transitions (advanced, promoted, rolled_back, ...), by model and version.",
        )

    def candidate_replicas(self, r: pb.Rollout) -> int:
        """SERVING replicas of the rollout's candidate now."""
        return sum(
            1
            for rep in self.membership.list(r.plan.model)
            if rep.model_version == r.plan.candidate_version and rep.state == reg_pb.REPLICA_STATE_SERVING
        )

    async def tick(self) -> None:
        """One decision for every running or paused rollout."""
        for stored in self.traffic.active_rollouts():
            # Decided on a copy: the stored rollout changes only once the write succeeded.
            r = pb.Rollout()
            r.CopyFrom(stored)
            await self._step(r)
            if r == stored:
                continue  # nothing to write: no store write per tick while nothing changes
            traffic_changed = (r.state, r.step, r.candidate_percent) != (
                stored.state,
                stored.step,
                stored.candidate_percent,
            )
            event = r.updated_at_unix != stored.updated_at_unix
            try:
                # Checks and replica counts change often; routers only care about the split.
                await self.traffic.save_rollout(r, publish=traffic_changed)
            except Aborted:
                continue  # another registry decided first; its decision is reloaded
            if event:
                self.announce(r)

    async def run(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.tick()
            except Exception:  # a failing tick (metrics down) must not stop later ones
                log.exception("registry.rollout_tick_failed")

    async def _step(self, r: pb.Rollout) -> None:
        now = self._clock()
        had_replicas = r.candidate_replicas
        r.candidate_replicas = self.candidate_replicas(r)
        plan = r.plan
        if plan.strategy == plans.SHADOW:
            if r.state == plans.RUNNING and now - r.step_started_at_unix >= plan.bake_s:
                plans.complete(r, now, f"shadowed {plan.shadow_percent:g}% for {plan.bake_s:g} s")
            return
        checks = await self._judge(r, now)
        del r.checks[:]
        r.checks.extend(checks)
        breaches = [c for c in checks if c.verdict == guardrails.BREACH]
        if breaches:
            detail = "guardrail breached: " + guardrails.describe_all(breaches)
            plans.rollback(r, now, detail)
            return
        if r.candidate_replicas and not had_replicas:
            r.step_started_at_unix = now  # the bake starts over: time without replicas proved nothing
        if r.candidate_replicas == 0:
            if r.events[-1].kind != "waiting":
                plans.record(r, "waiting", now, f"no SERVING replica of {plan.candidate_version}: "
                             f"traffic stays on {plan.baseline_version}")  # fmt: skip
            return
        if r.state == plans.PAUSED and checks and _paused_undecided(r) and _all_ok(checks):
            # The pause only waited for evidence, and it came: the plan goes on (a breach while paused rolls back
            # the same way). An operator's own pause is left to the operator.
            plans.resume(r, now, "the guardrails were judged ok: " + guardrails.describe_all(checks))
        if r.state != plans.RUNNING or now - r.step_started_at_unix < plan.bake_s:
            return
        if _all_ok(checks):
            judged = guardrails.describe_all(checks) or "no guardrails"
            plans.advance(
                r, now, f"{now - r.step_started_at_unix:.0f} s at {r.candidate_percent:g}% ({judged})"
            )
            return
        self._hold(r, now, [c for c in checks if c.verdict != guardrails.OK])

    def _hold(self, r: pb.Rollout, now: float, pending: list[pb.GuardrailCheck]) -> None:
        """The bake is over but not every guardrail is ok (a rate's bounds straddle its limit, or too few samples):
        the step holds, saying so once with the numbers, for at most max_hold_s (counted again from a resume);
        then the plan's on_undecided pauses it for an operator or rolls it back."""
        plan = r.plan
        hold_s = plans.max_hold_s(plan)
        since = r.step_started_at_unix + plan.bake_s
        for e in reversed(r.events):
            if e.kind == "resumed" and e.at_unix >= r.step_started_at_unix:
                since = max(since, e.at_unix)
                break
        what = guardrails.describe_all(pending)
        action = plans.undecided_action_name(plan.on_undecided)
        if now - since >= hold_s:
            detail = f"undecided {now - r.step_started_at_unix:.0f} s into the step at {r.candidate_percent:g}%: {what}"
            if plan.on_undecided == plans.ROLLBACK:
                plans.rollback(r, now, detail)
            else:
                r.state = plans.PAUSED
                plans.record(
                    r,
                    "undecided",
                    now,
                    f"{detail}; paused for an operator (resume: hold {hold_s:g} s more), or until every guardrail is ok",
                )
            return
        last = r.events[-1]
        if last.kind != "holding" or last.at_unix < since:
            plans.record(
                r, "holding", now, f"bake over at {r.candidate_percent:g}%, not every guardrail ok yet: {what}; "
                f"holding up to {hold_s:g} s, then {action}",
            )  # fmt: skip

    async def _judge(self, r: pb.Rollout, now: float) -> list[pb.GuardrailCheck]:
        plan = r.plan
        if not plan.guardrails:
            return []
        start = r.step_started_at_unix
        if plan.window_s:
            start = max(start, now - plan.window_s)
        window = max(MIN_WINDOW_S, now - start)
        if self.source is None:
            cand = base = VersionStats()  # no metrics service: never judged, so never advanced
        else:
            try:
                cand = await self.source.fetch(plan.model, plan.candidate_version, window)
                base = await self.source.fetch(plan.model, plan.baseline_version, window)
                if base.requests < _baseline_need(plan) and now - r.started_at_unix > window:
                    # The baseline has too little traffic in the window (a late step sends it little or none):
                    # its numbers over the whole rollout so far stand in.
                    base = await self.source.fetch(plan.model, plan.baseline_version, now - r.started_at_unix)
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "registry.rollout_metrics_unavailable", code=e.code().name, rollout_id=r.rollout_id
                )
                cand = base = VersionStats()
        conf = plans.confidence(plan)
        return [guardrails.judge(g, cand, base, conf) for g in plan.guardrails]

    def announce(self, r: pb.Rollout) -> None:
        """Count (a metric the metrics service receives) and log the rollout's last event."""
        e = r.events[-1]
        self._events.add(
            1, {"model": r.plan.model, "model_version": r.plan.candidate_version, "event": e.kind}
        )
        level = log.warning if e.kind in ("rolled_back", "undecided") else log.info
        level(
            f"registry.rollout_{e.kind}",
            rollout_id=r.rollout_id,
            model=r.plan.model,
            baseline_version=r.plan.baseline_version,
            candidate_version=r.plan.candidate_version,
            candidate_percent=r.candidate_percent,
            step=r.step,
            detail=e.detail,
        )


def _all_ok(checks: list[pb.GuardrailCheck]) -> bool:
    return all(c.verdict == guardrails.OK for c in checks)


def _paused_undecided(r: pb.Rollout) -> bool:
    """Paused by its own hold running out undecided (an 'undecided' event since the last pause or resume), not by
    an operator."""
    for e in reversed(r.events):
        if e.kind in ("undecided", "paused", "resumed"):
            return e.kind == "undecided"
    return False
