"""Every server has grpc.health.v1 and reflection, so grpcurl and health probes work with no .proto files."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import grpc
import pytest
from fleetserve.engine.v1 import engine_service_pb2 as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from shared.server import Service, create_server


class _Engine:
    async def Generate(self, request, context):
        yield pb.GenerateResponse()

    async def Abort(self, request, context):
        return pb.AbortResponse()

    async def GetLoad(self, request, context):
        return pb.GetLoadResponse()

    async def GetInfo(self, request, context):
        return pb.GetInfoResponse(replica_id="r1")

    async def SubscribeKvEvents(self, request, context):
        yield pb.SubscribeKvEventsResponse()


async def test_reflection_lists_services_and_resolves_methods():
    """Reflection lists our service, health and reflection, and describes Generate's message types."""
    running = await create_server([Service(pb, "EngineService", _Engine())])

    def lookup():
        # The reflection client is synchronous: run it off the event loop the server is serving on.
        with grpc.insecure_channel(running.address) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            return set(db.get_services()), db.FindFileContainingSymbol("fleetserve.engine.v1.EngineService")

    try:
        services, desc = await asyncio.to_thread(lookup)
        assert {"fleetserve.engine.v1.EngineService", "grpc.health.v1.Health"} <= services
        assert desc.package == "fleetserve.engine.v1"
    finally:
        await running.server.stop(None)


async def test_health_reports_not_serving_when_draining():
    """Health is SERVING after start and NOT_SERVING once the server starts draining."""
    running = await create_server([Service(pb, "EngineService", _Engine())])
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for name in ("", "fleetserve.engine.v1.EngineService"):
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            await running.set_serving(False)
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.server.stop(None)


async def test_settle_heap_sets_the_serving_collector_thresholds(monkeypatch):
    """While serving the collector runs with the services' thresholds, or FLEETSERVE_GC_THRESHOLD's."""
    import gc

    from shared.server import GC_THRESHOLD, settle_heap

    before = gc.get_threshold()
    monkeypatch.setenv("FLEETSERVE_GC_FULL_EVERY_S", "0")
    try:
        monkeypatch.delenv("FLEETSERVE_GC_THRESHOLD", raising=False)
        async with settle_heap():
            assert gc.get_threshold() == GC_THRESHOLD
        monkeypatch.setenv("FLEETSERVE_GC_THRESHOLD", "700,10,10")
        async with settle_heap():
            assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def _collectors() -> list[asyncio.Task]:
    """The running loop's tasks of periodic full collections."""
    return [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "collect_fully_forever"]


async def test_settle_heap_frees_garbage_of_the_oldest_generation_while_serving(monkeypatch):
    """A reference cycle that reached the oldest generation is freed by settle_heap's periodic full collections,
    which the serving thresholds alone would leave for ~100M allocations; they stop with the block, also when it
    ends by an exception."""
    import gc
    import weakref

    from shared.server import settle_heap
    from tests.support import assert_eventually

    class Node:
        pass

    class Stopped(Exception):
        pass

    before = gc.get_threshold()
    monkeypatch.delenv("FLEETSERVE_GC_THRESHOLD", raising=False)
    monkeypatch.setenv("FLEETSERVE_GC_FULL_EVERY_S", "0.05")
    assert _collectors() == []
    try:
        with pytest.raises(Stopped):
            async with settle_heap():
                assert len(_collectors()) == 1
                node = Node()
                node.me = node  # a cycle: only the collector frees it
                freed = weakref.ref(node)
                gc.collect(1)  # alive through a pass of the middle generation: promoted to the oldest
                del node
                gc.collect(1)  # the younger generations' passes no longer see it
                assert freed() is not None
                await assert_eventually(
                    lambda: freed() is None, timeout_s=5, message="garbage left in generation 2"
                )
                raise Stopped
        assert _collectors() == []
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


ROOT = Path(__file__).resolve().parents[3]
SERVE_A_REGISTRY = textwrap.dedent(
    """
    import asyncio, json, sys
    from services.registry.app import start
    from services.registry.config import RegistrySettings
    from shared.server import serve_main

    def collectors():
        return sum(t.get_coro().__qualname__ == "collect_fully_forever" for t in asyncio.all_tasks())

    async def main():
        before = collectors()
        settings = RegistrySettings(port=0, metrics_port=-1, db_path=":memory:", ready_file=sys.argv[1])
        await serve_main("registry", settings, start)
        print(json.dumps({"before": before, "after": collectors()}))

    asyncio.run(main())
    """
)


