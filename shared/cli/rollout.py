"""`fleetserve rollout|experiment|flag`: start and steer rollouts, run A/B experiments and read their verdicts, set
feature flags, all through the registry's RolloutService."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time

import grpc
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from shared.channels import open_channel
from shared.cluster import read_state
from shared.errors import details_of
from shared.tls import Tls

STRATEGIES = {
    "canary": pb.ROLLOUT_STRATEGY_CANARY,
    "gradual": pb.ROLLOUT_STRATEGY_GRADUAL,
    "blue-green": pb.ROLLOUT_STRATEGY_BLUE_GREEN,
    "shadow": pb.ROLLOUT_STRATEGY_SHADOW,
}
# error_rate<=0.02 (absolute), tpot_p99_ms<=1.5x (relative to the baseline), 'error_rate<=2x+0.01' (relative with
# a gap), feedback_rating>=0.9x; '@N' at the end: at least N samples before judging.
_GUARDRAIL = re.compile(
    r"^\s*(?P<metric>[a-z0-9_]+)\s*(?P<op><=|>=)\s*(?P<limit>[0-9.eE+-]+?)(?P<x>x)?"
    r"(?:\+(?P<gap>[0-9.eE+-]+))?(?:@(?P<min>\d+))?\s*$"
)
UNDECIDED = {"pause": pb.UNDECIDED_ACTION_PAUSE, "rollback": pb.UNDECIDED_ACTION_ROLLBACK}
EXPERIMENT_VERBS = ("create", "status", "analyze", "list", "stop")


def _common() -> argparse.ArgumentParser:
    """Options every verb takes (after the verb, as in `fleetserve rollout status --json`)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--registry", help="registry host:port (default: the running cluster's)")
    p.add_argument("--json", action="store_true", help="JSON output")
    return p


def add_rollout_arguments(p: argparse.ArgumentParser) -> None:
    common = [_common()]
    sub = p.add_subparsers(dest="rollout_command", required=True)
    start = sub.add_parser("start", help="start a rollout plan", parents=common)
    start.add_argument("--model", required=True)
    start.add_argument("--baseline", required=True, help="the version serving now")
    start.add_argument("--candidate", required=True, help="the new version")
    start.add_argument("--strategy", choices=STRATEGIES, default="gradual")
    start.add_argument(
        "--steps", default="", help="candidate percent per step, e.g. 1,5,25,50,100 (canary: one)"
    )
    start.add_argument("--bake", type=float, default=300.0, help="seconds each step is held (default 300)")
    start.add_argument(
        "--window", type=float, default=0.0, help="guardrails look this far back (0: the step)"
    )
    start.add_argument(
        "--guardrail",
        action="append",
        default=[],
        metavar="RULE",
        help="e.g. 'error_rate<=0.02', 'tpot_p99_ms<=1.5x' (x: times the baseline), 'error_rate<=2x+0.01' "
        "(and worse by more than 0.01), 'feedback_rating>=0.9x', '...@50' (judge after 50 samples); repeatable",
    )
    start.add_argument(
        "--confidence",
        type=float,
        default=0.0,
        help="rate guardrails (error_rate, refusal_rate) roll back once the rate's lower confidence bound is over "
        "the limit and pass once its upper bound is at or under it, at this confidence (default 0.95)",
    )
    start.add_argument(
        "--max-hold",
        type=float,
        default=0.0,
        help="seconds a step whose bake is over is held while a guardrail is undecided (default: three bakes, "
        "at least 60)",
    )
    start.add_argument(
        "--on-undecided",
        choices=("pause", "rollback"),
        default="pause",
        help="after --max-hold undecided: pause for an operator (default; it resumes by itself once every "
        "guardrail is judged ok) or roll back",
    )
    start.add_argument("--shadow-percent", type=float, default=0.0, help="shadow: percent of requests copied")
    start.add_argument("--shadow-max-in-flight", type=int, default=0, help="shadow: budget per router")
    start.add_argument("--manual-promote", action="store_true", help="hold at the last step until promote")
    for verb, text in (
        ("status", "a rollout's state, guardrail checks and history"),
        ("pause", "hold a rollout at its step"),
        ("resume", "let a paused rollout go on"),
        ("promote", "all traffic to the candidate now"),
        ("rollback", "all traffic back to the baseline now"),
    ):
        v = sub.add_parser(verb, help=text, parents=common)
        v.add_argument("rollout_id", nargs="?" if verb == "status" else None, help="rollout id")
        if verb == "status":
            v.add_argument("--model", help="the model's latest rollout (instead of an id)")
        if verb == "rollback":
            v.add_argument("--reason", default="", help="why (kept in its history)")
    ls = sub.add_parser("list", help="rollouts, newest first", parents=common)
    ls.add_argument("--model", default="")


def add_experiment_arguments(p: argparse.ArgumentParser) -> argparse._SubParsersAction:
    """The A/B verbs; returns the subparsers so that other commands (book exercises) can join them."""
    common = [_common()]
    sub = p.add_subparsers(dest="experiment_command", required=True)
    create = sub.add_parser("create", help="create and start an A/B experiment", parents=common)
    create.add_argument("name")
    create.add_argument("--model", required=True)
    create.add_argument(
        "--arm",
        action="append",
        required=True,
        metavar="NAME:KEY=VALUE,...",
        help="an arm, the control first: e.g. 'control:version=v1' 'treatment:version=v2,policy=round_robin,"
        "percent=50' (keys version, policy, percent; percents add up to 100 or are all left out)",
    )
    create.add_argument("--percent", type=float, default=100.0, help="percent of users in it (default 100)")
    create.add_argument(
        "--offset", type=float, default=0.0, help="where its users' slice starts (0: first free)"
    )
    create.add_argument("--tenants", default="", help="only these tenants' users (comma-separated)")
    create.add_argument(
        "--metric", required=True, help="primary metric, e.g. ttft_ms, error_rate, success_rate"
    )
    create.add_argument(
        "--mde", type=float, default=0.0, help="minimum detectable effect (absolute difference)"
    )
    create.add_argument("--std", type=float, default=0.0, help="means: expected standard deviation")
    create.add_argument("--rate", type=float, default=0.0, help="rates: the control's expected rate")
    create.add_argument("--alpha", type=float, default=0.0, help="significance level (default 0.05)")
    create.add_argument("--power", type=float, default=0.0, help="power (default 0.8)")
    create.add_argument("--samples-per-arm", type=int, default=0, help="fixed horizon instead of mde/power")
    for verb, text in (("status", "samples so far against the horizon"), ("analyze", "the statistics and verdict"),
                       ("stop", "end an experiment (its data stays)")):  # fmt: skip
        v = sub.add_parser(verb, help=text, parents=common)
        v.add_argument("experiment", help="experiment id or name")
        if verb == "analyze":
            v.add_argument(
                "--peek", action="store_true", help="show the tests before the horizon (decides nothing)"
            )
    ls = sub.add_parser("list", help="experiments, newest first", parents=common)
    ls.add_argument("--model", default="")
    return sub


def add_flag_arguments(p: argparse.ArgumentParser) -> None:
    common = [_common()]
    sub = p.add_subparsers(dest="flag_command", required=True)
    s = sub.add_parser("set", help="create or replace a feature flag", parents=common)
    s.add_argument("name")
    s.add_argument("--model", required=True)
    s.add_argument("--tenants", default="", help="these tenants (comma-separated)")
    s.add_argument("--users", default="", help="these user ids (comma-separated)")
    s.add_argument("--percent", type=float, default=0.0, help="this percent of users, sticky by hash")
    s.add_argument("--version", default="", help="model version they get")
    s.add_argument("--policy", default="", help="routing policy they get")
    s.add_argument("--disabled", action="store_true", help="keep the flag but do not apply it")
    d = sub.add_parser("delete", help="remove a flag", parents=common)
    d.add_argument("name")
    sub.add_parser("list", help="every flag", parents=common)


# -- parsing ----------------------------------------------------------------------------------------------


def parse_guardrail(rule: str) -> pb.Guardrail:
    """'error_rate<=0.02', 'tpot_p99_ms<=1.5x', 'error_rate<=2x+0.01@50' -> Guardrail; ValueError otherwise."""
    from services.registry.rollouts.guardrails import METRICS

    m = _GUARDRAIL.match(rule)
    if m is None:
        raise ValueError(
            f"guardrail {rule!r}: write METRIC<=LIMIT, METRIC<=FACTORx or METRIC>=... (feedback)"
        )
    metric = METRICS.get(m["metric"])
    if metric is not None and (m["op"] == ">=") != metric.higher_is_better:
        want = ">=" if metric.higher_is_better else "<="
        raise ValueError(f"guardrail {rule!r}: {m['metric']} is limited with {want}")
    g = pb.Guardrail(
        metric=m["metric"],
        mode=pb.GUARDRAIL_MODE_RELATIVE if m["x"] else pb.GUARDRAIL_MODE_ABSOLUTE,
        limit=float(m["limit"]),
        min_gap=float(m["gap"] or 0.0),
        min_samples=int(m["min"] or 0),
    )
    if g.min_gap and not m["x"]:
        raise ValueError(f"guardrail {rule!r}: +GAP goes with a relative limit (FACTORx)")
    return g


def parse_arm(text: str) -> pb.Arm:
    """'treatment:version=v2,policy=round_robin,percent=50' -> Arm; ValueError otherwise."""
    name, _, body = text.partition(":")
    arm = pb.Arm(name=name.strip())
    for item in filter(None, (i.strip() for i in body.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"arm {text!r}: {item!r} is not KEY=VALUE")
        if key == "version":
            arm.variant.model_version = value
        elif key == "policy":
            arm.variant.routing_policy = value
        elif key == "percent":
            arm.percent = float(value)
        else:
            raise ValueError(f"arm {text!r}: unknown key {key!r} (version, policy, percent)")
    return arm


def _list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _steps(text: str) -> list[float]:
    try:
        return [float(x) for x in _list(text)]
    except ValueError:
        raise ValueError(f"--steps {text!r}: percents separated by commas, e.g. 1,5,25,50,100") from None


# -- output -----------------------------------------------------------------------------------------------


def _ago(t: float) -> str:
    return f"{max(0.0, time.time() - t):.0f}s ago" if t else "-"


def format_rollout(r: pb.Rollout) -> str:
    from services.registry.rollouts import guardrails, plans

    p = r.plan
    lines = [
        f"rollout {r.rollout_id}: {p.model} {p.baseline_version} -> {p.candidate_version} "
        f"({plans.strategy_name(p.strategy)}), {plans.state_name(r.state)}",
        f"  traffic: {r.candidate_percent:g}% to {p.candidate_version}"
        + (f" (step {r.step + 1}/{len(p.steps)})" if p.steps else "")
        + (f", shadowing {p.shadow_percent:g}%" if p.shadow_percent else "")
        + f"; {r.candidate_replicas} {p.candidate_version} replica(s) serving",
        f"  started {_ago(r.started_at_unix)}, step started {_ago(r.step_started_at_unix)}, bake {p.bake_s:g}s",
        f"  reason: {r.reason}",
    ]
    if p.guardrails and p.strategy != plans.SHADOW:
        lines.append(
            f"  rates decided at {plans.confidence(p) * 100:g}% confidence; a step undecided after its bake is held "
            f"up to {plans.max_hold_s(p):g}s, then {plans.undecided_action_name(p.on_undecided)}"
        )
    for c in r.checks:
        lines.append(f"  guardrail [{c.verdict}] {guardrails.describe(c)}")
    lines.append("  history:")
    for e in r.events:
        when = time.strftime("%H:%M:%S", time.localtime(e.at_unix))
        lines.append(f"    {when} {e.kind:<12} {e.candidate_percent:>5g}%  {e.detail}")
    return "\n".join(lines)


def format_experiment(e: pb.Experiment, samples=()) -> str:
    s = e.spec
    state = pb.ExperimentState.Name(e.state).removeprefix("EXPERIMENT_STATE_").lower()
    pop = s.population
    who = f"{pop.percent:g}% of users (slice {pop.offset_percent:g}-{pop.offset_percent + pop.percent:g}%)"
    if pop.tenants:
        who += f" of tenants {', '.join(pop.tenants)}"
    lines = [f"experiment {e.experiment_id} '{s.name}' on {s.model}: {state}; {who}",
             f"  primary metric {s.primary_metric}; fixed horizon {e.samples_per_arm} samples per arm"]  # fmt: skip
    for i, a in enumerate(s.arms):
        v = a.variant
        what = ", ".join(x for x in (v.model_version and f"version {v.model_version}",
                                     v.routing_policy and f"policy {v.routing_policy}") if x)  # fmt: skip
        got = f": {samples[i]}/{e.samples_per_arm} samples" if i < len(samples) else ""
        lines.append(f"  arm {a.name}{' (control)' if i == 0 else ''}: {what or 'default'}{got}")
    return "\n".join(lines)


def format_analysis(resp: pb.AnalyzeExperimentResponse) -> str:
    lines = [format_experiment(resp.experiment)]
    for a in resp.arms:
        cells = ", ".join(f"{m.metric} {m.mean:.4g} (n={m.count})" for m in a.metrics)
        lines.append(f"  {a.arm}: {a.requests} requests; {cells}")
    for c in resp.comparisons:
        if c.test == "chi_squared":
            lines.append(f"  {c.metric}: chi-squared across arms p={c.p_value:.3g}")
            continue
        mark = "*" if c.significant else " "
        lines.append(
            f" {mark}{c.arm} vs control {c.metric}: {c.difference:+.4g} ({c.relative_difference:+.1%}) "
            f"CI [{c.ci_low:+.4g}, {c.ci_high:+.4g}] p={c.p_value:.3g} Holm {c.p_adjusted:.3g} "
            f"effect {c.effect_size:+.3f} ({c.test})"
        )
    lines.append(f"verdict: {resp.verdict}")
    return "\n".join(lines)


def _print(args, message, text: str) -> None:
    if args.json:
        print(json.dumps(MessageToDict(message, preserving_proto_field_name=True)))
    else:
        print(text)


# -- commands ---------------------------------------------------------------------------------------------


async def _rollout(stub: pb_grpc.RolloutServiceStub, args) -> int:
    cmd = args.rollout_command
    if cmd == "start":
        plan = pb.RolloutPlan(
            model=args.model,
            baseline_version=args.baseline,
            candidate_version=args.candidate,
            strategy=STRATEGIES[args.strategy],
            steps=_steps(args.steps),
            bake_s=args.bake,
            window_s=args.window,
            guardrails=[parse_guardrail(g) for g in args.guardrail],
            shadow_percent=args.shadow_percent,
            shadow_max_in_flight=args.shadow_max_in_flight,
            manual_promote=args.manual_promote,
            confidence=args.confidence,
            max_hold_s=args.max_hold,
            on_undecided=UNDECIDED[args.on_undecided],
        )
        r = (await stub.StartRollout(pb.StartRolloutRequest(plan=plan), timeout=5)).rollout
    elif cmd == "status":
        req = pb.GetRolloutRequest(rollout_id=args.rollout_id or "", model=args.model or "")
        r = (await stub.GetRollout(req, timeout=5)).rollout
    elif cmd == "list":
        resp = await stub.ListRollouts(pb.ListRolloutsRequest(model=args.model), timeout=5)
        _print(args, resp, "\n\n".join(format_rollout(r) for r in resp.rollouts) or "no rollouts")
        return 0
    elif cmd == "pause":
        r = (await stub.PauseRollout(pb.PauseRolloutRequest(rollout_id=args.rollout_id), timeout=5)).rollout
    elif cmd == "resume":
        r = (await stub.ResumeRollout(pb.ResumeRolloutRequest(rollout_id=args.rollout_id), timeout=5)).rollout
    elif cmd == "promote":
        r = (
            await stub.PromoteRollout(pb.PromoteRolloutRequest(rollout_id=args.rollout_id), timeout=5)
        ).rollout
    else:
        req = pb.RollbackRolloutRequest(rollout_id=args.rollout_id, reason=args.reason)
        r = (await stub.RollbackRollout(req, timeout=5)).rollout
    _print(args, r, format_rollout(r))
    return 0


async def _experiment(stub: pb_grpc.RolloutServiceStub, args) -> int:
    cmd = args.experiment_command
    if cmd == "create":
        spec = pb.ExperimentSpec(
            name=args.name,
            model=args.model,
            arms=[parse_arm(a) for a in args.arm],
            population=pb.Population(
                percent=args.percent, offset_percent=args.offset, tenants=_list(args.tenants)
            ),
            primary_metric=args.metric,
            alpha=args.alpha,
            power=args.power,
            mde=args.mde,
            expected_std=args.std,
            expected_rate=args.rate,
            samples_per_arm=args.samples_per_arm,
        )
        e = (await stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec), timeout=5)).experiment
        _print(args, e, format_experiment(e))
    elif cmd == "status":
        resp = await stub.GetExperiment(pb.GetExperimentRequest(experiment_id=args.experiment), timeout=5)
        _print(args, resp, format_experiment(resp.experiment, list(resp.samples)))
    elif cmd == "analyze":
        req = pb.AnalyzeExperimentRequest(experiment_id=args.experiment, peek=args.peek)
        resp = await stub.AnalyzeExperiment(req, timeout=10)
        _print(args, resp, format_analysis(resp))
    elif cmd == "stop":
        resp = await stub.StopExperiment(pb.StopExperimentRequest(experiment_id=args.experiment), timeout=5)
        _print(args, resp.experiment, format_experiment(resp.experiment))
    else:
        resp = await stub.ListExperiments(pb.ListExperimentsRequest(model=args.model), timeout=5)
        _print(args, resp, "\n".join(format_experiment(e) for e in resp.experiments) or "no experiments")
    return 0


