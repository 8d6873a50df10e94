"""Hostile input at the public edge: every malformed OpenAI HTTP request gets a 400/401 OpenAI-shaped error
that names the parameter (never a 500 or aiohttp's plain-text page), and the gateway goes on serving."""

from __future__ import annotations

import json

import aiohttp
import pytest
import pytest_asyncio

from tests.integration.test_router import API_KEY, MODEL, in_process_fleet

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
COMPLETION = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
LONE_SURROGATE = "\ud800"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("hostile"), engines=1, gateway=True) as f:
        yield f


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def http(fleet):
    async with aiohttp.ClientSession(f"http://{fleet.gateway.http_address}") as s:
        yield s


async def post(http, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict]:
    h = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    async with http.post(path, data=data, headers=h) as resp:
        text = await resp.text()
        try:
            body = json.loads(text)
        except ValueError:
            raise AssertionError(f"{resp.status} not JSON: {text[:200]!r}") from None
        return resp.status, body


def raw_json(body: dict) -> bytes:
    # ensure_ascii: a lone surrogate goes out as the escape \ud800, which is valid JSON text.
    return json.dumps(body, ensure_ascii=True).encode()


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {**COMPLETION, "prompt": LONE_SURROGATE}, "prompt"),
        ("/v1/completions", {**COMPLETION, "model": "m" + LONE_SURROGATE}, "model"),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": "user", "content": LONE_SURROGATE}]},
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            {**CHAT, "messages": [{"role": LONE_SURROGATE, "content": "x"}]},
            "messages[0].role",
        ),
        ("/v1/completions", {**COMPLETION, "user": LONE_SURROGATE}, "user"),
        ("/v1/completions", {**COMPLETION, "stop": LONE_SURROGATE}, "stop"),
        ("/v1/completions", {**COMPLETION, "stop": ["ok", LONE_SURROGATE]}, "stop"),
        ("/v1/completions", {**COMPLETION, "temperature": 10**400}, "temperature"),
        ("/v1/completions", {**COMPLETION, "top_p": -(10**400)}, "top_p"),
        ("/v1/completions", {**COMPLETION, "service_tier": []}, "service_tier"),
        ("/v1/completions", {**COMPLETION, "service_tier": {"a": 1}}, "service_tier"),
        ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": []}, "stream_options"),
    ],
)
async def test_bad_values_are_400_naming_the_parameter(http, path, body, param):
    """Lone surrogates in any text, numbers too big for a float, wrong types: 400 invalid_request_error whose
    param names the field."""
    status, err = await post(http, path, raw_json(body))
    assert status == 400, err
    assert err["error"]["type"] == "invalid_request_error"
    assert err["error"]["param"] == param, err


async def test_json_nested_deeper_than_any_request_is_400(http):
    """JSON nested 50k deep (a RecursionError in the parser) is 400 invalid_json."""
    status, err = await post(http, "/v1/completions", b"[" * 50_000 + b"]" * 50_000)
    assert status == 400 and err["error"]["code"] == "invalid_json", err


async def test_unknown_charset_is_400_naming_the_header(http):
    """Content-Type with a charset Python does not know is 400 naming Content-Type."""
    status, err = await post(
        http, "/v1/completions", raw_json(COMPLETION), {"Content-Type": "application/json; charset=bogus-42"}
    )
    assert status == 400 and err["error"]["param"] == "Content-Type", err


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/models"])
async def test_authorization_that_is_not_utf8_is_401(fleet, path):
    """An Authorization header whose bytes are not UTF-8 is 401 invalid_api_key."""
    host, port = fleet.gateway.http_address.rsplit(":", 1)
    import asyncio

    reader, writer = await asyncio.open_connection(host, int(port))
    body = raw_json(COMPLETION)
    method = "GET" if path == "/v1/models" else "POST"
    writer.write(
        f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n".encode()
        + b"Authorization: Bearer \xff\xfe\xc3\x28\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"401", raw[:300]
    assert json.loads(payload)["error"]["code"] == "invalid_api_key"


async def test_still_serving_after_hostile_input(http):
    """After all of the above, a good request is served."""
    status, body = await post(http, "/v1/completions", raw_json(COMPLETION))
    assert status == 200 and body["choices"][0]["text"] is not None
