"""Gateway admission over real servers (registry + 2 sim engines + router in this process, a gateway per test
with its own settings and database): model access, rate limits, token rate reconciliation, budgets, the ledger,
stream caps, validation against the context, oversized messages, the safety filter and load shedding."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time

import grpc
import pytest
import pytest_asyncio
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from shared.errors import details_of
from shared.telemetry import Telemetry
from tests.integration.test_router import (
    API_KEY,
    MODEL,
    Fleet,
    engine_app,
    engine_config,
    in_process_fleet,
    recording_telemetry,
    registry_app,
    registry_config,
)
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("admission")) as f:
        yield f


class Gateway:
    """A started gateway, its metrics, and a client for it."""

    def __init__(self, app, reader: InMemoryMetricReader, channel: grpc.aio.Channel) -> None:
        self.app = app
        self.reader = reader
        self.stub = pb_grpc.InferenceServiceStub(channel)

    @property
    def tenants(self):
        return self.app.tenants

    @property
    def ledger(self):
        return self.app.servicer.pipeline.admission.ledger

    async def tenant_key(self, name: str, **limits) -> str:
        """A new tenant with these limits and a key for it."""
        await self.tenants.create_tenant(name, tenant_id=name)
        if limits:
            await self.tenants.set_tenant(name, **limits)
        return await self.tenants.add_key(name)

    def counter(self, name: str) -> list[tuple[dict, int]]:
        data = self.reader.get_metrics_data()
        return [
            (dict(p.attributes), p.value)
            for rm in (data.resource_metrics if data else ())
            for sm in rm.scope_metrics
            for m in sm.metrics
            if m.name == name
            for p in m.data.data_points
        ]

    async def generate(self, key: str, timeout_s: float = 20, **fields) -> tuple[list, str]:
        """The chunks and the request id of a successful Generate."""
        call = self.stub.Generate(
            pb.GenerateRequest(**{"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields}),
            metadata=auth(key),
            timeout=timeout_s,
        )
        chunks = [r.chunk async for r in call]
        return chunks, dict(await call.initial_metadata())["x-request-id"]

    async def error(self, key: str, **fields):
        """The details of a Generate that fails."""
        call = self.stub.Generate(
            pb.GenerateRequest(**{"model": MODEL, "prompt": "hello", "max_tokens": 4, **fields}),
            metadata=auth(key),
            timeout=20,
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
        return details_of(exc.value)


@contextlib.asynccontextmanager
async def real_time_fleet(tmp_path):
    """Registry, one sim engine at real speed (a 4000-token stream takes seconds) and a router that keeps one
    request in flight per replica and queues the rest, so the fleet can be saturated on purpose."""
    from services.router.app import start as start_router
    from services.router.config import RouterSettings

    telemetry, spans = recording_telemetry()
    started = []
    try:
        registry = await registry_app.start(
            registry_config.RegistrySettings(db_path=str(tmp_path / "registry.db"), heartbeat_interval_s=0.2),
            telemetry,
        )
        started.append(registry)
        engine = await engine_app.start(
            engine_config.EngineSettings(
                registry_address=registry.address, replica_id="engine-1", model=MODEL, speed_factor=1.0
            ),
            telemetry,
        )
        started.append(engine)
        router = await start_router(
            RouterSettings(
                registry_address=registry.address,
                max_in_flight_per_replica=1,
                watch_backoff_base_s=0.05,
                watch_backoff_max_s=0.2,
            ),
            telemetry,
        )
        started.append(router)
        await assert_eventually(lambda: len(router.membership.routable(MODEL)) == 1, timeout_s=10)
        yield Fleet(tmp_path, telemetry, spans, registry, {"engine-1": engine}, router)
    finally:
        for app in reversed(started):
            await app.stop(0.5)
        telemetry.shutdown()


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@contextlib.asynccontextmanager
async def gateway(fleet, tmp_path, **overrides):
    """A gateway on the fleet's router with these settings (fast polls, no caching), stopped at the end."""
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    tracer_provider = TracerProvider()
    telemetry = Telemetry(
        tracer_provider.get_tracer("t"), meter_provider.get_meter("t"), tracer_provider, meter_provider
    )
    settings = {
        "router_address": fleet.router.address,
        "db_path": str(tmp_path / "gateway.db"),
        "bootstrap_api_key": API_KEY,
        "auth_cache_ttl_s": 30.0,
        "config_poll_s": 0.05,
        "ledger_flush_interval_s": 0.05,
        "budget_refresh_s": 0.0,
        "http_port": -1,
        **overrides,
    }
    app = await start_gateway(GatewaySettings(**settings), telemetry)
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield Gateway(app, reader, channel)
    finally:
        await channel.close()
        await app.stop(0.5)
        telemetry.shutdown()


