"""session: a conversation sticks to one replica (consistent hashing of RoutingContext.session_id) unless that
replica holds more than its bounded share of the load, then the next replica on the ring takes it."""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from hashlib import blake2b

from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, least_loaded, register


def _hash(text: str) -> int:
    return int.from_bytes(blake2b(text.encode(), digest_size=8).digest(), "little")


@register("session")
class SessionPolicy(Policy):
    """Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): a replica takes a new
    request only while its in-flight count is below ceil(c * (in flight over all candidates + 1) / n), so no
    replica ever holds more than about c times the mean, and a replica joining or leaving moves only ~1/n of
    the sessions. Requests without a session go to the least-loaded replica."""

    def __init__(
        self,
        load_factor: float = 1.25,
        virtual_nodes: int = 64,
        rng: random.Random | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1, got {load_factor}")
        self.load_factor = load_factor
        self.virtual_nodes = virtual_nodes
        self._rng = rng or random.Random()
        self._ring_ids: frozenset[str] = frozenset()
        self._points: list[int] = []
        self._owners: list[str] = []

    def _ring(self, ids: frozenset[str]) -> None:
        # Rebuilt only when the candidate set changes (rare: joins, leaves, cooldowns).
        if ids == self._ring_ids:
            return
        points = sorted((_hash(f"{rid}#{v}"), rid) for rid in ids for v in range(self.virtual_nodes))
        self._points = [p for p, _ in points]
        self._owners = [rid for _, rid in points]
        self._ring_ids = ids

    def capacity(self, total_in_flight: int, replicas: int) -> int:
        """Most requests one replica may hold once this request is placed."""
        return math.ceil(self.load_factor * (total_in_flight + 1) / replicas)

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        session = request.session_id
        if not session:
            return least_loaded(self, candidates, self._rng, "no_session")
        by_id = {r.replica_id: r for r in candidates}
        self._ring(frozenset(by_id))
        in_flight = {rid: self.load.in_flight(rid) for rid in by_id}
        cap = self.capacity(sum(in_flight.values()), len(by_id))
        start = bisect.bisect_left(self._points, _hash(session)) % len(self._points)
        seen: list[str] = []
        n = len(self._owners)
        for i in range(n):
            rid = self._owners[(start + i) % n]
            if rid in seen:
                continue
            seen.append(rid)
            if in_flight[rid] < cap:
                reason = "session_home" if len(seen) == 1 else "session_home_full"
                scores = {r: float(in_flight[r]) for r in by_id}
                return Decision(by_id[rid], reason, scores, {"capacity": cap, "ring_hops": len(seen) - 1})
            if len(seen) == len(by_id):
                break
        # Unreachable while capacity exceeds the mean, kept so a bad load_factor cannot raise here.
        return least_loaded(self, candidates, self._rng, "session_all_full")
