"""cache_aware: send a prompt where its prefix was sent before (an approximate index of what this router routed,
per model and tenant), unless that would unbalance the fleet; poor matches go to the least-loaded replica."""

from __future__ import annotations

import random
from collections.abc import Sequence

from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, least_loaded, register
from services.router.prefix_index import PrefixIndex


@register("cache_aware")
class CacheAwarePolicy(Policy):
    """After SGLang's cache-aware router, with load guards relative to the fleet's load:

    1. imbalanced: the heaviest replica's load score exceeds the lightest's by more than `imbalance_abs` and by
       a factor over `imbalance_rel` -> least-loaded;
    2. only replicas within `slack` of the lightest compete on the match, slack = max(`balance_abs`,
       `balance_rel` x the mean load), so at low load a busy replica does not keep taking new conversations
       because it holds a shared system prompt, and conversations spread;
    3. among those, the longest prefix match wins if it covers at least `min_match` of the prompt's blocks,
       else (a poor match) least-loaded with random ties, never "the first replica".
    """

    def __init__(
        self,
        imbalance_abs: float = 8.0,
        imbalance_rel: float = 1.5,
        balance_abs: float = 1.0,
        balance_rel: float = 0.5,
        min_match: float = 0.5,
        index: PrefixIndex | None = None,
        rng: random.Random | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.imbalance_abs, self.imbalance_rel = imbalance_abs, imbalance_rel
        self.balance_abs, self.balance_rel = balance_abs, balance_rel
        self.min_match = min_match
        self.index = index or PrefixIndex()
        self._rng = rng or random.Random()

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        loads = {r.replica_id: round(self.load.score(r.replica_id), 4) for r in candidates}
        low, high = min(loads.values()), max(loads.values())
        if high - low > self.imbalance_abs and high > self.imbalance_rel * low:
            return least_loaded(self, candidates, self._rng, "imbalanced")
        hashes = request.block_hashes
        if not hashes:
            return least_loaded(self, candidates, self._rng, "no_full_block")
        matched = self.index.match(request.model, request.cache_salt, hashes, loads)
        slack = max(self.balance_abs, self.balance_rel * sum(loads.values()) / len(loads))
        eligible = [r for r in candidates if loads[r.replica_id] <= low + slack]
        # Longest match first, then the lighter replica, then chance.
        best = max(eligible, key=lambda r: (matched[r.replica_id], -loads[r.replica_id], self._rng.random()))
        ratio = matched[best.replica_id] / len(hashes)
        details = {"matched_blocks": matched[best.replica_id], "prompt_blocks": len(hashes), "loads": loads}
        if ratio < self.min_match:
            return least_loaded(self, candidates, self._rng, "poor_match", **details)
        scores = {rid: round(n / len(hashes), 4) for rid, n in matched.items()}
        return Decision(best, "prefix_match", scores, details)

    def _chosen(self, replica: ReplicaInfo, request: RouteRequest) -> None:
        if request.pb is not None:
            self.index.insert(request.model, request.cache_salt, request.block_hashes, replica.replica_id)

    def on_load_update(self, replica: ReplicaInfo) -> None:
        super().on_load_update(replica)
        self.index.set_capacity(replica.replica_id, replica.load.kv_blocks_total)

    def remove(self, replica_id: str) -> None:
        super().remove(replica_id)
        self.index.remove(replica_id)
