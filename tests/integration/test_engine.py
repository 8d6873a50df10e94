"""The engine over a real gRPC server on port 0: streaming, cancellation, deadlines, bad input, Abort, graceful
stop, tracing, and registration with the real registry (register, heartbeat load, re-register, drain)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import grpc
import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.engine.app import EngineApp, start
from services.engine.config import EngineSettings
from services.engine.profile import load_profile
from shared import tokenizer
from shared.errors import details_of
from shared.prefix_hash import block_hashes
from shared.telemetry import Telemetry
from tests.support import assert_eventually

MODEL = "sim-1b"
LONG = 100_000  # tokens: a generation that outlives any test (and fits the KV cache)


class Recorded:
    """Telemetry whose spans and metrics tests can read back."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.metrics = InMemoryMetricReader()
        tp = TracerProvider()
        tp.add_span_processor(SimpleSpanProcessor(self.spans))
        mp = MeterProvider(metric_readers=[self.metrics])
        self.telemetry = Telemetry(tp.get_tracer("test"), mp.get_meter("test"), tp, mp)

    def counter_total(self, name: str) -> int:
        data = self.metrics.get_metrics_data()
        return sum(
            p.value
            for rm in data.resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == name
            for p in m.data.data_points
        )


@contextlib.asynccontextmanager
async def engine(
    rec: Recorded | None = None, **overrides
) -> AsyncIterator[tuple[EngineApp, engine_grpc.EngineServiceStub]]:
    """A started engine (fast sim, no registry unless given) and a stub on a real channel; both closed after."""
    rec = rec or Recorded()
    # A context long enough for LONG generations (the profile's 4,096 would end them early).
    settings = {
        "replica_id": "engine-test",
        "model": MODEL,
        "speed_factor": 50.0,
        "max_model_len": 2 * LONG,
        **overrides,
    }
    app = await start(EngineSettings(**settings), rec.telemetry)
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield app, engine_grpc.EngineServiceStub(channel)
    finally:
        await channel.close()
        await app.stop(0)


def request(
    prompt: str = "hello engine", max_tokens: int = 16, request_id: str = "req-1", **kw
) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        spec=common_pb2.GenerationSpec(
            model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens)
        ),
        tenant_id="t1",
        cache_salt="t1",
        **kw,
    )


async def idle_with_aborted(stub, n: int) -> bool:
    resp = await stub.GetLoad(pb.GetLoadRequest(), timeout=2)
    return resp.requests_aborted == n and resp.load.running == 0 and resp.load.waiting == 0


async def test_streams_served_by_first_and_usage_last():
    """Generate streams chunks: served_by on the first, finish reason and usage on the last; the tokens add up
    to max_tokens; GetLoad counts the finished request and its tokens."""
    rec = Recorded()
    async with engine(rec) as (app, stub):
        chunks = [r.chunk async for r in stub.Generate(request(max_tokens=24), timeout=10)]
        assert chunks[0].served_by.model == MODEL and chunks[0].served_by.replica_id == "engine-test"
        assert not chunks[1].HasField("served_by")
        last = chunks[-1]
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.cached_tokens) == (
            3,
            24,
            0,
        )
        assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])
        assert sum(len(c.token_ids) for c in chunks) == 24 and "".join(c.text for c in chunks).strip()
        load = await stub.GetLoad(pb.GetLoadRequest(), timeout=2)
        assert (load.requests_finished, load.requests_aborted, load.output_tokens) == (1, 0, 24)
    assert rec.counter_total("fleetserve.engine.output_tokens") == 24