async def test_a_key_without_access_to_the_model_is_permission_denied_until_the_admin_allows_it(
    fleet, tmp_path
):
    """A tenant limited to other models gets PERMISSION_DENIED (MODEL_NOT_ALLOWED); allowing the model applies
    to the running gateway within config_poll_s although lookups are cached for 30 s."""
    async with gateway(fleet, tmp_path) as gw:
        key = await gw.tenant_key("acme", models=["other-model"])
        d = await gw.error(key)
        assert (d.code, d.reason) == (grpc.StatusCode.PERMISSION_DENIED, "MODEL_NOT_ALLOWED")
        await gw.tenants.set_tenant("acme", models=["other-model", MODEL])
        # The change is made on another connection, as `fleetserve admin` would.
        await assert_eventually(lambda: _succeeds(gw, key), timeout_s=5)


async def _succeeds(gw: Gateway, key: str) -> bool:
    try:
        await gw.generate(key)
    except grpc.aio.AioRpcError:
        return False
    return True


async def test_requests_per_second_limit_gives_quota_failure_and_a_retry_delay_that_works(fleet, tmp_path):
    """Past its rps, a tenant gets RESOURCE_EXHAUSTED (RATE_LIMITED) with QuotaFailure naming it and a
    RetryInfo; after waiting that long the next request passes."""
    async with gateway(fleet, tmp_path) as gw:
        key = await gw.tenant_key("rps", rps=2)
        await gw.generate(key)
        await gw.generate(key)
        d = await gw.error(key)
        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
        assert (
            d.quota_violations[0][0] == "tenant:rps" and "2 requests per second" in d.quota_violations[0][1]
        )
        assert 0 < d.retry_after_s <= 0.5
        await asyncio.sleep(d.retry_after_s)  # honouring the advice is the behaviour under test
        await gw.generate(key)
        assert any(a.get("limit") == "RATE_LIMITED" for a, v in gw.counter("fleetserve.gateway.limited") if v)


async def test_completion_tokens_count_against_tokens_per_minute_after_the_stream(fleet, tmp_path):
    """A long completion is charged when it ends, so the tenant's next request is refused (TOKEN_RATE_LIMITED)
    although its prompt alone would fit."""
    async with gateway(fleet, tmp_path) as gw:
        key = await gw.tenant_key("tpm", tokens_per_min=200)
        chunks, _ = await gw.generate(key, max_tokens=250, ignore_eos=True)
        assert chunks[-1].usage.completion_tokens == 250
        d = await gw.error(key, max_tokens=1)
        assert d.reason == "TOKEN_RATE_LIMITED" and d.retry_after_s > 0


async def test_ledger_sums_exactly_to_the_usage_in_responses(fleet, tmp_path):
    """N requests of different sizes: the ledger's rows (one per request id) sum to the final chunks' usage."""
    async with gateway(fleet, tmp_path, model_prices={MODEL: (100.0, 300.0)}) as gw:
        key = await gw.tenant_key("ledger")
        usages = {}
        for i in range(6):
            chunks, rid = await gw.generate(
                key, prompt="count " * (i + 1), max_tokens=3 + 5 * i, ignore_eos=i % 2 == 0
            )
            u = chunks[-1].usage
            usages[rid] = (u.prompt_tokens, u.completion_tokens)
        await assert_eventually(lambda: _ledger_rows(gw, "ledger") == len(usages), timeout_s=5)
        db = sqlite3.connect(gw.app.tenants.db_path)
        rows = db.execute(
            "SELECT request_id, prompt_tokens, completion_tokens, cost_usd, partial FROM usage_ledger "
            "WHERE tenant_id = 'ledger'"
        ).fetchall()
        db.close()
        assert {r[0]: (r[1], r[2]) for r in rows} == usages
        assert sum(r[1] + r[2] for r in rows) == sum(p + c for p, c in usages.values())
        assert sum(r[3] for r in rows) == pytest.approx(
            sum(p * 100e-6 + c * 300e-6 for p, c in usages.values())
        )
        assert not any(r[4] for r in rows)


def _ledger_rows(gw: Gateway, tenant: str) -> int:
    db = sqlite3.connect(gw.app.tenants.db_path)
    try:
        return db.execute("SELECT COUNT(*) FROM usage_ledger WHERE tenant_id = ?", (tenant,)).fetchone()[0]
    finally:
        db.close()


async def test_token_budget_per_period_is_enforced_with_the_period_end_as_retry(fleet, tmp_path):
    """Once a tenant's daily token budget is used, it gets TOKEN_BUDGET_EXHAUSTED until the UTC day ends."""
    async with gateway(fleet, tmp_path) as gw:
        key = await gw.tenant_key("budget", token_budget=60, budget_period="day")
        await gw.generate(key, max_tokens=60, ignore_eos=True)
        d = await gw.error(key)
        assert d.reason == "TOKEN_BUDGET_EXHAUSTED" and d.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        until_midnight = 86400 - time.time() % 86400
        assert abs(d.retry_after_s - until_midnight) < 5
        assert "budget" in d.quota_violations[0][1]


