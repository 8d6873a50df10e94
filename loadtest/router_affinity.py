"""Prefix-cache hit rate of multi-turn conversations through the gateway with 1 router vs 3 routers, all with
the cache_aware policy: with 3 routers a conversation's turns reach one router by the gateway's affinity (its
session id), so that router's cache-aware state sees the whole conversation; a third run gives every turn a
fresh session (no affinity: turns land on any router) to show what the affinity is worth. The embedded runs
(gateway --embedded-router --workers 2: a router in each gateway worker, no router process) send each turn on a
fresh connection, as an HTTP client without keep-alive does: "alternate" dials the gateway workers' own ports in
turn (turn i of conversation j goes to worker (i + j) mod 2, so every next turn meets the other worker's router),
"fresh" dials the shared port and lets the kernel (SO_REUSEPORT) pick; each worker's router reports how many
requests it took. One JSON document.

    python -m loadtest.router_affinity --out docs/benchmarks/router_affinity.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc

from loadtest.workload import Conversation, multiturn
from shared.channels import CHANNEL_OPTIONS, open_channel
from shared.cluster import Cluster, ClusterConfig


@dataclass(frozen=True)
class Run:
    """One configuration: its fleet and how the client reaches the gateway."""

    label: str
    routers: int = 1
    # "conversation": every turn carries its conversation's session id (the gateway's router affinity key);
    # "fresh": a new session id per turn (no affinity); "none": no session id (keys come from the prompt).
    session: str = "conversation"
    # gateway --embedded-router with this many gateway workers (0: router processes).
    embedded_workers: int = 0
    policy: str = "cache_aware"
    # The router's --policy-options ("cache_aware.affinity_ties=0": ties at random, as before the fix).
    options: str = ""
    # "channel": one connection for everything; "alternate": a fresh connection per turn to the next gateway
    # worker's own port; "fresh": a fresh connection per turn to the shared port (the kernel picks the worker).
    connect: str = "channel"


RANDOM_TIES = "cache_aware.affinity_ties=0"
RUNS = (
    Run("1 router, random ties", options=RANDOM_TIES),
    Run("1 router"),
    Run("3 routers", routers=3),
    Run("3 routers, no affinity", routers=3, session="fresh"),
    Run("1 router, kv_aware", policy="kv_aware"),
    Run("embedded, 1 worker", embedded_workers=1),
    Run("embedded x2, alternate, random ties", embedded_workers=2, options=RANDOM_TIES, connect="alternate"),
    Run("embedded x2, alternate", embedded_workers=2, connect="alternate"),
    Run(
        "embedded x2, alternate, no session, random ties",
        embedded_workers=2,
        session="none",
        options=RANDOM_TIES,
        connect="alternate",
    ),
    Run("embedded x2, alternate, no session", embedded_workers=2, session="none", connect="alternate"),
    Run("embedded x2, fresh, random ties", embedded_workers=2, options=RANDOM_TIES, connect="fresh"),
    Run("embedded x2, fresh", embedded_workers=2, connect="fresh"),
    Run("embedded x2, alternate, kv_aware", embedded_workers=2, policy="kv_aware", connect="alternate"),
)

# A channel of its own per turn must also be a connection of its own: gRPC shares one connection between
# channels to the same target through its global subchannel pool unless told not to.
FRESH_CONNECTION = (*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1))


async def _converse(call, key: str, conv: Conversation, index: int, session: str, totals: dict) -> None:
    messages = [common_pb2.ChatMessage(role="system", content=conv.system)] if conv.system else []
    for i, turn in enumerate(conv.turns):
        messages.append(common_pb2.ChatMessage(role="user", content=turn))
        req = pb.GenerateRequest(
            model="sim-1b",
            messages=messages,
            max_tokens=conv.max_tokens,
            ignore_eos=True,
            temperature=0,
            session_id={"conversation": conv.session, "fresh": uuid.uuid4().hex, "none": ""}[session],
        )
        text, last = [], None
        async for resp in call(index + i, req, metadata=(("authorization", f"Bearer {key}"),), timeout=120):
            text.append(resp.chunk.text)
            last = resp.chunk
        totals["requests"] += 1
        totals["prompt"] += last.usage.prompt_tokens
        totals["cached"] += last.usage.cached_tokens
        messages.append(common_pb2.ChatMessage(role="assistant", content="".join(text)))


async def _router_arrivals(cluster: Cluster) -> list[int]:
    """Requests each router (each gateway worker's, when embedded) admitted."""
    counts = []
    for address in cluster.router_endpoints():
        async with open_channel(address, cluster.client_tls) as ch:
            status = await router_grpc.RouterServiceStub(ch).GetStatus(
                router_pb.GetStatusRequest(), timeout=10
            )
        counts.append(sum(a.requests_total for a in status.arrivals))
    return counts


async def run(cfg: Run, args, seed: int) -> dict:
    workload = multiturn(
        args.requests,
        seed,
        tenants=2,
        system_words=150,
        turns=(3, 6),
        user_words=(40, 90),
        max_tokens=16,
    )
    with tempfile.TemporaryDirectory(prefix="fleetserve-affinity-") as tmp:
        cluster = Cluster(
            ClusterConfig(
                data_dir=Path(tmp),
                engines=3,
                routers=cfg.routers,
                embedded_router=cfg.embedded_workers > 0,
                gateway_workers=max(1, cfg.embedded_workers),
                speed_factor=args.speed_factor,
                metrics_port=-1,
                extra_args={
                    "router": [
                        "--policy",
                        cfg.policy,
                        *(["--policy-options", cfg.options] if cfg.options else []),
                    ],
                    "engine": ["--num-kv-blocks", "4096"],
                },
            )
        )
        await cluster.start()
        try:
            totals = {"requests": 0, "prompt": 0, "cached": 0}
            workers = cluster.ready_info("gateway").get("worker_addresses") or [cluster.gateway]
            async with open_channel(cluster.gateway, cluster.client_tls) as ch:
                stub = pb_grpc.InferenceServiceStub(ch)

                async def call(turn: int, req, **kw):
                    if cfg.connect == "channel":
                        async for resp in stub.Generate(req, **kw):
                            yield resp
                        return
                    target = workers[turn % len(workers)] if cfg.connect == "alternate" else cluster.gateway
                    async with open_channel(target, cluster.client_tls, FRESH_CONNECTION) as own:
                        async for resp in pb_grpc.InferenceServiceStub(own).Generate(req, **kw):
                            yield resp

                pending = iter(enumerate(workload.conversations))
                start = time.perf_counter()

                async def slot() -> None:
                    for index, conv in pending:
                        await _converse(call, cluster.api_key, conv, index, cfg.session, totals)

                await asyncio.gather(*(slot() for _ in range(args.concurrency)))
                duration = time.perf_counter() - start
            arrivals = await _router_arrivals(cluster)
        finally:
            await cluster.stop()
    rec = {
        "run": cfg.label,
        "seed": seed,
        "routers": cfg.routers if not cfg.embedded_workers else 0,
        "embedded_workers": cfg.embedded_workers,
        "policy": cfg.policy,
        "policy_options": cfg.options,
        "session": cfg.session,
        "affinity": cfg.session == "conversation",
        "connect": cfg.connect,
        "requests": totals["requests"],
        "requests_per_router": arrivals,
        "prompt_tokens": totals["prompt"],
        "cached_tokens": totals["cached"],
        "prefix_cache_hit_rate": round(totals["cached"] / totals["prompt"], 4) if totals["prompt"] else 0.0,
        "duration_s": round(duration, 2),
    }
    print(json.dumps(rec), file=sys.stderr)
    return rec


async def main_async(args) -> dict:
    runs = [r for r in RUNS if not args.only or r.label in args.only]
    # Rounds: every configuration once per seed, in turn, so a slow spell of the shared machine spreads over all.
    rounds = [[await run(r, args, args.seed + k) for r in runs] for k in range(args.repeats)]
    results = []
    for i in range(len(runs)):
        recs = [rnd[i] for rnd in rounds]
        prompt, cached = sum(r["prompt_tokens"] for r in recs), sum(r["cached_tokens"] for r in recs)
        results.append(
            {
                **{k: v for k, v in recs[0].items() if k not in ("seed", "duration_s")},
                "requests": sum(r["requests"] for r in recs),
                "requests_per_router": [
                    sum(col) for col in zip(*(r["requests_per_router"] for r in recs), strict=True)
                ],
                "prompt_tokens": prompt,
                "cached_tokens": cached,
                "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
                "hit_rate_per_seed": [r["prefix_cache_hit_rate"] for r in recs],
            }
        )
    return {
        "kind": "router_affinity",
        "title": "prefix-cache hit rate through the gateway: 1 vs 3 routers vs routers embedded in 2 gateway workers",
        "command": "python -m loadtest.router_affinity " + " ".join(sys.argv[1:]),
        "workload": {
            "requests": args.requests,
            "seeds": list(range(args.seed, args.seed + args.repeats)),
            "concurrency": args.concurrency,
        },
        "engines": 3,
        "speed_factor": args.speed_factor,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.router_affinity", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=120, help="turns in all (default 120)")
    p.add_argument("--concurrency", type=int, default=6, help="conversations at once (default 6)")
    p.add_argument("--seed", type=int, default=1, help="the first workload seed (default 1)")
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each configuration, on seeds seed, seed+1, ... (default 3)",
    )
    p.add_argument("--speed-factor", type=float, default=5.0, help="sim speed (default 5)")
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument(
        "--only",
        action="append",
        choices=[r.label for r in RUNS],
        help="run only this configuration (repeatable)",
    )
    args = p.parse_args(argv)
    doc = asyncio.run(main_async(args))
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
