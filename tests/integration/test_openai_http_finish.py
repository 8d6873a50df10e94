"""A client's stream ends with the chunk that carries the finish reason, not after every hop's trailers: over
HTTP the finish event, usage, [DONE] and the end of the body, over gRPC the call's OK status, while the pipeline
still ends behind it; the request still counts as finished, never cancelled, and its stream slot is free for the
next one."""

from __future__ import annotations

import asyncio
import contextlib
import json

import aiohttp
import grpc
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from services.router.app import start as start_router
from services.router.config import RouterSettings
from tests.integration.test_engine import Recorded, start_registry
from tests.integration.test_engine_vllm import MODEL, vllm_engine
from tests.integration.test_engine_vllm import model_dir as model_dir  # the fixture
from tests.support import assert_eventually

API_KEY = "fsk-finish-test"


@contextlib.asynccontextmanager
async def held_fleet(model_dir: str, monkeypatch, tmp_path, **router_kw):
    """Registry, a vllm engine on the fake whose streams end only when the test says, router and gateway."""
    rec = Recorded()
    registry = await start_registry(rec)
    started = [registry]
    try:
        async with vllm_engine(model_dir, monkeypatch, registry.address) as (_engine, _stub, llm):
            router = await start_router(
                RouterSettings(
                    registry_address=registry.address,
                    watch_backoff_base_s=0.05,
                    # The held end is not a hang here (the router's watchdog would end a silence of 1 s).
                    **{"stall_detection": False, **router_kw},
                ),
                rec.telemetry,
            )
            started.append(router)
            await assert_eventually(
                lambda: len(router.membership.routable(MODEL)) == 1,
                timeout_s=10,
                message="engine not routable",
            )
            gateway = await start_gateway(
                GatewaySettings(
                    router_address=router.address,
                    db_path=str(tmp_path / "gateway.db"),
                    bootstrap_api_key=API_KEY,
                    auth_cache_ttl_s=0.0,
                ),
                rec.telemetry,
            )
            started.append(gateway)
            llm.hold_after_finish = asyncio.Event()
            yield rec, gateway, llm
    finally:
        for app in reversed(started):
            await app.stop(0.5)


async def stream_body(
    session: aiohttp.ClientSession, gateway, key: str, prompt: str, max_tokens: int = 5
) -> tuple[int, list[str]]:
    """A streamed completion's status and its events, read to the end of the body (bounded)."""
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    url = f"http://{gateway.http_address}/v1/completions"
    async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
        raw = await asyncio.wait_for(resp.read(), timeout=20)
        return resp.status, [e.removeprefix("data: ") for e in raw.decode().split("\n\n") if e]


async def test_sse_body_ends_at_the_finish_chunk_and_the_request_still_finishes(
    model_dir, monkeypatch, tmp_path
):
    async with held_fleet(model_dir, monkeypatch, tmp_path) as (rec, gateway, llm):
        async with aiohttp.ClientSession() as session:
            # The whole body, to its end, while the engine still holds its stream open.
            status, events = await stream_body(session, gateway, API_KEY, "hold the end")
        assert status == 200 and events[-1] == "[DONE]"
        finish, usage = json.loads(events[-3]), json.loads(events[-2])
        assert finish["choices"][0]["finish_reason"] == "length"
        assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
        assert llm.requests, "the engine's stream had ended already"

        llm.hold_after_finish.set()
        await assert_eventually(
            lambda: not llm.requests, timeout_s=10, message="the engine stream never ended"
        )
        assert llm.aborted == []  # read to its end, not cancelled

        def gateway_codes() -> list[int]:
            spans = [s for s in rec.spans.get_finished_spans() if s.name == "gateway.http.Completions"]
            return [s.attributes.get("rpc.grpc.status_code") for s in spans]

        await assert_eventually(lambda: gateway_codes() == [0], timeout_s=10, message="not counted as OK")


async def test_a_tenant_at_its_stream_cap_sends_its_next_request_right_after_the_body_ends(
    model_dir, monkeypatch, tmp_path
):
    """max_streams 1: the slot is given back with the last chunk, not when the call's trailers come, so a
    client that sends its next request as soon as a body ends is not refused CONCURRENT_STREAMS_LIMIT."""
    async with held_fleet(model_dir, monkeypatch, tmp_path) as (_rec, gateway, llm):
        await gateway.tenants.create_tenant("one", tenant_id="one")
        await gateway.tenants.set_tenant("one", max_streams=1)
        key = await gateway.tenants.add_key("one")
        async with aiohttp.ClientSession() as session:
            for i in range(3):
                status, events = await stream_body(session, gateway, key, f"next at once {i}")
                assert status == 200, events
                assert events[-1] == "[DONE]"
                # Feedback may rate it at once: the request is known before its body ends.
                request_id = json.loads(events[0])["id"].removeprefix("cmpl-")
                assert gateway.servicer.feedback.recent.get(request_id) is not None
        assert len(llm.requests) == 3  # every one's end still held: the slots went back before it
        llm.hold_after_finish.set()
        await assert_eventually(
            lambda: not llm.requests, timeout_s=10, message="the engine streams never ended"
        )


