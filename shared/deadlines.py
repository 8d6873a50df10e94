"""Deadlines: how much time a request has left, and what to give the next hop."""

from __future__ import annotations

import math

import grpc

from shared.errors import DeadlineExceeded

# Each hop keeps a little of the caller's time back so that it, not its caller, reports the timeout
# with a clear status and can still abort downstream work.
HOP_MARGIN_S = 0.005


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds until the caller's deadline, or None when the caller set none."""
    return context.time_remaining()


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """Whether the caller's deadline has passed (tells a deadline from a cancellation in `finally`)."""
    # time_remaining() is None without a deadline and 0, which is falsy, once it has passed.
    left = time_left(context)
    return left is not None and left <= 0


# gRPC adds up to ~2 ms to a timeout when it turns the call's deadline into the grpc-timeout header.
_WIRE_SLOP_S = 0.002


def grpc_timeout_unit(timeout_s: float) -> float:
    """Resolution of the grpc-timeout header for a timeout this long: gRPC rounds timeouts UP to it
    (1 ms under 1 s, 10 ms under 10 s, 100 ms under 100 s, then seconds, ...; timeout_encoding.cc)."""
    if timeout_s < 1:
        return 0.001
    if timeout_s < 10:
        return 0.01
    if timeout_s < 100:
        return 0.1
    if timeout_s < 1_000:
        return 1.0
    if timeout_s < 10_000:
        return 10.0
    if timeout_s < 100_000:
        return 100.0
    return 3600.0


def caller_time_left(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's time left, conservatively: what arrived, less the header's rounding-up, so a hop never
    believes it has more time than its caller gave it (None when the caller set no deadline). Not undone:
    gRPC's HPACK encoder may resend an earlier timeout up to 3% longer on the same connection; the
    caller's own deadline still ends the call then."""
    left = time_left(context)
    if left is None:
        return None
    return left - grpc_timeout_unit(left)


def wire_timeout(timeout_s: float) -> float:
    """The timeout to hand gRPC so that the next hop sees at most timeout_s after the header's rounding-up:
    a little under a multiple of the header's unit. Raises DeadlineExceeded when that leaves nothing."""
    unit = grpc_timeout_unit(timeout_s)
    # The small epsilon keeps an exact multiple (19.9 / 0.1 = 198.99999...) from losing a whole unit.
    wire = math.floor((timeout_s - _WIRE_SLOP_S) / unit + 1e-9) * unit - _WIRE_SLOP_S
    if wire <= 0:
        raise DeadlineExceeded("deadline exceeded before the request could be forwarded")
    return wire


def downstream_timeout(
    context: grpc.aio.ServicerContext,
    default_s: float | None = None,
    margin_s: float = HOP_MARGIN_S,
    conservative: bool = False,
) -> float | None:
    """Timeout for the next hop: the caller's time left minus a margin (or default_s when the caller set
    none). With conservative, the time left is caller_time_left's (the header's rounding-up removed).
    Raises DeadlineExceeded when nothing useful is left."""
    left = caller_time_left(context) if conservative else time_left(context)
    if left is None:
        return default_s
    if default_s is not None:
        left = min(left, default_s)
    timeout = left - margin_s
    if timeout <= 0:
        raise DeadlineExceeded("deadline exceeded before the request could be forwarded")
    return timeout
