"""Rollout plans: validation of what an operator asks for, and a rollout's transitions (start, advance, pause,
resume, promote, roll back, complete), each recorded as an event with its reason."""

from __future__ import annotations

import math
from collections.abc import Mapping

from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.registry.rollouts import guardrails
from shared.errors import FailedPrecondition, InvalidArgument

MAX_BAKE_S = 7 * 86400.0
MAX_EVENTS = 200
DEFAULT_SHADOW_IN_FLIGHT = 32

CANARY = pb.ROLLOUT_STRATEGY_CANARY
GRADUAL = pb.ROLLOUT_STRATEGY_GRADUAL
BLUE_GREEN = pb.ROLLOUT_STRATEGY_BLUE_GREEN
SHADOW = pb.ROLLOUT_STRATEGY_SHADOW
RUNNING = pb.ROLLOUT_STATE_RUNNING
PAUSED = pb.ROLLOUT_STATE_PAUSED
PROMOTED = pb.ROLLOUT_STATE_PROMOTED
ROLLED_BACK = pb.ROLLOUT_STATE_ROLLED_BACK
COMPLETED = pb.ROLLOUT_STATE_COMPLETED
ACTIVE = frozenset({RUNNING, PAUSED})
PAUSE = pb.UNDECIDED_ACTION_PAUSE
ROLLBACK = pb.UNDECIDED_ACTION_ROLLBACK
# An undecided step's hold past its bake when the plan does not say (max_hold_s 0): three bakes, at least this.
MIN_DEFAULT_HOLD_S = 60.0


def strategy_name(strategy: int) -> str:
    return pb.RolloutStrategy.Name(strategy).removeprefix("ROLLOUT_STRATEGY_").lower()


def state_name(state: int) -> str:
    return pb.RolloutState.Name(state).removeprefix("ROLLOUT_STATE_").lower()


def confidence(plan: pb.RolloutPlan) -> float:
    """The confidence rate guardrails decide at (0 means the default)."""
    return plan.confidence or guardrails.DEFAULT_CONFIDENCE


def max_hold_s(plan: pb.RolloutPlan) -> float:
    """How long a step whose bake is over may stay undecided before on_undecided applies."""
    return plan.max_hold_s or max(3.0 * plan.bake_s, MIN_DEFAULT_HOLD_S)


def undecided_action_name(action: int) -> str:
    return "rollback" if action == ROLLBACK else "pause"


def _percent_ok(v: float) -> bool:
    return math.isfinite(v) and 0.0 < v <= 100.0


def validate(plan: pb.RolloutPlan, versions: Mapping[str, set[str]]) -> None:
    """InvalidArgument naming every bad field of a plan; versions maps each model to the versions any of its
    replicas ever registered with (a version never seen is unknown; one seen whose replicas left is accepted and
    gets no traffic until a replica is back)."""
    bad: list[tuple[str, str]] = []
    known = versions.get(plan.model)
    if not plan.model:
        bad.append(("plan.model", "required"))
    elif known is None:
        bad.append(
            ("plan.model", f"no replica of {plan.model!r} has registered; known models: {_listed(versions)}")
        )
    for name in ("baseline_version", "candidate_version"):
        v = getattr(plan, name)
        if not v:
            bad.append((f"plan.{name}", "required"))
        elif known is not None and v not in known:
            bad.append((f"plan.{name}", f"unknown version {v!r} of {plan.model!r}; known: {_listed(known)}"))
    if plan.baseline_version and plan.baseline_version == plan.candidate_version:
        bad.append(("plan.candidate_version", "must differ from plan.baseline_version"))
    bad += _check_steps(plan)
    if not (math.isfinite(plan.bake_s) and 0.0 <= plan.bake_s <= MAX_BAKE_S):
        bad.append(("plan.bake_s", f"seconds in [0, {MAX_BAKE_S:g}]; got {plan.bake_s}"))
    if not (math.isfinite(plan.window_s) and plan.window_s >= 0.0):
        bad.append(("plan.window_s", f"seconds >= 0 (0: the whole step); got {plan.window_s}"))
    if not (math.isfinite(plan.confidence) and (plan.confidence == 0.0 or 0.5 <= plan.confidence < 1.0)):
        bad.append(("plan.confidence", f"in [0.5, 1), e.g. 0.95 (0: 0.95); got {plan.confidence}"))
    if not (math.isfinite(plan.max_hold_s) and 0.0 <= plan.max_hold_s <= MAX_BAKE_S):
        bad.append(
            (
                "plan.max_hold_s",
                f"seconds in [0, {MAX_BAKE_S:g}] (0: three bakes, >= 60 s); got {plan.max_hold_s}",
            )
        )
    if plan.on_undecided not in pb.UndecidedAction.values():
        bad.append(("plan.on_undecided", f"unknown action {plan.on_undecided}"))
    bad += _check_guardrails(plan)
    if bad:
        raise InvalidArgument(
            "invalid rollout plan: " + "; ".join(f"{f} {d}" for f, d in bad), field_violations=bad
        )


