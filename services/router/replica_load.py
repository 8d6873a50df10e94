"""The router's estimate of each replica's load: the registry's last report corrected by what this router
routed and saw finish since, so a policy never acts on a heartbeat-old number alone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.router.membership import ReplicaInfo


@dataclass(frozen=True, slots=True)
class LoadWeights:
    """How the load score adds up its parts (a request counts 1 unit)."""

    requests: float = 1.0
    # Per 1,000 tokens of queued or running work (prompt still to prefill plus output still to generate).
    tokens_per_k: float = 1.0
    # Per unit of KV-cache usage (0..1): a nearly full cache means preemptions soon.
    kv_usage: float = 4.0


@dataclass(slots=True)
class _Replica:
    in_flight: int = 0
    in_flight_tokens: int = 0
    # Since the replica's last load report: requests and tokens this router sent there, requests that ended.
    started_since: int = 0
    tokens_since: int = 0
    ended_since: int = 0
    ended_tokens_since: int = 0
    reported_requests: int = 0
    reported_tokens: int = 0
    kv_usage: float = 0.0


class LoadTracker:
    """Per-replica load from this router's in-flight accounting (exact, current) and the registry's load
    reports (which also see other routers' traffic, but arrive with heartbeats)."""

    def __init__(self, weights: LoadWeights | None = None) -> None:
        self.weights = weights or LoadWeights()
        self._r: dict[str, _Replica] = {}

    def _get(self, replica_id: str) -> _Replica:
        r = self._r.get(replica_id)
        if r is None:
            r = self._r[replica_id] = _Replica()
        return r

    # -- events ---------------------------------------------------------------------------------------

    def started(self, replica_id: str, tokens: int) -> None:
        """This router sent a request of about `tokens` tokens of work (prompt + max output) there."""
        r = self._get(replica_id)
        r.in_flight += 1
        r.in_flight_tokens += tokens
        r.started_since += 1
        r.tokens_since += tokens

    def ended(self, replica_id: str) -> None:
        """One request this router sent there ended. The interface names no request, so its tokens are taken
        as the mean of what is in flight there (exact for one in flight, a fair estimate beyond)."""
        r = self._r.get(replica_id)
        if r is None or r.in_flight <= 0:
            return
        share = r.in_flight_tokens // r.in_flight
        r.in_flight_tokens -= share
        r.in_flight -= 1
        r.ended_since += 1
        r.ended_tokens_since += share

    def report(self, replica: ReplicaInfo) -> None:
        """The registry's newer load for replica: it now covers what was counted since the last one."""
        r = self._get(replica.replica_id)
        load = replica.load
        r.reported_requests = load.running + load.waiting
        r.reported_tokens = load.in_flight_tokens
        r.kv_usage = load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
        r.started_since = r.tokens_since = r.ended_since = r.ended_tokens_since = 0

    def forget(self, replica_id: str) -> None:
        self._r.pop(replica_id, None)

    # -- estimates ------------------------------------------------------------------------------------

    def in_flight(self, replica_id: str) -> int:
        """Requests this router has in flight there (exact)."""
        r = self._r.get(replica_id)
        return r.in_flight if r else 0

    def requests(self, replica_id: str) -> int:
        """Requests running or waiting there: the last report plus this router's starts and ends since, never
        fewer than this router's own in-flight count."""
        r = self._r.get(replica_id)
        if r is None:
            return 0
        return max(r.in_flight, r.reported_requests + r.started_since - r.ended_since)

    def tokens(self, replica_id: str) -> int:
        """Tokens of work queued or running there: the last report plus what this router sent there since, less
        what ended since. (Not floored at this router's own outstanding tokens, as requests() is: those count a
        request's whole work until it ends, while the report counts only what is left.)"""
        r = self._r.get(replica_id)
        if r is None:
            return 0
        return max(0, r.reported_tokens + r.tokens_since - r.ended_tokens_since)

    def kv_usage(self, replica_id: str) -> float:
        r = self._r.get(replica_id)
        return r.kv_usage if r else 0.0

    def score(self, replica_id: str) -> float:
        """One number, lower is lighter: weighted requests, tokens (per 1,000) and KV usage."""
        w = self.weights
        return (
            w.requests * self.requests(replica_id)
            + w.tokens_per_k * self.tokens(replica_id) / 1000.0
            + w.kv_usage * self.kv_usage(replica_id)
        )
