"""The router over real servers in-process: registry + engines + router on port 0. Routing, failover before the
first token, unknown models, draining replicas, and riding out a registry outage."""

from __future__ import annotations

import asyncio
import contextlib
import shlex
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.inference.v1 import inference_service_pb2 as gw_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as gw_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.engine import app as engine_app
from services.engine import config as engine_config
from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from services.registry import app as registry_app
from services.registry import config as registry_config
from services.router.app import start as start_router
from services.router.config import RouterSettings
from shared.errors import details_of
from shared.server import LEFTOVER_S
from shared.telemetry import Telemetry
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "sim-1b"
API_KEY = "fsk-integration-test"


def recording_telemetry() -> tuple[Telemetry, InMemorySpanExporter]:
    """Telemetry whose finished spans are kept in memory for assertions."""
    exporter = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    meter_provider = MeterProvider()
    return (
        Telemetry(
            tracer=tracer_provider.get_tracer("test"),
            meter=meter_provider.get_meter("test"),
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
        ),
        exporter,
    )


def closed_port_address() -> str:
    """host:port where nothing listens (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"127.0.0.1:{port}"


@dataclass
class Fleet:
    """Services started in this process, and how to reach them."""

    tmp: Path
    telemetry: Telemetry
    spans: InMemorySpanExporter
    registry: object
    engines: dict[str, object]
    router: object
    gateway: object | None = None
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def channel(self, address: str) -> grpc.aio.Channel:
        ch = grpc.aio.insecure_channel(address)
        self.channels.append(ch)
        return ch

    def router_stub(self) -> router_grpc.RouterServiceStub:
        return router_grpc.RouterServiceStub(self.channel(self.router.address))

    def registry_stub(self) -> reg_grpc.RegistryServiceStub:
        return reg_grpc.RegistryServiceStub(self.channel(self.registry.address))

    async def engine_load(self, name: str) -> engine_pb.GetLoadResponse:
        stub = engine_grpc.EngineServiceStub(self.channel(self.engines[name].address))
        return await stub.GetLoad(engine_pb.GetLoadRequest(), timeout=2)

    async def aborted_total(self) -> int:
        return sum([(await self.engine_load(n)).requests_aborted for n in self.engines])

    async def busy_total(self) -> int:
        loads = [(await self.engine_load(n)).load for n in self.engines]
        return sum(x.running + x.waiting for x in loads)

    async def register_dead_replica(
        self, replica_id: str, model: str = MODEL, model_version: str = ""
    ) -> str:
        """Register a replica (of model_version, when given) whose address refuses connections; returns the
        address."""
        address = closed_port_address()
        replica = reg_pb.Replica(
            replica_id=replica_id, address=address, model=model, model_version=model_version, backend="sim"
        )
        await self.registry_stub().RegisterReplica(
            reg_pb.RegisterReplicaRequest(replica=replica),
            timeout=2,
        )
        await assert_eventually(lambda: self.router.membership.get(replica_id) is not None, timeout_s=5)
        return address

    async def deregister(self, replica_id: str) -> None:
        await self.registry_stub().DeregisterReplica(
            reg_pb.DeregisterReplicaRequest(replica_id=replica_id, drain=False), timeout=2
        )
        await assert_eventually(lambda: self.router.membership.get(replica_id) is None, timeout_s=5)


async def start_test_registry(tmp: Path, telemetry: Telemetry, port: int = 0):
    """A registry in this process (port 0, or a given one to come back on), its database under tmp."""
    settings = registry_config.RegistrySettings(
        port=port, db_path=str(tmp / "registry.db"), lease_ttl_s=30.0, heartbeat_interval_s=0.2
    )
    return await registry_app.start(settings, telemetry)


async def start_test_gateway(tmp: Path, router_address: str, telemetry: Telemetry, **overrides):
    """A gateway in this process on port 0 in front of router_address, API_KEY its bootstrapped key."""
    settings = GatewaySettings(
        router_address=router_address,
        db_path=str(tmp / "gateway.db"),
        bootstrap_api_key=API_KEY,
        auth_cache_ttl_s=0.0,
        **overrides,
    )
    return await start_gateway(settings, telemetry)


@contextlib.asynccontextmanager
async def in_process_fleet(
    tmp: Path, engines: int = 2, gateway: bool = False, embedded_router: bool = False, **router_overrides
) -> AsyncIterator[Fleet]:
    """Registry, `engines` sim engines (fast), a router (and a gateway) in this process on port 0; every
    server stopped and every channel closed when the block ends. embedded_router: no router of its own, the
    gateway's (--embedded-router) is fleet.router (its RouterService port, its membership)."""
    telemetry, spans = recording_telemetry()
    started: list[object] = []
    fleet: Fleet | None = None
    try:
        registry = await start_test_registry(tmp, telemetry)
        started.append(registry)
        engine_apps = {}
        for i in range(1, engines + 1):
            name = f"engine-{i}"
            engine_apps[name] = await engine_app.start(
                engine_config.EngineSettings(
                    registry_address=registry.address,
                    replica_id=name,
                    model=MODEL,
                    backend="sim",
                    speed_factor=20.0,
                ),
                telemetry,
            )
            started.append(engine_apps[name])
        router_settings = {"watch_backoff_base_s": 0.05, "watch_backoff_max_s": 0.2, **router_overrides}
        if embedded_router:
            flags = [f"--{k.replace('_', '-')}={v}" for k, v in router_settings.items()]
            gw = await start_test_gateway(
                tmp, "", telemetry, registry_address=registry.address, embedded_router=True,
                router_flags=shlex.join(flags),
            )  # fmt: skip
            started.append(gw)
            router = gw.embedded
        else:
            router = await start_router(
                RouterSettings(registry_address=registry.address, **router_settings), telemetry
            )
            started.append(router)
        fleet = Fleet(tmp, telemetry, spans, registry, engine_apps, router)
        await assert_eventually(
            lambda: len(router.membership.routable(MODEL)) == engines,
            timeout_s=10,
            message="engines not routable",
        )
        if embedded_router:
            fleet.gateway = gw
        elif gateway:
            fleet.gateway = await start_test_gateway(tmp, router.address, telemetry)
            started.append(fleet.gateway)
        yield fleet
    finally:
        if fleet is not None:
            for ch in fleet.channels:
                await ch.close()
            # The fleet's own fields: a test may have replaced a service (a restarted registry).
            started = [fleet.registry, *fleet.engines.values()]
            started += [fleet.router] if not embedded_router else []
            started += [fleet.gateway] if fleet.gateway is not None else []
        for app in reversed(started):
            await app.stop(0.5)
        telemetry.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("router")) as f:
        yield f


