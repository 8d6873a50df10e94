"""describe_after_send: a request's describing work, run once the downstream call it just started has gone out."""

from __future__ import annotations

import types
from collections.abc import Callable


@types.coroutine
def describe_after_send(describe: Callable[..., None], *args: object):
    """Await right after starting a grpc.aio call: one event-loop turn passes, then describe(*args) runs."""
    # grpc.aio sends a call from a task of its own, queued behind ours until we yield. What only describes the
    # request (log context, span attributes, gauges, initial metadata) must not run before that send: it would
    # sit on the first token's path; after it, it overlaps the next hop's work. A bare yield is asyncio.sleep(0)
    # without its two coroutine frames: the task runs again on the loop's next turn. Cancelled there, describe
    # does not run (the caller describes the request at its end instead).
    yield
    describe(*args)