async def _flag(stub: pb_grpc.RolloutServiceStub, args) -> int:
    cmd = args.flag_command
    if cmd == "set":
        flag = pb.FeatureFlag(
            name=args.name,
            model=args.model,
            tenants=_list(args.tenants),
            users=_list(args.users),
            percent=args.percent,
            variant=pb.Variant(model_version=args.version, routing_policy=args.policy),
            disabled=args.disabled,
        )
        resp = await stub.SetFeatureFlag(pb.SetFeatureFlagRequest(flag=flag), timeout=5)
        _print(args, resp.flag, f"flag {flag.name} set")
    elif cmd == "delete":
        resp = await stub.DeleteFeatureFlag(pb.DeleteFeatureFlagRequest(name=args.name), timeout=5)
        _print(args, resp, f"flag {args.name} {'deleted' if resp.found else 'not found'}")
    else:
        resp = await stub.ListFeatureFlags(pb.ListFeatureFlagsRequest(), timeout=5)
        rows = [
            f"{f.name:<20} {f.model:<12} tenants={','.join(f.tenants) or '-'} users={','.join(f.users) or '-'} "
            f"percent={f.percent:g} -> version={f.variant.model_version or '-'} "
            f"policy={f.variant.routing_policy or '-'}{' (disabled)' if f.disabled else ''}"
            for f in resp.flags
        ]
        _print(args, resp, "\n".join(rows) or "no flags")
    return 0


def run(args, which: str) -> int:
    """Run `fleetserve rollout|experiment|flag ...`: 0 on success, 1 on an error (printed with its details)."""
    registry = args.registry or read_state()["registry"]
    handler = {"rollout": _rollout, "experiment": _experiment, "flag": _flag}[which]

    async def go() -> int:
        async with open_channel(registry, Tls.for_tools()) as ch:
            return await handler(pb_grpc.RolloutServiceStub(ch), args)

    try:
        return asyncio.run(go())
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except grpc.aio.AioRpcError as e:
        d = details_of(e)
        print(f"error: {d.code.name} {d.reason}: {d.message}", file=sys.stderr)
        for field, text in d.field_violations:
            print(f"  {field}: {text}", file=sys.stderr)
        return 1
