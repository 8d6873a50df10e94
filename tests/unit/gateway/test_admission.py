"""Admission against tenant and key limits: which limit refused (QuotaFailure), when to retry (RetryInfo),
budgets from the ledger, stream caps, and the reconciliation of completion tokens."""

from __future__ import annotations

import calendar
import dataclasses

import grpc
import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics import MeterProvider

from services.gateway.admission import Admission
from services.gateway.ledger import Ledger
from services.gateway.limits import LocalLimits
from services.gateway.schema import open_accounts
from services.gateway.tenants import Limits, Tenant
from shared.errors import ResourceExhausted

NOW = calendar.timegm((2026, 11, 23, 12, 0, 0))


@pytest_asyncio.fixture
async def admission(tmp_path):
    db = await open_accounts(str(tmp_path / "gw.db"))
    ledger = Ledger(db, refresh_s=0, clock=lambda: NOW)
    yield Admission(
        LocalLimits(),
        ledger,
        MeterProvider().get_meter("t"),
        prices={"m": (1000.0, 2000.0)},
        clock=lambda: NOW,
    )
    await ledger.close()
    await db.close()


def tenant(**limits) -> Tenant:
    key_limits = limits.pop("key", Limits())
    return Tenant("acme", "Acme", "standard", Limits(**limits), key_id="key_1", key_limits=key_limits)


async def refused(admission: Admission, t: Tenant, prompt: int = 1) -> ResourceExhausted:
    with pytest.raises(ResourceExhausted) as exc:
        await admission.admit(t, "m", "r", prompt, 60)
    return exc.value


async def finish(admission: Admission, ticket, completion: int, prompt: int | None = None):
    entry = await admission.finish(
        ticket,
        status="OK",
        prompt_tokens=ticket.prompt_tokens if prompt is None else prompt,
        completion_tokens=completion,
        cached_tokens=0,
        relayed_chunks=completion,
    )
    await admission.ledger.flush()  # as the gateway's writer does right after
    return entry


@pytest.mark.asyncio
async def test_requests_per_second_refusal_names_the_limit_and_the_wait(admission):
    """Past its rps the tenant gets RESOURCE_EXHAUSTED, reason RATE_LIMITED, a QuotaFailure naming the tenant
    and a RetryInfo of about one request's drain time."""
    t = tenant(rps=2)
    for _ in range(2):
        await admission.admit(t, "m", "r", 1, 60)
    err = await refused(admission, t)
    status = err.to_status()
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "RATE_LIMITED"
    assert err.quota_violations[0][0] == "tenant:acme"
    assert "2 requests per second" in err.quota_violations[0][1]
    assert 0.3 < err.retry_after_s <= 0.5


@pytest.mark.asyncio
async def test_a_key_limit_applies_below_the_tenant_limit(admission):
    """A key's own rps refuses it while the tenant still has room; the subject names the key."""
    t = tenant(rps=100, key=Limits(rps=1))
    await admission.admit(t, "m", "r", 1, 60)
    err = await refused(admission, t)
    assert err.quota_violations[0][0] == "key:key_1"
    other_key = dataclasses.replace(t, key_id="key_2")
    await admission.admit(other_key, "m", "r", 1, 60)


@pytest.mark.asyncio
async def test_tokens_per_minute_count_prompt_on_admission_and_completion_at_the_end(admission):
    """Prompt tokens are taken on admission and completion tokens when the stream ends, so a tenant that
    generated a lot waits before its next request; the wait is the time to drain the excess."""
    t = tenant(tokens_per_min=600)
    ticket = await admission.admit(t, "m", "r", 100, 60)
    await finish(admission, ticket, completion=450)
    err = await refused(admission, t, prompt=100)
    assert err.reason == "TOKEN_RATE_LIMITED"
    # 550 in a 600/min bucket (10/s): 100 more fit after about 5 s.
    assert 4.5 < err.retry_after_s <= 5.0


@pytest.mark.asyncio
async def test_a_prompt_larger_than_the_token_rate_is_refused_without_retry_advice(admission):
    """A prompt that can never fit the tokens/min limit is refused without a RetryInfo (waiting won't help)."""
    err = await refused(admission, tenant(tokens_per_min=50), prompt=51)
    assert err.reason == "PROMPT_EXCEEDS_TOKEN_RATE" and err.retry_after_s is None


