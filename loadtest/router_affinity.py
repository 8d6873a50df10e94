"""Prefix-cache hit rate of multi-turn conversations through the gateway with 1 router vs 3 routers, all with
the cache_aware policy: with 3 routers a conversation's turns reach one router by the gateway's affinity (its
session id), so that router's cache-aware state sees the whole conversation; a third run gives every turn a
fresh session (no affinity: turns land on any router) to show what the affinity is worth. One JSON document.

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
from pathlib import Path

from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from loadtest.workload import Conversation, multiturn
from shared.channels import open_channel
from shared.cluster import Cluster, ClusterConfig

RUNS = (("1 router", 1, True), ("3 routers", 3, True), ("3 routers, no affinity", 3, False))


async def _converse(stub, key: str, conv: Conversation, affinity: bool, totals: dict) -> None:
    messages = [common_pb2.ChatMessage(role="system", content=conv.system)] if conv.system else []
    for turn in conv.turns:
        messages.append(common_pb2.ChatMessage(role="user", content=turn))
        req = pb.GenerateRequest(
            model="sim-1b",
            messages=messages,
            max_tokens=conv.max_tokens,
            ignore_eos=True,
            temperature=0,
            session_id=conv.session if affinity else uuid.uuid4().hex,
        )
        text, last = [], None
        async for resp in stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=120):
            text.append(resp.chunk.text)
            last = resp.chunk
        totals["requests"] += 1
        totals["prompt"] += last.usage.prompt_tokens
        totals["cached"] += last.usage.cached_tokens
        messages.append(common_pb2.ChatMessage(role="assistant", content="".join(text)))


async def run(label: str, routers: int, affinity: bool, args) -> dict:
    workload = multiturn(
        args.requests,
        args.seed,
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
                routers=routers,
                speed_factor=args.speed_factor,
                metrics_port=-1,
                extra_args={"router": ["--policy", "cache_aware"], "engine": ["--num-kv-blocks", "4096"]},
            )
        )
        await cluster.start()
        try:
            totals = {"requests": 0, "prompt": 0, "cached": 0}
            async with open_channel(cluster.gateway, cluster.client_tls) as ch:
                stub = pb_grpc.InferenceServiceStub(ch)
                pending = iter(workload.conversations)
                start = time.perf_counter()

                async def slot() -> None:
                    for conv in pending:
                        await _converse(stub, cluster.api_key, conv, affinity, totals)

                await asyncio.gather(*(slot() for _ in range(args.concurrency)))
                duration = time.perf_counter() - start
        finally:
            await cluster.stop()
    rec = {
        "run": label,
        "routers": routers,
        "affinity": affinity,
        "requests": totals["requests"],
        "prompt_tokens": totals["prompt"],
        "cached_tokens": totals["cached"],
        "prefix_cache_hit_rate": round(totals["cached"] / totals["prompt"], 4) if totals["prompt"] else 0.0,
        "duration_s": round(duration, 2),
    }
    print(json.dumps(rec), file=sys.stderr)
    return rec


async def main_async(args) -> dict:
    results = [await run(label, n, affinity, args) for label, n, affinity in RUNS]
    return {
        "kind": "router_affinity",
        "title": "cache_aware prefix-cache hit rate through the gateway: 1 vs 3 routers",
        "command": "python -m loadtest.router_affinity " + " ".join(sys.argv[1:]),
        "workload": {"requests": args.requests, "seed": args.seed, "concurrency": args.concurrency},
        "engines": 3,
        "speed_factor": args.speed_factor,
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.router_affinity", description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=120, help="turns in all (default 120)")
    p.add_argument("--concurrency", type=int, default=6, help="conversations at once (default 6)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--speed-factor", type=float, default=5.0, help="sim speed (default 5)")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    doc = asyncio.run(main_async(args))
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
