"""The gateway's gRPC API beyond Generate, over real servers: Chat streams the same chunks, Feedback is stored
and counted per model, and server reflection describes the versioned v1 service (what grpcurl uses)."""

from __future__ import annotations

import asyncio
import json
import sys

import grpc
import openai
import pytest
import pytest_asyncio
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from fleetserve.metrics.v1 import metrics_service_pb2 as metrics_pb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from shared.errors import details_of
from tests.integration.conftest import running_cluster
from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

CHAT = [
    common_pb2.ChatMessage(role="system", content="be brief"),
    common_pb2.ChatMessage(role="user", content="hello fleet"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("protocols"), gateway=True) as f:
        yield f


def auth(key: str = API_KEY):
    return (("authorization", f"Bearer {key}"),)


def stub(fleet) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))


async def test_chat_streams_the_same_chunks_as_generate_with_messages(fleet):
    """Chat(messages) streams what Generate with the same messages streams (greedy), served_by first and usage
    last, with an x-request-id; the gateway span is gateway.Chat."""
    s = stub(fleet)
    chat = s.Chat(
        pb.ChatRequest(model=MODEL, messages=CHAT, max_tokens=10, seed=3), metadata=auth(), timeout=10
    )
    chunks = [r.chunk async for r in chat]
    gen = [
        r.chunk
        async for r in s.Generate(
            pb.GenerateRequest(model=MODEL, messages=CHAT, max_tokens=10, seed=3), metadata=auth(), timeout=10
        )
    ]
    assert chunks[0].served_by.replica_id in fleet.engines
    assert "".join(c.text for c in chunks) == "".join(c.text for c in gen) != ""
    assert chunks[-1].finish_reason and chunks[-1].usage.completion_tokens == gen[-1].usage.completion_tokens
    request_id = dict(await chat.initial_metadata())["x-request-id"]
    span = await assert_eventually(
        lambda: [
            x
            for x in fleet.spans.get_finished_spans()
            if x.name == "gateway.Chat" and x.attributes.get("fleetserve.request_id") == request_id
        ],
        timeout_s=5,
    )
    assert span[0].attributes["fleetserve.output_tokens"] == chunks[-1].usage.completion_tokens


async def test_chat_without_messages_is_invalid_argument(fleet):
    """Chat with no messages is INVALID_ARGUMENT naming the messages field."""
    call = stub(fleet).Chat(pb.ChatRequest(model=MODEL), metadata=auth(), timeout=5)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in call:
            pass
    d = details_of(exc.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in d.field_violations] == ["messages"]


async def test_feedback_is_stored_counted_and_checked(fleet):
    """Feedback on a response (gRPC or HTTP) is stored with the response's model, emitted as a span event; a bad
    rating is INVALID_ARGUMENT; another tenant cannot rate it (NOT_FOUND)."""
    s = stub(fleet)
    call = s.Generate(
        pb.GenerateRequest(model=MODEL, prompt="rate me", max_tokens=3), metadata=auth(), timeout=10
    )
    async for _ in call:
        pass
    request_id = dict(await call.initial_metadata())["x-request-id"]
    resp = await s.Feedback(
        pb.FeedbackRequest(request_id=request_id, rating=5, tags=["helpful", "fast"]),
        metadata=auth(),
        timeout=5,
    )
    assert len(resp.feedback_id) == 32
    assert await fleet.gateway.servicer.feedback.ratings(request_id) == [("dev", 5, "helpful,fast")]
    row = await fleet.gateway.databases.jobs.fetchrow(
        "SELECT model FROM feedback WHERE id = ?", resp.feedback_id
    )
    assert row == (MODEL,)
    events = [
        e
        for x in fleet.spans.get_finished_spans()
        if x.name == "gateway.Feedback"
        for e in x.events
        if e.name == "fleetserve.feedback"
    ]
    assert any(
        e.attributes["fleetserve.request_id"] == request_id
        and e.attributes["fleetserve.feedback.rating"] == 5
        for e in events
    )

    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.Feedback(pb.FeedbackRequest(request_id=request_id, rating=9), metadata=auth(), timeout=5)
    assert [f for f, _ in details_of(exc.value).field_violations] == ["rating"]

    other = await fleet.gateway.tenants.create_tenant("rival", tenant_id="rival")
    rival_key = await fleet.gateway.tenants.add_key(other.id)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.Feedback(
            pb.FeedbackRequest(request_id=request_id, rating=1), metadata=auth(rival_key), timeout=5
        )
    assert details_of(exc.value).reason == "REQUEST_NOT_FOUND"

    # The x-request-id of an OpenAI-compatible HTTP response can be rated the same way.
    async with openai.AsyncOpenAI(
        base_url=f"http://{fleet.gateway.http_address}/v1", api_key=API_KEY, max_retries=0
    ) as c:
        raw = await c.completions.with_raw_response.create(model=MODEL, prompt="hi", max_tokens=2)
    http_id = raw.headers["x-request-id"]
    await s.Feedback(pb.FeedbackRequest(request_id=http_id, rating=2), metadata=auth(), timeout=5)
    assert await fleet.gateway.servicer.feedback.ratings(http_id) == [("dev", 2, "")]


