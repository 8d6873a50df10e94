"""The admission queue: tiers in order, fair share across tenants within a tier, bounds and deadlines."""

from __future__ import annotations

import asyncio

import pytest
from fleetserve.common.v1 import common_pb2

from services.router.admission import AdmissionQueue
from shared.errors import DeadlineExceeded, ResourceExhausted

INTERACTIVE, STANDARD, BATCH = (
    common_pb2.PRIORITY_INTERACTIVE,
    common_pb2.PRIORITY_STANDARD,
    common_pb2.PRIORITY_BATCH,
)


class Slots:
    """Free slots of model "m", as the servicer would count them."""

    def __init__(self, free: int) -> None:
        self.free = free

    def __call__(self, model: str) -> int | None:
        return self.free


async def admit_in_order(q: AdmissionQueue, slots: Slots, entries: list[tuple[str, int, str]]) -> list[str]:
    """Queue every (name, priority, tenant) while no slot is free, then free one slot at a time (the admitted
    request takes it until it 'finishes'); the order they got in."""
    order: list[str] = []

    async def one(name: str, priority: int, tenant: str) -> None:
        await q.acquire("m", priority, tenant, timeout_s=5)
        slots.free -= 1
        order.append(name)

    tasks = []
    for e in entries:
        tasks.append(asyncio.create_task(one(*e)))
        await asyncio.sleep(0)  # queued in this order
    for _ in entries:
        slots.free += 1
        q.pump("m")
        await asyncio.sleep(0)
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    return order


async def test_free_slots_admit_at_once():
    """With slots free and nobody waiting, acquire returns without queueing."""
    q = AdmissionQueue(Slots(2))
    await asyncio.wait_for(q.acquire("m", STANDARD, "a", timeout_s=1), 0.5)
    assert q.waiting() == {}


async def test_interactive_overtakes_queued_batch():
    """Queued batch requests wait while a later interactive one goes first; standard sits between."""
    slots = Slots(0)
    q = AdmissionQueue(slots)
    order = await admit_in_order(
        q, slots, [("b1", BATCH, "a"), ("b2", BATCH, "a"), ("s1", STANDARD, "a"), ("i1", INTERACTIVE, "a")]
    )
    assert order == ["i1", "s1", "b1", "b2"]


async def test_a_tenant_with_a_burst_does_not_starve_another():
    """Within a tier, tenants alternate: B's two requests queued after A's six go 2nd and 4th, not last."""
    slots = Slots(0)
    q = AdmissionQueue(slots)
    entries = [(f"a{i}", STANDARD, "A") for i in range(6)] + [("b0", STANDARD, "B"), ("b1", STANDARD, "B")]
    order = await admit_in_order(q, slots, entries)
    assert order == ["a0", "b0", "a1", "b1", "a2", "a3", "a4", "a5"]


async def test_retries_of_admitted_requests_go_first():
    """An urgent waiter (a retry or resume) goes before interactive ones."""
    slots = Slots(0)
    q = AdmissionQueue(slots)
    order: list[str] = []

    async def one(name, priority, urgent=False):
        await q.acquire("m", priority, "t", timeout_s=5, urgent=urgent)
        order.append(name)

    t1 = asyncio.create_task(one("i", INTERACTIVE))
    await asyncio.sleep(0)
    t2 = asyncio.create_task(one("retry", BATCH, urgent=True))
    await asyncio.sleep(0)
    slots.free = 1
    q.pump("m")
    await asyncio.sleep(0)
    assert order == ["retry"]
    slots.free = 2
    q.pump("m")
    await asyncio.gather(t1, t2)
    assert order == ["retry", "i"]


async def test_full_queue_is_resource_exhausted_with_retry_advice():
    """Beyond max_waiting, a request is refused at once with RESOURCE_EXHAUSTED and a retry delay."""
    q = AdmissionQueue(Slots(0), max_waiting=1, retry_after_s=0.7)
    waiter = asyncio.create_task(q.acquire("m", STANDARD, "a", timeout_s=5))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted) as exc:
        await q.acquire("m", STANDARD, "b", timeout_s=5)
    assert exc.value.reason == "ROUTER_QUEUE_FULL" and exc.value.retry_after_s == 0.7
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert q.waiting() == {}


async def test_wait_is_bounded_by_the_deadline_and_leaves_the_queue():
    """A request still queued at its deadline gets DEADLINE_EXCEEDED and no longer counts as waiting."""
    q = AdmissionQueue(Slots(0))
    with pytest.raises(DeadlineExceeded):
        await q.acquire("m", BATCH, "a", timeout_s=0.01)
    assert q.waiting() == {}


async def test_model_without_replicas_does_not_queue():
    """No routable replica (free_slots None): acquire returns so that choosing fails fast with the reason."""
    q = AdmissionQueue(lambda model: None)
    await asyncio.wait_for(q.acquire("m", BATCH, "a", timeout_s=5), 0.5)


async def test_woken_waiter_that_goes_away_hands_its_slot_on():
    """A waiter woken but cancelled before it used the slot passes it to the next in line."""
    slots = Slots(0)
    q = AdmissionQueue(slots)
    first = asyncio.create_task(q.acquire("m", INTERACTIVE, "a", timeout_s=5))
    await asyncio.sleep(0)
    second = asyncio.create_task(q.acquire("m", BATCH, "a", timeout_s=5))
    await asyncio.sleep(0)
    slots.free = 1
    q.pump("m")  # wakes `first`
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)


async def test_waiter_cancelled_just_before_a_pump_takes_no_slot_and_breaks_nothing():
    """A queued request cancelled just before pump() runs (its clean-up not yet run) is skipped: the slot goes
    to the next waiter, and the cancelled one leaves without error, so the queue keeps flowing."""
    slots = Slots(0)
    q = AdmissionQueue(slots)
    gone = asyncio.create_task(q.acquire("m", INTERACTIVE, "a", timeout_s=5))
    await asyncio.sleep(0)
    nxt = asyncio.create_task(q.acquire("m", BATCH, "b", timeout_s=5))
    await asyncio.sleep(0)
    gone.cancel()  # cancels the awaited future now; the task's except block runs only on its next step
    slots.free = 1
    q.pump("m")
    with pytest.raises(asyncio.CancelledError):
        await gone
    await asyncio.wait_for(nxt, 1)
    assert q.waiting() == {}
    third = asyncio.create_task(q.acquire("m", STANDARD, "c", timeout_s=5))
    await asyncio.sleep(0)
    slots.free = 2  # `nxt` holds one, one is free: admitted at once or by the next pump
    q.pump("m")
    await asyncio.wait_for(third, 1)
