"""Which versions of a model the autoscaler keeps, and what share of the model's traffic each is sized for, from
the registry's traffic configuration (RolloutService.WatchTraffic: the latest rollout of each model, running
experiments, enabled feature flags), read as the routers apply it (services/router/traffic.py on the rollouts
work): a split's candidate gets its percent and is kept warm while the plan runs, the baseline the rest; a
promoted plan's baseline is retired after `retire_after_s` (so a blue-green switch back finds it warm); a rolled
back candidate is retired at once."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

from fleetserve.registry.v1 import rollout_service_pb2 as rpb

from services.autoscaler.spec import ModelSpec
from shared.cohorts import arm_percents

# Read from the registry's RolloutService answers (the protocol), not from the registry's own modules.
ACTIVE = frozenset({rpb.ROLLOUT_STATE_RUNNING, rpb.ROLLOUT_STATE_PAUSED})
BLUE_GREEN = rpb.ROLLOUT_STRATEGY_BLUE_GREEN
SHADOW = rpb.ROLLOUT_STRATEGY_SHADOW
PROMOTED = rpb.ROLLOUT_STATE_PROMOTED

EXPERIMENT_RUNNING = rpb.EXPERIMENT_STATE_RUNNING

# Roles, in the order of precedence when one version has several (a baseline that is also an experiment arm
# is the baseline).
CURRENT, BASELINE, CANDIDATE, SHADOW_ROLE, EXPERIMENT, FLAG, RETIRING = (
    "current",
    "baseline",
    "candidate",
    "shadow",
    "experiment",
    "flag",
    "retiring",
)
_PRECEDENCE = (CURRENT, BASELINE, CANDIDATE, SHADOW_ROLE, EXPERIMENT, FLAG, RETIRING)


@dataclass(frozen=True, slots=True)
class VersionPlan:
    """One version's part in its model's traffic."""

    version: str
    role: str
    #: Fraction of the model's arrivals this version is sized for (0..1; a blue-green pair: 1 each).
    share: float
    #: Replicas kept at least while the role lasts (a canary's 1: the rollout waits for a serving replica).
    warm: int = 0
    #: The version that serves this one's share while it has no serving replica (the routers fall back).
    fallback: str = ""
    #: Retiring: Unix time from which it is drained to zero (held at its count until then, and until the version
    #: that replaces it serves what it wants: capacity moves over before the old version goes).
    retire_at: float = 0.0
    replaced_by: str = ""
    #: Why, in words (shown in status and every decision).
    why: str = ""


def _merge(plans: dict[str, VersionPlan], p: VersionPlan) -> None:
    """Keep one plan per version: the more important role, the larger share and warm count."""
    old = plans.get(p.version)
    if old is None:
        plans[p.version] = p
        return
    first, second = sorted((old, p), key=lambda x: _PRECEDENCE.index(x.role))
    plans[p.version] = VersionPlan(
        version=p.version,
        role=first.role,
        share=max(old.share, p.share),
        warm=max(old.warm, p.warm),
        fallback=first.fallback,
        retire_at=first.retire_at,
        why=first.why if first.role == second.role else f"{first.why}; {second.why}",
    )


def _rollout(r: rpb.Rollout, spec: ModelSpec) -> list[VersionPlan]:
    p = r.plan
    base, cand = p.baseline_version, p.candidate_version
    rid = r.rollout_id
    if p.strategy == SHADOW:
        if r.state in ACTIVE:
            copies = p.shadow_percent / 100.0
            return [
                VersionPlan(base, CURRENT, 1.0, why=f"{rid}: shadow baseline"),
                VersionPlan(
                    cand, SHADOW_ROLE, copies, warm=1, why=f"{rid}: shadow copies of {p.shadow_percent:g}%"
                ),
            ]
        return [
            VersionPlan(base, CURRENT, 1.0, why=f"{rid}: shadow ended"),
            VersionPlan(cand, RETIRING, 0.0, retire_at=r.updated_at_unix, why=f"{rid}: shadow ended"),
        ]
    if r.state in ACTIVE:
        pct = r.candidate_percent
        if p.strategy == BLUE_GREEN:
            # Both warm, each sized for the whole model: the switch and the switch back move all traffic.
            return [
                VersionPlan(base, BASELINE, 1.0, why=f"{rid}: blue-green, kept warm for the switch back"),
                VersionPlan(
                    cand, CANDIDATE, 1.0, warm=1, fallback=base, why=f"{rid}: blue-green at {pct:g}%"
                ),
            ]
        return [
            VersionPlan(
                base, BASELINE, 1.0 - pct / 100.0, fallback=cand, why=f"{rid}: baseline at {100 - pct:g}%"
            ),
            VersionPlan(
                cand, CANDIDATE, pct / 100.0, warm=1, fallback=base, why=f"{rid}: candidate at {pct:g}%"
            ),
        ]
    if r.state == PROMOTED:
        due = r.updated_at_unix + spec.retire_after_s
        return [
            VersionPlan(cand, CURRENT, 1.0, why=f"{rid}: promoted"),
            VersionPlan(
                base,
                RETIRING,
                0.0,
                retire_at=due,
                why=f"{rid}: promoted {cand}; {base} retired {spec.retire_after_s:g} s after",
            ),
        ]
    # Rolled back (or any end without a promotion): the routers never send the candidate traffic again.
    return [
        VersionPlan(base, CURRENT, 1.0, why=f"{rid}: rolled back"),
        VersionPlan(cand, RETIRING, 0.0, retire_at=r.updated_at_unix, why=f"{rid}: rolled back"),
    ]


def plan(
    spec: ModelSpec, traffic: rpb.WatchTrafficResponse | None, owned: Iterable[str] = ()
) -> dict[str, VersionPlan]:
    """Every version of spec.model the autoscaler should run (or retire), by version. `owned`: versions it runs
    (or wants) replicas of now; one that no traffic names any more is retired at once (drained, never cut), and
    a retiring version it runs nothing of is left out."""
    model = spec.model
    plans: dict[str, VersionPlan] = {}
    rollout = None
    if traffic is not None:
        rollout = next((r for r in traffic.rollouts if r.plan.model == model), None)
    if rollout is None:
        _merge(plans, VersionPlan(spec.version, CURRENT, 1.0, why="no rollout"))
    else:
        for p in _rollout(rollout, spec):
            _merge(plans, p)
    if traffic is not None:
        for e in traffic.experiments:
            if e.spec.model != model or e.state != EXPERIMENT_RUNNING:
                continue
            pop = e.spec.population
            # A tenant-restricted population's share of traffic is unknown: measured arrivals size it.
            reach = 0.0 if pop.tenants else pop.percent / 100.0
            for arm, pct in zip(e.spec.arms, arm_percents([a.percent for a in e.spec.arms]), strict=True):
                if arm.variant.model_version:
                    why = f"experiment {e.spec.name} arm {arm.name}"
                    _merge(
                        plans,
                        VersionPlan(arm.variant.model_version, EXPERIMENT, reach * pct / 100.0, 1, why=why),
                    )
        for f in traffic.flags:
            if f.model != model or f.disabled or not f.variant.model_version:
                continue
            reach = 0.0 if (f.tenants or f.users) else f.percent / 100.0
            _merge(plans, VersionPlan(f.variant.model_version, FLAG, reach, 1, why=f"feature flag {f.name}"))
    owned = set(owned)
    for v in owned:
        if v not in plans:
            _merge(plans, VersionPlan(v, RETIRING, 0.0, why=f"{v}: no traffic names it any more"))
    current = next((v for v, p in plans.items() if p.role == CURRENT), "")
    return {
        v: dataclasses.replace(p, replaced_by=current) if p.role == RETIRING else p
        for v, p in plans.items()
        if p.role != RETIRING or v in owned
    }