async def test_a_stream_its_client_cancels_is_known_to_feedback_once_it_ends(fleet):
    """A Generate its client cancels after the first chunk is remembered for Feedback (tenant, model) once the
    gateway has ended it, as a finished one is."""
    s = stub(fleet)
    call = s.Generate(
        pb.GenerateRequest(model=MODEL, prompt="cut me short", max_tokens=1000, ignore_eos=True),
        metadata=auth(),
        timeout=10,
    )
    await call.read()
    request_id = dict(await call.initial_metadata())["x-request-id"]
    call.cancel()

    def ended_cancelled() -> bool:
        return any(
            x.name == "gateway.Generate"
            and x.attributes.get("fleetserve.request_id") == request_id
            and x.attributes.get("rpc.grpc.status_code") == grpc.StatusCode.CANCELLED.value[0]
            for x in fleet.spans.get_finished_spans()
        )

    await assert_eventually(ended_cancelled, timeout_s=10, message="the gateway never ended it as cancelled")
    served = fleet.gateway.servicer.feedback.recent.get(request_id)
    assert served is not None and (served.tenant_id, served.model) == ("dev", MODEL)


async def test_reflection_lists_and_describes_the_v1_service(fleet):
    """Server reflection (what grpcurl uses) lists fleetserve.inference.v1.InferenceService with every RPC and
    resolves its message types, so a client needs no .proto files."""

    def describe():
        with grpc.insecure_channel(fleet.gateway.address) as ch:
            db = ProtoReflectionDescriptorDatabase(ch)
            services = set(db.get_services())
            pool = descriptor_pool.DescriptorPool(db)
            svc = pool.FindServiceByName("fleetserve.inference.v1.InferenceService")
            fields = [
                f.name for f in pool.FindMessageTypeByName("fleetserve.inference.v1.ChatRequest").fields
            ]
            return services, [m.name for m in svc.methods], fields

    services, methods, fields = await asyncio.to_thread(describe)
    assert {"fleetserve.inference.v1.InferenceService", "grpc.health.v1.Health"} <= services
    assert methods == ["Generate", "Chat", "ListModels", "Feedback", "SubmitBatch", "GetJob", "CancelJob"]
    assert "messages" in fields and "prompt" not in fields


async def test_chat_request_is_wire_compatible_with_generate_request():
    """Every ChatRequest field has the same number, name, type, repetition and presence in GenerateRequest (the gateway re-reads a
    ChatRequest's bytes as a GenerateRequest), and Chat/Generate responses have the same shape."""
    gen = pb.GenerateRequest.DESCRIPTOR.fields_by_number
    for f in pb.ChatRequest.DESCRIPTOR.fields:
        g = gen[f.number]
        assert (g.name, g.type, g.is_repeated, g.has_presence) == (
            f.name,
            f.type,
            f.is_repeated,
            f.has_presence,
        )
    chat_resp = [(f.number, f.name, f.message_type) for f in pb.ChatResponse.DESCRIPTOR.fields]
    gen_resp = [(f.number, f.name, f.message_type) for f in pb.GenerateResponse.DESCRIPTOR.fields]
    assert chat_resp == gen_resp


