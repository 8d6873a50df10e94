"""The gateway's OpenAI-compatible HTTP API over real servers, driven by the official openai client (unchanged)
and by raw HTTP: chat and completions, streamed (SSE) and whole, usage, models, errors, cancellation."""

from __future__ import annotations

import json
import socket
import sqlite3

import aiohttp
import openai
import pytest
import pytest_asyncio

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from tests.integration.test_gateway import gateway_without_router
from tests.integration.test_router import (
    API_KEY,
    MODEL,
    in_process_fleet,
)
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello fleet"}]


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["router", "embedded"])
async def fleet(request, tmp_path_factory):
    """The fleet behind a router process, and behind the gateway's embedded router (--embedded-router)."""
    embedded = request.param == "embedded"
    tmp = tmp_path_factory.mktemp("openai")
    async with in_process_fleet(tmp, gateway=True, embedded_router=embedded) as f:
        yield f


def client(fleet, key: str = API_KEY) -> openai.AsyncOpenAI:
    # max_retries=0: these tests check what the server answers, not the client's retries.
    return openai.AsyncOpenAI(
        base_url=f"http://{fleet.gateway.http_address}/v1", api_key=key, max_retries=0, timeout=20
    )


async def test_chat_completion_whole(fleet):
    """A non-streamed chat completion has OpenAI's shape: assistant message, finish_reason, usage, request id."""
    async with client(fleet) as c:
        resp = await c.chat.completions.with_raw_response.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, extra_body={"ignore_eos": True}
        )
        request_id = resp.headers["x-request-id"]
        done = resp.parse()
    assert len(request_id) == 32 and done.id == f"chatcmpl-{request_id}"
    assert done.object == "chat.completion" and done.model == MODEL
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert done.usage.completion_tokens == 8 and done.usage.prompt_tokens > 0
    assert done.usage.total_tokens == done.usage.prompt_tokens + 8


async def test_chat_completion_streamed_matches_whole_and_reports_usage_last(fleet):
    """stream=true yields role, then content deltas that join to the same text as the whole response (greedy,
    seeded), the finish reason, and with include_usage a final chunk with no choices and the usage."""
    args = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, seed=7)
    async with client(fleet) as c:
        whole = await c.chat.completions.create(**args)
        stream = await c.chat.completions.create(**args, stream=True, stream_options={"include_usage": True})
        chunks = [ch async for ch in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    assert {ch.id for ch in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


async def test_completions_streamed_and_whole(fleet):
    """/v1/completions works whole and streamed; without include_usage no usage chunk is sent."""
    async with client(fleet) as c:
        whole = await c.completions.create(
            model=MODEL, prompt="once upon a time", max_tokens=6, temperature=0
        )
        stream = await c.completions.create(
            model=MODEL, prompt="once upon a time", max_tokens=6, temperature=0, stream=True
        )
        chunks = [ch async for ch in stream]
    assert whole.object == "text_completion" and whole.usage.completion_tokens <= 6
    assert "".join(ch.choices[0].text for ch in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(ch.usage is None for ch in chunks)


async def test_models_list_and_retrieve(fleet):
    """GET /v1/models lists the served model; retrieving an unknown one is NotFoundError."""
    async with client(fleet) as c:
        models = await c.models.list()
        assert [m.id for m in models.data] == [MODEL]
        assert (await c.models.retrieve(MODEL)).id == MODEL
        with pytest.raises(openai.NotFoundError) as exc:
            await c.models.retrieve("gpt-none")
    assert exc.value.body["code"] == "model_not_found"


async def test_wrong_key_is_authentication_error(fleet):
    """A wrong bearer key is 401 -> openai.AuthenticationError, code invalid_api_key."""
    async with client(fleet, key="fsk-wrong") as c:
        with pytest.raises(openai.AuthenticationError) as exc:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
        with pytest.raises(openai.AuthenticationError):
            await c.models.list()
    assert exc.value.status_code == 401
    assert exc.value.body["code"] == "invalid_api_key" and exc.value.body["type"] == "authentication_error"


async def test_unknown_model_is_not_found_with_the_router_reason(fleet):
    """An unknown model is 404 -> NotFoundError carrying the router's reason, the same as over gRPC."""
    async with client(fleet) as c:
        with pytest.raises(openai.NotFoundError) as exc:
            await c.chat.completions.create(model="gpt-none", messages=MESSAGES, stream=True)
    assert exc.value.body["code"] == "model_not_found" and MODEL in exc.value.body["message"]


async def test_bad_parameters_are_bad_request_with_param(fleet):
    """Out-of-range sampling values and unsupported options are 400 -> BadRequestError naming the param."""
    async with client(fleet) as c:
        with pytest.raises(openai.BadRequestError) as exc:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=3.5)
        assert exc.value.body["param"] == "temperature"
        with pytest.raises(openai.BadRequestError) as exc:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, n=2)
        assert exc.value.body["param"] == "n"
        with pytest.raises(openai.BadRequestError) as exc:
            await c.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])
        assert exc.value.body["param"] == "messages[0].role"