def request(
    max_tokens: int = 8, model: str = MODEL, request_id: str = "r-1", **sampling
) -> router_pb.GenerateRequest:
    return router_pb.GenerateRequest(
        request_id=request_id,
        spec=common_pb2.GenerationSpec(
            model=model,
            prompt="route me",
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling),
        ),
        routing=router_pb.RoutingContext(tenant_id="t1", priority=common_pb2.PRIORITY_STANDARD),
    )


async def generate(
    fleet: Fleet, req: router_pb.GenerateRequest, rpc_timeout_s: float = 10
) -> list[common_pb2.GenerateChunk]:
    return [r.chunk async for r in fleet.router_stub().Generate(req, timeout=rpc_timeout_s)]


async def generate_error(fleet: Fleet, req: router_pb.GenerateRequest, rpc_timeout_s: float = 10):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await generate(fleet, req, rpc_timeout_s)
    return details_of(exc.value)


def router_spans(fleet: Fleet, request_id: str):
    return [
        s
        for s in fleet.spans.get_finished_spans()
        if s.name == "router.Generate" and s.attributes.get("fleetserve.request_id") == request_id
    ]


async def test_streams_a_generation_from_a_replica(fleet):
    """Router.Generate streams the engine's chunks: served_by first, usage and finish reason last; the span
    records request, model, replica and one attempt; nothing stays in flight."""
    chunks = await generate(fleet, request(max_tokens=12, ignore_eos=True, request_id="stream-1"))
    assert chunks[0].served_by.replica_id in fleet.engines
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 12
    assert sum(len(c.token_ids) for c in chunks) == 12
    (span,) = router_spans(fleet, "stream-1")
    assert span.attributes["fleetserve.model"] == MODEL
    assert span.attributes["fleetserve.replica_id"] == chunks[0].served_by.replica_id
    assert span.attributes["fleetserve.attempts"] == 1
    status = await fleet.router_stub().GetStatus(router_pb.GetStatusRequest(), timeout=2)
    assert {r.replica_id for r in status.replicas} == set(fleet.engines)
    assert all(r.routable and r.in_flight == 0 for r in status.replicas)


async def test_get_status_counts_every_admitted_request_by_model_and_version(fleet):
    """GetStatus.arrivals (the autoscaler's arrival rate) counts each admitted request once, under the version
    it was given (empty without one), and not a request refused before admission (an unknown model)."""

    async def counts() -> dict[tuple[str, str], int]:
        status = await fleet.router_stub().GetStatus(router_pb.GetStatusRequest(), timeout=2)
        return {(a.model, a.version): a.requests_total for a in status.arrivals}

    before = await counts()
    for i in range(3):
        await generate(fleet, request(request_id=f"count-{i}"))
    pinned = request(request_id="count-pinned")
    pinned.spec.model_version = "v1"
    await generate(fleet, pinned)
    await generate_error(fleet, request(model="no-such-model", request_id="count-unknown"))
    after = await counts()
    assert after[(MODEL, "")] - before.get((MODEL, ""), 0) == 3
    assert after[(MODEL, "v1")] - before.get((MODEL, "v1"), 0) == 1
    assert not any(model == "no-such-model" for model, _ in after)


async def test_concurrent_requests_spread_over_replicas(fleet):
    """Least-load sends concurrent requests to both replicas, not all to one."""
    import asyncio

    results = await asyncio.gather(
        *(
            generate(fleet, request(max_tokens=30, ignore_eos=True, request_id=f"spread-{i}"))
            for i in range(6)
        )
    )
    served = [chunks[0].served_by.replica_id for chunks in results]
    assert set(served) == set(fleet.engines), served


async def test_list_models_counts_serving_replicas(fleet):
    """ListModels reports each model with its number of SERVING replicas."""
    resp = await fleet.router_stub().ListModels(router_pb.ListModelsRequest(), timeout=2)
    assert [(m.model, m.replicas) for m in resp.models] == [(MODEL, 2)]


