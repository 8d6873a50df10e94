"""Following a server stream that never ends by itself (a registry watch): apply each message, and when the
stream breaks or ends, reconnect after a full-jitter backoff (reset once messages flow again), keeping what was
learned so far."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, Protocol

import grpc
import structlog

from shared.resilience import full_jitter

log = structlog.get_logger(__name__)


class Follower(Protocol):
    """What follows the stream: whether it is connected now (read by health and status)."""

    connected: bool


async def follow(
    owner: Follower,
    open_stream: Callable[[], AsyncIterable[Any]],
    apply: Callable[[Any], object],
    event: str,
    *,
    kept: Callable[[], dict[str, Any]] = dict,
    backoff_base_s: float = 0.1,
    backoff_max_s: float = 5.0,
    rng: random.Random | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Apply messages from open_stream() until cancelled. Logs `<event>_connected`, `_resubscribe`, `_error` and
    `_broken` (with kept()'s fields: what is kept meanwhile)."""
    attempt = 0
    while True:
        stream = open_stream()
        try:
            async for message in stream:
                if not owner.connected:
                    owner.connected = True
                    log.info(f"{event}_connected", attempt=attempt)
                attempt = 0
                apply(message)
            reason = "stream ended"
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and owner.connected:
                # The watch's own (long) timeout: resubscribe at once for a fresh snapshot.
                log.info(f"{event}_resubscribe")
                owner.connected = False
                continue
            reason = f"{e.code().name}: {e.details()}"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bad message must not stop the follower for good
            log.exception(f"{event}_error")
            reason = repr(e)
        finally:
            cancel = getattr(stream, "cancel", None)
            if cancel is not None:
                cancel()
        owner.connected = False
        delay = full_jitter(attempt, backoff_base_s, backoff_max_s, rng)
        log.warning(f"{event}_broken", reason=reason, attempt=attempt, retry_in_s=round(delay, 3), **kept())
        attempt += 1
        await sleep(delay)
