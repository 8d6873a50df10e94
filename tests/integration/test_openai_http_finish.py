"""The OpenAI SSE response ends with the chunk that carries the finish reason, not after every hop's trailers:
the client has its finish event, usage, [DONE] and the end of the body while the pipeline still ends behind
it, and the request still counts as finished, never cancelled."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from services.router.app import start as start_router
from services.router.config import RouterSettings
from tests.integration.test_engine import Recorded, start_registry
from tests.integration.test_engine_vllm import MODEL, vllm_engine
from tests.integration.test_engine_vllm import model_dir as model_dir  # the fixture
from tests.support import assert_eventually

API_KEY = "fsk-finish-test"


def _events(body: bytes) -> list[str]:
    return [e.removeprefix("data: ") for e in body.decode().split("\n\n") if e]


async def test_sse_body_ends_at_the_finish_chunk_and_the_request_still_finishes(
    model_dir, monkeypatch, tmp_path
):
    rec = Recorded()
    registry = await start_registry(rec)
    started = [registry]
    try:
        async with vllm_engine(model_dir, monkeypatch, registry.address) as (engine, _stub, llm):
            router = await start_router(
                RouterSettings(
                    registry_address=registry.address,
                    watch_backoff_base_s=0.05,
                    # The held end is not a hang here (the router's watchdog would end a silence of 1 s).
                    stall_detection=False,
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
            body = {
                "model": MODEL,
                "prompt": "hold the end",
                "max_tokens": 5,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            url = f"http://{gateway.http_address}/v1/completions"
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    url, json=body, headers={"Authorization": f"Bearer {API_KEY}"}
                ) as resp:
                    assert resp.status == 200
                    # The whole body, to its end, while the engine still holds its stream open.
                    raw = await asyncio.wait_for(resp.read(), timeout=20)
            events = _events(raw)
            assert events[-1] == "[DONE]"
            finish, usage = json.loads(events[-3]), json.loads(events[-2])
            assert finish["choices"][0]["finish_reason"] == "length"
            assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
            assert [r.request_id for r in llm.requests.values()], "the engine's stream had ended already"

            llm.hold_after_finish.set()
            await assert_eventually(
                lambda: not llm.requests, timeout_s=10, message="the engine stream never ended"
            )
            assert llm.aborted == []  # read to its end, not cancelled

            def gateway_codes() -> list[int]:
                spans = [s for s in rec.spans.get_finished_spans() if s.name == "gateway.http.Completions"]
                return [s.attributes.get("rpc.grpc.status_code") for s in spans]

            await assert_eventually(lambda: gateway_codes() == [0], timeout_s=10, message="not counted as OK")
    finally:
        for app in reversed(started):
            await app.stop(0.5)
