"""`fleetserve status`: the fleet's replicas with health and load from the registry, the router's view of
each (circuit breaker, ejection, its own in-flight count), and the SLO alerts firing now."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as mpb_grpc
from fleetserve.registry.v1 import registry_service_pb2 as pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as rollout_pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rollout_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from shared.channels import open_channel
from shared.cluster import read_state
from shared.health import check
from shared.tls import Tls


async def _router_view(
    router: str | None, tls: Tls | None = None
) -> dict[str, router_pb.ReplicaStatus] | None:
    """The router's status per replica id; empty when there is no router, None when it does not answer (the
    registry's view is still worth showing then, with the router shown DOWN)."""
    if not router:
        return {}
    try:
        async with open_channel(router, tls) as ch:
            resp = await router_grpc.RouterServiceStub(ch).GetStatus(router_pb.GetStatusRequest(), timeout=2)
    except grpc.aio.AioRpcError:
        return None
    return {r.replica_id: r for r in resp.replicas}


async def probe_services(services: dict[str, dict], tls: Tls | None = None) -> list[dict]:
    """Every process of the fleet (the launcher's state file) with a live grpc.health.v1 probe: healthy or DOWN,
    and the supervisor's restart count and last exit code."""
    names = sorted(services)
    healthy = await asyncio.gather(
        *(
            check(services[n]["address"], timeout_s=1.0, tls=tls) if services[n].get("address") else _false()
            for n in names
        )
    )
    return [
        {
            "name": n,
            "service": services[n].get("service", ""),
            "address": services[n].get("address", ""),
            "healthy": ok,
            "restarts": services[n].get("restarts", 0),
            "last_exit": services[n].get("last_exit"),
            "state": services[n].get("state", "up"),
        }
        for n, ok in zip(names, healthy, strict=True)
    ]


async def _false() -> bool:
    return False


def services_table(rows: list[dict]) -> Table:
    t = Table(title=f"services ({len(rows)})")
    for col in ("service", "address", "health", "restarts", "last exit"):
        t.add_column(col)
    for r in rows:
        health = "[green]serving[/]" if r["healthy"] else "[red]DOWN[/]"
        if not r["healthy"] and r["state"] in ("restarting", "failed"):
            health = f"[red]DOWN[/] ({r['state']})"
        t.add_row(
            r["name"],
            r["address"],
            health,
            str(r["restarts"]) if r["restarts"] else "",
            "" if r["last_exit"] is None else str(r["last_exit"]),
        )
    return t


async def fetch_replicas(registry: str, router: str | None = None, tls: Tls | None = None) -> list[dict]:
    """Replicas from the registry, each with a live grpc.health.v1 probe of the engine itself and, when a
    router is given, the router's breaker state, ejection and in-flight count."""
    async with open_channel(registry, tls) as ch:
        resp = await pb_grpc.RegistryServiceStub(ch).ListReplicas(pb.ListReplicasRequest(), timeout=3)
    healthy, routed = await asyncio.gather(
        asyncio.gather(*(check(r.address, timeout_s=1.0, tls=tls) for r in resp.replicas)),
        _router_view(router, tls),
    )
    now = time.time()
    rows = []
    for r, ok in zip(resp.replicas, healthy, strict=True):
        load = r.load
        rows.append(
            {
                "replica_id": r.replica_id,
                "address": r.address,
                "model": r.model,
                "model_version": r.model_version,
                "backend": r.backend,
                "state": pb.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_").lower(),
                "healthy": ok,
                "running": load.running,
                "waiting": load.waiting,
                "kv_usage": (load.kv_blocks_used / load.kv_blocks_total) if load.kv_blocks_total else 0.0,
                "output_tokens_per_s": round(load.output_tokens_per_s, 1),
                "heartbeat_age_s": round(max(0.0, now - r.last_heartbeat_unix), 2),
                "prefix_cache_hit_rate": round(load.prefix_cache_hit_rate, 4),
                **_routing(None if routed is None else routed.get(r.replica_id)),
                "router_down": routed is None,
            }
        )
    return sorted(rows, key=lambda r: r["replica_id"])


