"""Cost attribution: replica time x price split over requests by their GPU-time weight; every breakdown adds up
to the attributed total; idle replicas, unknown replicas, windows and model-routing savings."""

from __future__ import annotations

import pytest
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.engine.profile import load_profile
from services.metrics.cost import OUTPUT_CLASSES, CostLedger, Price, PriceBook, length_class, parse_prices
from services.metrics.gauges import ReplicaClock
from services.metrics.records import RequestRecord

SMALL, LARGE = "h100-llama-1b", "h100-llama-8b"


def clock_with(*replicas: tuple[str, str, str, float, float]) -> ReplicaClock:
    """Replicas (id, type, model, up from, up to) as their uptime gauges would report them."""
    clock = ReplicaClock()
    for rid, rtype, model, start, end in replicas:
        attrs = {"replica_id": rid, "replica_type": rtype, "model": model}
        for t in (start + 1.0, end):
            clock.on_uptime(attrs, t, t - start)
    return clock


def rec(
    t, replica="e1", tenant="a", feature="chat", model="small", prompt=100, output=50, **kw
) -> RequestRecord:
    return RequestRecord(
        end_unix_s=t,
        e2e_ms=10.0,
        ttft_ms=1.0,
        output_tokens=output,
        status_code=0,
        model=model,
        requested_model=kw.pop("requested", model),
        tenant=tenant,
        feature=feature,
        replica_id=replica,
        prompt_tokens=prompt,
        **kw,
    )


def breakdown(resp, dim) -> dict[str, mpb.CostLine]:
    (bd,) = [b for b in resp.breakdowns if b.dimension == dim]
    return {line.key: line for line in bd.lines}


def test_replica_time_is_split_by_weight_and_every_breakdown_adds_up():
    """One hour of an H100 at $2.50 is split over its requests by GPU-time weight: a request with twice the
    tokens costs twice as much, and per-tenant, per-feature and per-class sums are all the replica's $2.50."""
    replicas = clock_with(("e1", SMALL, "small", 0.0, 3600.0))
    ledger = CostLedger(PriceBook(), replicas, clock=lambda: 3600.0)
    ledger.add(rec(100.0, tenant="a", feature="chat", prompt=100, output=50))
    ledger.add(rec(200.0, tenant="b", feature="summarize", prompt=200, output=100))
    ledger.add(rec(300.0, tenant="b", feature="chat", prompt=200, output=100))
    resp = ledger.report(0.0, 3600.0, now=3600.0)
    assert resp.total_usd == pytest.approx(2.5)
    assert resp.gpu_hours == pytest.approx(1.0)
    assert resp.attributed_usd == pytest.approx(2.5) and resp.idle_usd == 0.0
    tenants = breakdown(resp, mpb.COST_DIMENSION_TENANT)
    assert tenants["b"].cost_usd == pytest.approx(4 * tenants["a"].cost_usd)
    for dim in (mpb.COST_DIMENSION_TENANT, mpb.COST_DIMENSION_FEATURE, mpb.COST_DIMENSION_OUTPUT_CLASS):
        assert sum(x.cost_usd for x in breakdown(resp, dim).values()) == pytest.approx(2.5)
    assert resp.tokens == 750 and resp.cost_per_1k_tokens == pytest.approx(2.5 / 0.75)
    assert tenants["a"].cost_per_request == pytest.approx(0.5)
    assert resp.biggest_driver.key == "b" and resp.biggest_driver_dimension == mpb.COST_DIMENSION_TENANT


def test_weights_follow_the_profile_cost_model():
    """An output token weighs what the profile's step time makes it (~8x an uncached prompt token on the 1B
    H100 profile); cached prompt tokens weigh almost nothing."""
    p = load_profile(SMALL)
    prompt_ms, cached_ms, output_ms = p.token_weights_ms()
    price = PriceBook().price(SMALL)
    assert price == Price(2.5, prompt_ms, cached_ms, output_ms)
    assert 5 < output_ms / prompt_ms < 12
    assert price.weight_ms(100, 100, 0) < price.weight_ms(100, 0, 0) / 100