def _listed(items) -> str:
    return ", ".join(sorted(items)) or "none"


def _check_steps(plan: pb.RolloutPlan) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    s = plan.strategy
    if s not in (CANARY, GRADUAL, BLUE_GREEN, SHADOW):
        return [("plan.strategy", "required: canary, gradual, blue_green or shadow")]
    steps = list(plan.steps)
    for i, v in enumerate(steps):
        if not _percent_ok(v):
            bad.append((f"plan.steps[{i}]", f"a percent in (0, 100]; got {v}"))
        elif i and v <= steps[i - 1]:
            bad.append((f"plan.steps[{i}]", f"steps must increase; {v:g} follows {steps[i - 1]:g}"))
    if s == CANARY and len(steps) != 1:
        bad.append(("plan.steps", "a canary takes exactly one step: the candidate's percent"))
    elif s == GRADUAL and not steps:
        bad.append(("plan.steps", "a gradual rollout needs its ramp, e.g. 1, 5, 25, 50, 100"))
    elif s == BLUE_GREEN and steps not in ([], [100.0]):
        bad.append(("plan.steps", "blue-green switches all traffic at once: leave steps empty"))
    elif s == SHADOW and steps:
        bad.append(("plan.steps", "a shadow plan moves no traffic: give shadow_percent instead"))
    if s == SHADOW:
        if not _percent_ok(plan.shadow_percent):
            bad.append(("plan.shadow_percent", f"a percent in (0, 100]; got {plan.shadow_percent}"))
    elif plan.shadow_percent:
        bad.append(("plan.shadow_percent", "only for the shadow strategy"))
    return bad


def _check_guardrails(plan: pb.RolloutPlan) -> list[tuple[str, str]]:
    bad: list[tuple[str, str]] = []
    if plan.strategy == SHADOW and plan.guardrails:
        return [
            ("plan.guardrails", "a shadow plan serves nothing from the candidate: read its comparison report")
        ]
    for i, g in enumerate(plan.guardrails):
        where = f"plan.guardrails[{i}]"
        if g.metric not in guardrails.METRICS:
            bad.append(
                (f"{where}.metric", f"unknown metric {g.metric!r}; known: {_listed(guardrails.METRICS)}")
            )
        if not (math.isfinite(g.limit) and g.limit >= 0.0):
            bad.append((f"{where}.limit", f"a finite number >= 0; got {g.limit}"))
        elif guardrails.relative(g) and g.limit == 0.0:
            bad.append((f"{where}.limit", "a relative limit is a factor of the baseline's value, > 0"))
        if not (math.isfinite(g.min_gap) and g.min_gap >= 0.0):
            bad.append((f"{where}.min_gap", f"a finite number >= 0; got {g.min_gap}"))
        if g.mode not in pb.GuardrailMode.values():
            bad.append((f"{where}.mode", f"unknown mode {g.mode}"))
        elif guardrails.relative(g) and plan.strategy == BLUE_GREEN:
            bad.append(
                (
                    f"{where}.mode",
                    "blue-green leaves the baseline no traffic to compare with: use absolute limits",
                )
            )
    return bad


# -- transitions -------------------------------------------------------------------------------------------


def first_percent(plan: pb.RolloutPlan) -> float:
    """The candidate's percent of live traffic when a plan starts."""
    if plan.strategy == BLUE_GREEN:
        return 100.0
    if plan.strategy == SHADOW:
        return 0.0
    return plan.steps[0]


