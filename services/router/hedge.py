"""Hedging the first token: when a replica stays silent too long, the same request goes to a second replica
and whichever answers first carries on; the other is cancelled."""

from __future__ import annotations

import asyncio

import grpc
import structlog

from services.router.attempt import Attempt, Fault, RequestAttempts
from shared.resilience import is_retryable

log = structlog.get_logger(__name__)


async def race(run: RequestAttempts, attempt: Attempt, delay: float) -> Attempt:
    """Wait up to delay for attempt's first chunk; then send a hedge (run.spare) and return whichever attempt
    answers first, with its first read done (Attempt.first: a chunk, EOF or the winner's error). Every other
    attempt is failed or cancelled and closed here; the winner is the caller's to close."""
    model = attempt.replica.model
    counters = run.router.counters
    attempt.first = asyncio.ensure_future(attempt.relay.read())
    racers: dict[asyncio.Future, Attempt] = {attempt.first: attempt}
    started = [attempt]
    winner: Attempt | None = None
    try:
        done, _ = await asyncio.wait({attempt.first}, timeout=delay)
        if not done:
            hedge = run.spare(attempt)
            if hedge is None:
                await asyncio.wait({attempt.first})
            else:
                started.append(hedge)
                hedge.first = asyncio.ensure_future(hedge.relay.read())
                racers[hedge.first] = hedge
                counters.hedge(model, "sent")
                log.info(
                    "router.hedged",
                    replica=attempt.replica.replica_id,
                    hedge=hedge.replica.replica_id,
                    delay_ms=delay * 1000,
                )
        while True:
            done, _ = await asyncio.wait(racers, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                err = task.exception()
                # A timeout is left to the attempt that goes on, which knows the deadline it gave.
                retryable = isinstance(err, grpc.aio.AioRpcError) and is_retryable(err.code(), True)
                if err is None or not retryable or len(racers) == 1:
                    winner = racers[task]
                    if winner is not attempt and err is None:
                        counters.hedge(model, "won")
                    return winner
                # This racer failed but the other may still answer: account it and keep waiting.
                loser = racers.pop(task)
                run.lost(loser, Fault(err.code(), err.details() or "", err))
                loser.close()
    finally:
        # The caller closes the winner, or the attempt it passed in when the race ends without one (its caller
        # went away); closing twice is harmless.
        for a in started:
            if a is not winner:
                a.close()