async def fetch_alerts(metrics: str | None, tls: Tls | None = None) -> list[dict] | None:
    """The alerts firing now: the snapshot WatchAlerts opens with. None when there is no metrics service or it
    does not answer (the replicas are still worth showing then)."""
    if not metrics:
        return None
    try:
        async with open_channel(metrics, tls) as ch:
            call = mpb_grpc.MetricsServiceStub(ch).WatchAlerts(mpb.WatchAlertsRequest(), timeout=2)
            first = await call.read()
            call.cancel()
    except grpc.aio.AioRpcError:
        return None
    if first == grpc.aio.EOF:
        return None
    return [
        {
            "alert_id": a.alert_id,
            "severity": mpb.AlertSeverity.Name(a.severity).removeprefix("ALERT_SEVERITY_").lower(),
            "model": a.model,
            "since_unix": a.fired_unix,
            "summary": a.summary,
        }
        for a in first.alerts
    ]


def alerts_table(alerts: list[dict]) -> Table:
    t = Table(title=f"SLO alerts firing: {len(alerts)}")
    for col in ("severity", "alert", "since", "summary"):
        t.add_column(col)
    now = time.time()
    for a in sorted(alerts, key=lambda a: (a["severity"], a["alert_id"])):
        color = "red" if a["severity"] == "page" else "yellow"
        t.add_row(
            f"[{color}]{a['severity']}[/]", a["alert_id"], f"{now - a['since_unix']:.0f}s ago", a["summary"]
        )
    return t


async def fetch_scaling(registry: str, tls: Tls | None = None) -> list[dict]:
    """The autoscaler's desired vs actual replicas and latest decisions per model, as it last reported them to
    the registry; empty when no autoscaler runs (or an older registry does not know the RPC)."""
    try:
        async with open_channel(registry, tls) as ch:
            resp = await pb_grpc.RegistryServiceStub(ch).GetScaling(pb.GetScalingRequest(), timeout=3)
    except grpc.aio.AioRpcError:
        return []
    return [
        {
            "model": m.model,
            "desired": m.desired,
            "serving": m.serving,
            "starting": m.starting,
            "draining": m.draining,
            "min_replicas": m.min_replicas,
            "max_replicas": m.max_replicas,
            "policies": list(m.policies),
            "provisioner": m.provisioner,
            "updated_unix": m.updated_unix,
            "cold_starts_s": [round(c, 2) for c in m.cold_starts_s],
            "arrival_rate": round(m.arrival_rate, 3),
            "arrival_source": m.arrival_source,
            "versions": [
                {
                    "version": v.version,
                    "role": v.role,
                    "share": round(v.share, 4),
                    "desired": v.desired,
                    "serving": v.serving,
                    "starting": v.starting,
                    "draining": v.draining,
                    "min_replicas": v.min_replicas,
                    "max_replicas": v.max_replicas,
                    "arrival_rate": round(v.arrival_rate, 3),
                    "reason": v.reason,
                }
                for v in m.versions
            ],
            "decisions": [
                {
                    "at_unix": d.at_unix,
                    "previous": d.previous,
                    "desired": d.desired,
                    "actual": d.actual,
                    "direction": d.direction,
                    "policy": d.policy,
                    "signal": d.signal,
                    "reason": d.reason,
                    "version": d.version,
                }
                for d in m.decisions
            ],
        }
        for m in resp.models
    ]


