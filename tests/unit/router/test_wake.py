"""Wake on demand in the router's admission queue: a request for a model with no routable replica waits (and is
counted as waiting, which the autoscaler reads) until one is routable, bounded by its deadline; a model that
does not wake still fails at once."""

from __future__ import annotations

import asyncio

import pytest

from services.router.admission import AdmissionQueue
from shared.errors import DeadlineExceeded


async def test_a_waking_model_waits_for_a_replica_then_goes():
    """No replica: the request waits and is listed as waiting; when a replica appears, pump() lets it go."""
    slots: dict[str, int | None] = {"m": None}
    q = AdmissionQueue(lambda model: slots[model], wakes=lambda model: model == "m")
    task = asyncio.create_task(q.acquire("m", 0, "t", timeout_s=10))
    await asyncio.sleep(0.05)
    assert not task.done()
    assert sum(q.waiting()["m"]) == 1
    q.pump("m")  # still no replica: keeps waiting
    await asyncio.sleep(0.05)
    assert not task.done()
    slots["m"] = 1 << 30
    q.pump("m")
    await asyncio.wait_for(task, 2)
    assert q.waiting() == {}


async def test_the_wait_is_bounded_by_the_deadline():
    """With no replica ever, the waiting request ends with DeadlineExceeded at its timeout."""
    q = AdmissionQueue(lambda model: None, wakes=lambda model: True)
    with pytest.raises(DeadlineExceeded):
        await q.acquire("m", 0, "t", timeout_s=0.1)
    assert q.waiting() == {}


async def test_a_model_that_does_not_wake_does_not_wait():
    """Without wake, no replica means acquire returns at once (choosing then fails fast with the reason)."""
    q = AdmissionQueue(lambda model: None)
    await asyncio.wait_for(q.acquire("m", 0, "t", timeout_s=10), 1)