async def test_cost_budget_from_model_prices(fleet, tmp_path):
    """With a model priced, a tenant whose spend reaches its cost budget is refused (COST_BUDGET_EXHAUSTED)."""
    async with gateway(fleet, tmp_path, model_prices={MODEL: (0.0, 10_000.0)}) as gw:
        key = await gw.tenant_key("cost", cost_budget_usd=0.1)
        await gw.generate(key, max_tokens=10, ignore_eos=True)  # 10 tokens at $0.01 each
        d = await gw.error(key)
        assert d.reason == "COST_BUDGET_EXHAUSTED"


async def test_concurrent_streams_are_capped_per_tenant(fleet, tmp_path):
    """With max_streams 1, a second stream is refused (CONCURRENT_STREAMS_LIMIT, with a retry delay) while the
    first runs; once it is cancelled a new one is admitted."""
    async with gateway(fleet, tmp_path) as gw:
        key = await gw.tenant_key("streams", max_streams=1)
        long = gw.stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="long", max_tokens=5000, ignore_eos=True),
            metadata=auth(key),
            timeout=30,
        )
        await long.read()
        d = await gw.error(key)
        assert d.reason == "CONCURRENT_STREAMS_LIMIT" and d.retry_after_s > 0
        long.cancel()
        await assert_eventually(lambda: _succeeds(gw, key), timeout_s=5)


async def test_prompt_too_long_for_the_context_and_unknown_model(fleet, tmp_path):
    """A prompt longer than the model's configured context is INVALID_ARGUMENT on the prompt field; an unknown
    model is NOT_FOUND naming the available models, from the gateway (no limit is used up)."""
    async with gateway(fleet, tmp_path, context_lengths={MODEL: 32}) as gw:
        key = await gw.tenant_key("valid", rps=1)
        d = await gw.error(key, prompt="word " * 100)
        assert d.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in d.field_violations] == [
            "prompt"
        ] and "context is 32 tokens" in d.field_violations[0][1]
        d = await gw.error(key, model="no-such-model")
        assert (d.code, d.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND") and MODEL in d.message
        await gw.generate(key)  # the refusals above did not take the one request per second


async def test_oversized_messages_are_refused_before_parsing(fleet, tmp_path):
    """A request larger than max_request_bytes is RESOURCE_EXHAUSTED from gRPC itself; smaller ones pass."""
    async with gateway(fleet, tmp_path, max_request_bytes=4096) as gw:
        call = gw.stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="x" * 5000), metadata=auth(API_KEY), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in call:
                pass
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "larger than max" in (exc.value.details() or "")
        await gw.generate(API_KEY, prompt="y" * 1000)


async def test_safety_filter_blocks_input_and_counts_the_refusal(fleet, tmp_path):
    """A prompt matching a deny pattern is INVALID_ARGUMENT with reason SAFETY_INPUT_BLOCKED, and
    fleetserve.gateway.refusals counts it by reason."""
    async with gateway(fleet, tmp_path, safety_input_patterns=[r"forbidden\s+topic"]) as gw:
        d = await gw.error(API_KEY, prompt="tell me about the FORBIDDEN  topic")
        assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SAFETY_INPUT_BLOCKED")
        await gw.generate(API_KEY, prompt="an allowed topic")
        counts = gw.counter("fleetserve.gateway.refusals")
        assert [(a["reason"], v) for a, v in counts] == [("SAFETY_INPUT_BLOCKED", 1)]


async def test_safety_filter_stops_output_that_spans_chunks_before_it_is_sent(fleet, tmp_path):
    """Generation is deterministic with a seed: a deny pattern made of the end of one chunk and the start of the
    next stops the stream with SAFETY_OUTPUT_BLOCKED before the completing chunk reaches the client."""
    req = dict(prompt="tell a story", max_tokens=24, ignore_eos=True, seed=7)
    async with gateway(fleet, tmp_path) as gw:
        reference, _ = await gw.generate(API_KEY, **req)
    texts = [c.text for c in reference]
    i = next(i for i in range(1, len(texts)) if len(texts[i - 1]) >= 2 and len(texts[i]) >= 2)
    pattern = __import__("re").escape(texts[i - 1][-2:] + texts[i][:2])
    (tmp_path / "second").mkdir()
    async with gateway(fleet, tmp_path / "second", safety_output_patterns=[pattern]) as gw:
        got = []
        call = gw.stub.Generate(pb.GenerateRequest(model=MODEL, **req), metadata=auth(API_KEY), timeout=20)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for r in call:
                got.append(r.chunk.text)
        d = details_of(exc.value)
        assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "SAFETY_OUTPUT_BLOCKED")
        # Everything before the completing chunk arrived (unless an earlier window matched first), not it.
        assert "".join(got) == "".join(texts[: len(got)]) and len(got) <= i
        assert [a["reason"] for a, v in gw.counter("fleetserve.gateway.refusals") if v] == [
            "SAFETY_OUTPUT_BLOCKED"
        ]