async def test_unknown_model_is_not_found_listing_available_models(fleet):
    """A model no replica ever served is NOT_FOUND, reason MODEL_NOT_FOUND, naming the models there are."""
    d = await generate_error(fleet, request(model="no-such-model"))
    assert d.code == grpc.StatusCode.NOT_FOUND
    assert d.reason == "MODEL_NOT_FOUND"
    assert MODEL in d.message and d.retry_after_s is None


async def test_fails_over_when_a_replica_is_dead_before_the_first_token(fleet):
    """A registered replica whose address refuses connections is tried, taken out of rotation, and the
    request is served by another replica: every request succeeds."""
    await fleet.register_dead_replica("dead-1")
    try:
        for i in range(40):  # the dead replica ties with the idle engines: it is picked at random
            chunks = await generate(fleet, request(max_tokens=4, request_id=f"failover-{i}"))
            assert chunks[0].served_by.replica_id in fleet.engines
            assert chunks[-1].usage.completion_tokens == 4
            if any(s.attributes["fleetserve.attempts"] == 2 for s in router_spans(fleet, f"failover-{i}")):
                break
        else:
            pytest.fail("the dead replica was never chosen in 40 requests")
        status = await fleet.router_stub().GetStatus(router_pb.GetStatusRequest(), timeout=2)
        dead = next(r for r in status.replicas if r.replica_id == "dead-1")
        assert not dead.routable
    finally:
        await fleet.deregister("dead-1")


async def test_known_model_with_no_reachable_replica_is_unavailable_with_retry_advice(fleet):
    """When every replica of a model fails before streaming, the caller gets UNAVAILABLE NO_HEALTHY_REPLICA
    with a retry delay; while the replica cools down, the next request gets the same at once."""
    await fleet.register_dead_replica("ghost-1", model="ghost")
    try:
        for _ in range(2):
            d = await generate_error(fleet, request(model="ghost"))
            assert d.code == grpc.StatusCode.UNAVAILABLE
            assert d.reason == "NO_HEALTHY_REPLICA"
            assert d.retry_after_s and d.retry_after_s > 0
    finally:
        await fleet.deregister("ghost-1")


async def test_a_model_whose_replicas_all_left_stays_listed_and_is_unavailable_not_not_found(fleet):
    """Once every replica of a model has left (restarting, recycled), ListModels still lists it with 0 replicas
    and a request for it is UNAVAILABLE NO_HEALTHY_REPLICA with a retry delay: not NOT_FOUND, which callers take
    for good."""
    await fleet.register_dead_replica("gone-1", model="gone")
    await fleet.deregister("gone-1")
    resp = await fleet.router_stub().ListModels(router_pb.ListModelsRequest(), timeout=2)
    assert ("gone", 0) in [(m.model, m.replicas) for m in resp.models]
    d = await generate_error(fleet, request(model="gone"))
    assert d.code == grpc.StatusCode.UNAVAILABLE and d.reason == "NO_HEALTHY_REPLICA"
    assert d.retry_after_s and d.retry_after_s > 0


async def test_a_model_without_replicas_past_forget_model_after_s_is_not_found(tmp_path):
    """--forget-model-after-s: a model whose replicas all left longer ago than that was decommissioned, not
    restarting: it leaves ListModels and its requests get NOT_FOUND again."""
    async with in_process_fleet(tmp_path, engines=1, forget_model_after_s=0.5) as f:
        await f.register_dead_replica("old-1", model="old")
        await f.deregister("old-1")
        d = await generate_error(f, request(model="old"))
        assert d.code == grpc.StatusCode.UNAVAILABLE and d.reason == "NO_HEALTHY_REPLICA"

        async def forgotten() -> bool:
            resp = await f.router_stub().ListModels(router_pb.ListModelsRequest(), timeout=2)
            return "old" not in [m.model for m in resp.models]

        await assert_eventually(forgotten, timeout_s=5)
        d = await generate_error(f, request(model="old"))
        assert d.code == grpc.StatusCode.NOT_FOUND


async def test_cancelling_at_the_router_aborts_in_the_engine(fleet):
    """A caller that goes away mid-stream cancels the engine call: the engine counts an abort and idles."""
    before = await fleet.aborted_total()
    call = fleet.router_stub().Generate(
        request(max_tokens=5000, ignore_eos=True, request_id="cancel-1"), timeout=30
    )
    got = 0
    async for resp in call:
        got += len(resp.chunk.token_ids)
        if got >= 3:
            break
    call.cancel()
    await assert_eventually(lambda: _aborted_and_idle(fleet, before + 1), timeout_s=10)


@pytest.mark.asyncio(loop_scope="function")
async def test_initial_metadata_reaches_the_caller_before_the_engines_first_token(tmp_path):
    """The router sends its initial metadata once the engine call is on its way, not with the first chunk: a
    caller has it while the engine has not started the request (its one slot is busy with a long one)."""
    async with in_process_fleet(tmp_path, engines=0) as f:
        f.engines["one-slot"] = await engine_app.start(
            engine_config.EngineSettings(
                registry_address=f.registry.address,
                replica_id="one-slot",
                model=MODEL,
                backend="sim",
                speed_factor=1.0,
                startup_s=0.0,
                max_num_seqs=1,
            ),
            f.telemetry,
        )
        await assert_eventually(lambda: len(f.router.membership.routable(MODEL)) == 1, timeout_s=10)
        stub = f.router_stub()
        busy = stub.Generate(request(max_tokens=5000, ignore_eos=True, request_id="busy"), timeout=60)
        await busy.read()  # the slot is taken: 5000 tokens take seconds at speed factor 1
        call = stub.Generate(request(max_tokens=4, request_id="early-md"), timeout=60)
        metadata = await asyncio.wait_for(call.initial_metadata(), 3.0)
        assert not call.done()
        assert not any(k.startswith("x-fleetserve-") for k, _ in metadata)  # no version: nothing of ours
        call.cancel()
        busy.cancel()


