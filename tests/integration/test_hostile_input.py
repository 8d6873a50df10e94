"""Hostile input at the public edge: every malformed OpenAI HTTP request gets a 400/401 OpenAI-shaped error
that names the parameter (never a 500 or aiohttp's plain-text page); property-based fuzzing of the 7 public gRPC
RPCs and the HTTP API finds no UNKNOWN, INTERNAL or 500, and the gateway goes on serving.

FLEETSERVE_FUZZ_EXAMPLES sets the fuzz's examples per gRPC method and per HTTP test (`make fuzz` runs 10k per
protocol); FLEETSERVE_FUZZ_REPORT names a JSON file to which each fuzz test adds its tally of outcomes."""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter

import aiohttp
import grpc
import pytest
import pytest_asyncio
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shared.errors import details_of
from tests.chaos.report import add_record
from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
from tests.strategies import any_text, json_bytes, json_values, openai_bodies, request_bytes

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


# -- fuzzing ------------------------------------------------------------------------------------------------------

EXAMPLES = int(os.environ.get("FLEETSERVE_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
INFERENCE = inf_pb.DESCRIPTOR.services_by_name["InferenceService"]
# Values that pass validation often enough for the fuzz to reach the router and the engine.
OVERRIDES = {
    "model": st.one_of(st.just(MODEL), st.just(MODEL), st.text(max_size=8)),
    "max_tokens": st.one_of(st.integers(0, 6), st.integers(0, 6), st.integers(0, 2**32 - 1)),
    "temperature": st.one_of(st.floats(0, 2, width=32), st.floats(width=32)),
    "top_p": st.one_of(st.floats(0, 1, width=32), st.floats(0, 1, width=32), st.floats(width=32)),
    "rating": st.integers(-3, 8),
    "prompt": st.one_of(st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30), any_text),
    "role": st.one_of(st.sampled_from(["user", "system", "assistant"]), any_text),
    "content": st.one_of(st.text(min_size=1, max_size=30), any_text),
    "stop": st.text(min_size=1, max_size=4),
}
# Fields the fuzz always sets on a method's request (the rest come and go), so that most requests get past
# the first checks.
REQUIRED = frozenset({"model", "prompt", "messages", "max_tokens", "job_id", "request_id", "items"})
AUTH = st.sampled_from([f"Bearer {API_KEY}"] * 6 + ["Bearer wrong", "", "Basic x"])
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS}


async def fuzz(check, **strategies) -> None:
    """Run hypothesis over check(**drawn values) (a coroutine function) on this event loop. Hypothesis runs
    in a thread of its own and hands each example to the loop, where the fleet's channels live."""
    loop = asyncio.get_running_loop()

    @FUZZ
    @given(**strategies)
    def one(**drawn) -> None:
        asyncio.run_coroutine_threadsafe(check(**drawn), loop).result(60)

    await asyncio.to_thread(one)


def _record(name: str, tally: Counter) -> None:
    print(f"fuzz {name}: {sum(tally.values())} requests, {dict(tally)}")
    add_record("FLEETSERVE_FUZZ_REPORT", name, {"requests": sum(tally.values()), "outcomes": dict(tally)})


async def _fuzz_call(
    channel: grpc.aio.Channel, method, payload: bytes, auth: str
) -> tuple[grpc.StatusCode, str]:
    """(status code, ErrorInfo reason) of one raw call."""
    try:
        await _raw_call(channel, method, payload, auth)
    except grpc.aio.AioRpcError as e:
        return e.code(), details_of(e).reason
    return grpc.StatusCode.OK, ""


async def _raw_call(channel: grpc.aio.Channel, method, payload: bytes, auth: str) -> None:
    path = f"/{INFERENCE.full_name}/{method.name}"
    metadata = (("authorization", auth),) if auth else ()
    if not method.server_streaming:
        await channel.unary_unary(path)(payload, timeout=5, metadata=metadata)
        return
    call = channel.unary_stream(path)(payload, timeout=5, metadata=metadata)
    try:
        n = 0
        async for _ in call:
            n += 1
            if n >= 3:  # enough to know it streams; the rest would only load the engine
                return
    finally:
        call.cancel()


@pytest.mark.parametrize("name", [m.name for m in INFERENCE.methods])
async def test_fuzzed_grpc_requests_never_unknown_or_internal(fleet, name):
    """Fuzzed requests (structured messages of the method's type, raw bytes, trailing garbage; with a good
    key, a bad one or none) on each public RPC: every answer is a status a client can act on, never UNKNOWN
    or INTERNAL, and the gateway stays SERVING."""
    method = INFERENCE.methods_by_name[name]
    channel = fleet.channel(fleet.gateway.address)
    tally: Counter = Counter()

    async def one(payload: bytes, auth: str) -> None:
        code, reason = await _fuzz_call(channel, method, payload, auth)
        tally[f"{code.name} {reason}".strip()] += 1
        assert code not in BAD_CODES, (code, payload)

    await fuzz(one, payload=request_bytes(method.input_type, OVERRIDES, REQUIRED), auth=AUTH)
    _record(f"grpc.{name}", tally)
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