@pytest.mark.asyncio
async def test_token_budget_counts_the_ledger_and_advises_the_period_end(admission):
    """Once the ledger holds the tenant's token budget for the day, it is refused until the day ends."""
    t = tenant(token_budget=100, budget_period="day")
    ticket = await admission.admit(t, "m", "r1", 40, 60)
    entry = await finish(admission, ticket, completion=50)
    assert (entry.prompt_tokens, entry.completion_tokens) == (40, 50)
    err = await refused(admission, t, prompt=11)
    assert err.reason == "TOKEN_BUDGET_EXHAUSTED"
    assert err.retry_after_s == 12 * 3600  # NOW is noon UTC
    await admission.admit(t, "m", "r2", 10, 60)  # exactly up to the budget still fits


@pytest.mark.asyncio
async def test_cost_budget_from_model_prices(admission):
    """Cost is charged at the model's prices; a spent cost budget refuses further requests."""
    t = tenant(cost_budget_usd=1.0)
    ticket = await admission.admit(t, "m", "r", 500, 60)
    entry = await finish(admission, ticket, completion=250)
    assert entry.cost_usd == pytest.approx(1.0)  # 500 * $1000/M + 250 * $2000/M
    assert (await refused(admission, t)).reason == "COST_BUDGET_EXHAUSTED"


@pytest.mark.asyncio
async def test_concurrent_streams_are_capped_and_freed_at_the_end(admission):
    """A tenant at its stream cap is refused (CONCURRENT_STREAMS_LIMIT, with a wait); finishing one frees it."""
    t = tenant(max_streams=2)
    a = await admission.admit(t, "m", "a", 1, 60)
    await admission.admit(t, "m", "b", 1, 60)
    err = await refused(admission, t)
    assert err.reason == "CONCURRENT_STREAMS_LIMIT" and err.retry_after_s > 0
    await finish(admission, a, completion=1)
    await admission.admit(t, "m", "c", 1, 60)


@pytest.mark.asyncio
async def test_a_stream_without_final_usage_is_recorded_partial_from_the_gateways_counts(admission):
    """A cancelled stream has no usage chunk: the ledger gets the admitted prompt count and one token per chunk."""
    ticket = await admission.admit(tenant(), "m", "r", 12, 60)
    entry = await admission.finish(
        ticket,
        status="CANCELLED",
        prompt_tokens=None,
        completion_tokens=None,
        cached_tokens=None,
        relayed_chunks=7,
    )
    assert (entry.prompt_tokens, entry.completion_tokens, entry.partial) == (12, 7, True)


@pytest.mark.asyncio
async def test_a_rate_below_one_per_second_admits_one_request_per_interval(admission):
    """rps 0.5 admits one request, then advises waiting about 2 s (a bucket holds at least one request)."""
    t = tenant(rps=0.5)
    await admission.admit(t, "m", "r", 1, 60)
    err = await refused(admission, t)
    assert 1.5 < err.retry_after_s <= 2.0


@pytest.mark.asyncio
async def test_a_request_refused_by_a_rate_keeps_no_stream_slot(admission):
    """A stream cap and an rps limit together: the rate refusal gives the stream slot back at once."""
    t = tenant(max_streams=1, rps=1)
    first = await admission.admit(t, "m", "a", 1, 60)
    await finish(admission, first, completion=1)
    assert (await refused(admission, t)).reason == "RATE_LIMITED"
    assert await admission.backend.open_stream("s:acme", 1, "probe", 60)


class _FailingClose(LocalLimits):
    """In-process limits whose stream release reports a failure after releasing (a store that failed to answer,
    as one can outside the Redis fallback's errors)."""

    async def close_stream(self, key: str, stream_id: str) -> None:
        await super().close_stream(key, stream_id)
        raise RuntimeError("limits store failed")


@pytest.mark.asyncio
async def test_a_failing_stream_release_still_writes_the_ledger_row_and_charges(tmp_path):
    """When giving the stream slot back fails, the request's ledger row is written and its tokens charged
    anyway; the failure still reaches the caller."""
    db = await open_accounts(str(tmp_path / "gw.db"))
    ledger = Ledger(db, refresh_s=0, clock=lambda: NOW)
    admission = Admission(_FailingClose(), ledger, MeterProvider().get_meter("t"), clock=lambda: NOW)
    try:
        t = tenant(max_streams=1, tokens_per_min=100)
        ticket = await admission.admit(t, "m", "r", 10, 60)
        with pytest.raises(RuntimeError):
            await finish(admission, ticket, completion=90)
        await ledger.flush()
        assert [row[:5] for row in await ledger.summary("acme")] == [("acme", "m", 1, 10, 90)]
        # The 90 completion tokens were charged: the minute's 100 tokens are spent (asked without the stream
        # cap, whose release on refusal would fail again).
        assert (await refused(admission, tenant(tokens_per_min=100))).reason == "TOKEN_RATE_LIMITED"
    finally:
        await ledger.close()
        await db.close()