def start(plan: pb.RolloutPlan, rollout_id: str, now: float) -> pb.Rollout:
    """A new running rollout at its first step."""
    r = pb.Rollout(rollout_id=rollout_id, state=RUNNING, started_at_unix=now, step_started_at_unix=now)
    r.plan.CopyFrom(plan)
    if r.plan.strategy == SHADOW and not r.plan.shadow_max_in_flight:
        r.plan.shadow_max_in_flight = DEFAULT_SHADOW_IN_FLIGHT
    r.candidate_percent = first_percent(plan)
    what = (
        f"shadowing {plan.shadow_percent:g}% of {plan.model} requests to {plan.candidate_version}"
        if plan.strategy == SHADOW
        else f"{r.candidate_percent:g}% of {plan.model} to {plan.candidate_version}"
    )
    record(r, "started", now, f"{strategy_name(plan.strategy)}: {what}")
    return r


def record(r: pb.Rollout, kind: str, now: float, detail: str) -> None:
    """Append an event (the oldest go beyond MAX_EVENTS) and make detail the rollout's reason."""
    r.events.add(at_unix=now, kind=kind, step=r.step, candidate_percent=r.candidate_percent, detail=detail)
    if len(r.events) > MAX_EVENTS:
        del r.events[: len(r.events) - MAX_EVENTS]
    r.reason = detail
    r.updated_at_unix = now


def _need(r: pb.Rollout, states: frozenset[int], action: str) -> None:
    if r.state not in states:
        raise FailedPrecondition(
            f"cannot {action} rollout {r.rollout_id}: it is {state_name(r.state)}",
            reason="ROLLOUT_STATE",
            metadata={"rollout_id": r.rollout_id, "state": state_name(r.state)},
        )


def pause(r: pb.Rollout, now: float) -> None:
    _need(r, frozenset({RUNNING}), "pause")
    r.state = PAUSED
    record(r, "paused", now, f"paused at {r.candidate_percent:g}% by an operator")


def resume(r: pb.Rollout, now: float, why: str = "") -> None:
    """Running again; `why` says what resumed it when it was not an operator."""
    _need(r, frozenset({PAUSED}), "resume")
    r.state = RUNNING
    record(r, "resumed", now, f"resumed at {r.candidate_percent:g}%" + (f": {why}" if why else ""))


def promote(r: pb.Rollout, now: float, detail: str) -> None:
    """All traffic to the candidate; the rollout ends."""
    _need(r, ACTIVE, "promote")
    if r.plan.strategy == SHADOW:
        raise FailedPrecondition(
            "a shadow plan moves no traffic; start a canary, gradual or blue-green rollout to promote",
            reason="ROLLOUT_STATE",
            metadata={"rollout_id": r.rollout_id},
        )
    r.state = PROMOTED
    r.candidate_percent = 100.0
    record(r, "promoted", now, detail)


def rollback(r: pb.Rollout, now: float, detail: str) -> None:
    """All traffic to the baseline at once (a promoted rollout too: blue-green's switch back)."""
    _need(r, ACTIVE | {PROMOTED}, "roll back")
    r.state = ROLLED_BACK
    r.candidate_percent = 0.0
    record(r, "rolled_back", now, detail)


def complete(r: pb.Rollout, now: float, detail: str) -> None:
    """A shadow plan's end: the comparison is final."""
    r.state = COMPLETED
    record(r, "completed", now, detail)


def advance(r: pb.Rollout, now: float, detail: str) -> None:
    """The next step; after the last, promote (or hold there when the plan asks for a manual promotion)."""
    steps = list(r.plan.steps) or [100.0]
    if r.step + 1 < len(steps):
        r.step += 1
        r.candidate_percent = steps[r.step]
        r.step_started_at_unix = now
        record(r, "advanced", now, f"{r.candidate_percent:g}% after {detail}")
    elif r.plan.manual_promote:
        if not r.reason.startswith("passed every step"):
            record(r, "waiting", now, f"passed every step ({detail}); waiting for promote")
    else:
        promote(r, now, f"passed every step: {detail}")