async def fetch_rollouts(registry: str, tls: Tls | None = None) -> list[dict]:
    """Each model's latest rollout (running, or how the last one ended: promoted, rolled back with the numbers
    that triggered it) with its last event; empty when there are none (or the registry has no RolloutService)."""
    try:
        async with open_channel(registry, tls) as ch:
            stub = rollout_grpc.RolloutServiceStub(ch)
            resp = await stub.ListRollouts(rollout_pb.ListRolloutsRequest(), timeout=3)
    except grpc.aio.AioRpcError:
        return []
    latest: dict[str, rollout_pb.Rollout] = {}
    for r in resp.rollouts:  # newest first
        latest.setdefault(r.plan.model, r)
    out = []
    for model, r in sorted(latest.items()):
        e = r.events[-1] if r.events else None
        out.append(
            {
                "model": model,
                "rollout_id": r.rollout_id,
                "strategy": rollout_pb.RolloutStrategy.Name(r.plan.strategy)
                .removeprefix("ROLLOUT_STRATEGY_")
                .lower(),
                "baseline_version": r.plan.baseline_version,
                "candidate_version": r.plan.candidate_version,
                "state": rollout_pb.RolloutState.Name(r.state).removeprefix("ROLLOUT_STATE_").lower(),
                "candidate_percent": r.candidate_percent,
                "candidate_replicas": r.candidate_replicas,
                "last_event": e.kind if e else "",
                "last_event_unix": e.at_unix if e else 0.0,
                "reason": r.reason,
            }
        )
    return out


def rollouts_table(rollouts: list[dict]) -> Table:
    """Each model's latest rollout and its last event (an automatic rollback shows here with its numbers)."""
    t = Table(title="rollouts (latest per model)")
    for col in ("model", "rollout", "versions", "state", "candidate", "last event", "reason"):
        t.add_column(col)
    now = time.time()
    for r in rollouts:
        color = {"rolled_back": "red", "running": "yellow", "paused": "yellow"}.get(r["state"], "green")
        t.add_row(
            r["model"],
            f"{r['rollout_id']} ({r['strategy']})",
            f"{r['baseline_version']} -> {r['candidate_version']}",
            f"[{color}]{r['state']}[/]",
            f"{r['candidate_percent']:g}%, {r['candidate_replicas']} replica(s)",
            f"{r['last_event']} {now - r['last_event_unix']:.0f}s ago" if r["last_event"] else "-",
            escape(r["reason"]),
        )
    return t


def scaling_table(models: list[dict], last: int = 3) -> Table:
    """Desired vs actual per model (and per version while several share its traffic: a rollout's baseline and
    candidate, a version retiring), and its last decisions with their reasons."""
    t = Table(title="autoscaling: desired vs actual")
    for col in (
        "model",
        "desired",
        "serving",
        "starting",
        "draining",
        "bounds",
        "policies",
        "last decisions",
    ):
        t.add_column(col)
    now = time.time()
    for m in models:
        # Escaped: "[capacity]" (and a reason's brackets) are text, not Rich markup.
        lines = [
            escape(
                f"{now - d['at_unix']:.0f}s ago {_at(d.get('version', ''))}{d['previous']}->{d['desired']} "
                f"[{d['policy']}] {d['reason']}"
            )
            for d in m["decisions"][-last:]
        ]
        color = "green" if m["desired"] == m["serving"] else "yellow"
        rate = f"\n{m['arrival_rate']:.1f} req/s ({m['arrival_source']})" if m.get("arrival_source") else ""
        t.add_row(
            m["model"],
            f"[{color}]{m['desired']}[/]",
            str(m["serving"]),
            str(m["starting"]),
            str(m["draining"]),
            f"{m['min_replicas']}-{m['max_replicas']}",
            ",".join(m["policies"]) + rate,
            "\n".join(lines) or "-",
        )
        versions = m.get("versions", [])
        if len(versions) > 1 or any(v["role"] != "current" for v in versions):
            for v in versions:
                t.add_row(
                    f"  @{v['version']} {v['role']} {100 * v['share']:.0f}%",
                    str(v["desired"]),
                    str(v["serving"]),
                    str(v["starting"]),
                    str(v["draining"]),
                    f"{v['min_replicas']}-{v['max_replicas']}",
                    f"{v['arrival_rate']:.1f} req/s",
                    escape(v["reason"]),
                )
    return t


def _at(version: str) -> str:
    return f"@{version} " if version else ""


def _routing(st: router_pb.ReplicaStatus | None) -> dict:
    """The router's columns of one row; None where the router does not know the replica (yet)."""
    if st is None:
        return {"breaker": None, "ejected": None, "router_in_flight": None}
    return {
        "breaker": router_pb.BreakerState.Name(st.breaker_state).removeprefix("BREAKER_STATE_").lower(),
        "ejected": st.ejected,
        "router_in_flight": st.in_flight,
    }


