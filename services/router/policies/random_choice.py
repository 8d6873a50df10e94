"""random: a uniformly random replica (the baseline the load-aware policies are measured against)."""

from __future__ import annotations

import random
from collections.abc import Sequence

from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, register


@register("random")
class RandomPolicy(Policy):
    """Any candidate with equal probability."""

    def __init__(self, rng: random.Random | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rng = rng or random.Random()

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        chosen = self._rng.choice(list(candidates))
        return Decision(chosen, "uniform_random", {r.replica_id: 1.0 / len(candidates) for r in candidates})