async def test_raw_sse_framing_headers_and_done(fleet):
    """On the wire: text/event-stream, x-request-id, one `data: {json}` event per chunk, `data: [DONE]` last;
    malformed JSON is a 400 with an OpenAI-shaped body; an unknown route a JSON 404."""
    url = f"http://{fleet.gateway.http_address}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 5, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json=body, headers=headers) as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert len(r.headers["x-request-id"]) == 32
            raw = (await r.read()).decode()
        async with s.post(url, data=b"{not json", headers=headers) as r:
            assert r.status == 400
            assert (await r.json())["error"]["code"] == "invalid_json"
        async with s.get(f"http://{fleet.gateway.http_address}/v2/nothing", headers=headers) as r:
            assert r.status == 404 and (await r.json())["error"]["type"] == "not_found_error"
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for p in payloads if p["choices"][0]["delta"].get("content")) >= 2


async def test_a_completed_stream_is_recorded_ok_in_the_ledger(fleet):
    """A streamed completion that reached its finish reason is accounted as OK (not CANCELLED) and not partial,
    whole or streamed: the front end's stopping after the last event is not the client going away."""
    url = f"http://{fleet.gateway.http_address}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {API_KEY}"}
    ids = []
    async with aiohttp.ClientSession() as s:
        for stream in (True, False):
            body = {
                "model": MODEL,
                "messages": MESSAGES,
                "max_tokens": 4,
                "stream": stream,
                "ignore_eos": True,
            }
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 200
                await r.read()
                ids.append(r.headers["x-request-id"])
    ledger = fleet.gateway.servicer.pipeline.admission.ledger

    async def rows() -> list[tuple]:
        await ledger.flush()
        db = sqlite3.connect(fleet.gateway.tenants.db_path)
        try:
            marks = ",".join("?" * len(ids))
            query = (
                f"SELECT status, partial, completion_tokens FROM usage_ledger WHERE request_id IN ({marks})"
            )
            return db.execute(query, ids).fetchall()
        finally:
            db.close()

    async def two_rows() -> bool:
        return len(await rows()) == 2

    await assert_eventually(two_rows, timeout_s=10)
    assert await rows() == [("OK", 0, 4), ("OK", 0, 4)]


async def test_client_disconnect_mid_stream_aborts_in_the_engine(fleet):
    """Closing the HTTP connection mid-stream cancels the request all the way to the engine."""
    before = await fleet.aborted_total()
    url = f"http://{fleet.gateway.http_address}/v1/completions"
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 5000, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        r = await s.post(url, json=body, headers={"Authorization": f"Bearer {API_KEY}"})
        await r.content.readuntil(b"\n\n")
        await r.content.readuntil(b"\n\n")
        r.close()  # drops the connection, not just the response

    async def aborted_and_idle() -> bool:
        return await fleet.aborted_total() >= before + 1 and await fleet.busy_total() == 0

    await assert_eventually(aborted_and_idle, timeout_s=10)


@pytest.mark.asyncio(loop_scope="function")
async def test_unreachable_router_is_503_with_retry_after(tmp_path):
    """With no router, the openai client gets InternalServerError with status 503 and a Retry-After header."""
    async with gateway_without_router(tmp_path) as gw:
        c = openai.AsyncOpenAI(base_url=f"http://{gw.http_address}/v1", api_key=API_KEY, max_retries=0)
        async with c:
            with pytest.raises(openai.InternalServerError) as exc:
                await c.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
    assert exc.value.status_code == 503
    assert int(exc.value.response.headers["Retry-After"]) >= 1
    assert exc.value.body["code"] == "router_unavailable"


