"""Drain: who gets refused while a service drains, and when a worker hands its clients to its siblings."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from structlog.testing import capture_logs

from shared.drain import PROGRESS_SAMPLE_S, Drain
from shared.errors import ShuttingDown
from shared.workers import siblings_serve


class Call:
    """A downstream call the drain can cut."""

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.mark.asyncio
async def test_a_draining_service_refuses_new_requests_unless_it_hands_over_and_then_only_once_it_cuts():
    """Drain.check refuses at once by default; with serve_new it serves until the cut, then refuses."""
    keeps_port = Drain("gateway")
    call = Call()
    keeps_port.track(call)
    running = asyncio.create_task(keeps_port.run(0.2))
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        keeps_port.check()
    await running
    assert call.cancelled

    hands_over = Drain("gateway")
    call = Call()
    hands_over.track(call)
    running = asyncio.create_task(hands_over.run(0.2, serve_new=True))
    await asyncio.sleep(0)
    hands_over.check()  # served: it reached us on a connection opened before the GOAWAY
    await running
    assert call.cancelled and hands_over.cutting
    with pytest.raises(ShuttingDown):
        hands_over.check()


@pytest.mark.asyncio
async def test_a_stream_that_starts_as_the_drain_goes_idle_is_waited_for_not_cut():
    """The last stream ends and another starts before the drain's task runs again (a request that reached a
    handing-over worker): the drain waits for it as for any other, and cuts nothing before its cut time."""
    drain = Drain("gateway")
    first, second = Call(), Call()
    drain.track(first)
    running = asyncio.create_task(drain.run(4.0, serve_new=True))  # cuts at 3 s
    for _ in range(5):
        await asyncio.sleep(0)  # the drain waits for `first`
    drain.untrack(first)  # idle: the drain's wait ends...
    drain.track(second)  # ...and a new stream starts before the drain runs again
    for _ in range(10):
        await asyncio.sleep(0)
    assert not second.cancelled and not drain.cutting
    assert not running.done()
    drain.untrack(second)
    await asyncio.wait_for(running, 1.0)
    assert not second.cancelled and not drain.cutting


class Stream(Call):
    """A stream that says how far it got (progress) and what it is (describe)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.chunks = 0

    def progress(self) -> int:
        return self.chunks

    def describe(self) -> dict:
        return {"request_id": self.name, "chunks": self.chunks}


@pytest.mark.asyncio
async def test_each_stream_the_drain_cuts_is_logged_with_what_it_was_doing_and_how_long_it_was_silent():
    """At the cut, one line per stream: its describe() and its silence, sampled while draining (a stuck stream:
    silent the whole drain; a moving one: not); the summary line says how far into the drain the cut came."""
    drain = Drain("gateway")
    stuck, moving = Stream("stuck"), Stream("moving")
    drain.track(stuck)
    drain.track(moving)

    async def move() -> None:
        while not moving.cancelled:
            moving.chunks += 1
            await asyncio.sleep(0.02)

    mover = asyncio.create_task(move())
    with capture_logs() as logs:
        await asyncio.wait_for(drain.run(1.0), 10)  # cuts at 0.75 s
    await asyncio.wait_for(mover, 10)
    assert stuck.cancelled and moving.cancelled
    (summary,) = [e for e in logs if e["event"] == "drain.cutting_streams"]
    assert summary["streams"] == 2 and summary["drain_s"] >= 0.75, summary
    cut = {e["request_id"]: e for e in logs if e["event"] == "drain.cutting_stream"}
    assert cut["stuck"]["chunks"] == 0 and cut["stuck"]["silent_s"] >= 0.75, cut
    assert cut["moving"]["chunks"] > 0 and cut["moving"]["silent_s"] < PROGRESS_SAMPLE_S + 0.1, cut


def test_only_a_worker_whose_siblings_keep_serving_hands_over(tmp_path):
    """siblings_serve: a worker of several, while the supervisor's stop file is absent (not the whole service
    stopping); never a lone process."""
    stop_file = tmp_path / "gateway-1-stopping"
    worker = SimpleNamespace(worker_count=2, stop_file=str(stop_file))
    assert siblings_serve(worker)
    stop_file.touch()
    assert not siblings_serve(worker)
    assert not siblings_serve(SimpleNamespace(worker_count=1, stop_file=str(tmp_path / "absent")))
    assert not siblings_serve(SimpleNamespace(worker_count=2, stop_file=""))
    assert not siblings_serve(SimpleNamespace())