async def test_saturated_fleet_sheds_batch_first_keeps_standard_and_degrades_when_configured(tmp_path):
    """One engine, one request in flight at a time (the router queues the rest): with 3 long interactive
    streams queued, batch requests are shed (LOAD_SHED, RetryInfo) while standard ones are admitted and
    served; a gateway configured to degrade caps max_tokens instead and says so on the first chunk."""
    async with real_time_fleet(tmp_path) as small:
        shed = {"shed_batch_queue_depth": 2, "shed_standard_queue_depth": 50, "shed_poll_s": 0.05}
        (tmp_path / "degrade").mkdir()
        async with (
            gateway(small, tmp_path, **shed) as gw,
            gateway(small, tmp_path / "degrade", degrade_max_tokens=8, **shed) as degrading,
        ):
            long = [
                gw.stub.Generate(
                    pb.GenerateRequest(
                        model=MODEL, prompt="busy", max_tokens=4000, ignore_eos=True, priority=1
                    ),
                    metadata=auth(API_KEY),
                    timeout=120,
                )
                for _ in range(4)
            ]
            shedder = gw.app.servicer.pipeline.shedder
            await assert_eventually(lambda: shedder.depths.get(MODEL, 0) >= 3, timeout_s=10)
            d = await gw.error(API_KEY, priority=3)
            assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "LOAD_SHED")
            assert d.retry_after_s >= 1.0 and "batch" in d.quota_violations[0][1]
            shed_total = {"model_name": MODEL, "tier": "batch"}
            registry = gw.app.metrics_registry
            # Counted as the request is settled, which may come after the client has its status.
            await assert_eventually(
                lambda: registry.get_sample_value("fleetserve:shed_requests_total", shed_total) == 1,
                timeout_s=10,
            )
            standard = asyncio.ensure_future(gw.generate(API_KEY, timeout_s=120, priority=2))
            await assert_eventually(lambda: degrading.app.servicer.pipeline.shedder.depths.get(MODEL, 0) >= 3)
            degraded = asyncio.ensure_future(
                degrading.generate(API_KEY, timeout_s=120, priority=3, max_tokens=100, ignore_eos=True)
            )
            await assert_eventually(lambda: shedder.depths.get(MODEL, 0) >= 5, timeout_s=10)
            for call in long:
                call.cancel()
            chunks, _ = await asyncio.wait_for(standard, 120)
            assert chunks[-1].usage.completion_tokens == 4
            chunks, _ = await asyncio.wait_for(degraded, 120)
            assert "max_tokens capped at 8" in chunks[0].served_by.degraded
            assert chunks[-1].usage.completion_tokens == 8
            # Counted when the gateway settles the request, which is after the client has its last chunk (the
            # gateway ends the client's stream with it): a fresh-clone CI run read the counter before that.
            degraded_total = {"model_name": MODEL}
            degrading_registry = degrading.app.metrics_registry
            await assert_eventually(
                lambda: (
                    degrading_registry.get_sample_value("fleetserve:degraded_requests_total", degraded_total)
                    == 1
                ),
                timeout_s=10,
            )


async def test_a_cancelled_stream_is_recorded_partial_with_the_gateways_counts(fleet, tmp_path):
    """A stream cancelled mid-way has no usage chunk: its ledger row is marked partial, with the prompt as the
    fleet tokenizer counts it and at least the chunks the client received."""
    from shared import tokenizer

    async with gateway(fleet, tmp_path) as gw:
        key = await gw.tenant_key("cancels")
        call = gw.stub.Generate(
            pb.GenerateRequest(model=MODEL, prompt="a long story", max_tokens=4000, ignore_eos=True),
            metadata=auth(key),
            timeout=30,
        )
        for _ in range(5):
            await call.read()
        call.cancel()
        await assert_eventually(lambda: _ledger_rows(gw, "cancels") == 1, timeout_s=5)
        db = sqlite3.connect(gw.app.tenants.db_path)
        row = db.execute(
            "SELECT status, partial, prompt_tokens, completion_tokens FROM usage_ledger WHERE tenant_id = 'cancels'"
        ).fetchone()
        db.close()
        assert row[:3] == ("CANCELLED", 1, len(tokenizer.load().encode("a long story")))
        assert 5 <= row[3] < 4000