async def test_a_grpc_call_ends_ok_at_the_finish_chunk_and_the_request_still_finishes(
    model_dir, monkeypatch, tmp_path
):
    async with held_fleet(model_dir, monkeypatch, tmp_path) as (rec, gateway, llm):
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = pb_grpc.InferenceServiceStub(channel).Generate(
                pb.GenerateRequest(model=MODEL, prompt="hold the end", max_tokens=5, ignore_eos=True),
                metadata=(("authorization", f"Bearer {API_KEY}"),),
                timeout=20,
            )
            chunks = [r.chunk async for r in call]  # to the call's end, while the engine holds its stream
            assert await call.code() == grpc.StatusCode.OK
            request_id = dict(await call.initial_metadata())["x-request-id"]
        # Feedback may rate it at once: the request is known (tenant, version) before its call ends.
        served = gateway.servicer.feedback.recent.get(request_id)
        assert served is not None and served.model == MODEL
        assert sum(len(c.token_ids) for c in chunks) == 5 and chunks[-1].usage.completion_tokens == 5
        assert llm.requests, "the engine's stream had ended already"

        llm.hold_after_finish.set()
        await assert_eventually(
            lambda: not llm.requests, timeout_s=10, message="the engine stream never ended"
        )
        assert llm.aborted == []

        def gateway_codes() -> list[int]:
            spans = [s for s in rec.spans.get_finished_spans() if s.name == "gateway.Generate"]
            return [s.attributes.get("rpc.grpc.status_code") for s in spans]

        await assert_eventually(lambda: gateway_codes() == [0], timeout_s=10, message="not counted as OK")


async def test_completion_tokens_are_charged_before_the_body_ends(model_dir, monkeypatch, tmp_path):
    """tokens_per_min 45: a completion of 40 tokens is charged with its last chunk, so the tenant's next request,
    sent as soon as the body ends (the engine's stream still open), is refused TOKEN_RATE_LIMITED."""
    async with held_fleet(model_dir, monkeypatch, tmp_path) as (_rec, gateway, llm):
        await gateway.tenants.create_tenant("tpm", tenant_id="tpm")
        await gateway.tenants.set_tenant("tpm", tokens_per_min=45)
        key = await gateway.tenants.add_key("tpm")
        async with aiohttp.ClientSession() as session:
            status, events = await stream_body(session, gateway, key, "count me", max_tokens=40)
            assert status == 200 and events[-1] == "[DONE]"
            assert llm.requests, "the engine's stream had ended already"
            status, events = await stream_body(session, gateway, key, "and me")
        assert status == 429 and "tokens per minute" in events[0], events
        llm.hold_after_finish.set()


async def test_the_stall_watchdog_leaves_a_stream_whose_last_chunk_came(model_dir, monkeypatch, tmp_path):
    """The engine's stream stays open 1.5 s after its last chunk, with the router's watchdog on at a 0.3 s
    silence: that is no hang, so the request ends OK (not UNAVAILABLE replica_stalled) and the replica stays in
    rotation."""
    async with held_fleet(
        model_dir, monkeypatch, tmp_path, stall_detection=True, stall_min_silence_s=0.3, stall_itl_factor=2.0
    ) as (rec, gateway, llm):
        async with grpc.aio.insecure_channel(gateway.address) as channel:
            call = pb_grpc.InferenceServiceStub(channel).Generate(
                pb.GenerateRequest(model=MODEL, prompt="close it late", max_tokens=5, ignore_eos=True),
                metadata=(("authorization", f"Bearer {API_KEY}"),),
                timeout=20,
            )
            assert sum([len(r.chunk.token_ids) async for r in call]) == 5
            assert await call.code() == grpc.StatusCode.OK
        await asyncio.sleep(1.5)  # five times the watchdog's silence, the stream's end still held
        llm.hold_after_finish.set()

        def codes() -> dict[str, list[int]]:
            spans = [
                s for s in rec.spans.get_finished_spans() if s.name in ("gateway.Generate", "router.Generate")
            ]
            return {
                n: [s.attributes.get("rpc.grpc.status_code") for s in spans if s.name == n] for n in names
            }

        names = ("gateway.Generate", "router.Generate")
        ok = {n: [0] for n in names}  # grpc.StatusCode.OK; a cut stream is UNAVAILABLE (14)
        await assert_eventually(lambda: codes() == ok, timeout_s=10, message=f"cut as a stall: {codes()}")
