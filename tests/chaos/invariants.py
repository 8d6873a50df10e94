"""Checks every fault test ends with: logs that are one JSON object per line, and no request left behind
(engines idle, the router's in-flight counts back to zero)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc

from shared.cluster import Cluster


def log_problems(logs_dir: Path) -> list[str]:
    """Lines of the fleet's service logs that are not one JSON object, or that carry OpenTelemetry's
    "Failed to detach context" (one per cancelled stream, once)."""
    problems = []
    for path in sorted(logs_dir.glob("*.log")):
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            try:
                ok = isinstance(json.loads(line), dict)
            except ValueError:
                ok = False
            if not ok or "Failed to detach context" in line:
                problems.append(f"{path.name}:{n}: {line[:160]}")
    return problems


async def busy_counts(cluster: Cluster) -> dict[str, int]:
    """Requests each engine still runs or queues, and attempts the router still has in flight per replica
    (all zero once every stream has ended)."""
    counts: dict[str, int] = {}
    for name in cluster.engine_names():
        proc = cluster.procs[name]
        if not proc.alive or not proc.address:
            continue
        async with grpc.aio.insecure_channel(proc.address) as ch:
            load = (
                await engine_grpc.EngineServiceStub(ch).GetLoad(engine_pb.GetLoadRequest(), timeout=5)
            ).load
        counts[name] = load.running + load.waiting
    # Every router worker (or, with --embedded-router, every gateway worker's router) answers for itself.
    for address in cluster.router_endpoints():
        async with grpc.aio.insecure_channel(address) as ch:
            status = await router_grpc.RouterServiceStub(ch).GetStatus(
                router_pb.GetStatusRequest(), timeout=5
            )
        for r in status.replicas:
            key = f"router->{r.replica_id}"
            counts[key] = counts.get(key, 0) + r.in_flight
    return counts
