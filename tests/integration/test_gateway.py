"""The gateway over real servers in-process (registry + 2 engines + router + gateway on port 0): streaming,
auth, validation, cancellation and deadlines reaching the engine, the root span's attributes, ListModels."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from opentelemetry.trace import SpanKind

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from shared.errors import details_of
from tests.integration.test_router import (
    API_KEY,
    MODEL,
    Fleet,
    closed_port_address,
    in_process_fleet,
    recording_telemetry,
)
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["router", "embedded"])
async def fleet(request, tmp_path_factory):
    """The fleet behind a router process, and behind the gateway's embedded router (--embedded-router)."""
    embedded = request.param == "embedded"
    tmp = tmp_path_factory.mktemp("gateway")
    async with in_process_fleet(tmp, gateway=True, embedded_router=embedded) as f:
        yield f


def auth(key: str = API_KEY) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def stub(fleet: Fleet) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))


async def generate_error(fleet: Fleet, req: pb.GenerateRequest, metadata=None, rpc_timeout_s: float = 10):
    call = stub(fleet).Generate(req, metadata=auth() if metadata is None else metadata, timeout=rpc_timeout_s)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            pass
    return details_of(exc.value)


def gateway_span(fleet: Fleet, request_id: str):
    spans = [
        s
        for s in fleet.spans.get_finished_spans()
        if s.name == "gateway.Generate" and s.attributes.get("fleetserve.request_id") == request_id
    ]
    return spans[0] if spans else None


async def test_streams_through_gateway_router_and_engine(fleet):
    """A prompt streams back as token chunks (served_by first, usage last) with an x-request-id; the root
    span carries the attributes the metrics service reads, router and engine spans hang under it in the
    client's trace, and the deadline each hop sees shrinks hop by hop."""
    trace_id, client_span = os.urandom(16).hex(), os.urandom(8).hex()
    call = stub(fleet).Generate(
        pb.GenerateRequest(
            model=MODEL, prompt="hello fleet", max_tokens=16, ignore_eos=True, feature="smoke-test"
        ),
        metadata=auth() + (("traceparent", f"00-{trace_id}-{client_span}-01"),),
        timeout=7.003,  # not a multiple of the header unit: gRPC rounds it up to 7.01 s on the wire
    )
    chunks = [r.chunk async for r in call]
    request_id = dict(await call.initial_metadata())["x-request-id"]
    assert len(request_id) == 32
    assert chunks[0].served_by.replica_id in fleet.engines
    assert len([c for c in chunks if c.text]) >= 2
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 16

    span = await assert_eventually(lambda: gateway_span(fleet, request_id), timeout_s=5)
    a = span.attributes
    assert span.kind == SpanKind.SERVER
    assert format(span.context.trace_id, "032x") == trace_id
    assert format(span.parent.span_id, "016x") == client_span
    assert a["fleetserve.tenant_id"] == "dev" and a["fleetserve.model"] == MODEL
    assert isinstance(a["fleetserve.ttft_ms"], float) and 0 < a["fleetserve.ttft_ms"] < 10_000
    assert a["fleetserve.output_tokens"] == 16 and a["fleetserve.prompt_tokens"] > 0
    assert a["fleetserve.cached_tokens"] >= 0
    assert a["rpc.grpc.status_code"] == 0
    # What cost and quality reports group by: the client's request type, the tenant's tier, the served model.
    assert a["fleetserve.feature"] == "smoke-test"
    assert a["fleetserve.tenant_tier"] in ("interactive", "standard", "batch")
    assert a["fleetserve.served_model"] == MODEL
    router = [
        s
        for s in fleet.spans.get_finished_spans()
        if s.name == "router.Generate" and s.attributes.get("fleetserve.request_id") == request_id
    ]
    assert len(router) == 1 and router[0].parent.span_id == span.context.span_id
    engine = [
        s
        for s in fleet.spans.get_finished_spans()
        if s.name == "engine.Generate" and s.attributes.get("fleetserve.request_id") == request_id
    ]
    assert len(engine) == 1 and engine[0].parent.span_id == router[0].context.span_id
    # The deadline travels with the request and shrinks hop by hop, never above what the client gave.
    left = [float(x.attributes["fleetserve.deadline_left_ms"]) for x in (span, router[0], engine[0])]
    assert 7_003 >= left[0] > left[1] > left[2] > 0, left