async def test_the_last_chunk_carries_the_refusal_check_of_a_whole_output_only():
    """The last chunk of a streamed generation says whether the output opens like a refusal (true for a version
    planted to refuse, false otherwise) and no other chunk does; a resumed attempt (its engine never saw the
    opening) and a summarized stream leave it unset."""
    async with engine(sim_behaviour="*:refusal_rate=1") as (app, stub):
        refused = [r.chunk async for r in stub.Generate(request(request_id="r0"), timeout=10)]
    assert "".join(c.text for c in refused).lstrip().startswith("I'm sorry")
    assert refused[-1].HasField("output_refusal") and refused[-1].output_refusal is True
    assert not any(c.HasField("output_refusal") for c in refused[:-1])
    async with engine() as (app, stub):
        plain = [r.chunk async for r in stub.Generate(request(request_id="p0"), timeout=10)]
        resumed_req = request(request_id="p1")
        resumed_req.spec.resume_token_ids.extend(plain[0].token_ids)
        resumed = [r.chunk async for r in stub.Generate(resumed_req, timeout=10)]
        summarized = [r async for r in stub.Generate(request(request_id="p2", summarize=True), timeout=10)]
    assert plain[-1].HasField("output_refusal") and plain[-1].output_refusal is False
    assert not any(c.HasField("output_refusal") for c in plain[:-1])
    assert resumed[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert not any(c.HasField("output_refusal") for c in resumed)
    assert summarized[-1].chunk.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert not any(m.chunk.HasField("output_refusal") for m in summarized)


async def test_a_summarized_stream_is_the_first_chunk_then_one_message_with_the_rest():
    """summarize (the router's shadow copies): the first chunk as streamed, then with no progress interval one
    last message with the rest of the text, the usage and the engine's token times; with one, empty progress
    messages between. The text and usage equal the streamed answer's."""
    async with engine(speed_factor=10.0) as (app, stub):  # 200 tokens in about 0.3 s: progress is due
        streamed = [
            r.chunk async for r in stub.Generate(request(max_tokens=200, request_id="s0"), timeout=10)
        ]
        whole = [
            r
            async for r in stub.Generate(request(max_tokens=200, request_id="s1", summarize=True), timeout=10)
        ]
        ticked = [
            r
            async for r in stub.Generate(
                request(max_tokens=200, request_id="s2", summarize=True, summary_progress_ms=1), timeout=10
            )
        ]  # fmt: skip
    assert sum(len(c.token_ids) for c in streamed) == 200 and len(streamed) > 2
    assert len(whole) == 2
    first, last = whole
    assert first.chunk.served_by.replica_id == "engine-test" and first.chunk.text == streamed[0].text
    assert first.chunk.token_ids == streamed[0].token_ids and not first.HasField("summary")
    assert first.chunk.text + last.chunk.text == "".join(c.text for c in streamed)
    assert last.chunk.usage == streamed[-1].usage and last.chunk.finish_reason == streamed[-1].finish_reason
    assert not last.chunk.token_ids  # a summary carries text, not ids
    assert 0 < last.summary.first_token_ms < last.summary.last_token_ms and 2 <= last.summary.outputs <= 200
    progress = ticked[1:-1]
    assert 1 <= len(progress) < 200 and all(m == pb.GenerateResponse() for m in progress)
    assert ticked[0].chunk.text + ticked[-1].chunk.text == first.chunk.text + last.chunk.text


async def test_token_times_put_the_engines_clock_on_a_streamed_answers_last_chunk_only():
    """token_times (the router asks for a live request with a shadow copy): the streamed answer is unchanged but
    for its last chunk's summary, the engine's first- and last-token times (as a summarized stream's); no summary
    unasked, nor on a resumed attempt (it timed only the continuation)."""
    async with engine() as (app, stub):
        plain = [r async for r in stub.Generate(request(max_tokens=20, request_id="t0"), timeout=10)]
        timed = [
            r
            async for r in stub.Generate(
                request(max_tokens=20, request_id="t1", token_times=True), timeout=10
            )
        ]
        resumed_req = request(max_tokens=20, request_id="t2", token_times=True)
        resumed_req.spec.resume_token_ids.extend(plain[0].chunk.token_ids)
        resumed = [r async for r in stub.Generate(resumed_req, timeout=10)]
    assert [t for m in timed for t in m.chunk.token_ids] == [t for m in plain for t in m.chunk.token_ids]
    assert timed[-1].chunk.usage == plain[-1].chunk.usage
    assert not any(m.HasField("summary") for m in plain + timed[:-1] + resumed)
    s = timed[-1].summary
    assert 0 < s.first_token_ms < s.last_token_ms < 10_000 and s.outputs == 0


async def test_span_is_a_child_of_the_callers_context_with_request_attributes():
    """engine.Generate joins the caller's trace (traceparent) and records request, replica, model, tokens and
    finish reason."""
    rec = Recorded()
    trace_id, parent = os.urandom(16).hex(), os.urandom(8).hex()
    async with engine(rec) as (_, stub):
        call = stub.Generate(
            request(max_tokens=5, request_id="traced"),
            metadata=(("traceparent", f"00-{trace_id}-{parent}-01"),),
            timeout=10,
        )
        _ = [r async for r in call]
    (span,) = [s for s in rec.spans.get_finished_spans() if s.name == "engine.Generate"]
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == parent
    a = span.attributes
    assert a["fleetserve.request_id"] == "traced" and a["fleetserve.replica_id"] == "engine-test"
    assert a["fleetserve.model"] == MODEL and a["fleetserve.output_tokens"] == 5
    assert a["fleetserve.finish_reason"] == "FINISH_REASON_LENGTH"
    assert 0 < a["fleetserve.deadline_left_ms"] <= 10_000


async def test_client_cancel_aborts_in_the_engine():
    """A caller that cancels mid-stream aborts the request: requests_aborted goes up and nothing runs."""
    async with engine() as (_, stub):
        call = stub.Generate(request(max_tokens=LONG), timeout=30)
        got = 0
        async for resp in call:
            got += len(resp.chunk.token_ids)
            if got >= 3:
                break
        call.cancel()
        await assert_eventually(lambda: idle_with_aborted(stub, 1), timeout_s=5)


async def test_initial_metadata_reaches_the_caller_once_admitted_before_the_first_token():
    """The engine sends its initial metadata once it admitted a request, not with the first chunk: a caller has
    it while the request waits for the one slot (busy with a long generation); cancelled there, it is aborted."""
    async with engine(speed_factor=1.0, max_num_seqs=1) as (_, stub):
        busy = stub.Generate(request(max_tokens=LONG, request_id="busy"), timeout=30)
        await busy.read()  # the slot is taken: LONG tokens take minutes at speed factor 1
        call = stub.Generate(request(max_tokens=4, request_id="early-md"), timeout=30)
        await asyncio.wait_for(call.initial_metadata(), 3.0)
        assert not call.done()
        load = await stub.GetLoad(pb.GetLoadRequest(), timeout=2)
        assert (load.load.running, load.load.waiting) == (1, 1)  # no token of it yet: it still waits
        call.cancel()
        busy.cancel()
        await assert_eventually(lambda: idle_with_aborted(stub, 2), timeout_s=5)


async def test_short_deadline_is_deadline_exceeded_and_the_engine_aborts():
    """A deadline shorter than the generation ends it with DEADLINE_EXCEEDED and frees the engine."""
    async with engine() as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in stub.Generate(request(max_tokens=LONG), timeout=0.3):
                pass
        assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await assert_eventually(lambda: idle_with_aborted(stub, 1), timeout_s=5)


async def generate_error(stub, req: pb.GenerateRequest):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stub.Generate(req, timeout=5):
            pass
    return details_of(exc.value)


async def test_bad_input_is_invalid_argument_with_field_violations():
    """A request without prompt or messages, or with an empty stop string, is INVALID_ARGUMENT naming the
    fields; a request for another model is NOT_FOUND."""
    async with engine() as (_, stub):
        d = await generate_error(stub, request(prompt=""))
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT and d.reason == "INVALID_ARGUMENT"
        assert [f for f, _ in d.field_violations] == ["spec.prompt"]
        bad = request()
        bad.spec.sampling.stop.append("")
        bad.spec.sampling.top_p = 1.5
        d = await generate_error(stub, bad)
        assert {f for f, _ in d.field_violations} == {"spec.sampling.stop[0]", "spec.sampling.top_p"}
        other = request()
        other.spec.model = "other-model"
        d = await generate_error(stub, other)
        assert d.code == grpc.StatusCode.NOT_FOUND and d.reason == "MODEL_NOT_FOUND"
        load = await stub.GetLoad(pb.GetLoadRequest(), timeout=2)
        assert load.load.running == load.load.waiting == load.requests_aborted == 0


async def test_chat_messages_are_accepted():
    """A chat request (messages instead of a prompt) streams like a prompt request."""
    async with engine() as (_, stub):
        req = request(prompt="", max_tokens=4)
        req.spec.messages.add(role="user", content="hi there")
        chunks = [r.chunk async for r in stub.Generate(req, timeout=10)]
        assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].usage.prompt_tokens > 4