@pytest.mark.asyncio(loop_scope="function")
async def test_a_versioned_request_names_its_version_also_when_refused_before_an_engine_call(tmp_path):
    """A request pinned to a version gets the version in the router's initial metadata when its attempts fail
    and, once the version's only replica is out of rotation, when it is refused before any engine call."""
    async with in_process_fleet(tmp_path, engines=0, max_attempts=1, unroutable_cooldown_s=30.0) as f:
        await f.register_dead_replica("dead-v7", model_version="v7")
        for i in range(2):  # the first reaches the dead replica; the second finds no routable one
            req = request(request_id=f"pinned-{i}")
            req.spec.model_version = "v7"
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await generate(f, req)
            assert dict(exc.value.initial_metadata() or ()).get("x-fleetserve-model-version") == "v7", i
        (span,) = router_spans(f, "pinned-1")
        assert span.attributes["fleetserve.attempts"] == 0


async def _aborted_and_idle(fleet: Fleet, at_least: int) -> bool:
    return await fleet.aborted_total() >= at_least and await fleet.busy_total() == 0


async def test_deadline_is_passed_to_the_engine(fleet):
    """A caller's deadline shorter than the generation ends it with DEADLINE_EXCEEDED and frees the engine."""
    before = await fleet.aborted_total()
    d = await generate_error(fleet, request(max_tokens=5000, ignore_eos=True), rpc_timeout_s=0.3)
    assert d.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_eventually(lambda: _aborted_and_idle(fleet, before + 1), timeout_s=10)


@pytest.mark.asyncio(loop_scope="function")
async def test_callers_deadline_is_not_counted_against_the_replica(tmp_path):
    """Streams cut by the caller's deadline (over 1 s, where grpc-timeout rounds to 10 ms) end with
    DEADLINE_EXCEEDED, are not retried, and leave every breaker without a counted failure."""
    async with in_process_fleet(tmp_path, engines=0) as f:
        for name in ("real-time-1", "real-time-2"):
            await add_engine(f, name, speed=1.0)  # 3000 tokens take seconds
        reqs = [request(max_tokens=3000, ignore_eos=True, request_id=f"dl-{i}") for i in range(2)]
        for d in await asyncio.gather(*(generate_error(f, r, rpc_timeout_s=1.5) for r in reqs)):
            assert d.code == grpc.StatusCode.DEADLINE_EXCEEDED
        for i in range(2):
            # The client's own deadline ends its call; the router's handler may finish a moment later.
            (span,) = await assert_eventually(lambda i=i: router_spans(f, f"dl-{i}"), timeout_s=5)
            assert span.attributes["fleetserve.attempts"] == 1
        status = await f.router_stub().GetStatus(router_pb.GetStatusRequest(), timeout=2)
        assert len(status.replicas) == 2
        assert all(r.consecutive_failures == 0 and r.routable for r in status.replicas)


@pytest.mark.asyncio(loop_scope="function")
async def test_draining_replica_gets_no_new_requests(tmp_path):
    """Once the registry marks a replica DRAINING, new requests all go to the others."""
    async with in_process_fleet(tmp_path) as f:
        await f.registry_stub().DeregisterReplica(
            reg_pb.DeregisterReplicaRequest(replica_id="engine-1", drain=True), timeout=2
        )
        await assert_eventually(
            lambda: [r.replica_id for r in f.router.membership.routable(MODEL)] == ["engine-2"]
        )
        for i in range(6):
            chunks = await generate(f, request(max_tokens=2, request_id=f"drain-{i}"))
            assert chunks[0].served_by.replica_id == "engine-2"


@pytest.mark.asyncio(loop_scope="function")
async def test_keeps_routing_while_the_registry_is_down_and_reconnects(tmp_path):
    """With the registry gone the router keeps its last membership and still serves; when a registry is
    back on the same address the watch reconnects."""
    async with in_process_fleet(tmp_path) as f:
        port = int(f.registry.address.rsplit(":", 1)[1])
        await f.registry.stop(0)
        await assert_eventually(lambda: not f.router.membership.connected, timeout_s=5)
        chunks = await generate(f, request(max_tokens=3, request_id="no-registry"))
        assert chunks[-1].usage.completion_tokens == 3
        f.registry = await start_test_registry(tmp_path, f.telemetry, port)
        await assert_eventually(lambda: f.router.membership.connected, timeout_s=5)
        assert {r.replica_id for r in f.router.membership.routable(MODEL)} == {"engine-1", "engine-2"}


# -- resilience: mid-stream resume, circuit breakers, retry budget ------------------------------------


