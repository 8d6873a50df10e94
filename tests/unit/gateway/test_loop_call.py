"""RedisLimits' background-loop calls end their loop when its task is cancelled, whatever the call does then."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.redis_limits import _loop_call


async def _cancel_becomes(exc: BaseException | None):
    """A call that, when cancelled, returns (exc None) or raises exc instead, as redis-py can."""
    try:
        await asyncio.sleep(10)
    except asyncio.CancelledError:
        if exc is None:
            return "finished anyway"
        raise exc from None
    return "not cancelled"


@pytest.mark.parametrize("exc", [None, ConnectionError("Connection closed by server.")])
async def test_a_cancel_the_call_swallows_still_cancels_the_loop(exc):
    task = asyncio.ensure_future(_loop_call(_cancel_becomes(exc)))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 2)
    assert task.cancelled()


async def test_calls_of_an_uncancelled_loop_return_and_raise_as_they_are():
    async def ok():
        return 7

    async def fails():
        raise ConnectionError("down")

    assert await _loop_call(ok()) == 7
    with pytest.raises(ConnectionError, match="down"):
        await _loop_call(fails())
