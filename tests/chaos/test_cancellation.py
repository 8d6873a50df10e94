"""Cancelled streams leave nothing behind: clients that go away before the first token, mid-stream, or by
deadline end the work on the engine, the router's counts return to zero, and every service's log stays one
JSON object per line (no OpenTelemetry detach tracebacks)."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc

from tests.chaos.invariants import busy_counts, log_problems
from tests.integration.conftest import running_cluster
from tests.support import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

STREAMS = 40


async def _cancelled_stream(stub, key: str, rng: random.Random) -> str:
    """One stream ended by its client: after 0..5 chunks (0: before the first), or by a short deadline."""
    how = rng.choice(["early", "mid", "deadline"])
    req = inf_pb.GenerateRequest(
        model="sim-1b", prompt=f"cancel me {rng.random()}", max_tokens=400, ignore_eos=True
    )
    timeout = 0.3 if how == "deadline" else 30
    call = stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=timeout)
    stop_after = 0 if how == "early" else rng.randint(1, 5)
    try:
        n = 0
        async for _ in call:
            n += 1
            if n >= stop_after and how != "deadline":
                break
    except grpc.aio.AioRpcError as e:
        assert e.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED), e
    call.cancel()
    return how


@pytest.mark.parametrize("embedded", [False, True], ids=["router", "embedded-router"])
async def test_cancelled_streams_leave_no_work_and_clean_logs(tmp_path, embedded):
    """40 streams cancelled at random points through the gateway: afterwards the engines run nothing, the
    router has nothing in flight, and every line of every service's log is a JSON object; the same with the
    router inside the gateway (--embedded-router)."""
    async with running_cluster(tmp_path, engines=2, embedded_router=embedded) as cluster:
        async with grpc.aio.insecure_channel(cluster.gateway) as ch:
            stub = inf_grpc.InferenceServiceStub(ch)
            rng = random.Random(7)
            kinds = []
            for _ in range(STREAMS // 8):
                kinds += await asyncio.gather(
                    *(_cancelled_stream(stub, cluster.api_key, rng) for _i in range(8))
                )
            assert set(kinds) == {"early", "mid", "deadline"}

            async def idle():
                counts = await busy_counts(cluster)
                return not any(counts.values()) and counts

            await assert_eventually(
                idle, timeout_s=30, interval_s=0.2, message="work left after cancellation"
            )
    assert log_problems(tmp_path / "logs") == []
