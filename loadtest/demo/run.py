"""`fleetserve demo capstone`: the chapter's capstone in one command. A sim fleet (small and large model, cache-aware
routing of chats, model routing of questions, predictive + reactive autoscaling, tenants with limits) serves two
compressed days of traffic with an afternoon spike; one replica is SIGKILLed mid-run; every request is measured at
the client; the fleet's own services are asked for scaling, cost and SLO status; the record is written as JSON
and rendered as an HTML report (loadtest/demo/report.py). A piece that is not on main yet is reported as skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as mpb_grpc
from fleetserve.registry.v1 import registry_service_pb2 as rpb
from fleetserve.registry.v1 import registry_service_pb2_grpc as rpb_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as rollpb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rollpb_grpc
from fleetserve.router.v1 import router_service_pb2 as routerpb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc
from google.protobuf.json_format import MessageToDict

from fleetserve.client import AsyncClient, FleetServeError
from loadtest.demo.workload import TENANTS, DayShape, Request, Traffic
from loadtest.policy_bench import wait_routable
from services.registry.rollouts import guardrails as guardrail_text
from services.registry.rollouts.plans import state_name
from shared.channels import open_channel
from shared.cli.rollout import parse_guardrail
from shared.cluster import Cluster, ClusterConfig

SMALL, LARGE, ALIAS = "sim-1b", "sim-8b", "auto"


def log(msg: str) -> None:
    print(f"[demo] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class DemoSettings:
    """The run: a day compressed into day_s seconds, `days` of them (the first teaches the predictor)."""

    day_s: float = 75.0
    days: int = 2
    rate_lo: float = 1.5  # requests/s at night
    rate_hi: float = 5.0  # ... in the afternoon (the spike multiplies it)
    speed_factor: float = 0.5  # the sim engines run at half an H100's speed: few requests fill a replica
    cold_start_s: float = 4.0  # a new replica's cold start, wall seconds
    small_replicas: int = 2
    max_small_replicas: int = 5
    kill_at_h: float = 11.0  # hour of the last day at which a small-model replica is SIGKILLed
    # Canary rollouts of the small model: v1 -> v2 (identical: promoted) from good_at_h of the first day, then
    # v2 -> v3 (planted: every engine step `bad_slowdown` times slower) once the first is decided (not before
    # bad_at_h). Each candidate's first replica pays a cold start (tens of seconds on a busy 2-core machine).
    rollouts: bool = True
    good_at_h: float = 2.0
    bad_at_h: float = 10.0
    canary_percent: float = 30.0
    bad_slowdown: float = 8.0
    seed: int = 1
    backend: str = "sim"
    vllm_args: str = ""

    @property
    def duration_s(self) -> float:
        return self.day_s * self.days

    def at_hour(self, day: int, hour: float) -> float:
        return day * self.day_s + hour / 24.0 * self.day_s


QUICK = DemoSettings(
    day_s=16.0, days=1, rate_lo=1.0, rate_hi=3.0, kill_at_h=12.0, cold_start_s=2.0, rollouts=False
)
# What the canaries must hold (the same for both: the good version passes them, the planted one does not). TPOT
# median at most twice the baseline's and 5 ms worse: the planted 4x stands out; a busy machine's noise, which
# moves a p99 over a few dozen requests by that much (docs/benchmarks/rollouts.md), does not move the median.
# The error rate at most 25%: rate guardrails pass only once their 95% upper bound is at or under the limit, and the
# canary gets ~0.5 requests/s here (28 by 20:00 in a run with a 0.1 limit, which needs 46 clean ones): 0 errors in
# 18 show <= 25% (a broken version is still caught); a 2% limit would take 236.
GUARDRAILS = ("error_rate<=0.25@12", "tpot_p50_ms<=2x+5@12")


@dataclass
class Run:
    """Everything measured, in seconds since the start of the traffic."""

    settings: DemoSettings
    requests: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    sections: dict[str, dict] = field(default_factory=dict)
    rollout_samples: list[dict] = field(default_factory=list)
    in_flight: int = 0
    started: float = 0.0
    wall_started: float = 0.0
    current_version: str = "v1"  # of the small model: the last promoted one (the kill picks a replica of it)

    def now(self) -> float:
        return time.monotonic() - self.started

    def event(self, what: str, **extra) -> None:
        self.events.append({"t_s": round(self.now(), 2), "what": what, **extra})
        log(f"t={self.now():.1f}s {what}")


class CountingClient(AsyncClient):
    """An AsyncClient that counts the waits it makes before retrying (RetryInfo or backoff)."""

    retries = 0

    async def _sleep(self, seconds: float) -> None:
        self.retries += 1
        await asyncio.sleep(seconds)


# -- the fleet -----------------------------------------------------------------------------------------------


def autoscale_spec(s: DemoSettings) -> dict:
    """sim-1b scales on a forecast of its arrival rate one compressed day back (predictive) and on requests
    running per replica (reactive); the larger wins."""
    return {
        SMALL: {
            "min_replicas": s.small_replicas,
            "max_replicas": s.max_small_replicas,
            "replica_rps": 1.6,
            "cold_start_s": s.cold_start_s,
            "scale_down_cooldown_s": s.day_s / 10,
            # The canaries' versions: v2 the same engine, v3 with a planted regression (slower steps).
            "version": "v1",
            "versions": {
                "v2": {"max_replicas": s.max_small_replicas},
                "v3": {"max_replicas": 2, "engine_args": f"--sim-behaviour v3:slowdown={s.bad_slowdown:g}"},
            },
            # A promoted canary's old version keeps its replicas two compressed hours, then drains.
            "retire_after_s": s.day_s / 12,
            "policies": {
                "predictive": {
                    "period_s": s.day_s,
                    "bucket_s": s.day_s / 96,
                    "trend_window_s": s.day_s / 12,
                    "lead_margin_s": 1.0,
                    "headroom": 0.2,
                    # The plain scale-down window (the demo's report and its numbers were made with it): no
                    # forecast-aware shortening, no look-ahead beyond the lead time.
                    "scale_down_hold_s": s.day_s / 10,
                    "keep_ahead_s": 0.0,
                },
                "reactive": {"target_running_per_replica": 3.0, "target_waiting_per_replica": 2.0},
            },
        }
    }


def cluster_config(s: DemoSettings, data_dir: Path) -> ClusterConfig:
    engine_args = ["--vllm-args", s.vllm_args] if s.backend == "vllm" and s.vllm_args else []
    return ClusterConfig(
        data_dir=data_dir,
        engines=0,  # the autoscaler starts the small model's replicas (as `fleetserve up --autoscale` does)
        backend=s.backend,
        model=SMALL,
        speed_factor=s.speed_factor,
        lease_ttl_s=1.5,
        heartbeat_interval_s=0.25,
        metrics_export_interval_s=1.0,
        grace_period_s=5.0,
        start_timeout_s=120.0,
        # The sim's modelled cold start is in seconds at speed 1 (divided by the speed factor).
        engine_startup_s=s.cold_start_s * s.speed_factor,
        autoscale_models=json.dumps(autoscale_spec(s)),
        autoscale_interval_s=1.0,
        extra_args={
            "router": [
                "--model-aliases",
                f"{ALIAS}={SMALL}|{LARGE}",
                "--model-policies",
                f"{SMALL}=cache_aware",
            ],
            # One compressed day is a day for the SLO windows and burn-rate alerts.
            "metrics": ["--slo-time-scale", f"{86400 / s.day_s:g}"],
            "registry": ["--rollout-interval-s", "0.5"],
            "engine": engine_args,
        },
    )


def admin(data_dir: Path, *args: str) -> dict | list:
    """`fleetserve admin --json ...` on the fleet's gateway database, in this process (nine CLI processes took
    minutes to start on a busy 2-core machine)."""
    from shared.cli.admin import run_admin
    from shared.cli.main import build_parser

    ns = build_parser().parse_args(["admin", "--db", str(data_dir / "gateway.db"), "--json", *args])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_admin(ns)
    if code != 0:
        raise RuntimeError(f"fleetserve admin {' '.join(args)}: {err.getvalue().strip()}")
    return json.loads(out.getvalue().strip().splitlines()[-1])  # the JSON line (a log line may come first)


def create_tenants(data_dir: Path) -> dict[str, str]:
    """Each demo tenant with its tier and limits, and an API key for it."""
    keys = {}
    for t in TENANTS:
        admin(data_dir, "tenant", "create", t.name, "--tier", t.tier)
        if t.limits:
            admin(data_dir, "limits", t.name, *t.limits)
        keys[t.name] = admin(data_dir, "key", "create", t.name, "--name", "demo")["api_key"]
    return keys


# -- traffic -------------------------------------------------------------------------------------------------


async def one(run: Run, clients: dict[str, CountingClient], traffic: Traffic, req: Request) -> None:
    client = clients[req.tenant]
    rec = {"t_s": round(run.now(), 3), "tenant": req.tenant, "kind": req.kind}
    run.in_flight += 1
    reply = None
    try:
        if req.messages is not None:
            done = await client.complete(
                messages=req.messages,
                model=SMALL,
                max_tokens=req.max_tokens,
                session_id=req.session,
                feature="chat",
            )
        else:
            done = await client.complete(req.prompt, model=ALIAS, max_tokens=req.max_tokens, feature=req.kind)
        u = done.usage
        rec.update(
            status="ok",
            model=done.served_by.model,
            version=done.served_by.model_version,
            replica=done.served_by.replica_id,
            ttft_ms=round(done.ttft_s * 1000, 2) if done.ttft_s is not None else None,
            prompt_tokens=u.prompt_tokens,
            cached_tokens=u.cached_tokens,
            output_tokens=u.completion_tokens,
        )
        reply = done.text
    except FleetServeError as e:
        limited = e.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        rec.update(
            status="limited" if limited else "failed", code=e.code.name, reason=e.reason, attempts=e.attempts
        )
        if not limited:
            run.event(f"request failed: {e}")
    finally:
        run.in_flight -= 1
        rec["e2e_ms"] = round((run.now() - rec["t_s"]) * 1000, 2)
        if rec.get("ttft_ms") is not None and rec.get("output_tokens", 0) > 1:
            rec["tpot_ms"] = round((rec["e2e_ms"] - rec["ttft_ms"]) / (rec["output_tokens"] - 1), 3)
        run.requests.append(rec)
        traffic.done(req, reply)


async def drive(
    run: Run, clients: dict[str, CountingClient], traffic: Traffic, arrivals: list[float]
) -> None:
    """Open loop: each arrival is sent at its time whatever the fleet is doing (as real users do)."""
    tasks = []
    for at in arrivals:
        delay = at - run.now()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(run, clients, traffic, traffic.next())))
    await asyncio.gather(*tasks)


async def sample(run: Run, cluster: Cluster, shape: DayShape, stop: asyncio.Event) -> None:
    """Once a second: the offered rate, requests in flight, the autoscaler's desired and the registry's actual
    replicas of the small model, and the routable replicas the router sees."""
    async with (
        open_channel(cluster.registry, cluster.client_tls) as reg,
        open_channel(cluster.router, cluster.client_tls) as rt,
    ):
        registry, router = rpb_grpc.RegistryServiceStub(reg), router_grpc.RouterServiceStub(rt)
        while not stop.is_set():
            t = run.now()
            point = {"t_s": round(t, 2), "rate": round(shape.rate(t), 3), "in_flight": run.in_flight}
            try:
                scaling = await registry.GetScaling(rpb.GetScalingRequest(model=SMALL), timeout=2)
                for m in scaling.models:
                    if m.model == SMALL:
                        point.update(
                            desired=m.desired, serving=m.serving, starting=m.starting, draining=m.draining
                        )
                status = await router.GetStatus(routerpb.GetStatusRequest(), timeout=2)
                point["routable"] = {
                    model: sum(1 for r in status.replicas if r.model == model and r.routable)
                    for model in (SMALL, LARGE)
                }
            except grpc.aio.AioRpcError as e:
                point["error"] = e.code().name
            run.samples.append(point)
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def kill_one(run: Run, data_dir: Path, at_s: float) -> None:
    """SIGKILL one small-model replica at at_s: one the autoscaler started (its ready file names its pid), of the
    version serving now (after a promoted canary, the new one) when there is one."""
    await asyncio.sleep(max(0.0, at_s - run.now()))
    # Autoscaled replica ids: <model>-as<n>-<pid> or <model>-<version>-as<n>-<pid>.
    ready_files = [f for f in (data_dir / "run").glob(f"{SMALL}-*.json") if "-as" in f.stem]
    current = f"{SMALL}-{run.current_version}-as"
    for ready in sorted(ready_files, key=lambda f: (not f.stem.startswith(current), f.name)):
        try:
            info = json.loads(ready.read_text())
            os.kill(int(info["pid"]), signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            continue  # gone already (scaled down) or not written yet
        run.event(
            f"SIGKILL {ready.stem} ({SMALL}) with {run.in_flight} requests in flight",
            kind="kill",
            replica=ready.stem,
            in_flight=run.in_flight,
        )
        return
    run.event("no replica to kill")


# -- what the fleet says afterwards ----------------------------------------------------------------------------


async def fleet_sections(run: Run, cluster: Cluster, wall_start: float) -> None:
    """SLO status, cost over time and by dimension, the autoscaler's decisions, resumes from the router's log."""
    s = run.settings
    async with (
        open_channel(cluster.metrics, cluster.client_tls) as ch,
        open_channel(cluster.registry, cluster.client_tls) as reg,
    ):
        metrics = mpb_grpc.MetricsServiceStub(ch)
        expected = sum(1 for r in run.requests if r["status"] == "ok")
        cost = None
        for _ in range(60):  # spans arrive within a few export intervals
            cost = await metrics.GetCost(
                mpb.GetCostRequest(
                    start_unix=wall_start,
                    end_unix=time.time(),
                    group_by=[
                        mpb.COST_DIMENSION_TENANT,
                        mpb.COST_DIMENSION_MODEL,
                        mpb.COST_DIMENSION_FEATURE,
                        mpb.COST_DIMENSION_REPLICA_TYPE,
                    ],
                ),
                timeout=10,
            )
            if cost.requests >= expected:
                break
            await asyncio.sleep(0.5)
        run.sections["cost"] = MessageToDict(cost, preserving_proto_field_name=True)
        step = s.day_s / 12  # two compressed hours
        series = []
        for i in range(int(s.duration_s / step)):
            w = await metrics.GetCost(
                mpb.GetCostRequest(start_unix=wall_start + i * step, end_unix=wall_start + (i + 1) * step),
                timeout=10,
            )
            series.append(
                {
                    "t_s": round((i + 0.5) * step, 2),
                    "cost_per_1k_tokens_usd": w.cost_per_1k_tokens,
                    "total_usd": w.total_usd,
                    "tokens": w.tokens,
                }
            )
        run.sections["cost_series"] = {"step_s": step, "series": series}
        slos = await metrics.GetSlos(mpb.GetSlosRequest(), timeout=10)
        run.sections["slos"] = MessageToDict(slos, preserving_proto_field_name=True)
        scaling = await rpb_grpc.RegistryServiceStub(reg).GetScaling(
            rpb.GetScalingRequest(model=SMALL), timeout=5
        )
        run.sections["scaling"] = MessageToDict(scaling, preserving_proto_field_name=True)
    resumes = retries = 0
    log_file = cluster.config.data_dir / "logs" / "router.log"
    for line in log_file.read_text().splitlines() if log_file.exists() else ():
        if '"router.retrying"' in line:
            resumes += '"resume"' in line
            retries += '"retry"' in line
    run.sections["resilience"] = {
        "router_resumes": resumes,
        "router_retries": retries,
        "client_retries": None,
    }


# -- the canary rollouts ----------------------------------------------------------------------------------------


def rollout_sample(t: float, r: rollpb.Rollout) -> dict:
    """One look at a rollout: its state, the candidate's share of traffic and each guardrail's last values."""
    return {
        "t_s": round(t, 2),
        "rollout_id": r.rollout_id,
        "candidate": r.plan.candidate_version,
        "state": state_name(r.state),
        "candidate_percent": r.candidate_percent,
        "candidate_replicas": r.candidate_replicas,
        "checks": [
            {
                "metric": c.guardrail.metric,
                "verdict": c.verdict,
                "candidate": round(c.candidate_value, 4),
                "baseline": round(c.baseline_value, 4),
                "limit": c.guardrail.limit,
                "relative": c.guardrail.mode == rollpb.GUARDRAIL_MODE_RELATIVE,
                "samples": c.samples,
            }
            for c in r.checks
        ],
    }


async def one_rollout(
    run: Run, stub: rollpb_grpc.RolloutServiceStub, baseline: str, candidate: str, until_s: float
) -> dict:
    """Start a canary of `candidate` and watch it (a sample a second) until it is promoted or rolled back, or
    until until_s; its summary."""
    s = run.settings
    plan = rollpb.RolloutPlan(
        model=SMALL,
        baseline_version=baseline,
        candidate_version=candidate,
        strategy=rollpb.ROLLOUT_STRATEGY_CANARY,
        steps=[s.canary_percent],
        bake_s=s.day_s / 12,  # two compressed hours at the canary's share (and the guardrails' samples)
        guardrails=[parse_guardrail(g) for g in GUARDRAILS],
    )
    r = (await stub.StartRollout(rollpb.StartRolloutRequest(plan=plan), timeout=10)).rollout
    started = run.now()
    run.event(
        f"canary {SMALL} {baseline} -> {candidate} at {s.canary_percent:g}% started ({r.rollout_id})",
        kind="rollout",
    )
    while run.now() < until_s:
        try:
            r = (await stub.GetRollout(rollpb.GetRolloutRequest(rollout_id=r.rollout_id), timeout=5)).rollout
        except grpc.aio.AioRpcError as e:
            log(f"GetRollout: {e.code().name}")
        else:
            run.rollout_samples.append(rollout_sample(run.now(), r))
            if r.state not in (rollpb.ROLLOUT_STATE_RUNNING, rollpb.ROLLOUT_STATE_PAUSED):
                break
        await asyncio.sleep(1.0)
    state = state_name(r.state)
    ended = run.now()
    if r.state in (rollpb.ROLLOUT_STATE_RUNNING, rollpb.ROLLOUT_STATE_PAUSED):
        run.event(f"canary {candidate}: still {state} when the traffic ended ({r.reason})", kind="rollout")
    else:
        run.event(f"canary {candidate}: {state} ({r.reason})", kind="rollout")
    return {
        "rollout_id": r.rollout_id,
        "baseline": baseline,
        "candidate": candidate,
        "strategy": "canary",
        "percent": s.canary_percent,
        "guardrails": list(GUARDRAILS),
        "state": state,
        "automatic": r.state == rollpb.ROLLOUT_STATE_ROLLED_BACK
        and r.reason.startswith("guardrail breached"),
        "reason": r.reason,
        "started_s": round(started, 2),
        "decided_s": round(ended, 2) if state in ("promoted", "rolled_back") else None,
        "checks": [guardrail_text.describe(c) for c in r.checks],
        "events": [
            {
                "t_s": round(e.at_unix - run.wall_started, 2),
                "kind": e.kind,
                "candidate_percent": e.candidate_percent,
                "detail": e.detail,
            }
            for e in r.events
        ],
    }


async def canaries(run: Run, cluster: Cluster) -> None:
    """The first day's two canaries of the small model: v2 (the same engine: it should be promoted) from
    good_at_h, then v3 (planted slower steps: its TPOT guardrail should roll it back) from bad_at_h or once
    the first was decided, against whichever version then serves."""
    s = run.settings
    section: dict = {"rollouts": [], "planted": {"v3": f"slowdown={s.bad_slowdown:g}"}}
    run.sections["rollout"] = section
    end = s.duration_s - 2.0
    async with open_channel(cluster.registry, cluster.client_tls) as ch:
        stub = rollpb_grpc.RolloutServiceStub(ch)
        try:
            await asyncio.sleep(max(0.0, s.at_hour(0, s.good_at_h) - run.now()))
            good = await one_rollout(run, stub, "v1", "v2", min(end, s.at_hour(0, 20.0)))
            section["rollouts"].append(good)
            if good["state"] == "promoted":
                run.current_version = "v2"
            elif good["state"] in ("running", "paused"):
                # Undecided by 22:00: the demo takes it back (the report shows it as not promoted).
                await stub.RollbackRollout(
                    rollpb.RollbackRolloutRequest(
                        rollout_id=good["rollout_id"], reason="demo: not decided by 20:00 of day 1"
                    ),
                    timeout=10,
                )
            await asyncio.sleep(max(0.0, s.at_hour(0, s.bad_at_h) - run.now()))
            bad = await one_rollout(run, stub, run.current_version, "v3", end)
            section["rollouts"].append(bad)
        except grpc.aio.AioRpcError as e:
            section["error"] = f"{e.code().name}: {e.details()}"
            run.event(f"rollout call failed: {section['error']}", kind="rollout")


def rollout_verdict(section: dict) -> dict:
    """The canaries did what they should: the good version promoted, the planted one rolled back by a guardrail."""
    if "skipped" in section:
        return {"skipped": section["skipped"]}
    by = {r["candidate"]: r for r in section.get("rollouts", [])}
    good, bad = by.get("v2", {}), by.get("v3", {})
    return {
        "good_promoted": good.get("state") == "promoted",
        "bad_rolled_back_automatically": bool(bad.get("automatic")),
        "bad_reason": bad.get("reason", ""),
        "ok": good.get("state") == "promoted" and bool(bad.get("automatic")),
    }


def verdicts(run: Run) -> dict:
    """The run's verdicts: no failed request (kill included), each SLO of the metrics service met or not."""
    reqs = run.requests
    failed = [r for r in reqs if r["status"] == "failed"]
    kills = [e for e in run.events if e.get("kind") == "kill"]
    around = [r for r in failed for k in kills if k["t_s"] - 1 <= r["t_s"] <= k["t_s"] + 15]
    out = {
        "requests": len(reqs),
        "ok": sum(r["status"] == "ok" for r in reqs),
        "limited": sum(r["status"] == "limited" for r in reqs),
        "failed": len(failed),
        "failed_around_the_kill": len(around),
        "zero_failed_requests": not failed,
        "slos": [],
    }
    for st in run.sections.get("slos", {}).get("slos", []):
        slo = st.get("slo", {})
        objective, sli = float(slo.get("objective", 0)), float(st.get("sli", 0))
        events = int(st.get("events", 0))
        out["slos"].append(
            {
                "name": slo.get("name"),
                "kind": slo.get("kind"),
                "objective": objective,
                "sli": round(sli, 5),
                "events": events,
                "bad_events": int(st.get("bad_events", 0)),
                "threshold_ms": slo.get("threshold_ms"),
                "measured_ms": st.get("measured_ms"),
                "met": bool(events) and sli >= objective,
                "alerts_firing": [a.get("rule", a.get("name")) for a in st.get("firing", [])],
            }
        )
    out["all_slos_met"] = bool(out["slos"]) and all(x["met"] for x in out["slos"])
    out["rollout"] = rollout_verdict(run.sections.get("rollout", {}))
    cost = run.sections.get("cost", {})
    out["cost"] = {
        "total_usd": round(float(cost.get("total_usd", 0.0)), 6),
        "cost_per_1k_tokens_usd": round(float(cost.get("cost_per_1k_tokens", 0.0)), 6),
        "tokens": int(cost.get("tokens", 0)),
        "requests": int(cost.get("requests", 0)),
    }
    return out