async def test_abort_rpc_ends_the_stream_with_abort():
    """Abort(request_id) ends that request's stream with FINISH_REASON_ABORT; a second Abort finds nothing."""
    async with engine() as (_, stub):
        call = stub.Generate(request(max_tokens=LONG, request_id="to-abort"), timeout=30)
        stream = aiter(call)
        first = await anext(stream)
        assert first.chunk.token_ids
        assert (await stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=2)).aborted
        rest = [r.chunk async for r in stream]
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert not (await stub.Abort(pb.AbortRequest(request_id="to-abort"), timeout=2)).aborted
        assert await idle_with_aborted(stub, 1)


async def test_get_info_names_the_replica():
    """GetInfo returns the replica id, model, version, backend and the KV-cache geometry."""
    async with engine(num_kv_blocks=1000, model_version="2024-06-b") as (_, stub):
        info = await stub.GetInfo(pb.GetInfoRequest(), timeout=2)
        assert (info.replica_id, info.model, info.backend) == ("engine-test", MODEL, "sim")
        assert info.model_version == "2024-06-b"
        assert (info.block_size, info.kv_blocks_total, info.max_model_len) == (16, 1000, 2 * LONG)


async def test_served_by_names_the_version_and_a_pin_to_another_is_not_found():
    """served_by carries the replica's model version (span and counter too); a request pinned to another version
    is NOT_FOUND with reason MODEL_VERSION_NOT_FOUND and the version served."""
    rec = Recorded()
    async with engine(rec, model_version="v7") as (_, stub):
        req = request(max_tokens=4)
        req.spec.model_version = "v7"
        chunks = [r.chunk async for r in stub.Generate(req, timeout=10)]
        assert chunks[0].served_by.model_version == "v7"
        (span,) = [s for s in rec.spans.get_finished_spans() if s.name == "engine.Generate"]
        assert span.attributes["fleetserve.model_version"] == "v7"
        req.spec.model_version = "v8"
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            [r async for r in stub.Generate(req, timeout=10)]
        d = details_of(exc.value)
        assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_VERSION_NOT_FOUND")
        assert "'v7'" in d.message


