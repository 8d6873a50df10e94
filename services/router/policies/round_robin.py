"""round_robin: each model's replicas in turn, in a stable order (by replica id), whatever their load."""

from __future__ import annotations

from collections.abc import Sequence

from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, register


@register("round_robin")
class RoundRobinPolicy(Policy):
    """The next replica after the one chosen last, by id: a changing candidate set (a replica cooling down or
    joining) shifts the turn without restarting it at the first replica."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._last = ""

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        ordered = sorted(candidates, key=lambda r: r.replica_id)
        chosen = next((r for r in ordered if r.replica_id > self._last), ordered[0])
        self._last = chosen.replica_id
        return Decision(chosen, "next_in_turn", {r.replica_id: float(r is chosen) for r in ordered})