def test_idle_replica_and_unknown_replica():
    """A replica that served nothing in the window is idle cost; a request whose replica never reported its
    uptime costs nothing (and is still counted)."""
    replicas = clock_with(("e1", SMALL, "small", 0.0, 100.0), ("e2", LARGE, "large", 0.0, 100.0))
    ledger = CostLedger(PriceBook({LARGE: 10.0}), replicas, clock=lambda: 100.0)
    ledger.add(rec(50.0, replica="e1"))
    ledger.add(rec(50.0, replica="ghost"))
    resp = ledger.report(0.0, 100.0, now=100.0)
    assert resp.total_usd == pytest.approx(100 / 3600 * (2.5 + 10.0))
    assert resp.idle_usd == pytest.approx(100 / 3600 * 10.0)
    assert resp.requests == 2
    assert {r.replica_id: r.requests for r in resp.replicas} == {"e1": 1, "e2": 0}


def test_window_prices_only_the_replica_time_inside_it():
    """Asking for [1000, 1600] prices ten minutes of replica time and the requests that ended then."""
    replicas = clock_with(("e1", SMALL, "small", 0.0, 3600.0))
    ledger = CostLedger(PriceBook(), replicas, clock=lambda: 3600.0)
    ledger.add(rec(500.0, tenant="early"))
    ledger.add(rec(1300.0, tenant="inside"))
    resp = ledger.report(1000.0, 1600.0, now=3600.0)
    assert resp.total_usd == pytest.approx(600 / 3600 * 2.5)
    assert set(breakdown(resp, mpb.COST_DIMENSION_TENANT)) == {"inside"}


def test_routing_savings_against_the_large_model():
    """Requests an alias sent to the small model are priced again at the large pool's observed cost per GPU-ms;
    the difference is what routing saved."""
    replicas = clock_with(("s", SMALL, "small", 0.0, 3600.0), ("l", LARGE, "large", 0.0, 3600.0))
    ledger = CostLedger(PriceBook(), replicas, {"auto": ("small", "large")}, clock=lambda: 3600.0)
    for i in range(10):
        ledger.add(rec(100.0 + i, replica="s", model="small", requested="auto"))
    ledger.add(rec(200.0, replica="l", model="large", requested="auto", prompt=3000))
    resp = ledger.report(0.0, 3600.0, now=3600.0)
    (sav,) = resp.routing_savings
    assert (sav.alias, sav.small_model, sav.large_model) == ("auto", "small", "large")
    assert (sav.small_requests, sav.large_requests, sav.basis) == (10, 1, "observed")
    assert sav.actual_usd == pytest.approx(5.0)
    assert sav.saved_usd == pytest.approx(sav.all_large_usd - sav.actual_usd) and sav.saved_usd > 0
    small, large = PriceBook().price(SMALL), PriceBook().price(LARGE)
    per_request = (
        large.weight_ms(100, 0, 50) * large.usd_per_gpu_ms
        - small.weight_ms(100, 0, 50) * small.usd_per_gpu_ms
    )
    assert sav.saved_at_full_use_usd == pytest.approx(10 * per_request)


def test_savings_without_config_take_the_dearer_model_as_large():
    """Without the alias table, the served model whose output tokens weigh more is the large one."""
    replicas = clock_with(("s", SMALL, "small", 0.0, 60.0), ("l", LARGE, "large", 0.0, 60.0))
    ledger = CostLedger(PriceBook(), replicas, clock=lambda: 60.0)
    ledger.add(rec(10.0, replica="s", model="small", requested="auto"))
    ledger.add(rec(10.0, replica="l", model="large", requested="auto"))
    (sav,) = ledger.report(0.0, 60.0, now=60.0).routing_savings
    assert (sav.small_model, sav.large_model) == ("small", "large")


def test_request_usd_and_classes_and_prices():
    """Per-request cost at full use; length classes; price overrides parse and refuse bad entries."""
    replicas = clock_with(("e1", SMALL, "small", 0.0, 60.0))
    ledger = CostLedger(PriceBook(), replicas)
    p = PriceBook().price(SMALL)
    assert ledger.request_usd(rec(1.0)) == pytest.approx(p.weight_ms(100, 0, 50) * 2.5 / 3.6e6)
    assert [length_class(n, OUTPUT_CLASSES) for n in (0, 63, 64, 511, 512)] == [
        "short",
        "short",
        "medium",
        "medium",
        "long",
    ]
    assert parse_prices("a=1.5, b=0") == {"a": 1.5, "b": 0.0}
    for bad in ("a", "a=-1", "=2", "a=x"):
        with pytest.raises(ValueError):
            parse_prices(bad)
