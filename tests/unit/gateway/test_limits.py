"""In-process rate limits: all-or-nothing takes, computed waits, after-the-fact charges, stream caps."""

from __future__ import annotations

import pytest

from services.gateway.limits import LocalLimits, Rate

RPS = Rate("t:a:rps", 2.0, 1.0, "tenant:a", "requests per second")
TPM = Rate("t:a:tpm", 600.0, 60.0, "tenant:a", "tokens per minute")


@pytest.mark.asyncio
async def test_takes_until_capacity_then_refuses_with_the_wait():
    """Two requests fit a 2/s bucket; the third is refused with the time until one unit drains (~0.5 s)."""
    lim = LocalLimits()
    assert await lim.take([(RPS, 1)]) == []
    assert await lim.take([(RPS, 1)]) == []
    refused = await lim.take([(RPS, 1)])
    assert [r for r, _ in refused] == [RPS]
    assert 0.4 < refused[0][1] <= 0.5


@pytest.mark.asyncio
async def test_a_refusal_takes_nothing_from_the_other_buckets():
    """When one limit refuses, the others are left untouched (no partial charge)."""
    lim = LocalLimits()
    assert await lim.take([(TPM, 600)]) == []
    refused = await lim.take([(RPS, 1), (TPM, 10)])
    assert [r.key for r, _ in refused] == [TPM.key]
    # The rps bucket was not charged: both of its units are still there.
    assert await lim.take([(RPS, 2)]) == []


@pytest.mark.asyncio
async def test_charge_goes_past_capacity_and_delays_later_requests():
    """Completion tokens charged after the stream can overdraw the bucket; the next request waits longer."""
    lim = LocalLimits()
    assert await lim.take([(TPM, 100)]) == []
    await lim.charge([(TPM, 1000)])
    ((rate, wait),) = await lim.take([(TPM, 10)])
    # 1110 units in a 600 bucket draining 10/s: about 51 s until 10 more fit.
    assert rate is TPM and 50 < wait <= 51


@pytest.mark.asyncio
async def test_a_changed_limit_starts_a_fresh_bucket():
    """After the admin raises a limit the new capacity applies at once."""
    lim = LocalLimits()
    assert await lim.take([(RPS, 2)]) == []
    assert await lim.take([(RPS, 1)])
    bigger = Rate(RPS.key, 10.0, 1.0, RPS.subject, RPS.what)
    assert await lim.take([(bigger, 1)]) == []


@pytest.mark.asyncio
async def test_stream_slots_are_capped_and_given_back():
    """At most cap streams are held per key; closing one frees a slot."""
    lim = LocalLimits()
    assert await lim.open_stream("s:a", 2, "r1", 60)
    assert await lim.open_stream("s:a", 2, "r2", 60)
    assert not await lim.open_stream("s:a", 2, "r3", 60)
    assert await lim.open_stream("s:b", 2, "r3", 60)  # another tenant is not affected
    await lim.close_stream("s:a", "r1")
    assert await lim.open_stream("s:a", 2, "r3", 60)
