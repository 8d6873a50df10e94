"""A retry storm in virtual time: clients send requests to a replica that serves a fixed number per second from a
bounded queue; for a while it struggles (serves a fraction of that); the clients retry failed attempts either
naively (at once, up to many times) or as fleetserve does (full-jitter exponential backoff from
fleetserve.client.RetryPolicy, gated by shared.resilience.RetryBudget, the router's retry throttling). Measured:
how many attempts each request costs the replica (load amplification) and how long after the replica is healthy
again goodput takes to recover. The decisions are the project's own code; the replica is a queue model (work
whose client gave up is still done, as on a server that does not see the cancellation)."""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

import grpc

from fleetserve.client import ErrorDetails, RetryPolicy
from shared.resilience import RetryBudget

UNAVAILABLE = ErrorDetails(code=grpc.StatusCode.UNAVAILABLE, message="struggling")


@dataclass(frozen=True)
class StormSettings:
    """The replica, the load and the struggle (seconds, requests per second)."""

    duration_s: float = 120.0
    tick_s: float = 0.01
    capacity: float = 100.0  # requests the healthy replica serves per second
    struggle_capacity: float = 25.0  # ... and while it struggles
    struggle_from_s: float = 20.0
    struggle_to_s: float = 35.0
    offered: float = 70.0  # new requests per second (Poisson)
    queue_max: int = 300  # attempts the replica holds; more are refused at once (UNAVAILABLE)
    timeout_s: float = 2.0  # a client gives an attempt up after this
    recovered_share: float = 0.95  # goodput / offered over a 5 s window that counts as recovered


@dataclass(frozen=True)
class ClientRetries:
    """How clients retry: naive (no delay, up to max_attempts) or with policy + budget."""

    name: str
    max_attempts: int
    policy: RetryPolicy | None = None  # None: retry at once
    budget: bool = False


NAIVE = ClientRetries("naive", max_attempts=10)
CAREFUL = ClientRetries(
    "backoff+jitter+budget",
    max_attempts=4,
    policy=RetryPolicy(max_attempts=4, backoff_base_s=0.1, backoff_max_s=5.0),
    budget=True,
)


@dataclass
class _Attempt:
    request: int
    number: int
    sent: float


@dataclass
class Timeline:
    """Per second: new requests, attempts the replica received, requests served in time (goodput), work done for
    attempts whose client had already given up, queue length at the end of the second."""

    offered: list[int] = field(default_factory=list)
    attempts: list[int] = field(default_factory=list)
    goodput: list[int] = field(default_factory=list)
    wasted: list[int] = field(default_factory=list)
    queue: list[int] = field(default_factory=list)
    requests: int = 0
    total_attempts: int = 0
    succeeded: int = 0
    gave_up: int = 0
    throttled: int = 0


def simulate(s: StormSettings, clients: ClientRetries, seed: int = 1) -> Timeline:
    """Run the storm; every loop is bounded by the number of ticks and of attempts made."""
    rng = random.Random(seed)
    budget = RetryBudget(max_tokens=50.0, token_ratio=0.1) if clients.budget else None
    seconds = int(s.duration_s)
    tl = Timeline(*([0] * seconds for _ in range(5)))
    queue: deque[_Attempt] = deque()
    timeouts: deque[_Attempt] = deque()  # attempts in the queue, by send time (their deadlines in order)
    done: set[tuple[int, int]] = set()  # (request, attempt) served or timed out
    retries: list[tuple[float, int, int]] = []  # (when, request, attempt number) scheduled
    next_arrival = rng.expovariate(s.offered)
    served_credit = 0.0
    ticks = int(s.duration_s / s.tick_s)

    def fail(t: float, request: int, number: int) -> None:
        if budget is not None:
            budget.on_failure()
        if number >= clients.max_attempts:
            tl.gave_up += 1
            return
        if budget is not None and not budget.can_retry():
            tl.throttled += 1
            tl.gave_up += 1
            return
        if clients.policy is None:
            send(t, request, number + 1)
            return
        wait = clients.policy.delay(UNAVAILABLE, number, None, rng)
        if wait is None:
            tl.gave_up += 1
            return
        retries.append((t + wait, request, number + 1))

    def send(t: float, request: int, number: int) -> None:
        sec = min(int(t), seconds - 1)
        tl.attempts[sec] += 1
        tl.total_attempts += 1
        if len(queue) >= s.queue_max:
            fail(t, request, number)  # refused at once
            return
        a = _Attempt(request, number, t)
        queue.append(a)
        timeouts.append(a)

    for i in range(ticks):
        t = i * s.tick_s
        sec = int(t)
        while next_arrival <= t:
            tl.requests += 1
            tl.offered[sec] += 1
            send(t, tl.requests, 1)
            next_arrival += rng.expovariate(s.offered)
        if retries:
            due = [r for r in retries if r[0] <= t]
            if due:
                retries[:] = [r for r in retries if r[0] > t]
                for _, request, number in due:
                    send(t, request, number)
        struggling = s.struggle_from_s <= t < s.struggle_to_s
        served_credit += (s.struggle_capacity if struggling else s.capacity) * s.tick_s
        while served_credit >= 1.0 and queue:
            served_credit -= 1.0
            a = queue.popleft()
            if (a.request, a.number) in done:
                tl.wasted[sec] += 1  # its client gave up on it already: the work helps nobody
                continue
            done.add((a.request, a.number))
            tl.goodput[sec] += 1
            tl.succeeded += 1
            if budget is not None:
                budget.on_success()
        if not queue:
            served_credit = min(served_credit, 1.0)  # an idle replica does not bank capacity
        while timeouts and timeouts[0].sent + s.timeout_s <= t:
            a = timeouts.popleft()
            if (a.request, a.number) not in done:
                done.add((a.request, a.number))
                fail(t, a.request, a.number)
        if (i + 1) % int(1 / s.tick_s) == 0:
            tl.queue[sec] = len(queue)
    return tl


def recovery_s(s: StormSettings, tl: Timeline, window: int = 5) -> float | None:
    """Seconds after the struggle ends until goodput over `window` seconds reaches recovered_share of the
    requests offered in them; None when that never happens within the run."""
    start = int(s.struggle_to_s)
    for t in range(start, len(tl.goodput) - window + 1):
        offered = sum(tl.offered[t : t + window])
        if offered and sum(tl.goodput[t : t + window]) >= s.recovered_share * offered:
            return float(t - start)
    return None


def summary(s: StormSettings, tl: Timeline) -> dict:
    lo, hi = int(s.struggle_from_s), int(s.struggle_to_s)
    struggle_offered = sum(tl.offered[lo:hi]) or 1
    return {
        "requests": tl.requests,
        "attempts": tl.total_attempts,
        "amplification": round(tl.total_attempts / max(1, tl.requests), 2),
        "amplification_during_struggle": round(sum(tl.attempts[lo:hi]) / struggle_offered, 2),
        "peak_attempts_per_s": max(tl.attempts),
        "succeeded": tl.succeeded,
        "success_rate": round(tl.succeeded / max(1, tl.requests), 4),
        "wasted_work": sum(tl.wasted),
        "retries_throttled": tl.throttled,
        "recovery_s": recovery_s(s, tl),
    }
