"""Prefix indexes: which replica holds which prompt blocks. PrefixIndex is approximate (what this router routed,
aged out as the replicas' caches would); both answer the longest cached run of a request's block hashes."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

# A replica's assumed cache size, in blocks, until a load report tells the real one.
DEFAULT_REPLICA_BLOCKS = 32768


def longest_runs(
    hashes: Sequence[int], holders: Sequence[set[str] | None], replica_ids: Iterable[str]
) -> dict[str, int]:
    """For each replica, how many of hashes, from the first on, it holds (holders[i]: who holds hashes[i]).
    A chain stops at the first block a replica lacks: the engine's prefix cache matches from the start only."""
    runs = dict.fromkeys(replica_ids, 0)
    alive = set(runs)
    for i, held in enumerate(holders):
        if not held:
            break
        alive &= held
        if not alive:
            break
        for rid in alive:
            runs[rid] = i + 1
    return runs


class PrefixIndex:
    """Blocks keyed by (model, cache salt, block hash), so one tenant's prefix can never match another tenant's
    entry or another model's, each with the replicas it was routed to. Every replica keeps an LRU of its blocks
    capped at its KV-cache size, as its engine would evict them (hand-written: no library keeps one LRU per
    owner over a shared key space with O(1) touch)."""

    def __init__(self, default_capacity: int = DEFAULT_REPLICA_BLOCKS) -> None:
        self.default_capacity = default_capacity
        self._holders: dict[tuple[str, str, int], set[str]] = {}
        self._lru: dict[str, OrderedDict[tuple[str, str, int], None]] = {}
        self._capacity: dict[str, int] = {}

    def set_capacity(self, replica_id: str, blocks: int) -> None:
        """The replica's KV cache holds this many blocks (from its load report)."""
        if blocks > 0:
            self._capacity[replica_id] = blocks
            self._evict(replica_id)

    def insert(self, model: str, salt: str, hashes: Sequence[int], replica_id: str) -> None:
        """replica_id was sent a prompt with these blocks: it caches them (and they are its most recent)."""
        lru = self._lru.setdefault(replica_id, OrderedDict())
        for h in hashes:
            key = (model, salt, h)
            if key in lru:
                lru.move_to_end(key)
            else:
                lru[key] = None
                self._holders.setdefault(key, set()).add(replica_id)
        self._evict(replica_id)

    def _evict(self, replica_id: str) -> None:
        lru = self._lru.get(replica_id)
        if lru is None:
            return
        cap = self._capacity.get(replica_id, self.default_capacity)
        while len(lru) > cap:
            key, _ = lru.popitem(last=False)
            self._drop(key, replica_id)

    def _drop(self, key: tuple[str, str, int], replica_id: str) -> None:
        held = self._holders.get(key)
        if held is not None:
            held.discard(replica_id)
            if not held:
                del self._holders[key]

    def match(
        self, model: str, salt: str, hashes: Sequence[int], replica_ids: Iterable[str]
    ) -> dict[str, int]:
        """Per replica, the longest run of hashes (from the first) it is thought to hold."""
        holders = [self._holders.get((model, salt, h)) for h in hashes]
        return longest_runs(hashes, holders, replica_ids)

    def remove(self, replica_id: str) -> None:
        """Forget a replica (it left; a new one starts cold)."""
        for key in self._lru.pop(replica_id, {}):
            self._drop(key, replica_id)
        self._capacity.pop(replica_id, None)

    def blocks(self, replica_id: str) -> int:
        """Blocks thought cached on replica_id."""
        return len(self._lru.get(replica_id, ()))
