"""Every server has grpc.health.v1 and reflection, so grpcurl and health probes work with no .proto files."""

from __future__ import annotations

import asyncio

import grpc
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


def test_settle_heap_sets_the_serving_collector_thresholds(monkeypatch):
    """After start-up the collector runs with the services' thresholds, or FLEETSERVE_GC_THRESHOLD's."""
    import gc

    from shared.server import GC_THRESHOLD, settle_heap

    before = gc.get_threshold()
    try:
        monkeypatch.delenv("FLEETSERVE_GC_THRESHOLD", raising=False)
        settle_heap()
        assert gc.get_threshold() == GC_THRESHOLD
        monkeypatch.setenv("FLEETSERVE_GC_THRESHOLD", "700,10,10")
        settle_heap()
        assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_settle_heap_frees_garbage_of_the_oldest_generation_while_serving(monkeypatch):
    """A reference cycle that reached the oldest generation is freed by settle_heap's periodic full collections,
    which the serving thresholds alone would leave for ~100M allocations."""
    import gc
    import weakref

    from shared.server import cancel_and_wait, settle_heap
    from tests.support import assert_eventually

    class Node:
        pass

    before = gc.get_threshold()
    monkeypatch.delenv("FLEETSERVE_GC_THRESHOLD", raising=False)
    monkeypatch.setenv("FLEETSERVE_GC_FULL_EVERY_S", "0.05")
    collector = settle_heap()
    try:
        node = Node()
        node.me = node  # a cycle: only the collector frees it
        freed = weakref.ref(node)
        gc.collect(1)  # alive through a pass of the middle generation: promoted to the oldest
        del node
        gc.collect(1)  # the younger generations' passes no longer see it
        assert freed() is not None
        await assert_eventually(lambda: freed() is None, timeout_s=5, message="garbage left in generation 2")
    finally:
        if collector is not None:
            await cancel_and_wait([collector])
        gc.unfreeze()
        gc.set_threshold(*before)


def test_full_collection_period_comes_from_the_environment(monkeypatch):
    """FLEETSERVE_GC_FULL_EVERY_S sets the period (0 turns the collections off); a negative one fails loudly."""
    import pytest

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
