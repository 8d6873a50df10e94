"""The engine worker with the vllm backend (on a fake AsyncLLM) behind a real gRPC server and a real registry:
streaming, Abort, load, KV events, and engine death -> NOT_SERVING and out of the registry."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc

from services.engine import vllm_backend
from services.engine.app import start
from services.engine.config import EngineSettings
from shared.errors import details_of
from shared.health import check
from shared.prefix_hash import block_hashes
from shared.tokenizer import load as load_tokenizer
from tests.integration.test_engine import FAST_RETRY, Recorded, listed, start_registry
from tests.support import assert_eventually

pytest.importorskip("zmq", reason="the vllm backend reads KV events with pyzmq")
from tests.fake_vllm import FakeAsyncLLM, fake_api, first_stored_hashes  # noqa: E402 - after the skip: it imports zmq

MODEL = "llama-tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from infra.models.generate import main as generate

    out = tmp_path_factory.mktemp("model") / "tiny"
    generate([str(out), "--size", "tiny"])
    return str(out)


@contextlib.asynccontextmanager
async def vllm_engine(model_dir: str, monkeypatch, registry_address: str = "", **settings_kw):
    engines: list[FakeAsyncLLM] = []
    monkeypatch.setattr(vllm_backend, "load_vllm_api", lambda: fake_api(model_dir, engines, step_s=0.003))
    rec = Recorded()
    settings = EngineSettings(
        replica_id="engine-vllm",
        model=MODEL,
        backend="vllm",
        vllm_args=f"--model {model_dir}",
        registry_address=registry_address,
        **FAST_RETRY,
        **settings_kw,
    )
    app = await start(settings, rec.telemetry)
    app.backend.health_poll_s = 0.02
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield app, engine_grpc.EngineServiceStub(channel), engines[0]
    finally:
        await channel.close()
        await app.stop(0)


def request(prompt: str, max_tokens: int, request_id: str, salt: str = "tenant") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=request_id,
        spec=common_pb2.GenerationSpec(
            model=MODEL,
            prompt=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        ),
        tenant_id="t",
        cache_salt=salt,
    )


async def test_streams_over_grpc_with_usage_and_info(model_dir, monkeypatch):
    """Generate streams the fake vLLM's tokens as chunks; GetInfo reports vLLM's KV geometry and backend."""
    async with vllm_engine(model_dir, monkeypatch) as (app, stub, llm):
        chunks = [r.chunk async for r in stub.Generate(request("hello vllm worker", 20, "g1"), timeout=10)]
        assert chunks[0].served_by.replica_id == "engine-vllm"
        assert sum(len(c.token_ids) for c in chunks) == 20
        assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert chunks[-1].usage.completion_tokens == 20
        info = await stub.GetInfo(pb.GetInfoRequest(), timeout=5)
        assert (info.backend, info.block_size, info.kv_blocks_total) == ("vllm", 16, 1000)


async def test_a_summarized_stream_over_vllm(model_dir, monkeypatch):
    """summarize on the vllm backend: the first chunk, then one message with the rest of the text, the usage
    and the engine's token times; the same text as the streamed answer."""
    async with vllm_engine(model_dir, monkeypatch) as (app, stub, llm):
        streamed = [r.chunk async for r in stub.Generate(request("summarize me", 20, "v0"), timeout=10)]
        req = request("summarize me", 20, "v1")
        req.summarize = True
        whole = [r async for r in stub.Generate(req, timeout=10)]
    assert sum(len(c.token_ids) for c in streamed) == 20 and len(whole) == 2
    first, last = whole
    assert first.chunk.served_by.replica_id == "engine-vllm"
    assert first.chunk.text + last.chunk.text == "".join(c.text for c in streamed)
    assert last.chunk.usage.completion_tokens == 20 and last.chunk.finish_reason == streamed[-1].finish_reason
    assert 0 < last.summary.first_token_ms <= last.summary.last_token_ms
    assert last.summary.outputs == len(streamed)


