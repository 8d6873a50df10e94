"""kv_aware: score replicas by the prompt blocks their engines report cached (KV events) against their load."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from services.router.kv_index import (
    ChannelFactory,
    KvIndex,
    KvSubscriptions,
    StateListener,
    _insecure_channel,
)
from services.router.membership import ReplicaInfo
from services.router.policies import Decision, Policy, RouteRequest, register
from shared.prefix_hash import BLOCK_SIZE


@register("kv_aware")
class KvAwarePolicy(Policy):
    """cost = prefill_weight x (prompt tokens not cached there) / 1000 + load_weight x load score; the lowest
    cost wins, ties at random. The cached run comes from the engines' own KV events (kv_index.KvIndex), so it
    is exact up to the events in flight; a replica whose stream is not synced yet, or that publishes no KV events
    (a vLLM engine without --vllm-kv-events; logged once as router.kv_events_off), counts as caching nothing,
    so it is scored by load alone.

    With the default weights 1,000 uncached prompt tokens weigh as much as one more request in flight there
    (prefill of 1,000 tokens costs about one decode step of a batch on the modelled H100)."""

    def __init__(
        self,
        prefill_weight: float = 4.0,
        load_weight: float = 1.0,
        subscribe: bool = True,
        channel_factory: ChannelFactory = _insecure_channel,
        index: KvIndex | None = None,
        rng: random.Random | None = None,
        on_kv_state: StateListener | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.prefill_weight, self.load_weight = prefill_weight, load_weight
        self.index = index or KvIndex()
        self.subscriptions = (
            KvSubscriptions(self.index, channel_factory, on_state=on_kv_state) if subscribe else None
        )
        self._rng = rng or random.Random()

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        hashes = request.block_hashes
        prompt = len(request.token_ids)
        matched = self.index.match(hashes, (r.replica_id for r in candidates))
        costs: dict[str, float] = {}
        for r in candidates:
            uncached = max(0, prompt - matched[r.replica_id] * BLOCK_SIZE)
            costs[r.replica_id] = round(
                self.prefill_weight * uncached / 1000.0 + self.load_weight * self.load.score(r.replica_id), 4
            )
        low = min(costs.values())
        best = [r for r in candidates if costs[r.replica_id] == low]
        chosen = best[0] if len(best) == 1 else self._rng.choice(best)
        n = matched[chosen.replica_id]
        reason = "cached_prefix" if n else "least_cost_no_cache"
        details = {
            "matched_blocks": n,
            "prompt_blocks": len(hashes),
            "prompt_tokens": prompt,
            "work_tokens": max(0, prompt - n * BLOCK_SIZE) + request.max_tokens,
        }
        return Decision(chosen, reason, costs, details)

    def on_load_update(self, replica: ReplicaInfo) -> None:
        super().on_load_update(replica)
        if self.subscriptions is not None and replica.address:
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return  # no loop (a unit test): nothing to subscribe with
            self.subscriptions.ensure(replica.replica_id, replica.address, replica.model)

    def remove(self, replica_id: str) -> None:
        super().remove(replica_id)
        if self.subscriptions is not None:
            self.subscriptions.drop(replica_id)
        else:
            self.index.remove(replica_id)

    async def close(self) -> None:
        if self.subscriptions is not None:
            await self.subscriptions.close()
