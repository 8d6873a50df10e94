"""least_load: fewest requests in flight from this router, then the lightest reported load, then at random."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from services.router.membership import ReplicaInfo
from services.router.policies import Policy, register


@register("least_load")
class LeastLoadPolicy(Policy):
    """The router's own in-flight count decides first: it is exact and current, while the registry's load
    (running + waiting) arrives with heartbeats and may be a second old; it only breaks ties (it still
    sees load from other routers). Remaining ties go to a random replica so no one replica gets them all."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._in_flight: dict[str, int] = {}

    def in_flight(self, replica_id: str) -> int:
        """Attempts this policy sent to replica_id that have not completed."""
        return self._in_flight.get(replica_id, 0)

    def select(self, candidates: Sequence[ReplicaInfo], request: Any) -> ReplicaInfo:
        if not candidates:
            raise ValueError("select() needs at least one candidate")
        best: list[ReplicaInfo] = []
        best_key: tuple[int, int] | None = None
        for r in candidates:
            key = (self._in_flight.get(r.replica_id, 0), r.reported_queue)
            if best_key is None or key < best_key:
                best, best_key = [r], key
            elif key == best_key:
                best.append(r)
        chosen = best[0] if len(best) == 1 else self._rng.choice(best)
        self._in_flight[chosen.replica_id] = self._in_flight.get(chosen.replica_id, 0) + 1
        return chosen

    def on_complete(self, replica_id: str) -> None:
        n = self._in_flight.get(replica_id, 0) - 1
        if n > 0:
            self._in_flight[replica_id] = n
        else:
            self._in_flight.pop(replica_id, None)

    def remove(self, replica_id: str) -> None:
        # Attempts still streaming from a removed replica call on_complete later; that only pops again.
        self._in_flight.pop(replica_id, None)