async def run_demo(s: DemoSettings, out_dir: Path) -> dict:
    """Start the fleet, run the traffic, gather what the fleet says, stop it; the record."""
    data_dir = out_dir / "fleet"  # the caller made out_dir
    cluster = Cluster(cluster_config(s, data_dir))
    shape = DayShape(s.day_s, s.rate_lo, s.rate_hi)
    rng = random.Random(s.seed)
    arrivals = shape.arrivals(s.duration_s, rng)
    run = Run(s)
    log(
        f"starting the fleet in {data_dir} (sim speed {s.speed_factor:g}, autoscaled {SMALL}, one {LARGE}) ..."
    )
    await cluster.start()
    try:
        await cluster.add_engine(model=LARGE, args=["--profile", "h100-llama-8b"])
        await wait_routable(cluster.router, s.small_replicas, SMALL)
        await wait_routable(cluster.router, 1, LARGE)
        keys = await asyncio.to_thread(create_tenants, data_dir)
        clients = {t: CountingClient(cluster.gateway, k, timeout_s=60.0) for t, k in keys.items()}
        traffic = Traffic(rng)
        log(
            f"{len(arrivals)} requests over {s.days} compressed day(s) of {s.day_s:g} s; tenants {', '.join(keys)}"
        )
        await asyncio.sleep(2.0)  # the gateway's config poll sees the tenants
        wall_start = run.wall_started = time.time()
        run.started = time.monotonic()
        run.event("traffic starts")
        for d in range(s.days):
            run.events.append(
                {"t_s": round(s.at_hour(d, shape.spike_from_h), 2), "what": f"day {d + 1}: spike"}
            )
        stop = asyncio.Event()
        sampler = asyncio.create_task(sample(run, cluster, shape, stop))
        killer = asyncio.create_task(kill_one(run, data_dir, s.at_hour(s.days - 1, s.kill_at_h)))
        if s.rollouts:
            rollouts = asyncio.create_task(canaries(run, cluster))
        else:
            run.sections["rollout"] = {"skipped": "--quick: one short day has no time for two canaries"}
        try:
            await drive(run, clients, traffic, arrivals)
        finally:
            await killer
            if s.rollouts:
                await rollouts
            stop.set()
            await sampler
        run.event("traffic ends")
        client_retries = {t: c.retries for t, c in clients.items()}
        for c in clients.values():
            await c.close()
        await fleet_sections(run, cluster, wall_start)
        run.sections["resilience"]["client_retries"] = client_retries
    finally:
        exits = await cluster.stop()
    run.sections.setdefault("rollout", {"skipped": "the traffic ended before the canaries started"})
    return {
        "demo": "capstone",
        "settings": asdict(s),
        "verdicts": verdicts(run),
        "events": sorted(run.events, key=lambda e: e["t_s"]),
        "samples": run.samples,
        "rollout_samples": run.rollout_samples,
        "requests": run.requests,
        "sections": run.sections,
        "exit_codes": {k: v for k, v in exits.items() if v not in (0, None)},
    }