CONTENT_TYPES = st.sampled_from(
    ["application/json"] * 5
    + [
        "application/json; charset=utf-8",
        "application/json; charset=latin-1",
        "application/json; charset=bogus-42",
        "text/plain",
        "multipart/form-data; boundary=x",
        "",
    ]
)
# Bytes an HTTP field value may hold (RFC 9110: visible ASCII, space, tab and obs-text 0x80-0xff), most of them
# not UTF-8; control characters are refused by aiohttp's parser with a plain 400 before any handler runs.
FIELD_BYTES = st.lists(st.sampled_from([9, *range(0x20, 0x7F), *range(0x80, 0x100)]), max_size=12).map(bytes)
HTTP_AUTH = st.one_of(AUTH, FIELD_BYTES.map(lambda b: b"Bearer " + b.strip()))
BODIES = st.one_of(
    openai_bodies(MODEL).map(json_bytes),
    openai_bodies(MODEL).map(json_bytes),
    json_values.map(json_bytes),
    st.binary(max_size=64),
)
ROUTES = st.one_of(
    *[st.sampled_from(["POST /v1/chat/completions", "POST /v1/completions"] * 4 + ["GET /v1/models"])] * 6,
    st.text(max_size=12).map(lambda t: "GET /v1/models/" + t),
    st.tuples(st.sampled_from(["GET", "PUT", "DELETE", "POST"]), st.text(max_size=12)).map(
        lambda t: f"{t[0]} /v1/{t[1]}"
    ),
)


async def _http_request(address: str, route: str, body: bytes, content_type: str, auth) -> tuple[int, bytes]:
    """One HTTP/1.1 request written by hand (aiohttp's client would refuse some of these headers and paths);
    (status, body). Streams are read for a few events, then the connection is closed."""
    from urllib.parse import quote

    method, _, path = route.partition(" ")
    host, port = address.rsplit(":", 1)
    auth = auth if isinstance(auth, bytes) else auth.encode()
    head = f"{method} {quote(path, safe='/')} HTTP/1.1\r\nHost: fuzz\r\nConnection: close\r\n".encode()
    if content_type:
        head += f"Content-Type: {content_type}\r\n".encode()
    if auth:
        head += b"Authorization: " + auth.replace(b"\r", b"").replace(b"\n", b"") + b"\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head + body)
        status_line = await asyncio.wait_for(reader.readline(), 10)
        rest = await asyncio.wait_for(reader.read(4096), 10)
        return int(status_line.split()[1]), rest
    finally:
        writer.close()


async def test_fuzzed_http_requests_never_500(fleet):
    """Fuzzed OpenAI HTTP requests (bodies of every shape, odd content types, keys that are not UTF-8, unknown
    routes): never a 5xx other than 503/504, and an error is always a JSON error body."""
    tally: Counter = Counter()

    async def one(route: str, body: bytes, content_type: str, auth) -> None:
        status, rest = await _http_request(fleet.gateway.http_address, route, body, content_type, auth)
        tally[str(status)] += 1
        assert status < 500 or status in (503, 504), (status, route, body[:200], rest[:300])
        if status >= 400:
            assert b'"error"' in rest.partition(b"\r\n\r\n")[2], (status, rest[:300])

    await fuzz(one, route=ROUTES, body=BODIES, content_type=CONTENT_TYPES, auth=HTTP_AUTH)
    _record("http", tally)


async def test_http_fuzz_left_the_gateway_serving(http):
    """After the fuzz (which runs before this test), a good request is served."""
    status, body = await post(http, "/v1/completions", raw_json(COMPLETION))
    assert status == 200, body


@pytest.mark.parametrize(("method", "path", "status"), [("GET", "/v1/\n", 404), ("PUT", "/v1/models", 405)])
async def test_routing_refusals_are_openai_shaped(fleet, method, path, status):
    """A path no route matches (a newline in it) and a method a route does not take: JSON error bodies."""
    got, rest = await _http_request(
        fleet.gateway.http_address, f"{method} {path}", b"", "", f"Bearer {API_KEY}"
    )
    assert got in (status, 404), rest
    assert b'"error"' in rest.partition(b"\r\n\r\n")[2], rest
