"""describe_after_send (shared/after_send.py): work queued before it (a call's send) runs first; a cancel skips it."""

from __future__ import annotations

import asyncio

import pytest

from shared.after_send import describe_after_send


async def test_a_task_queued_before_it_runs_before_the_description():
    """A task started just before (as grpc.aio starts a call's send) runs before describe, which gets its args."""
    order: list[str] = []

    async def send() -> None:
        order.append("sent")

    task = asyncio.get_running_loop().create_task(send())
    await describe_after_send(lambda what, how: order.append(f"{what} {how}"), "described", "after")
    assert order == ["sent", "described after"]
    await task


async def test_cancelled_during_its_turn_it_describes_nothing():
    """A task cancelled while it lets the loop turn raises CancelledError and never runs describe."""
    described: list[bool] = []
    started = asyncio.Event()

    async def request() -> None:
        started.set()
        await describe_after_send(described.append, True)

    task = asyncio.get_running_loop().create_task(request())
    await started.wait()  # woken before the task's own next turn: it is inside describe_after_send's yield
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert described == []