async def test_a_stopped_service_leaves_no_full_collection_task(tmp_path):
    """A registry served by serve_main, with full collections every 0.05 s, stopped by SIGTERM: its loop has no
    collection task left (there was none before it started)."""
    from shared.server import PARENT_PID_ENV
    from tests.support import assert_eventually

    log_file, out_file = tmp_path / "registry.log", tmp_path / "out.json"
    env = {**os.environ, "FLEETSERVE_GC_FULL_EVERY_S": "0.05", PARENT_PID_ENV: str(os.getpid())}
    argv = [sys.executable, "-c", SERVE_A_REGISTRY, str(tmp_path / "ready.json")]
    with open(log_file, "wb") as log, open(out_file, "wb") as out:  # noqa: ASYNC230 - once, before it starts
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=log, env=env)  # noqa: ASYNC220
    try:
        # A collection ran: the task exists, and (logged after the start) the SIGTERM handler is installed.
        await assert_eventually(
            lambda: "process.gc_full" in log_file.read_text() or proc.poll() is not None, timeout_s=60
        )
        assert proc.poll() is None, log_file.read_text()[-3000:]
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 30) == 0, log_file.read_text()[-3000:]
        assert json.loads(out_file.read_text().splitlines()[-1]) == {"before": 0, "after": 0}
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_full_collection_period_comes_from_the_environment(monkeypatch):
    """FLEETSERVE_GC_FULL_EVERY_S sets the period (0 turns the collections off); a negative one fails loudly."""
    from shared.server import GC_FULL_EVERY_S, gc_full_every_s

    monkeypatch.delenv("FLEETSERVE_GC_FULL_EVERY_S", raising=False)
    assert gc_full_every_s() == GC_FULL_EVERY_S
    monkeypatch.setenv("FLEETSERVE_GC_FULL_EVERY_S", "0")
    assert gc_full_every_s() == 0
    monkeypatch.setenv("FLEETSERVE_GC_FULL_EVERY_S", "-1")
    with pytest.raises(ValueError):
        gc_full_every_s()


def test_full_collections_back_off_while_they_find_little_garbage():
    """After a full collection that found under GC_FULL_QUIET unreachable objects the wait doubles, up to
    GC_FULL_MAX_BACKOFF periods; after one that found more it is the period again."""
    from shared.server import GC_FULL_MAX_BACKOFF, GC_FULL_QUIET, next_full_wait

    waits = [30.0]
    for _ in range(6):
        waits.append(next_full_wait(waits[-1], 30.0, GC_FULL_QUIET - 1))
    assert waits == [30.0, 60.0, 120.0, 240.0, 480.0, 30.0 * GC_FULL_MAX_BACKOFF, 30.0 * GC_FULL_MAX_BACKOFF]
    assert next_full_wait(480.0, 30.0, GC_FULL_QUIET) == 30.0


class _Held(_Engine):
    """Generate is one of the service's requests (Drain.check ... done) and streams once released;
    SubscribeKvEvents stands for a call gRPC accepted and never handed to the service: it is no request of
    the drain's and never ends by itself."""

    def __init__(self, drain) -> None:
        self.drain = drain
        self.release = asyncio.Event()

    async def Generate(self, request, context):
        self.drain.check()
        try:
            await self.release.wait()
            yield pb.GenerateResponse()
        finally:
            self.drain.done()

    async def SubscribeKvEvents(self, request, context):
        await asyncio.Event().wait()
        yield pb.SubscribeKvEventsResponse()


async def test_a_drained_server_cancels_the_calls_it_still_holds_once_none_is_the_services():
    """drain_and_stop(idle=...): while a request of the service runs, nothing is cancelled; once none does,
    a call the server still holds (one gRPC never handed over) is cancelled within about LEFTOVER_S, not at the
    end of the grace period, and the stop returns then."""
    from shared.drain import Drain
    from shared.server import LEFTOVER_S, drain_and_stop

    drain = Drain("engine")
    servicer = _Held(drain)
    running = await create_server([Service(pb, "EngineService", servicer)])
    async with grpc.aio.insecure_channel(running.address) as ch:
        held = ch.unary_stream(
            "/fleetserve.engine.v1.EngineService/SubscribeKvEvents",
            request_serializer=pb.SubscribeKvEventsRequest.SerializeToString,
        )(pb.SubscribeKvEventsRequest(), timeout=60)
        ours = ch.unary_stream(
            "/fleetserve.engine.v1.EngineService/Generate",
            request_serializer=pb.GenerateRequest.SerializeToString,
            response_deserializer=pb.GenerateResponse.FromString,
        )(pb.GenerateRequest(), timeout=60)
        for _ in range(200):  # bounded: until the service's request is in its code
            if drain.busy:
                break
            await asyncio.sleep(0.01)
        assert drain.busy == 1
        stopping = asyncio.create_task(
            drain_and_stop(running, 30.0, goaway_first=True, idle=lambda: drain.busy == 0)
        )
        await asyncio.sleep(LEFTOVER_S + 0.5)
        assert not stopping.done()  # the service's request runs: nothing is cancelled
        servicer.release.set()
        assert len([r async for r in ours]) == 1  # it ended as it would have
        started = asyncio.get_running_loop().time()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(held.read(), 10)
        # gRPC's "Cancelling all calls": UNAVAILABLE without details, which a gateway retries on another router.
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "Cancelling all calls" in e.value.details()
        await asyncio.wait_for(stopping, 10)
        assert asyncio.get_running_loop().time() - started < LEFTOVER_S + 5  # far from the 30 s grace
