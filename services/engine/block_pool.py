"""The sim's paged KV cache, after vLLM v1's BlockPool: a fixed set of 16-token blocks, a free queue in LRU
order that still holds unreferenced cached blocks, and a map from block hash to cached block."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field


class KVBlock:
    """One KV-cache block. A block with a hash is cached: another request with the same prefix may share it."""

    __slots__ = ("block_id", "ref_cnt", "block_hash", "parent_hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None
        # For KV events and snapshots: the chain link and the block's tokens.
        self.parent_hash: int | None = None
        self.token_ids: tuple[int, ...] = ()

    def __repr__(self) -> str:
        return f"KVBlock({self.block_id}, ref={self.ref_cnt}, hash={self.block_hash})"


@dataclass(slots=True)
class PrefixCacheStats:
    """Prefix-cache lookups since start, in tokens (as vLLM's PrefixCacheStats)."""

    queries: int = 0
    hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(slots=True)
class PoolEvents:
    """KV changes since the last take(), in order: ("stored", hashes, parent, tokens) or ("removed", hashes)."""

    items: list[tuple] = field(default_factory=list)

    def stored(self, hashes: list[int], parent: int | None, tokens: list[int]) -> None:
        self.items.append(("stored", hashes, parent, tokens))

    def removed(self, block_hash: int) -> None:
        items = self.items
        if items and items[-1][0] == "removed":
            items[-1][1].append(block_hash)  # evictions of one step coalesce into one BlockRemoved
        else:
            items.append(("removed", [block_hash]))


class BlockPool:
    """All KV blocks of a replica.

    As in vLLM, the free queue holds every block with ref_cnt 0, least recently freed first, cached or not:
    new blocks come from its front, and a cached block taken from there is evicted (its hash dropped, a
    "removed" event). A request frees its blocks last-first, so a chain's tail is evicted before its head and
    the shared prefix survives longest. A cached block that is hit again leaves the queue (touch).

    The free queue is an OrderedDict (O(1) remove from the middle, pop from the front, append) rather than
    vLLM's hand-written doubly linked list: same order, less code. Blocks never used yet are made on demand:
    vLLM's queue starts as every block in id order, so all of them are handed out before any freed one, which
    a counter of fresh blocks reproduces without building 100k+ objects at start."""

    def __init__(self, num_blocks: int, block_size: int = 16, *, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1; got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.blocks: list[KVBlock] = []  # made so far; block_id == index
        self._free: OrderedDict[int, KVBlock] = OrderedDict()
        self.cached: dict[int, KVBlock] = {}
        self.events = PoolEvents()
        self.stats = PrefixCacheStats()

    # -- counts -------------------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks that can be allocated now (unreferenced, cached or not)."""
        return len(self._free) + self.num_blocks - len(self.blocks)

    @property
    def num_used(self) -> int:
        """Blocks referenced by a request (vLLM's KV usage counts these)."""
        return len(self.blocks) - len(self._free)

    # -- lookups ------------------------------------------------------------------------------------

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        return self.cached.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """A request takes cached blocks it hit: referenced blocks leave the free queue."""
        free = self._free
        for b in blocks:
            if b.ref_cnt == 0:
                del free[b.block_id]
            b.ref_cnt += 1

    # -- allocation ---------------------------------------------------------------------------------

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """n blocks from the front of the free queue (evicting cached ones); the caller checked num_free."""
        if n > self.num_free:
            raise ValueError(f"cannot allocate {n} blocks; {self.num_free} free")
        out: list[KVBlock] = []
        blocks = self.blocks
        fresh = min(n, self.num_blocks - len(blocks))
        for _ in range(fresh):
            b = KVBlock(len(blocks))
            blocks.append(b)
            b.ref_cnt = 1
            out.append(b)
        popitem = self._free.popitem
        for _ in range(n - fresh):
            b = popitem(last=False)[1]
            if b.block_hash is not None:
                self._evict(b)
            b.ref_cnt = 1
            out.append(b)
        return out

    def _evict(self, b: KVBlock) -> None:
        h = b.block_hash
        if self.cached.get(h) is b:
            del self.cached[h]
            self.events.removed(h)
        b.block_hash = None
        b.parent_hash = None
        b.token_ids = ()

    def cache_full_blocks(
        self, blocks: list[KVBlock], hashes: list[int], start: int, end: int, token_ids: list[int]
    ) -> None:
        """Blocks[start:end] are full: give them their hashes and make them hittable, one "stored" event for
        the chain. A hash already cached by another block (two requests computed the same prefix at once)
        keeps the first block; the duplicate stays private and is reused as a plain block."""
        if not self.enable_caching or start >= end:
            return
        bs = self.block_size
        parent = hashes[start - 1] if start > 0 else None
        stored: list[int] = []
        stored_tokens: list[int] = []
        first_parent = parent
        cached = self.cached
        for i in range(start, end):
            b, h = blocks[i], hashes[i]
            toks = token_ids[i * bs : (i + 1) * bs]
            if b.block_hash is None and h not in cached:
                b.block_hash, b.parent_hash, b.token_ids = h, parent, tuple(toks)
                cached[h] = b
                if not stored:
                    first_parent = parent
                elif stored[-1] != parent:
                    # The chain broke (a duplicate in between): report what we have, start a new run.
                    self.events.stored(stored, first_parent, stored_tokens)
                    stored, stored_tokens, first_parent = [], [], parent
                stored.append(h)
                stored_tokens.extend(toks)
            parent = h
        if stored:
            self.events.stored(stored, first_parent, stored_tokens)

    def free_blocks(self, blocks: list[KVBlock]) -> None:
        """A request lets go of its blocks (finished, aborted, preempted); pass them in chain order. They are
        queued tail first, so eviction takes the end of a chain before its shared beginning."""
        free = self._free
        for b in reversed(blocks):
            b.ref_cnt -= 1
            if b.ref_cnt == 0:
                free[b.block_id] = b

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash (only when no block is referenced, as vLLM); an "all cleared" event."""
        if self.num_used:
            return False
        for b in self.blocks:
            b.block_hash, b.parent_hash, b.token_ids = None, None, ()
        self.cached.clear()
        self.events.items.append(("cleared",))
        return True

    def take_events(self) -> list[tuple]:
        """The changes since the last call."""
        items = self.events.items
        self.events.items = []
        return items
