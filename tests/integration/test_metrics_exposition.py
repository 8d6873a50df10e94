"""Prometheus series over real servers in this process (registry, 2 sim engines, router, a gateway per test):
each request counted once where it ended, with its status, latencies and tokens; engines under vLLM's names;
the registry's replica counts; bounded labels."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import pytest_asyncio

from services.engine.engine_metrics import ENGINE_INDEX
from tests.integration.test_gateway_admission import gateway
from tests.integration.test_router import API_KEY, MODEL, generate, generate_error, in_process_fleet, request
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

REQUESTS = 4
ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("exposition")) as f:
        yield f


def value(registry, name: str, **labels) -> float:
    """A sample's value (0 when the series does not exist)."""
    return registry.get_sample_value(name, labels) or 0.0


def engines_total(fleet, name: str, **labels) -> float:
    return sum(
        value(app.metrics_registry, name, model_name=MODEL, engine=ENGINE_INDEX, **labels)
        for app in fleet.engines.values()
    )


async def test_gateway_counts_each_request_once_with_status_latency_and_tokens(fleet, tmp_path):
    """Served requests: OK count, one TTFT/TPOT/E2E observation each, token totals equal to the usage the
    clients got. Refusals: by code (a made-up model under model_name="unknown"), limits by reason. Nothing
    is left running."""
    async with gateway(fleet, tmp_path) as gw:
        reg = gw.app.metrics_registry
        usages = []
        for _ in range(5):
            chunks, _ = await gw.generate(API_KEY, max_tokens=6, ignore_eos=True)
            usages.append(chunks[-1].usage)
        assert (await gw.error("fsk-wrong")).code == grpc.StatusCode.UNAUTHENTICATED
        assert (await gw.error(API_KEY, model="no-such-model")).code == grpc.StatusCode.NOT_FOUND
        assert (await gw.error(API_KEY, temperature=9.0)).code == grpc.StatusCode.INVALID_ARGUMENT
        limited = await gw.tenant_key("limited", rps=0.01)
        chunks, _ = await gw.generate(limited, max_tokens=6, ignore_eos=True)
        usages.append(chunks[-1].usage)
        d = await gw.error(limited)
        assert (d.code, d.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")

        def requests(code: str, model: str = MODEL) -> float:
            return value(reg, "fleetserve:requests_total", model_name=model, code=code)

        # The gateway counts (and observes) a served request once its router call has ended, which comes after
        # the client's stream (ended with the last chunk): read right after, the 6th was missing in 84 of 1,800
        # probes, 0 of 1,800 with the refused request's round trip between; awaited, the rest is then exact.
        await assert_eventually(lambda: requests("OK") == 6, timeout_s=10)
        assert requests("UNAUTHENTICATED") == 1
        assert requests("NOT_FOUND", "unknown") == 1 and requests("NOT_FOUND") == 0
        assert requests("INVALID_ARGUMENT") == 1
        assert requests("RESOURCE_EXHAUSTED") == 1
        assert value(reg, "fleetserve:limited_requests_total", model_name=MODEL, limit="RATE_LIMITED") == 1
        for name in (
            "fleetserve:time_to_first_token_seconds_count",
            "fleetserve:request_time_per_output_token_seconds_count",
            "fleetserve:e2e_request_latency_seconds_count",
        ):
            assert value(reg, name, model_name=MODEL) == 6, name
        ttft_sum = value(reg, "fleetserve:time_to_first_token_seconds_sum", model_name=MODEL)
        e2e_sum = value(reg, "fleetserve:e2e_request_latency_seconds_sum", model_name=MODEL)
        assert 0 < ttft_sum < e2e_sum
        assert value(reg, "fleetserve:generation_tokens_total", model_name=MODEL) == sum(
            u.completion_tokens for u in usages
        )
        assert value(reg, "fleetserve:prompt_tokens_total", model_name=MODEL) == sum(
            u.prompt_tokens for u in usages
        )
        assert value(reg, "fleetserve:num_requests_running", model_name=MODEL) == 0
        # Bounded labels: no request ids, no tenants (off by default).
        labels = {k for m in reg.collect() for s in m.samples for k in s.labels}
        assert labels <= {"model_name", "code", "le", "limit", "tier", "reason"}


async def test_tenant_label_only_where_configured(fleet, tmp_path):
    """--metrics-tenant-label adds the tenant id to the request series."""
    async with gateway(fleet, tmp_path, metrics_tenant_label=True) as gw:
        await gw.generate(API_KEY)
        reg = gw.app.metrics_registry
        # The gateway counts a request once its router call has ended, which comes just after the client's stream
        # has (the gateway ends that with the last chunk): a read at once missed it in 2 of 200 probes.
        await assert_eventually(
            lambda: value(reg, "fleetserve:requests_total", model_name=MODEL, tenant="dev", code="OK") == 1,
            timeout_s=10,
        )
        assert value(reg, "fleetserve:time_to_first_token_seconds_count", model_name=MODEL, tenant="dev") == 1


async def test_engines_report_under_vllm_names(fleet, tmp_path):
    """Each engine counts its finished requests by vLLM's finished_reason, observes TTFT/TPOT/E2E once per
    request, and reports load gauges and token/prefix-cache totals read from the backend at scrape time."""
    before = engines_total(fleet, "vllm:request_success_total", finished_reason="length")
    ttft_before = engines_total(fleet, "vllm:time_to_first_token_seconds_count")
    async with gateway(fleet, tmp_path) as gw:
        for _ in range(4):
            await gw.generate(API_KEY, max_tokens=5, ignore_eos=True, prompt="the same prompt each time " * 8)
    # The engine records a request when its stream has ended there, a moment after the client saw the end.
    await assert_eventually(
        lambda: engines_total(fleet, "vllm:request_success_total", finished_reason="length") == before + 4
    )
    assert engines_total(fleet, "vllm:time_to_first_token_seconds_count") == ttft_before + 4
    assert engines_total(fleet, "vllm:generation_tokens_total") == sum(
        app.backend.counters.output_tokens for app in fleet.engines.values()
    )
    assert engines_total(fleet, "vllm:prefix_cache_hits_total") > 0  # the same prompt four times
    assert engines_total(fleet, "vllm:prefix_cache_queries_total") >= engines_total(
        fleet, "vllm:prefix_cache_hits_total"
    )
    for app in fleet.engines.values():
        reg = app.metrics_registry
        assert value(reg, "vllm:num_requests_running", model_name=MODEL, engine=ENGINE_INDEX) == 0
        assert 0 <= value(reg, "vllm:kv_cache_usage_perc", model_name=MODEL, engine=ENGINE_INDEX) <= 1


async def test_registry_reports_replicas_per_model_and_state(fleet):
    """fleetserve:registry_replicas counts the serving and draining replicas of each model."""
    reg = fleet.registry.metrics_registry
    assert value(reg, "fleetserve:registry_replicas", model_name=MODEL, state="serving") == 2
    assert value(reg, "fleetserve:registry_replicas", model_name=MODEL, state="draining") == 0


async def test_router_counts_requests_attempts_retries_and_breakers(fleet):
    """A dead replica among live ones: every request still succeeds, each counted once by code; the dead
    replica's failed attempt is a fault and the next one a retry; its breaker has a series while it is in
    the fleet and none after it left."""
    reg = fleet.router.metrics_registry
    ok_before = value(reg, "fleetserve:router_requests_total", model_name=MODEL, code="OK")
    await fleet.register_dead_replica("dead-metrics")
    sent = 0
    try:
        for i in range(40):  # the dead replica ties with the idle engines: it is picked at random
            await generate(fleet, request(max_tokens=3, request_id=f"prom-{i}"))
            sent += 1
            if value(reg, "fleetserve:router_retries_total", model_name=MODEL, kind="retry") >= 1:
                break
        else:
            pytest.fail("the dead replica was never chosen in 40 requests")
        assert value(reg, "fleetserve:router_requests_total", model_name=MODEL, code="OK") == ok_before + sent
        assert value(reg, "fleetserve:router_attempts_total", model_name=MODEL, outcome="fault") >= 1
        assert value(reg, "fleetserve:router_attempts_total", model_name=MODEL, outcome="ok") >= sent
        state = reg.get_sample_value(
            "fleetserve:router_breaker_state", {"replica": "dead-metrics", "model_name": MODEL}
        )
        assert state in (0, 1, 2)
        d = await generate_error(fleet, request(model="no-such-model"))
        assert d.code == grpc.StatusCode.NOT_FOUND
        assert value(reg, "fleetserve:router_requests_total", model_name="unknown", code="NOT_FOUND") == 1
    finally:
        await fleet.deregister("dead-metrics")
    assert (
        reg.get_sample_value(
            "fleetserve:router_breaker_state", {"replica": "dead-metrics", "model_name": MODEL}
        )
        is None
    )


class MetricCalls:
    """Counts every Prometheus and OpenTelemetry recording call (counter/gauge/histogram updates, span starts,
    attributes and events) by the fleet's code line that made it (the first frame in services/ or shared/)."""

    def __init__(self, monkeypatch) -> None:
        import collections
        import sys

        import prometheus_client.metrics as pm
        from opentelemetry.sdk.metrics._internal import instrument as oi
        from opentelemetry.sdk.trace import Span, Tracer

        self.counts: collections.Counter[str] = collections.Counter()
        self.on = False

        def site() -> str:
            f = sys._getframe(2)
            while f is not None:
                path = Path(f.f_code.co_filename)
                if path.is_relative_to(ROOT) and path.parts[len(ROOT.parts)] in ("services", "shared"):
                    return f"{path.relative_to(ROOT)}:{f.f_lineno}"
                f = f.f_back
            return "elsewhere"

        def wrap(cls, method: str) -> None:
            original = getattr(cls, method)

            def counted(*args, **kwargs):
                if self.on:
                    self.counts[site()] += 1
                return original(*args, **kwargs)

            monkeypatch.setattr(cls, method, counted)

        for cls, methods in (
            (pm.Counter, ("inc",)),
            (pm.Gauge, ("inc", "dec", "set")),
            (pm.Histogram, ("observe",)),
            (oi._Counter, ("add",)),
            (oi._UpDownCounter, ("add",)),
            (oi._Histogram, ("record",)),
            (oi._Gauge, ("set",)),
            (Span, ("set_attribute", "set_attributes", "add_event")),
            (Tracer, ("start_span",)),
        ):
            for m in methods:
                wrap(cls, m)

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.clear()
        return out


async def test_metrics_calls_per_request_do_not_grow_with_output_tokens(fleet, tmp_path, monkeypatch):
    """The token path records metrics per request, never per token: every Prometheus update, OTel instrument
    call, span start, attribute and event made by gateway, router and engine code numbers the same for requests
    of 4 and of 64 output tokens (counted by code line, the same requests otherwise)."""
    calls = MetricCalls(monkeypatch)
    async with gateway(fleet, tmp_path) as gw:
        reg = gw.app.metrics_registry

        def ok() -> float:
            return value(reg, "fleetserve:requests_total", model_name=MODEL, code="OK")

        # Counted, not read after each round: the gateway counts a request once its router call has ended,
        # which comes after the client's stream (ended with its last chunk), so a count read right after a
        # round may still miss its last request, whose calls would then land in the next round.
        counted = ok()
        await gw.generate(API_KEY, max_tokens=4, ignore_eos=True)  # warm: first calls create label children
        counted += 1
        await assert_eventually(lambda c=counted: ok() == c, timeout_s=10)
        per_length = {}
        for tokens in (4, 64):
            calls.take()
            calls.on = True
            for _ in range(REQUESTS):
                chunks, _ = await gw.generate(API_KEY, max_tokens=tokens, ignore_eos=True)
                assert chunks[-1].usage.completion_tokens == tokens
            counted += REQUESTS
            await assert_eventually(lambda c=counted: ok() == c, timeout_s=10)
            calls.on = False
            per_length[tokens] = calls.take()
    # The token path's code (the registry, which hears heartbeats in the meantime, is not on it).
    token_path = ("services/gateway/", "services/router/", "services/engine/", "shared/")
    short, long = (
        {s: n for s, n in d.items() if s.startswith(token_path)} for d in (per_length[4], per_length[64])
    )
    # Shown with -s (docs/benchmarks/metrics_overhead.md quotes it): calls per request by where they are made.
    for tokens, d in ((4, short), (64, long)):
        made = {w: sum(n for s, n in d.items() if s.startswith(w)) / REQUESTS for w in token_path}
        print(f"metric calls per request at {tokens} output tokens: {made}")
    # A call made per token (or per chunk) would be 60 more per request; background work (heartbeats, breaker
    # gauges) may add a few while the longer requests run: less than one per request.
    grown = {s: (short.get(s, 0), n) for s, n in long.items() if n - short.get(s, 0) >= REQUESTS}
    assert grown == {}, grown
    hops = ("services/gateway/", "services/router/")
    on_path = {s: n for s, n in short.items() if s.startswith(hops)}
    assert sum(n >= REQUESTS for n in on_path.values()) >= 10, short  # the per-request calls were counted
    assert sum(n for s, n in long.items() if s.startswith(hops)) - sum(on_path.values()) < REQUESTS
