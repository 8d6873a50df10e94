"""`fleetserve status`: the fleet's replicas with health and load, from the registry."""

from __future__ import annotations

import asyncio
import json
import sys
import time

import grpc
from fleetserve.registry.v1 import registry_service_pb2 as pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as pb_grpc
from rich.console import Console
from rich.table import Table

from shared.cluster import read_state
from shared.health import check


async def fetch_replicas(registry: str) -> list[dict]:
    """Replicas from the registry, each with a live grpc.health.v1 probe of the engine itself."""
    async with grpc.aio.insecure_channel(registry) as ch:
        resp = await pb_grpc.RegistryServiceStub(ch).ListReplicas(pb.ListReplicasRequest(), timeout=3)
    healthy = await asyncio.gather(*(check(r.address, timeout_s=1.0) for r in resp.replicas))
    now = time.time()
    rows = []
    for r, ok in zip(resp.replicas, healthy, strict=True):
        load = r.load
        rows.append(
            {
                "replica_id": r.replica_id,
                "address": r.address,
                "model": r.model,
                "backend": r.backend,
                "state": pb.ReplicaState.Name(r.state).removeprefix("REPLICA_STATE_").lower(),
                "healthy": ok,
                "running": load.running,
                "waiting": load.waiting,
                "kv_usage": (load.kv_blocks_used / load.kv_blocks_total) if load.kv_blocks_total else 0.0,
                "output_tokens_per_s": round(load.output_tokens_per_s, 1),
                "heartbeat_age_s": round(max(0.0, now - r.last_heartbeat_unix), 2),
            }
        )
    return sorted(rows, key=lambda r: r["replica_id"])


def table(rows: list[dict], title: str = "replicas") -> Table:
    t = Table(title=title)
    for col in (
        "replica",
        "model",
        "address",
        "state",
        "health",
        "running",
        "waiting",
        "kv",
        "tok/s",
        "heartbeat",
    ):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["replica_id"],
            r["model"],
            r["address"],
            r["state"],
            "[green]serving[/]" if r["healthy"] else "[red]down[/]",
            str(r["running"]),
            str(r["waiting"]),
            f"{r['kv_usage']:.0%}",
            f"{r['output_tokens_per_s']:.0f}",
            f"{r['heartbeat_age_s']:.1f}s ago",
        )
    return t


def run_status(args) -> int:
    registry = args.registry or read_state()["registry"]
    try:
        rows = asyncio.run(fetch_replicas(registry))
    except grpc.aio.AioRpcError as e:
        print(f"error: registry at {registry} did not answer: {e.code().name} {e.details()}")
        return 1
    if args.json:
        print(json.dumps(rows))
    else:
        # Off a TTY rich assumes 80 columns; a wider console keeps ids and addresses whole.
        Console(width=None if sys.stdout.isatty() else 160).print(table(rows))
    return 0