async def first_chunk_ms(stub, req: pb.GenerateRequest) -> tuple[float, common_pb2.GenerateChunk]:
    """Time to the first chunk, and the last chunk (with usage)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    first = None
    async for r in stub.Generate(req, timeout=30):
        if first is None:
            first = (loop.time() - t0) * 1000.0
        last = r.chunk
    return first, last


PREFIX = "The quick brown fox jumps over the lazy dog near the river bank. " * 60  # 1,082 tokens


async def test_a_cached_prefix_gives_cached_tokens_and_a_faster_first_token():
    """The second request sharing a long prefix reports cached tokens and gets its first token much sooner (a
    prefill-heavy cost model at real speed, so the difference is ~10x the noise)."""
    async with engine(speed_factor=1.0, step_per_prefill_token_ms=0.3) as (_, stub):
        cold_ms, cold = await first_chunk_ms(
            stub, request(prompt=PREFIX + "one", max_tokens=2, request_id="c")
        )
        warm_ms, warm = await first_chunk_ms(
            stub, request(prompt=PREFIX + "two", max_tokens=2, request_id="w")
        )
        assert cold.usage.cached_tokens == 0
        assert (
            warm.usage.cached_tokens >= warm.usage.prompt_tokens - 32 and warm.usage.cached_tokens % 16 == 0
        )
        assert warm_ms < cold_ms / 2, (cold_ms, warm_ms)
        load = (await stub.GetLoad(pb.GetLoadRequest(), timeout=2)).load
        assert load.prefix_cache_hit_tokens == warm.usage.cached_tokens
        assert load.prefix_cache_queried_tokens == cold.usage.prompt_tokens + warm.usage.prompt_tokens


async def test_another_tenants_cache_salt_gets_no_hit():
    """The same prompt with a different cache_salt is not served from the first tenant's cache."""
    async with engine() as (_, stub):

        async def cached(rid: str, salt: str) -> int:
            req = request(prompt=PREFIX, max_tokens=1, request_id=rid)
            req.cache_salt = salt
            return [r.chunk async for r in stub.Generate(req, timeout=10)][-1].usage.cached_tokens

        assert await cached("a1", "tenant-a") == 0
        assert await cached("b1", "tenant-b") == 0
        assert await cached("a2", "tenant-a") > 0