def _breaker_cell(r: dict) -> str:
    if r.get("router_down"):
        return "[red]router DOWN[/]"
    if r["breaker"] is None:
        return "-"
    if r["ejected"]:
        return "[red]ejected[/]"
    return {"closed": "[green]closed[/]", "open": "[red]open[/]"}.get(
        r["breaker"], f"[yellow]{r['breaker']}[/]"
    )


def table(rows: list[dict], title: str = "replicas") -> Table:
    t = Table(title=title)
    for col in (
        "replica",
        "model",
        "version",
        "address",
        "state",
        "health",
        "running",
        "waiting",
        "kv",
        "prefix hit",
        "tok/s",
        "breaker",
        "heartbeat",
    ):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["replica_id"],
            r["model"],
            r["model_version"] or "-",
            r["address"],
            r["state"],
            "[green]serving[/]" if r["healthy"] else "[red]down[/]",
            str(r["running"]),
            str(r["waiting"]),
            f"{r['kv_usage']:.0%}",
            f"{r['prefix_cache_hit_rate']:.0%}",
            f"{r['output_tokens_per_s']:.0f}",
            _breaker_cell(r),
            f"{r['heartbeat_age_s']:.1f}s ago",
        )
    return t


def endpoints_table(state: dict) -> Table:
    """Every process of the local fleet: its gRPC address and its Prometheus /metrics endpoint."""
    t = Table(title="endpoints")
    for col in ("process", "address", "/metrics"):
        t.add_column(col)
    addresses = {n: state.get(n, "") for n in ("gateway", "router", "registry", "metrics")}
    if state.get("autoscaler"):
        addresses["autoscaler"] = state["autoscaler"]
    addresses.update(state.get("engines", {}))
    metrics = state.get("metrics_addresses", {})
    for name in sorted(set(addresses) | set(metrics)):
        t.add_row(
            name,
            addresses.get(name, "") or "-",
            f"http://{metrics[name]}/metrics" if name in metrics else "-",
        )
    return t


def run_status(args) -> int:
    # With --registry alone, the router's columns stay empty rather than mixing in another fleet's router.
    state = {} if args.registry else read_state()
    registry = args.registry or state["registry"]
    metrics = args.metrics or state.get("metrics")
    tls = Tls.for_tools(state or None)

    async def fetch():
        return await asyncio.gather(
            fetch_replicas(registry, args.router or state.get("router"), tls),
            fetch_alerts(metrics, tls),
            fetch_scaling(registry, tls),
            fetch_rollouts(registry, tls),
        )

    services = asyncio.run(probe_services(state.get("services", {}), tls))
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        rows, alerts, scaling, rollouts = asyncio.run(fetch())
    except grpc.aio.AioRpcError as e:
        if args.json:
            print(
                json.dumps(
                    {
                        "services": services,
                        "replicas": None,
                        "alerts": None,
                        "scaling": None,
                        "rollouts": None,
                    }
                )
            )
        elif services:
            console.print(services_table(services))
        print(f"error: registry at {registry} is DOWN: {e.code().name} {e.details()}")
        return 1
    metrics = state.get("metrics_addresses", {})
    for r in rows:
        # The launcher names each engine process by its replica id.
        r["metrics_address"] = metrics.get(r["replica_id"], "")
    if args.json:
        # alerts is null when no metrics service answered (unknown, not "none firing").
        print(
            json.dumps(
                {
                    "services": services,
                    "replicas": rows,
                    "alerts": alerts,
                    "scaling": scaling,
                    "rollouts": rollouts,
                }
            )
        )
    else:
        # Off a TTY rich assumes 80 columns; a wider console keeps ids and addresses whole.
        if services:
            console.print(services_table(services))
        console.print(table(rows))
        if alerts is not None:
            console.print(alerts_table(alerts))
        if state:
            console.print(endpoints_table(state))
        if scaling:
            console.print(scaling_table(scaling))
        if rollouts:
            console.print(rollouts_table(rollouts))
    return 0
