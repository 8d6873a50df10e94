"""The router's traffic splits: rollouts, experiments and feature flags from the registry's WatchTraffic stream,
and the assignment of each request to a model version (and maybe an experiment arm, a routing policy, a shadow
copy). Assignment is sticky: a hash of tenant + user (or session) id decides, the same on every router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass

import structlog
from fleetserve.registry.v1 import rollout_service_pb2 as rpb

from shared.cohorts import arm_percents, bucket, cohort_key, in_slice, pick
from shared.watching import follow

log = structlog.get_logger(__name__)

RUNNING = rpb.ROLLOUT_STATE_RUNNING
PAUSED = rpb.ROLLOUT_STATE_PAUSED
PROMOTED = rpb.ROLLOUT_STATE_PROMOTED
ROLLED_BACK = rpb.ROLLOUT_STATE_ROLLED_BACK
SHADOW = rpb.ROLLOUT_STRATEGY_SHADOW


@dataclass(frozen=True, slots=True)
class Shadow:
    """Copy this request to the candidate (its answer compared, never served)."""

    rollout_id: str
    baseline_version: str
    candidate_version: str
    max_in_flight: int


@dataclass(frozen=True, slots=True)
class Assignment:
    """Where one request goes: a version (empty: any), the version to use instead when that one has no
    routable replica (empty: none), a routing policy (empty: the model's), the experiment arm it counts for,
    a shadow copy, and what decided (for spans and logs)."""

    version: str = ""
    fallback: str = ""
    policy: str = ""
    experiment: str = ""
    arm: str = ""
    shadow: Shadow | None = None
    source: str = ""
    # The rollout's own choice under an experiment arm or a flag: where the request goes if the arm's version
    # has no routable replica (it then counts for no arm).
    base: Assignment | None = None


NONE = Assignment()


def _rollout_assignment(r: rpb.Rollout, key: str, request_id: str) -> Assignment:
    """The model's latest rollout's choice for one request."""
    p = r.plan
    source = f"rollout:{r.rollout_id}"
    if p.strategy == SHADOW:
        # Live traffic stays on the baseline whatever the shadow plan's state; a running one copies a share.
        shadow = None
        if r.state == RUNNING and bucket(f"{r.rollout_id}:shadow", request_id) * 100.0 < p.shadow_percent:
            shadow = Shadow(
                r.rollout_id, p.baseline_version, p.candidate_version, p.shadow_max_in_flight or 32
            )
        return Assignment(version=p.baseline_version, shadow=shadow, source=source)
    if r.state == ROLLED_BACK:
        # Never send traffic to a version rolled back, even when the baseline has no replica left.
        return Assignment(version=p.baseline_version, source=source)
    if r.state == PROMOTED:
        return Assignment(version=p.candidate_version, fallback=p.baseline_version, source=source)
    if bucket(r.rollout_id, key) * 100.0 < r.candidate_percent:
        return Assignment(version=p.candidate_version, fallback=p.baseline_version, source=source)
    return Assignment(version=p.baseline_version, fallback=p.candidate_version, source=source)


def _flag_matches(f: rpb.FeatureFlag, tenant: str, user: str, key: str) -> bool:
    return (
        tenant in f.tenants
        or (user and user in f.users)
        or (f.percent > 0 and bucket(f"flag:{f.name}", key) * 100.0 < f.percent)
    )


def _in_population(e: rpb.Experiment, tenant: str, key: str) -> bool:
    p = e.spec.population
    if p.tenants and tenant not in p.tenants:
        return False
    # One hash space per model for every experiment: their slices never overlap, so no user is in two.
    return in_slice(bucket(f"experiments:{e.spec.model}", key), p.offset_percent, p.percent)


class TrafficTable:
    """The latest traffic configuration, per model, and the assignment of requests to it."""

    def __init__(self) -> None:
        self.rollouts: dict[str, rpb.Rollout] = {}
        self.experiments: dict[str, list[rpb.Experiment]] = {}
        self.flags: dict[str, list[rpb.FeatureFlag]] = {}
        self.ready = asyncio.Event()
        self.connected = False
        self._listeners: list[Callable[[rpb.WatchTrafficResponse], None]] = []

    def subscribe(self, listener: Callable[[rpb.WatchTrafficResponse], None]) -> None:
        self._listeners.append(listener)

    def apply(self, snapshot: rpb.WatchTrafficResponse) -> None:
        """Replace the configuration by a snapshot from the registry."""
        self.rollouts = {r.plan.model: r for r in snapshot.rollouts}
        experiments: dict[str, list[rpb.Experiment]] = {}
        for e in snapshot.experiments:
            if len(e.spec.arms) >= 2:
                experiments.setdefault(e.spec.model, []).append(e)
        self.experiments = experiments
        flags: dict[str, list[rpb.FeatureFlag]] = {}
        for f in snapshot.flags:
            flags.setdefault(f.model, []).append(f)
        self.flags = flags
        self.ready.set()
        for listener in self._listeners:
            listener(snapshot)

    def assign(self, model: str, tenant: str, user: str, session: str, request_id: str) -> Assignment:
        """Where a request for model goes (NONE: anywhere, as before any rollout)."""
        rollout = self.rollouts.get(model)
        experiments = self.experiments.get(model)
        flags = self.flags.get(model)
        if rollout is None and not experiments and not flags:
            return NONE  # the common case costs three lookups
        key, _ = cohort_key(tenant, user, session, request_id)
        base = _rollout_assignment(rollout, key, request_id) if rollout is not None else NONE
        for f in flags or ():
            if _flag_matches(f, tenant, user, key):
                v = f.variant
                return Assignment(
                    version=v.model_version or base.version,
                    fallback="" if v.model_version else base.fallback,
                    policy=v.routing_policy,
                    shadow=base.shadow,
                    source=f"flag:{f.name}",
                    base=base,
                )
        for e in experiments or ():
            if _in_population(e, tenant, key):
                arm = e.spec.arms[
                    pick(bucket(e.experiment_id, key), arm_percents([a.percent for a in e.spec.arms]))
                ]
                v = arm.variant
                return Assignment(
                    version=v.model_version or base.version,
                    fallback="" if v.model_version else base.fallback,
                    policy=v.routing_policy,
                    experiment=e.experiment_id,
                    arm=arm.name,
                    shadow=base.shadow,
                    source=f"experiment:{e.experiment_id}",
                    base=base,
                )
        return base

    async def watch(
        self,
        open_stream: Callable[[], AsyncIterable[rpb.WatchTrafficResponse]],
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
    ) -> None:
        """Apply snapshots from open_stream() until cancelled, reconnecting when the stream breaks; the last
        configuration is kept meanwhile (a registry outage freezes the splits, never resets them)."""
        await follow(
            self,
            open_stream,
            self.apply,
            "router.traffic_watch",
            kept=lambda: {"rollouts_kept": len(self.rollouts)},
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
        )
