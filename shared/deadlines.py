"""Deadlines: how much time a request has left, and what to give the next hop."""

from __future__ import annotations

import grpc

from shared.errors import DeadlineExceeded

# Each hop keeps a little of the caller's time back so that it, not its caller, reports the timeout
# with a clear status and can still abort downstream work.
HOP_MARGIN_S = 0.005


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the caller's deadline, or None when the caller set none."""
    return context.time_remaining()


def downstream_timeout(
    context: grpc.aio.ServicerContext, default_s: float | None = None, margin_s: float = HOP_MARGIN_S
) -> float | None:
    """Timeout for the next hop: the caller's time left minus a margin (or default_s when the caller set
    none). Raises DeadlineExceeded when nothing useful is left."""
    left = time_left(context)
    if left is None:
        return default_s
    if default_s is not None:
        left = min(left, default_s)
    timeout = left - margin_s
    if timeout <= 0:
        raise DeadlineExceeded("deadline exceeded before the request could be forwarded")
    return timeout