async def test_kv_events_stream_stored_then_removed_and_a_snapshot_first():
    """SubscribeKvEvents over gRPC: a snapshot batch first (seq 1), BlockStored with the fleet's salted block
    hashes of the prompt, then BlockRemoved for them when another prompt needs every block; a later
    subscriber's snapshot lists what is cached then."""
    async with engine(num_kv_blocks=80) as (_, stub):
        call = stub.SubscribeKvEvents(pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=30)
        events = aiter(call)
        snap = (await anext(events)).batch
        assert snap.snapshot and snap.seq == 1 and not snap.events
        req = request(prompt=PREFIX, max_tokens=1, request_id="a")
        req.cache_salt = "tenant-a"
        [r async for r in stub.Generate(req, timeout=10)]
        want = block_hashes(tokenizer.load().encode(PREFIX), "tenant-a")
        stored: list[int] = []
        seqs = [1]
        while len(stored) < len(want):
            batch = (await asyncio.wait_for(anext(events), 5)).batch
            seqs.append(batch.seq)
            stored += [
                h for e in batch.events if e.HasField("block_stored") for h in e.block_stored.block_hashes
            ]
        assert stored == want
        # 80 blocks hold 1,280 tokens: a different 1,082-token prompt evicts most of the first one's blocks.
        other = request(prompt=PREFIX.replace("fox", "cat"), max_tokens=1, request_id="b")
        [r async for r in stub.Generate(other, timeout=10)]
        removed: set[int] = set()
        for _ in range(20):
            batch = (await asyncio.wait_for(anext(events), 5)).batch
            seqs.append(batch.seq)
            removed |= {
                h for e in batch.events if e.HasField("block_removed") for h in e.block_removed.block_hashes
            }
            if removed:
                break
        assert removed and removed <= set(want)
        assert seqs == list(range(1, len(seqs) + 1))
        call.cancel()
        late = stub.SubscribeKvEvents(pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=5)
        snap2 = (await anext(aiter(late))).batch
        listed = {h for e in snap2.events for h in e.block_stored.block_hashes}
        assert snap2.snapshot and listed and not listed & removed
        late.cancel()


async def test_stop_lets_an_in_flight_stream_finish_and_refuses_new_ones():
    """stop(grace) lets a stream already running finish within the grace period; new calls are refused."""
    async with engine(speed_factor=2.0) as (app, stub):
        call = stub.Generate(request(max_tokens=300), timeout=30)  # ~0.35 s of modelled time
        stream = aiter(call)
        chunks = [(await anext(stream)).chunk]
        stopping = asyncio.create_task(app.stop(10.0))
        async for resp in stream:
            chunks.append(resp.chunk)
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert sum(len(c.token_ids) for c in chunks) == 300
        await asyncio.wait_for(stopping, 10)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.GetLoad(pb.GetLoadRequest(), timeout=1)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert app.backend.counters.finished == 1 and app.backend.counters.aborted == 0