async def test_wrong_key_is_unauthenticated_with_reason(fleet):
    """A wrong key is UNAUTHENTICATED, reason INVALID_API_KEY, no retry advice; the span says 16."""
    d = await generate_error(fleet, pb.GenerateRequest(model=MODEL, prompt="hi"), metadata=auth("fsk-wrong"))
    assert (d.code, d.reason, d.retry_after_s) == (grpc.StatusCode.UNAUTHENTICATED, "INVALID_API_KEY", None)
    codes = [
        s.attributes["rpc.grpc.status_code"]
        for s in fleet.spans.get_finished_spans()
        if s.name == "gateway.Generate"
    ]
    assert grpc.StatusCode.UNAUTHENTICATED.value[0] in codes


async def test_missing_key_is_unauthenticated_missing_api_key(fleet):
    """No authorization metadata at all is UNAUTHENTICATED, reason MISSING_API_KEY."""
    d = await generate_error(fleet, pb.GenerateRequest(model=MODEL, prompt="hi"), metadata=())
    assert (d.code, d.reason) == (grpc.StatusCode.UNAUTHENTICATED, "MISSING_API_KEY")


async def test_revoked_key_stops_working(fleet):
    """A key revoked in the database is refused (the test gateway caches lookups for 0 s)."""
    key = await fleet.gateway.tenants.add_key("dev")
    call = stub(fleet).ListModels(pb.ListModelsRequest(), metadata=auth(key), timeout=5)
    assert [m.name for m in (await call).models] == [MODEL]
    assert await fleet.gateway.tenants.revoke_key(key)
    d = await generate_error(fleet, pb.GenerateRequest(model=MODEL, prompt="hi"), metadata=auth(key))
    assert d.reason == "INVALID_API_KEY"


async def test_bad_input_is_invalid_argument_with_field_violations(fleet):
    """Bad input is INVALID_ARGUMENT with a BadRequest violation per field, all at once."""
    d = await generate_error(
        fleet, pb.GenerateRequest(model=MODEL, prompt="", temperature=3.0, max_tokens=10**6)
    )
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in d.field_violations} == {"prompt", "temperature", "max_tokens"}


