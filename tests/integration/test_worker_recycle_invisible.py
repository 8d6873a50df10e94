"""A gateway or router worker recycled under a steady load of streams loses nothing: clients keep one gRPC channel
and one HTTP keep-alive session open through the recycles and no request fails. The clients retry no status our
services send (UNAVAILABLE + RetryInfo from a draining worker was what failed before); only gRPC's own CANCELLED
for a call its server never handed to the gateway's code, as fleetserve.client does."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

import aiohttp
import grpc
import pytest
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc

from tests.integration.conftest import running_cluster
from tests.support import log_events

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

# Bounds of the load: it stops once each service recycled RECYCLES workers, or after these.
RECYCLES = 2
MAX_S = 120.0
MAX_REQUESTS = 20_000


def gateway_never_saw_it(e: grpc.aio.AioRpcError) -> bool:
    """CANCELLED with no google.rpc.Status details, before any chunk: gRPC's own answer to a call still queued
    in the server's core (not yet handed to the gateway's code) when the server stopped."""
    return e.code() == grpc.StatusCode.CANCELLED and not any(
        k == "grpc-status-details-bin" for k, _ in (e.trailing_metadata() or ())
    )


def recycles(cluster, service: str) -> int:
    return sum(1 for e in log_events(cluster, service) if e.get("event") == f"{service}.worker_recycled")


async def test_recycling_gateway_and_router_workers_fail_no_request(tmp_path):
    """--workers 2 gateway and router, each worker recycled after ~120 requests, under 8 gRPC streams on one
    channel and 2 HTTP streams on one keep-alive session (some long, so drains last): every request succeeds,
    without a client retry, through at least 2 recycles of each service."""
    async with running_cluster(
        tmp_path,
        engines=1,
        router_workers=2,
        gateway_workers=2,
        extra_args={
            "router": ["--max-requests-per-worker", "120", "--max-requests-jitter", "20"],
            "gateway": ["--max-requests-per-worker", "120", "--max-requests-jitter", "20"],
        },
    ) as cluster:
        key = cluster.api_key
        http = f"http://{cluster.ready_info('gateway')['http_address']}/v1/completions"
        failures: Counter[str] = Counter()
        ok = requeued = 0
        issued = 0
        stop = asyncio.Event()
        started = time.monotonic()

        def tokens(rng: random.Random) -> int:
            # Mostly short requests; a long one now and then keeps a draining worker busy for a while.
            return 48 if rng.random() < 0.1 else 4

        async def grpc_user(stub, wid: int) -> None:
            nonlocal ok, issued, requeued
            rng = random.Random(wid)
            while not stop.is_set() and issued < MAX_REQUESTS:
                issued += 1
                n = tokens(rng)
                req = inf_pb.GenerateRequest(model="sim-1b", prompt=f"g{wid} {issued}", max_tokens=n)
                for attempt in range(3):
                    # wait_for_ready: a connection attempt that fails (the kernel resets one that raced the
                    # closing listener) waits for the next instead of failing the call; no status is retried.
                    call = stub.Generate(
                        req, metadata=(("authorization", f"Bearer {key}"),), timeout=30, wait_for_ready=True
                    )
                    try:
                        got = [r async for r in call]
                        assert sum(r.chunk.usage.completion_tokens for r in got) == n, got[-1:]
                        ok += 1
                        break
                    except grpc.aio.AioRpcError as e:
                        if gateway_never_saw_it(e) and attempt < 2:
                            requeued += 1  # as fleetserve.client does (fleetserve/client/retry.py)
                            continue
                        failures[f"grpc {e.code().name} {e.details()[:80]}"] += 1
                        break

        async def http_user(session: aiohttp.ClientSession, wid: int) -> None:
            nonlocal ok, issued
            rng = random.Random(100 + wid)
            while not stop.is_set() and issued < MAX_REQUESTS:
                issued += 1
                n = tokens(rng)
                body = {"model": "sim-1b", "prompt": f"h{wid} {issued}", "max_tokens": n, "stream": True}
                try:
                    async with session.post(http, json=body, headers={"Authorization": f"Bearer {key}"}) as r:
                        if r.status != 200:
                            failures[f"http {r.status} {(await r.text())[:80]}"] += 1
                            continue
                        text = (await r.read()).decode()
                    assert text.rstrip().endswith("data: [DONE]"), text[-200:]
                    ok += 1
                except aiohttp.ClientError as e:
                    failures[f"http {type(e).__name__} {str(e)[:60]}"] += 1

        async def watch() -> None:
            while time.monotonic() - started < MAX_S and issued < MAX_REQUESTS:
                await asyncio.sleep(0.5)
                if min(recycles(cluster, s) for s in ("gateway", "router")) >= RECYCLES:
                    break
            stop.set()

        async with (
            grpc.aio.insecure_channel(cluster.gateway) as channel,
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        ):
            stub = inf_grpc.InferenceServiceStub(channel)
            await asyncio.gather(
                watch(),
                *(grpc_user(stub, i) for i in range(8)),
                *(http_user(session, i) for i in range(2)),
            )
        done = {s: recycles(cluster, s) for s in ("gateway", "router")}
        print(
            f"recycles {done}, ok {ok}, failures {dict(failures)}, requeued {requeued}, "
            f"{time.monotonic() - started:.1f} s"
        )
        assert min(done.values()) >= RECYCLES, done
        assert not failures, dict(failures)
        assert ok > 0