async def test_stop_aborts_streams_that_outlast_the_grace_period():
    """A stream still running when the grace period ends is cut off and aborted in the backend."""
    async with engine() as (app, stub):
        call = stub.Generate(request(max_tokens=LONG), timeout=30)
        stream = aiter(call)
        await anext(stream)
        await app.stop(0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in stream:
                pass
        assert app.backend.counters.aborted == 1 and app.backend.load().running == 0


# -- registration with the real registry ------------------------------------------------------------


async def start_registry(rec: Recorded, port: int = 0):
    from services.registry.app import start as start_registry_app
    from services.registry.config import RegistrySettings

    return await start_registry_app(
        RegistrySettings(port=port, db_path=":memory:", lease_ttl_s=5.0, heartbeat_interval_s=0.05),
        rec.telemetry,
    )


async def listed(registry_address: str) -> dict[str, reg_pb.Replica]:
    async with grpc.aio.insecure_channel(registry_address) as ch:
        resp = await reg_grpc.RegistryServiceStub(ch).ListReplicas(reg_pb.ListReplicasRequest(), timeout=2)
    return {r.replica_id: r for r in resp.replicas}


FAST_RETRY = {"register_retry_base_s": 0.02, "register_retry_max_s": 0.1}


async def test_registers_and_heartbeats_its_load():
    """The engine registers its advertised address, model and backend, and heartbeats carry its load."""
    rec = Recorded()
    registry = await start_registry(rec)
    try:
        async with engine(rec, registry_address=registry.address, **FAST_RETRY) as (app, stub):
            call = stub.Generate(request(max_tokens=LONG), timeout=30)
            stream = aiter(call)
            await anext(stream)

            async def busy_replica():
                r = (await listed(registry.address)).get("engine-test")
                return r if r is not None and r.load.running == 1 else None

            r = await assert_eventually(busy_replica, timeout_s=5)
            assert (r.address, r.model, r.backend) == (app.address, MODEL, "sim")
            assert r.model_version == "v1"  # the default
            assert r.state == reg_pb.REPLICA_STATE_SERVING
            assert r.load.kv_blocks_total == load_profile("h100-llama-1b").num_kv_blocks
            assert r.load.in_flight_tokens > 0 and r.load.prefix_cache_queried_tokens > 0
            call.cancel()
    finally:
        await registry.stop(0)


async def test_lost_lease_is_registered_again():
    """When the registry forgets the replica (heartbeat answered NOT_FOUND) the engine registers again."""
    rec = Recorded()
    registry = await start_registry(rec)
    try:
        async with engine(rec, registry_address=registry.address, **FAST_RETRY) as (app, _):
            await asyncio.wait_for(app.registration.registered.wait(), 5)
            async with grpc.aio.insecure_channel(registry.address) as ch:
                await reg_grpc.RegistryServiceStub(ch).DeregisterReplica(
                    reg_pb.DeregisterReplicaRequest(replica_id="engine-test"), timeout=2
                )
            await assert_eventually(lambda: app.registration.registrations >= 2, timeout_s=5)
            await assert_eventually(lambda: _is_listed(registry.address), timeout_s=5)
    finally:
        await registry.stop(0)


async def _is_listed(address: str) -> bool:
    return "engine-test" in await listed(address)


async def test_registers_once_the_registry_comes_up_and_after_it_restarts():
    """An engine started before its registry keeps retrying and registers once it is up; after the registry
    restarts empty on the same address the engine registers again."""
    rec = Recorded()
    registry = await start_registry(rec)
    port = registry.running.port
    await registry.stop(0)
    async with engine(rec, registry_address=f"127.0.0.1:{port}", **FAST_RETRY) as (app, _):
        await assert_eventually(lambda: app.registration.register_attempts >= 3, timeout_s=5)
        assert not app.registration.registered.is_set()
        registry = await start_registry(rec, port=port)
        try:
            await assert_eventually(lambda: _is_listed(registry.address), timeout_s=5)
            # The registry lists the replica before the engine has read the reply: wait for the engine's count.
            await assert_eventually(lambda: app.registration.registrations >= 1, timeout_s=5)
            await registry.stop(0)
            registry = await start_registry(rec, port=port)
            await assert_eventually(lambda: _is_listed(registry.address), timeout_s=5)
            await assert_eventually(lambda: app.registration.registrations >= 2, timeout_s=5)
        finally:
            await registry.stop(0)


async def test_stop_drains_in_the_registry_then_deregisters():
    """During stop the replica shows DRAINING (routers send nothing new) while its stream finishes; once
    stopped it is gone from the registry."""
    rec = Recorded()
    registry = await start_registry(rec)
    try:
        async with engine(rec, registry_address=registry.address, speed_factor=2.0, **FAST_RETRY) as (
            app,
            stub,
        ):
            await assert_eventually(lambda: _is_listed(registry.address), timeout_s=5)
            call = stub.Generate(request(max_tokens=300), timeout=30)
            stream = aiter(call)
            await anext(stream)
            stopping = asyncio.create_task(app.stop(10.0))

            async def draining():
                r = (await listed(registry.address)).get("engine-test")
                return r is not None and r.state == reg_pb.REPLICA_STATE_DRAINING

            await assert_eventually(draining, timeout_s=5)
            chunks = [r.chunk async for r in stream]
            assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
            await asyncio.wait_for(stopping, 10)
            assert "engine-test" not in await listed(registry.address)
    finally:
        await registry.stop(0)