def collect_ids(chunks: list[common_pb2.GenerateChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


async def crash(fleet: Fleet, name: str) -> None:
    """Stop an engine's gRPC server at once, cancelling its streams, without leaving the registry (a crash as
    the router sees it: the registry still lists the replica until its lease runs out)."""
    await fleet.engines[name].running.server.stop(0)


@pytest.mark.asyncio(loop_scope="function")
async def test_replica_dying_mid_stream_is_resumed_elsewhere_without_losing_or_repeating_tokens(tmp_path):
    """A seeded stream whose replica dies after some tokens continues on another replica: the client sees one
    stream whose token ids equal an uninterrupted run's, served_by once, and the full usage."""
    async with in_process_fleet(tmp_path, engines=3) as f:
        req = request(max_tokens=3000, ignore_eos=True, request_id="resume-1", seed=7, temperature=0.8)
        call = f.router_stub().Generate(req, timeout=30)
        chunks: list[common_pb2.GenerateChunk] = []
        victim = ""
        async for resp in call:
            chunks.append(resp.chunk)
            if not victim and sum(len(c.token_ids) for c in chunks) >= 20:
                victim = chunks[0].served_by.replica_id
                await crash(f, victim)
        ids = collect_ids(chunks)
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 3000 == len(ids)
        assert [c.served_by.replica_id for c in chunks if c.HasField("served_by")] == [victim]
        (span,) = router_spans(f, "resume-1")
        assert span.attributes["fleetserve.attempts"] == 2
        assert span.attributes["fleetserve.replica_id"] != victim
        # The same request again, uninterrupted, on a healthy replica: the very same tokens.
        again = request(max_tokens=3000, ignore_eos=True, request_id="ref-1", seed=7, temperature=0.8)
        reference = await generate(f, again)
        assert reference[0].served_by.replica_id != victim
        assert ids == collect_ids(reference)
        assert chunks[-1].usage.prompt_tokens == reference[-1].usage.prompt_tokens


@pytest.mark.asyncio(loop_scope="function")
async def test_a_lagging_caller_gets_merged_chunks_and_a_resume_after_them_loses_nothing(tmp_path):
    """A caller that reads slowly gets the chunks that waited for it merged into fewer messages (coalescing);
    when the replica dies mid-stream the generation resumes after exactly the tokens relayed: the ids equal an
    uninterrupted run's, the text is the ids' text, served_by comes once."""
    async with in_process_fleet(tmp_path, engines=3) as f:
        req = request(max_tokens=3000, ignore_eos=True, request_id="lag-1", seed=11, temperature=0.8)
        call = f.router_stub().Generate(req, timeout=60)
        chunks: list[common_pb2.GenerateChunk] = []
        victim = ""
        async for resp in call:
            chunks.append(resp.chunk)
            if not victim:
                await asyncio.sleep(0.02)  # a slow reader: chunks pile up in the router meanwhile
                if sum(len(c.token_ids) for c in chunks) >= 20:
                    victim = chunks[0].served_by.replica_id
                    await crash(f, victim)  # mid-stream: 3000 tokens take the sim engine over a second
        ids = collect_ids(chunks)
        assert chunks[-1].usage.completion_tokens == 3000 == len(ids)
        assert len(chunks) < len(ids)  # merged: fewer messages than tokens
        assert [c.served_by.replica_id for c in chunks if c.HasField("served_by")] == [victim]
        (span,) = router_spans(f, "lag-1")
        assert span.attributes["fleetserve.attempts"] == 2
        again = request(max_tokens=3000, ignore_eos=True, request_id="lag-ref", seed=11, temperature=0.8)
        reference = await generate(f, again)
        assert ids == collect_ids(reference)
        assert "".join(c.text for c in chunks) == "".join(c.text for c in reference)


@pytest.mark.asyncio(loop_scope="function")
async def test_stream_the_engine_aborts_is_resumed_elsewhere(tmp_path):
    """An engine that ends a stream with FINISH_REASON_ABORT the router did not ask for (here through the
    engine's Abort RPC) does not end the client's stream: it resumes on another replica, tokens intact."""
    async with in_process_fleet(tmp_path, engines=2) as f:
        req = request(max_tokens=3000, ignore_eos=True, request_id="abort-1", seed=11)
        chunks: list[common_pb2.GenerateChunk] = []
        async for resp in f.router_stub().Generate(req, timeout=30):
            chunks.append(resp.chunk)
            if len(chunks) == 3:
                stub = engine_grpc.EngineServiceStub(f.channel(f.engines[_serving_replica(f)].address))
                assert (await stub.Abort(engine_pb.AbortRequest(request_id="abort-1"), timeout=2)).aborted
        assert all(c.finish_reason != common_pb2.FINISH_REASON_ABORT for c in chunks)
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 3000
        (span,) = router_spans(f, "abort-1")
        assert span.attributes["fleetserve.attempts"] == 2
        reference = await generate(
            f, request(max_tokens=3000, ignore_eos=True, request_id="abort-ref", seed=11)
        )
        assert collect_ids(chunks) == collect_ids(reference)


@pytest.mark.asyncio(loop_scope="function")
async def test_unseeded_sampled_stream_is_not_resumed_by_default(tmp_path):
    """With resume=reproducible, a sampled generation without a seed whose replica dies mid-stream ends with
    the replica's error (resuming it would not continue the same sample)."""
    async with in_process_fleet(tmp_path, engines=2) as f:
        req = request(max_tokens=3000, ignore_eos=True, request_id="noresume-1", temperature=0.8)
        got = 0
        crashed = False
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for resp in f.router_stub().Generate(req, timeout=30):
                got += len(resp.chunk.token_ids)
                if got >= 20 and not crashed:
                    crashed = True
                    await crash(f, _serving_replica(f))
        assert exc.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert 20 <= got < 3000


def _serving_replica(f: Fleet) -> str:
    (rid,) = [rid for rid, n in f.router.servicer.in_flight.items() if n > 0]
    return rid


async def status_of(f: Fleet, replica_id: str) -> router_pb.ReplicaStatus:
    status = await f.router_stub().GetStatus(router_pb.GetStatusRequest(), timeout=2)
    return next(r for r in status.replicas if r.replica_id == replica_id)


async def add_engine(f: Fleet, name: str, model: str = MODEL, speed: float = 20.0, port: int = 0) -> None:
    """Start one more sim engine in the fleet (a slow one with a small speed factor)."""
    f.engines[name] = await engine_app.start(
        engine_config.EngineSettings(
            registry_address=f.registry.address,
            replica_id=name,
            model=model,
            backend="sim",
            speed_factor=speed,
            port=port,
        ),
        f.telemetry,
    )
    await assert_eventually(lambda: f.router.membership.get(name) is not None, timeout_s=5)


@pytest.mark.asyncio(loop_scope="function")
async def test_breaker_opens_on_unavailable_replica_and_a_half_open_probe_closes_it(tmp_path):
    """A replica that answers UNAVAILABLE opens its breaker after the threshold (visible in GetStatus) and the
    next request fails fast; once a working engine is back at its address, the first request after the open
    period is the half-open probe, and its success closes the breaker."""
    async with in_process_fleet(
        tmp_path, engines=1, breaker_failure_threshold=2, breaker_open_s=0.5, unroutable_cooldown_s=0.0
    ) as f:
        address = await f.register_dead_replica("flaky-1", model="flaky")
        for i in range(2):
            d = await generate_error(f, request(model="flaky", request_id=f"flaky-{i}"))
            assert d.code == grpc.StatusCode.UNAVAILABLE and d.reason == "NO_HEALTHY_REPLICA"
        st = await status_of(f, "flaky-1")
        assert st.breaker_state == router_pb.BREAKER_STATE_OPEN and not st.routable
        assert st.breaker_opened_total == 1 and 0 < st.breaker_open_seconds_left <= 0.5
        d = await generate_error(f, request(model="flaky", request_id="flaky-fast"))
        assert "open circuit breaker" in d.message and 0 < d.retry_after_s <= 0.5
        assert all(s.attributes["fleetserve.attempts"] == 0 for s in router_spans(f, "flaky-fast"))
        # A working engine comes back at the same address under the same id.
        await add_engine(f, "flaky-1", model="flaky", port=int(address.rsplit(":", 1)[1]))

        async def served() -> bool:
            try:
                chunks = await generate(f, request(model="flaky", max_tokens=2, request_id="flaky-probe"))
            except grpc.aio.AioRpcError:
                return False
            return chunks[-1].usage.completion_tokens == 2

        await assert_eventually(served, timeout_s=5, interval_s=0.1)
        st = await status_of(f, "flaky-1")
        assert st.breaker_state == router_pb.BREAKER_STATE_CLOSED and st.routable
        assert st.breaker_opened_total == 1 and st.consecutive_failures == 0


@pytest.mark.asyncio(loop_scope="function")
async def test_retry_budget_stops_retries_when_a_pool_keeps_failing(tmp_path):
    """With every replica of a model failing, retries stop once the model's retry budget is half spent: the
    caller gets UNAVAILABLE RETRY_BUDGET_EXHAUSTED after a single attempt, and other models still work."""
    async with in_process_fleet(
        tmp_path,
        engines=1,
        retry_budget_max_tokens=4,
        breaker_failure_threshold=100,
        unroutable_cooldown_s=0.0,
        max_attempts=5,
    ) as f:
        for i in range(3):
            await f.register_dead_replica(f"doomed-{i}", model="doomed")
        slept: list[float] = []

        async def recording_sleep(s: float) -> None:
            slept.append(s)

        f.router.servicer.sleep = recording_sleep  # injected backoff: the test does not wait
        first = await generate_error(f, request(model="doomed", request_id="doomed-1"))
        # One retry, after a full-jitter backoff within [0, base] (base 0.01 s for the first retry).
        assert len(slept) == 1 and 0 <= slept[0] <= 0.01
        # 4 tokens: the first failure leaves 3 (> 2, retry), the second leaves 2: no more retries.
        assert first.reason == "RETRY_BUDGET_EXHAUSTED" and first.retry_after_s
        (span,) = router_spans(f, "doomed-1")
        assert span.attributes["fleetserve.attempts"] == 2
        second = await generate_error(f, request(model="doomed", request_id="doomed-2"))
        assert second.reason == "RETRY_BUDGET_EXHAUSTED"
        (span,) = router_spans(f, "doomed-2")
        assert span.attributes["fleetserve.attempts"] == 1
        status = await f.router_stub().GetStatus(router_pb.GetStatusRequest(), timeout=2)
        (budget,) = [b for b in status.retry_budgets if b.model == "doomed"]
        assert budget.tokens == 1 and budget.max_tokens == 4 and budget.throttled_total == 2
        chunks = await generate(f, request(max_tokens=3, request_id="healthy-1"))
        assert chunks[-1].usage.completion_tokens == 3


# -- admission: priority tiers and fair share ----------------------------------------------------------


def tiered(request_id: str, priority: int, tenant: str, max_tokens: int = 3) -> router_pb.GenerateRequest:
    req = request(max_tokens=max_tokens, ignore_eos=True, request_id=request_id)
    req.routing.priority = priority
    req.routing.tenant_id = tenant
    return req


async def queued(f: Fleet) -> int:
    status = await f.router_stub().GetStatus(router_pb.GetStatusRequest(), timeout=2)
    return sum(q.interactive + q.standard + q.batch for q in status.queues if q.model == MODEL)


async def served_order(f: Fleet, entries: list[tuple[str, int, str]]) -> list[str]:
    """Hold the only slot with a long stream, queue entries (name, priority, tenant) one by one in this order,
    then free the slot: the order in which they completed (one at a time, so the order they were admitted)."""
    blocker = f.router_stub().Generate(tiered("blocker", common_pb2.PRIORITY_STANDARD, "x", 5000), timeout=30)
    await blocker.read()  # streaming: the slot is taken
    order: list[str] = []

    async def one(name: str, priority: int, tenant: str) -> None:
        chunks = await generate(f, tiered(name, priority, tenant))
        assert chunks[-1].usage.completion_tokens == 3
        order.append(name)

    tasks = []
    for n, entry in enumerate(entries, start=1):
        tasks.append(asyncio.create_task(one(*entry)))
        await assert_eventually(lambda n=n: _queued_is(f, n), timeout_s=5)
    blocker.cancel()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    return order


async def _queued_is(f: Fleet, n: int) -> bool:
    return await queued(f) == n


@pytest.mark.asyncio(loop_scope="function")
async def test_interactive_requests_overtake_queued_batch_ones(tmp_path):
    """With the replica at its in-flight cap, queued requests are admitted interactive first, then standard,
    then batch, whatever order they arrived in; GetStatus counts them per tier while they wait."""
    async with in_process_fleet(tmp_path, engines=1, max_in_flight_per_replica=1) as f:
        b, s, i = common_pb2.PRIORITY_BATCH, common_pb2.PRIORITY_STANDARD, common_pb2.PRIORITY_INTERACTIVE
        order = await served_order(f, [("b1", b, "t"), ("b2", b, "t"), ("s1", s, "t"), ("i1", i, "t")])
        assert order == ["i1", "s1", "b1", "b2"]


@pytest.mark.asyncio(loop_scope="function")
async def test_one_tenants_burst_does_not_starve_another_tenant(tmp_path):
    """Six requests of tenant A queued before two of tenant B: B's are admitted 2nd and 4th (fair share), not
    after all of A's."""
    async with in_process_fleet(tmp_path, engines=1, max_in_flight_per_replica=1) as f:
        s = common_pb2.PRIORITY_STANDARD
        entries = [(f"a{k}", s, "A") for k in range(6)] + [("b0", s, "B"), ("b1", s, "B")]
        order = await served_order(f, entries)
        assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


@pytest.mark.asyncio(loop_scope="function")
async def test_full_admission_queue_is_resource_exhausted_with_retry_info(tmp_path):
    """Beyond queue_max_waiting, a request is refused at once: RESOURCE_EXHAUSTED ROUTER_QUEUE_FULL with a
    retry delay."""
    async with in_process_fleet(
        tmp_path, engines=1, max_in_flight_per_replica=1, queue_max_waiting=1, queue_retry_after_s=0.25
    ) as f:
        blocker = f.router_stub().Generate(
            tiered("blocker", common_pb2.PRIORITY_BATCH, "x", 5000), timeout=30
        )
        await blocker.read()
        waiting = asyncio.create_task(generate(f, tiered("w1", common_pb2.PRIORITY_BATCH, "x")))
        await assert_eventually(lambda: _queued_is(f, 1), timeout_s=5)
        d = await generate_error(f, tiered("w2", common_pb2.PRIORITY_BATCH, "y"))
        assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED and d.reason == "ROUTER_QUEUE_FULL"
        assert d.retry_after_s == 0.25
        blocker.cancel()
        chunks = await asyncio.wait_for(waiting, 10)
        assert chunks[-1].usage.completion_tokens == 3


# -- hedging and outlier ejection ------------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="function")
async def test_hedged_request_is_served_by_the_faster_replica(tmp_path):
    """With hedging on, a request whose replica has sent nothing after the hedge delay also goes to another
    replica: the faster one serves it and the slow one's attempt is cancelled (aborted in the engine)."""
    async with in_process_fleet(tmp_path, engines=1, hedge_delay_s=0.05) as f:
        await add_engine(f, "slow-1", speed=0.005)
        slow_stub = engine_grpc.EngineServiceStub(f.channel(f.engines["slow-1"].address))

        async def slow_aborted() -> int:
            return (await slow_stub.GetLoad(engine_pb.GetLoadRequest(), timeout=2)).requests_aborted

        for i in range(30):  # the policy picks the slow replica first about every other time
            chunks = await generate(f, request(max_tokens=2, request_id=f"hedge-{i}"))
            assert chunks[0].served_by.replica_id == "engine-1"
            assert chunks[-1].usage.completion_tokens == 2
            if await slow_aborted() >= 2:
                break
        else:
            pytest.fail("the slow replica was never tried first in 30 requests")
        assert not f.router.servicer.in_flight


@pytest.mark.asyncio(loop_scope="function")
async def test_caller_leaving_during_a_hedge_race_aborts_both_attempts_and_releases_both_replicas(tmp_path):
    """A caller that goes away while the first attempt and its hedge both wait for a first token: both engine
    calls are aborted, neither replica stays counted in flight, and neither breaker is left holding a probe."""
    async with in_process_fleet(tmp_path, engines=0, hedge_delay_s=0.05) as f:
        await add_engine(f, "slow-1", speed=0.002)
        await add_engine(f, "slow-2", speed=0.002)
        call = f.router_stub().Generate(request(max_tokens=4, request_id="hedge-leaves"), timeout=30)
        reading = asyncio.ensure_future(call.read())
        await assert_eventually(lambda: sum(f.router.servicer.in_flight.values()) == 2, timeout_s=30)
        # Both engines hold the request (an attempt cancelled before its engine admitted it aborts nothing there).
        await assert_eventually(lambda: _busy_is(f, 2), timeout_s=30)
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reading
        await assert_eventually(lambda: not f.router.servicer.in_flight, timeout_s=30)
        await assert_eventually(lambda: _aborted_is(f, 2), timeout_s=30)
        for name in ("slow-1", "slow-2"):
            st = await status_of(f, name)
            assert st.breaker_state == router_pb.BREAKER_STATE_CLOSED and st.routable and st.in_flight == 0


async def _aborted_is(f: Fleet, n: int) -> bool:
    return await f.aborted_total() == n


async def _busy_is(f: Fleet, n: int) -> bool:
    return await f.busy_total() == n


@pytest.mark.asyncio(loop_scope="function")
async def test_replica_with_far_worse_ttft_is_ejected_for_a_while(tmp_path):
    """Outlier detection ejects a replica whose TTFT is far above its peers': GetStatus shows it ejected (reason
    ttft, not routable) and no request goes there while it is out."""
    async with in_process_fleet(
        tmp_path, engines=3, outlier_detection=True, outlier_min_samples=3, outlier_eject_s=30
    ) as f:
        await add_engine(f, "slow-1", speed=0.02)

        async def ejected() -> bool:
            await generate(f, request(max_tokens=1, request_id="warm"))
            return (await status_of(f, "slow-1")).ejected

        await assert_eventually(ejected, timeout_s=30, interval_s=0)
        st = await status_of(f, "slow-1")
        assert st.ejection_reason == "ttft" and not st.routable and 0 < st.ejected_seconds_left <= 30
        assert st.ttft_ewma_ms > 3 * (await status_of(f, "engine-1")).ttft_ewma_ms
        for i in range(10):
            chunks = await generate(f, request(max_tokens=1, request_id=f"after-{i}"))
            assert chunks[0].served_by.replica_id != "slow-1"


@pytest.mark.asyncio(loop_scope="function")
async def test_a_slow_unary_call_in_flight_when_gateway_and_router_drain_is_answered_not_cancelled(tmp_path):
    """A call with one response in our code when gateway and router start draining (ListModels, waiting for the
    router's first registry snapshot) is answered OK when the snapshot comes, seconds later: counted busy, it is
    not cancelled with what gRPC still holds LEFTOVER_S after the drains found no stream in flight."""
    telemetry, _ = recording_telemetry()
    # A registry's address with nothing serving it yet: the router waits for its first snapshot.
    registry = await start_test_registry(tmp_path, telemetry)
    port = int(registry.address.rsplit(":", 1)[1])
    await registry.stop(0)
    started: list[object] = []
    stops: list[asyncio.Task] = []
    try:
        router = await start_router(
            RouterSettings(
                registry_address=registry.address,
                register_in_registry=False,
                ready_wait_s=30.0,
                watch_backoff_base_s=0.05,
                watch_backoff_max_s=0.2,
            ),
            telemetry,
        )
        started.append(router)
        gateway = await start_test_gateway(tmp_path, router.address, telemetry, list_models_timeout_s=30.0)
        started.append(gateway)
        async with grpc.aio.insecure_channel(gateway.address) as ch:
            call = gw_grpc.InferenceServiceStub(ch).ListModels(
                gw_pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=30
            )
            drains = (gateway.servicer.pipeline.drain, router.servicer.drain)
            for _ in range(100):  # bounded (2 s): until the call is in both services' code
                if all(d.busy for d in drains):
                    break
                await asyncio.sleep(0.02)
            stops = [asyncio.create_task(app.stop(20.0)) for app in (gateway, router)]
            started.clear()  # they stop through these drains
            await asyncio.sleep(LEFTOVER_S + 1.0)  # what must not happen meanwhile: the call cancelled
            assert not call.done(), f"cancelled by the drain: {await call.code()} {await call.details()}"
            started.append(await start_test_registry(tmp_path, telemetry, port))
            resp = await asyncio.wait_for(call, 10)
            assert await call.code() == grpc.StatusCode.OK and isinstance(resp, gw_pb.ListModelsResponse)
            # The drains end with the call, not at the 20 s grace.
            await asyncio.wait_for(asyncio.gather(*stops), 10)
    finally:
        for task in stops:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 25)
        for app in reversed(started):
            await app.stop(0.5)
        telemetry.shutdown()