async def test_cli_generate_chat_messages(fleet):
    """`fleetserve generate -m role:content ...` streams a chat reply through the Chat RPC; a message without
    a role is a usage error (exit 2)."""
    base = [
        sys.executable, "-m", "shared.cli.main", "generate", "--gateway", fleet.gateway.address,
        "--api-key", API_KEY, "--max-tokens", "5",
    ]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *base, "-m", "system:be brief", "-m", "user:hello", "--json", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0
    last = json.loads(out.decode().splitlines()[-1])
    assert last["finish_reason"] == "length" and last["usage"]["completion_tokens"] == 5

    def chat_spans() -> list:
        return [
            x
            for x in fleet.spans.get_finished_spans()
            if x.name == "gateway.Chat" and x.attributes.get("fleetserve.request_id") == last["request_id"]
        ]

    # The gateway ends its span once the router's call has ended, after the client's stream (which it ends with
    # the last chunk): the CLI's exit usually outlasts that, but nothing orders the two.
    await assert_eventually(chat_spans, timeout_s=10)
    assert len(chat_spans()) == 1
    proc = await asyncio.create_subprocess_exec(*base, "-m", "no role", stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2 and b"ROLE:CONTENT" in err


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="function")
async def test_feedback_reaches_the_metrics_service_as_a_counter(tmp_path):
    """In a fleet of processes, a rating sent to the gateway shows up in the metrics service's counters
    (fleetserve.gateway.feedback), where quality signals are read."""
    async with running_cluster(tmp_path, engines=1) as cluster:
        async with grpc.aio.insecure_channel(cluster.gateway) as ch:
            s = pb_grpc.InferenceServiceStub(ch)
            call = s.Generate(
                pb.GenerateRequest(model=MODEL, prompt="rate me", max_tokens=2),
                metadata=auth(cluster.api_key),
                timeout=10,
            )
            async for _ in call:
                pass
            request_id = dict(await call.initial_metadata())["x-request-id"]
            for rating in (1, 5):
                await s.Feedback(
                    pb.FeedbackRequest(request_id=request_id, rating=rating),
                    metadata=auth(cluster.api_key),
                    timeout=5,
                )
        async with grpc.aio.insecure_channel(cluster.metrics) as ch:
            metrics = metrics_grpc.MetricsServiceStub(ch)

            async def counted():
                resp = await metrics.Query(metrics_pb.QueryRequest(), timeout=5)
                return resp.counters.get("fleetserve.gateway.feedback", 0) >= 2

            await assert_eventually(counted, timeout_s=20, interval_s=0.2)


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="function")
async def test_gateway_overhead_bench_measures_all_three_paths(tmp_path):
    """`fleetserve bench --gateway-overhead --spawn` runs every round on the router, gateway gRPC and gateway
    HTTP paths without errors, and reports paired differences over every round (no speed is asserted)."""
    from loadtest import bench

    out = tmp_path / "overhead.json"
    argv = ["--gateway-overhead", "--spawn", "--speed-factor", "5", "--requests", "6", "--warmup", "1"]
    argv += ["--max-tokens", "8", "--prompt-tokens", "16", "--quiet", "--out", str(out)]
    assert await asyncio.to_thread(bench.main, argv) == 0
    record = json.loads(out.read_text())
    assert set(record["records"]) == {"router", "gateway_grpc", "gateway_http"}
    for r in record["records"].values():
        assert (r["requests"], r["errors"]) == (6, 0)
        assert r["output_tokens"] == 6 * 8 and r["ttft_ms"]["p50"] > 0
    assert record["gateway_grpc_minus_router"]["paired_ttft_ms"]["pairs"] == 6
    assert record["gateway_http_minus_gateway_grpc"]["paired_ttft_ms"]["pairs"] == 6
    assert isinstance(record["target"]["met"], bool)


async def test_a_model_whose_replicas_all_left_is_unavailable_at_the_gateway_and_an_unknown_one_not_found(
    fleet,
):
    """The gateway checks model names against the router's list: a model whose replicas all left (a restart, a
    recycle) stays on it, so its requests get UNAVAILABLE with a retry delay, while a model never served is
    NOT_FOUND."""
    await fleet.register_dead_replica("away-1", model="away")
    await fleet.deregister("away-1")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        [
            r
            async for r in stub(fleet).Generate(
                pb.GenerateRequest(model="away", prompt="hi"), metadata=auth(), timeout=10
            )
        ]
    d = details_of(exc.value)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and d.reason == "NO_HEALTHY_REPLICA"
    assert d.retry_after_s and d.retry_after_s > 0
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        [
            r
            async for r in stub(fleet).Generate(
                pb.GenerateRequest(model="never", prompt="hi"), metadata=auth(), timeout=10
            )
        ]
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and details_of(exc.value).reason == "MODEL_NOT_FOUND"