async def test_rate_limited_tenant_gets_429_with_retry_after_and_denied_model_403(fleet):
    """Over its requests-per-second limit a tenant gets 429 -> RateLimitError with Retry-After; a model the
    tenant may not use is 403 -> PermissionDeniedError (the pipeline's admission, mapped once to HTTP)."""
    tenants = fleet.gateway.tenants
    await tenants.create_tenant("http-limited", tenant_id="http-limited")
    await tenants.set_tenant("http-limited", rps=0.5)
    limited = await tenants.add_key("http-limited")
    await tenants.create_tenant("http-other-models", tenant_id="http-other-models")
    await tenants.set_tenant("http-other-models", models=["some-other-model"])
    denied = await tenants.add_key("http-other-models")
    async with client(fleet, key=limited) as c:
        with pytest.raises(openai.RateLimitError) as exc:
            for _ in range(5):
                await c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    assert exc.value.status_code == 429
    assert int(exc.value.response.headers["Retry-After"]) >= 1
    assert exc.value.body["type"] == "rate_limit_error" and exc.value.body["code"]
    async with client(fleet, key=denied) as c:
        with pytest.raises(openai.PermissionDeniedError) as exc:
            await c.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
    assert exc.value.status_code == 403 and exc.value.body["type"] == "permission_error"


async def test_kept_alive_streaming_connections_have_nagle_off(fleet):
    """The server side of a kept-alive HTTP connection has TCP_NODELAY set, so a small SSE event is sent at
    once instead of waiting for the previous one's ACK (Nagle)."""
    url = f"http://{fleet.gateway.http_address}/v1/completions"
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        for _ in range(2):
            async with s.post(url, json=body, headers=headers) as r:
                assert r.status == 200
                await r.read()
        conns = [c for c in fleet.gateway.http.runner.server.connections if c.transport is not None]
        assert conns  # ours is kept alive after both requests
        for c in conns:
            sock = c.transport.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


async def test_oversized_body_is_413_before_it_is_read(fleet):
    """A body over max_request_bytes is refused with 413 and an OpenAI-shaped error (openai APIStatusError)."""
    huge = "x" * (4 * 1024 * 1024 + 1)
    async with client(fleet) as c:
        with pytest.raises(openai.APIStatusError) as exc:
            await c.completions.create(model=MODEL, prompt=huge, max_tokens=1)
    assert exc.value.status_code == 413 and exc.value.body["code"] == "request_too_large"


@pytest.mark.asyncio(loop_scope="function")
async def test_error_after_the_stream_started_is_an_sse_error_event(tmp_path):
    """An error after the first chunk (here the output safety filter ending the stream) arrives as a last SSE
    event {"error": ...}, which the openai client raises as APIError after the text it already got; without
    stream the same refusal is a 400 BadRequestError."""
    async with in_process_fleet(tmp_path, engines=1) as f:
        gw = await start_gateway(
            GatewaySettings(
                router_address=f.router.address,
                db_path=str(tmp_path / "gw.db"),
                bootstrap_api_key=API_KEY,
                # Matches once 40 characters have been generated: after the first chunks, before the end.
                safety_output_patterns=[r"(?s).{40}"],
            ),
            f.telemetry,
        )
        try:
            c = openai.AsyncOpenAI(base_url=f"http://{gw.http_address}/v1", api_key=API_KEY, max_retries=0)
            async with c:
                got = []
                stream = await c.chat.completions.create(
                    model=MODEL,
                    messages=MESSAGES,
                    max_tokens=200,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                with pytest.raises(openai.APIError) as exc:
                    async for chunk in stream:
                        got.append(chunk.choices[0].delta.content or "")
                assert got and 0 < len("".join(got)) < 200 * 3
                assert "safety_output_blocked" in str(exc.value.body).lower()
                with pytest.raises(openai.BadRequestError) as exc:
                    await c.completions.create(
                        model=MODEL, prompt="hi", max_tokens=200, extra_body={"ignore_eos": True}
                    )
                assert exc.value.body["code"] == "safety_output_blocked"
        finally:
            await gw.stop(0)
