"""power_of_two: two replicas drawn at random, the lighter one wins (load spread close to least_load's with
no herding when many routers share stale load)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, register


@register("power_of_two")
class PowerOfTwoPolicy(Policy):
    """Two distinct random candidates; the one with the lower load score (replica_load.LoadTracker) wins, the
    first drawn on a tie."""

    def __init__(self, rng: random.Random | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rng = rng or random.Random()

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        if len(candidates) == 1:
            return Decision(candidates[0], "only_candidate", {candidates[0].replica_id: 0.0})
        a, b = self._rng.sample(list(candidates), 2)
        sa, sb = self.load.score(a.replica_id), self.load.score(b.replica_id)
        chosen = b if sb < sa else a
        return Decision(chosen, "lighter_of_two", {a.replica_id: round(sa, 4), b.replica_id: round(sb, 4)})
