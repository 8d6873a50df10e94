"""least_load: the replica with the lowest load score (requests, tokens of work and KV usage), ties at random."""

from __future__ import annotations

import random
from collections.abc import Sequence

from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, least_loaded, register


@register("least_load")
class LeastLoadPolicy(Policy):
    """Load is the registry's last report (running + waiting requests, in-flight tokens, KV usage: it also sees
    other routers' traffic) corrected by what this router started and saw end since (so it is never a
    heartbeat old); see services/router/replica_load.py. Ties go to a random replica so no one gets them all."""

    def __init__(self, rng: random.Random | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rng = rng or random.Random()

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        return least_loaded(self, candidates, self._rng, "least_loaded")