async def test_request_refused_before_routing_still_has_its_id_and_span_attributes(fleet):
    """A request the gateway refuses before any router call (its log context, span attributes and x-request-id
    are set once that call is on its way) still gets its x-request-id ahead of the error, and its span the
    request id, model and tenant."""
    call = stub(fleet).Generate(
        pb.GenerateRequest(model=MODEL, prompt="hi", temperature=3.0, feature="refused"),
        metadata=auth(),
        timeout=10,
    )
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    request_id = dict(await call.initial_metadata())["x-request-id"]
    assert len(request_id) == 32
    span = await assert_eventually(lambda: gateway_span(fleet, request_id), timeout_s=5)
    a = span.attributes
    assert (a["fleetserve.model"], a["fleetserve.tenant_id"], a["fleetserve.feature"]) == (
        MODEL,
        "dev",
        "refused",
    )
    assert a["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]


async def test_unknown_model_error_is_relayed_with_its_details(fleet):
    """The router's NOT_FOUND reaches the client with its ErrorInfo reason intact."""
    d = await generate_error(fleet, pb.GenerateRequest(model="gpt-none", prompt="hi"))
    assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert MODEL in d.message


async def test_cancel_at_the_gateway_reaches_the_engine(fleet):
    """Cancelling the client stream aborts the request in the engine (requests_aborted goes up) and the
    gateway span records CANCELLED (1)."""
    before = await fleet.aborted_total()
    call = stub(fleet).Generate(
        pb.GenerateRequest(model=MODEL, prompt="a long one", max_tokens=5000, ignore_eos=True),
        metadata=auth(),
        timeout=30,
    )
    got = 0
    async for resp in call:
        got += len(resp.chunk.token_ids)
        if got >= 3:
            break
    request_id = dict(await call.initial_metadata())["x-request-id"]
    call.cancel()
    await assert_eventually(lambda: _aborted_and_idle(fleet, before + 1), timeout_s=10)
    span = await assert_eventually(lambda: gateway_span(fleet, request_id), timeout_s=5)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert span.attributes["fleetserve.ttft_ms"] > 0


async def _aborted_and_idle(fleet: Fleet, at_least: int) -> bool:
    return await fleet.aborted_total() >= at_least and await fleet.busy_total() == 0


async def test_deadline_at_the_gateway_is_deadline_exceeded_and_frees_the_engine(fleet):
    """A client deadline shorter than the generation ends it with DEADLINE_EXCEEDED; the engine aborts it."""
    before = await fleet.aborted_total()
    d = await generate_error(
        fleet,
        pb.GenerateRequest(model=MODEL, prompt="slow", max_tokens=5000, ignore_eos=True),
        rpc_timeout_s=0.4,
    )
    assert d.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await assert_eventually(lambda: _aborted_and_idle(fleet, before + 1), timeout_s=10)
    codes = {
        x.attributes["rpc.grpc.status_code"]
        for x in fleet.spans.get_finished_spans()
        if x.name == "gateway.Generate" and x.attributes.get("fleetserve.model") == MODEL
    }
    assert grpc.StatusCode.DEADLINE_EXCEEDED.value[0] in codes


async def test_a_pinned_version_that_fails_is_counted_for_its_version(fleet):
    """A request pinned to v7, whose only replica refuses connections, fails UNAVAILABLE with details, and the
    gateway's span still names v7 (from the router's initial metadata: no chunk came), for the version's error
    rate; a request pinned to the fleet's version is served by it."""
    await fleet.register_dead_replica("dead-v7", model_version="v7")
    try:
        call = stub(fleet).Generate(
            pb.GenerateRequest(model=MODEL, prompt="pinned", model_version="v7"), metadata=auth(), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
        d = details_of(exc.value)
        assert d.code == grpc.StatusCode.UNAVAILABLE and d.reason and d.retry_after_s
        request_id = dict(await call.initial_metadata())["x-request-id"]
        span = await assert_eventually(lambda: gateway_span(fleet, request_id), timeout_s=5)
        assert span.attributes["fleetserve.model_version"] == "v7"
    finally:
        await fleet.deregister("dead-v7")
    call = stub(fleet).Generate(
        pb.GenerateRequest(model=MODEL, prompt="pinned", model_version="v1", max_tokens=2),
        metadata=auth(),
        timeout=10,
    )
    assert [r.chunk async for r in call][0].served_by.model_version == "v1"


async def test_list_models(fleet):
    """ListModels (authenticated) lists the fleet's models with their replica counts."""
    resp = await stub(fleet).ListModels(pb.ListModelsRequest(), metadata=auth(), timeout=5)
    assert [(m.name, m.replicas) for m in resp.models] == [(MODEL, 2)]


@asynccontextmanager
async def gateway_without_router(tmp_path: Path) -> AsyncIterator:
    """A started gateway whose router address has nothing listening; stopped at the end."""
    telemetry, _ = recording_telemetry()
    gw = await start_gateway(
        GatewaySettings(
            router_address=closed_port_address(), db_path=str(tmp_path / "gw.db"), bootstrap_api_key=API_KEY
        ),
        telemetry,
    )
    try:
        yield gw
    finally:
        await gw.stop(0)
        telemetry.shutdown()


@pytest.mark.asyncio(loop_scope="function")
async def test_unreachable_router_is_unavailable_with_retry_advice(tmp_path):
    """With no router listening, Generate is UNAVAILABLE, reason ROUTER_UNAVAILABLE, with a retry delay."""
    async with gateway_without_router(tmp_path) as gw, grpc.aio.insecure_channel(gw.address) as ch:
        call = pb_grpc.InferenceServiceStub(ch).Generate(
            pb.GenerateRequest(model=MODEL, prompt="hi"), metadata=auth(), timeout=5
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
    d = details_of(exc.value)
    assert (d.code, d.reason) == (grpc.StatusCode.UNAVAILABLE, "ROUTER_UNAVAILABLE")
    assert d.retry_after_s and d.retry_after_s > 0
