"""cache_aware: send a prompt where its prefix was sent before (an approximate index of what this router routed,
per model and tenant), unless that would unbalance the fleet; poor matches go to the least-loaded replica. Ties go
where the request's affinity key hashes, so independent routers (gateway workers' embedded routers) agree."""

from __future__ import annotations

import random
from collections.abc import Sequence

from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, least_loaded, register, rendezvous_rank
from services.router.prefix_index import PrefixIndex
from shared.prefix_hash import BLOCK_SIZE


@register("cache_aware")
class CacheAwarePolicy(Policy):
    """After SGLang's cache-aware router, with its guards relative to the fleet's load (loads in requests
    running or waiting, as replica_load.LoadTracker estimates them):

    1. imbalanced: the busiest replica holds more than `imbalance_abs` requests over the lightest and more
       than `imbalance_rel` times it -> least-loaded;
    2. each replica scores the prompt tokens it would not recompute (the longest run of the prompt's blocks it
       was sent before) less `tokens_per_request` for every request it holds over the lightest replica, so a
       match wins only when it saves more than the extra queue costs: at low load a replica that holds a
       shared system prompt and one conversation already does not take the next conversation too
       (conversations spread), while a long history still pulls its next turn home;
    3. a poor match (the winner holds less than `min_match` of the prompt) -> least-loaded, never "the first
       replica".

    Ties go to the replica that rendezvous hashing of the request's affinity key (RouteRequest.affinity_key: its
    session, else its leading prompt blocks) ranks first, not to chance, so independent routers break them
    alike. `tie_tokens` > 0 widens the ties: every replica within that many tokens of the best score ties (and in
    the least-loaded fallbacks every load score within `tie_load` of the lightest). That is for several routers
    that each see some of a conversation's turns (the embedded routers of a gateway's workers, which the gateway
    sets to 256 and 1: one request's worth): each counts only its own requests in flight, so a turn whose
    history a router never saw, judged on its own view of the load, went elsewhere than the others sent the
    conversation; with the wider ties it goes where the key ranks it unless that replica is a request busier,
    and the routers' histories converge (measured: docs/benchmarks/router_affinity.md). It costs a single router
    some spread at low load (a new conversation may join a replica one request busier) and may move a short
    history (under tie_tokens) off a replica one request busier, so it is off for router processes, which the
    gateway's affinity already gives each conversation alone. `affinity_ties=0` restores random ties.
    """

    def __init__(
        self,
        imbalance_abs: float = 4.0,
        imbalance_rel: float = 1.5,
        tokens_per_request: float = 256.0,
        min_match: float = 0.3,
        affinity_ties: float = 1.0,
        tie_load: float = 0.0,
        tie_tokens: float = 0.0,
        index: PrefixIndex | None = None,
        rng: random.Random | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.imbalance_abs, self.imbalance_rel = imbalance_abs, imbalance_rel
        self.tokens_per_request = tokens_per_request
        self.min_match = min_match
        self.affinity_ties = bool(affinity_ties)
        self.tie_load = tie_load
        self.tie_tokens = tie_tokens
        self.index = index or PrefixIndex()
        self._rng = rng or random.Random()

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        key, tie = (request.affinity_key, self.tie_load) if self.affinity_ties else (b"", 0.0)
        loads = {r.replica_id: self.load.requests(r.replica_id) for r in candidates}
        low, high = min(loads.values()), max(loads.values())
        if high - low > self.imbalance_abs and high > self.imbalance_rel * low:
            return least_loaded(self, candidates, self._rng, "imbalanced", key, tie, loads=loads)
        hashes = request.block_hashes
        if not hashes:
            return least_loaded(self, candidates, self._rng, "no_full_block", key, tie)
        matched = self.index.match(request.model, request.cache_salt, hashes, loads)
        scores = {
            rid: round(n * BLOCK_SIZE - self.tokens_per_request * (loads[rid] - low), 1)
            for rid, n in matched.items()
        }
        # Highest score, then the lighter replica, then the affinity key's rank (without a key, chance). With
        # tie_tokens, every replica within that many tokens of the best score ties, and the key's rank alone picks.
        if key:
            floor = max(scores.values()) - self.tie_tokens
            near = [r for r in candidates if scores[r.replica_id] >= floor]
            if self.tie_tokens:
                best = max(near, key=lambda r: rendezvous_rank(key, r.replica_id))
            else:
                best = max(near, key=lambda r: (-loads[r.replica_id], rendezvous_rank(key, r.replica_id)))
        else:
            best = max(
                candidates, key=lambda r: (scores[r.replica_id], -loads[r.replica_id], self._rng.random())
            )
        n = matched[best.replica_id]
        details = {"matched_blocks": n, "prompt_blocks": len(hashes), "loads": loads}
        if n / len(hashes) < self.min_match:
            return least_loaded(
                self,
                candidates,
                self._rng,
                "poor_match",
                key,
                tie,
                **details,
                work_tokens=request.work_tokens,
            )
        return Decision(
            best,
            "prefix_match",
            scores,
            {**details, "work_tokens": max(0, request.work_tokens - n * BLOCK_SIZE)},
        )

    def _chosen(self, replica: ReplicaInfo, request: RouteRequest) -> None:
        if request.pb is not None:
            self.index.insert(request.model, request.cache_salt, request.block_hashes, replica.replica_id)

    def on_load_update(self, replica: ReplicaInfo) -> None:
        super().on_load_update(replica)
        self.index.set_capacity(replica.replica_id, replica.load.kv_blocks_total)

    def remove(self, replica_id: str) -> None:
        super().remove(replica_id)
        self.index.remove(replica_id)