async def test_abort_rpc_and_client_cancel_abort_in_vllm(model_dir, monkeypatch):
    """The Abort RPC ends a stream with ABORT; a cancelled call aborts in vLLM too."""
    async with vllm_engine(model_dir, monkeypatch) as (app, stub, llm):
        call = stub.Generate(request("abort me", 3000, "a1"), timeout=30)
        it = call.__aiter__()
        await anext(it)
        assert (await stub.Abort(pb.AbortRequest(request_id="a1"), timeout=5)).aborted
        rest = [r.chunk async for r in it]
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT

        call = stub.Generate(request("cancel me", 3000, "c1"), timeout=30)
        await anext(call.__aiter__())
        call.cancel()
        await assert_eventually(lambda: "c1" in llm.aborted, timeout_s=5)
        load = await stub.GetLoad(pb.GetLoadRequest(), timeout=5)
        assert load.requests_aborted == 2
        await assert_eventually(lambda: app.backend.load().running == 0, timeout_s=5)


async def test_kv_events_stream_fleet_hashes_over_grpc(model_dir, monkeypatch):
    """SubscribeKvEvents streams a snapshot, then the fleet hashes of a request's prompt blocks."""
    tok = load_tokenizer(model_dir)
    prompt = " ".join(f"w{i}" for i in range(60))
    want = block_hashes(tok.encode(prompt), "tenant")
    assert want
    async with vllm_engine(model_dir, monkeypatch, vllm_kv_events=True) as (app, stub, llm):
        events = stub.SubscribeKvEvents(pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=30)
        it = events.__aiter__()
        assert (await asyncio.wait_for(anext(it), 5)).batch.snapshot

        async def generate(i: int) -> None:
            [r async for r in stub.Generate(request(prompt, 1, f"k{i}"), timeout=10)]

        stored = await first_stored_hashes(generate, it, llm)
        events.cancel()
        assert stored[: len(want)] == want


async def test_no_kv_events_by_default_and_subscribing_says_so(model_dir, monkeypatch):
    """Without --vllm-kv-events (the default) the engine core gets no KV-event endpoint and nothing reads one;
    requests still stream, and SubscribeKvEvents answers FAILED_PRECONDITION KV_EVENTS_OFF naming the flag at
    once instead of a stream that never sends. --vllm-kv-events turns the publisher on."""
    async with vllm_engine(model_dir, monkeypatch) as (app, stub, llm):
        assert llm.kv_endpoint == ""
        assert app.backend._kv_reader is None
        replies = [r async for r in stub.Generate(request("no events here", 4, "n1"), timeout=10)]
        assert sum(len(r.chunk.token_ids) for r in replies if r.HasField("chunk")) == 4
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.SubscribeKvEvents(pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=5).read()
        err = details_of(e.value)
        assert err.code == grpc.StatusCode.FAILED_PRECONDITION
        assert err.reason == "KV_EVENTS_OFF" and "--vllm-kv-events" in err.message
        assert err.metadata == {"replica_id": "engine-vllm", "flag": "--vllm-kv-events"}
    async with vllm_engine(model_dir, monkeypatch, vllm_kv_events=True) as (app, stub, llm):
        assert llm.kv_endpoint.startswith("ipc://")
        assert app.backend._kv_reader is not None


async def test_engine_death_is_not_serving_and_leaves_the_registry(model_dir, monkeypatch):
    """When vLLM's engine core dies the worker reports NOT_SERVING and deregisters; new requests are refused."""
    rec = Recorded()
    registry = await start_registry(rec)
    try:
        async with vllm_engine(model_dir, monkeypatch, registry.address) as (app, stub, llm):
            await assert_eventually(lambda: _listed(registry.address), timeout_s=5)
            assert await check(app.address)
            llm.kill()
            await assert_eventually(lambda: _not_serving(app.address), timeout_s=5)
            await assert_eventually(lambda: _gone(registry.address), timeout_s=5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [r async for r in stub.Generate(request("anyone?", 2, "d1"), timeout=5)]
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await registry.stop(0)


async def _listed(address: str) -> bool:
    return "engine-vllm" in await listed(address)


async def _gone(address: str) -> bool:
    return "engine-vllm" not in await listed(address)


async def _not_serving(address: str) -> bool:
    return not await check(address, timeout_s=1)
