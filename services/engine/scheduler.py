"""The sim engine's scheduler, after vLLM v1's: continuous batching, chunked prefill under a per-step token
budget, paged KV blocks with prefix caching (services/engine/block_pool.py), and recompute preemption when
blocks run out. No clocks and no asyncio here: the step loop (sim.py) asks for a step, waits the step's
modelled time, then completes it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.engine.block_pool import BlockPool, KVBlock
from services.engine.sim_request import SimRequest
from shared.prefix_hash import BLOCK_SIZE


def blocks_for(tokens: int) -> int:
    """KV blocks that hold `tokens` tokens."""
    return -(-tokens // BLOCK_SIZE)


@dataclass(slots=True)
class Step:
    """One scheduled step: each request with how many of its tokens the step computes."""

    items: list[tuple[SimRequest, int]] = field(default_factory=list)
    decode_seqs: int = 0
    prefill_tokens: int = 0
    # Tokens the decoding sequences attend over (their KV, read by the step), in all and the longest one's.
    context_tokens: int = 0
    max_context: int = 0
    preempted: int = 0


class Scheduler:
    """Running requests go first (a decode step each, or the next chunk of their prefill), then waiting ones
    are admitted, interactive before standard before batch and first come first served within a tier, while
    the step has token budget, a sequence slot and KV blocks for them (vLLM's priority policy).

    A waiting request first takes the longest chain of its full blocks already cached (never its last token:
    one token must be computed to sample from), so only the rest is prefilled. When a running request needs a
    block and none is free, the lowest-priority, latest-arrived running request is preempted: its blocks are
    freed (they stay cached, so its recompute mostly hits) and it rejoins the front of its tier's queue."""

    def __init__(
        self,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int = 32768,
        *,
        enable_prefix_caching: bool = True,
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.pool = BlockPool(num_kv_blocks, BLOCK_SIZE, enable_caching=enable_prefix_caching)
        # One FIFO per priority rank (preempted requests rejoin at the front of theirs).
        self.waiting: tuple[deque[SimRequest], ...] = (deque(), deque(), deque())
        # In admission order; a dict so aborts remove in O(1).
        self.running: dict[str, SimRequest] = {}
        self.preemptions = 0

    # -- membership ---------------------------------------------------------------------------------

    @property
    def num_kv_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def blocks_used(self) -> int:
        return self.pool.num_used

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting)

    def fits(self, total_tokens: int) -> bool:
        """Whether a request needing KV for total_tokens could ever run (alone, with every block free)."""
        return blocks_for(total_tokens) <= self.pool.num_blocks

    def add(self, req: SimRequest) -> None:
        """Queue a new request."""
        self.waiting[req.rank].append(req)

    def remove(self, req: SimRequest) -> bool:
        """Take a request out (abort): its KV blocks and its queue slot are free at once."""
        if self.running.pop(req.request_id, None) is req:
            self._free(req)
            return True
        try:
            self.waiting[req.rank].remove(req)
        except ValueError:
            return False
        return True

    # -- KV blocks (vLLM's KVCacheManager) ----------------------------------------------------------

    def _free(self, req: SimRequest) -> None:
        self.pool.free_blocks(req.blocks)
        req.blocks = []
        req.num_cached_blocks = 0

    def _cache_hits(self, req: SimRequest) -> list[KVBlock]:
        """The longest run of req's leading full blocks that is cached, leaving at least one token to compute."""
        pool = self.pool
        if not pool.enable_caching:
            return []
        cached = pool.cached
        hits: list[KVBlock] = []
        for h in req.block_hashes[: (req.num_tokens - 1) // BLOCK_SIZE]:
            b = cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def _allocate(self, req: SimRequest, num_new: int, hits: list[KVBlock] = ()) -> bool:
        """Give req the blocks for num_new more tokens (after taking the cached hits); False, changing nothing,
        when there are not enough free blocks. Blocks that become full get their hashes cached now, as vLLM does
        at allocation (the step computes them before any later step can read them)."""
        total = req.num_computed + len(hits) * BLOCK_SIZE + num_new
        # Fast path (most decode steps): the held blocks have room and no block becomes full.
        if (
            not hits
            and total <= len(req.blocks) * BLOCK_SIZE
            and min(total // BLOCK_SIZE, len(req.block_hashes)) <= req.num_cached_blocks
        ):
            return True
        pool = self.pool
        need = blocks_for(total) - len(req.blocks) - len(hits)
        # Hits with no reference sit in the free queue; taking them leaves fewer blocks to allocate from.
        if need > pool.num_free - sum(1 for b in hits if b.ref_cnt == 0):
            return False
        if hits:
            pool.touch(hits)
            req.blocks.extend(hits)
            req.num_cached_blocks = len(req.blocks)
        if need > 0:
            req.blocks.extend(pool.get_new_blocks(need))
        full = min(total // BLOCK_SIZE, len(req.block_hashes))
        if full > req.num_cached_blocks:
            pool.cache_full_blocks(req.blocks, req.block_hashes, req.num_cached_blocks, full, req.token_ids)
            req.num_cached_blocks = full
        return True

    def _preempt(self, req: SimRequest) -> None:
        # Recompute preemption: drop its KV references; it prefills prompt and outputs again when readmitted,
        # first in its tier. Its outputs depend only on position, so its text does not change.
        del self.running[req.request_id]
        self._free(req)
        req.num_computed = 0
        req.num_preemptions += 1
        self.waiting[req.rank].appendleft(req)
        self.preemptions += 1

    # -- steps --------------------------------------------------------------------------------------

    def schedule(self) -> Step:
        """Choose what the next step computes, allocating the KV blocks it needs."""
        step = Step()
        budget = self.max_num_batched_tokens
        # Not yet scheduled this step, in admission order: the only ones preemption may take.
        rest = list(self.running.values())
        rest.reverse()
        while rest and budget > 0:
            req = rest.pop()
            n = min(req.num_tokens - req.num_computed, budget)
            scheduled = True
            while not self._allocate(req, n):
                # Out of blocks: preempt the lowest priority, latest arrival (this request itself, maybe).
                victim = max(rest, key=_victim_key, default=req)
                if _victim_key(req) > _victim_key(victim):
                    victim = req
                self._preempt(victim)
                step.preempted += 1
                if victim is req:
                    scheduled = False
                    break
                rest.remove(victim)
            if not scheduled:
                break
            self._account(step, req, n)
            budget -= n
        # vLLM admits nothing in a step that had to preempt: the blocks are needed by those already running.
        if step.preempted:
            return step
        pool = self.pool
        while budget > 0 and len(self.running) < self.max_num_seqs:
            queue = next((q for q in self.waiting if q), None)
            if queue is None:
                break
            req = queue[0]
            hits = self._cache_hits(req) if req.num_computed == 0 else []
            hit_tokens = len(hits) * BLOCK_SIZE
            n = min(req.num_tokens - req.num_computed - hit_tokens, budget)
            if not self._allocate(req, n, hits):
                break  # the head waits for blocks; no overtaking, so big requests are not starved
            if req.cached_tokens is None:
                # First admission: what vLLM reports as cached tokens and counts in its prefix-cache stats.
                req.cached_tokens = hit_tokens
                pool.stats.queries += req.num_tokens
                pool.stats.hits += hit_tokens
            req.num_computed += hit_tokens
            queue.popleft()
            self.running[req.request_id] = req
            self._account(step, req, n)
            budget -= n
        return step

    @staticmethod
    def _account(step: Step, req: SimRequest, n: int) -> None:
        step.items.append((req, n))
        if n == 1 and req.outputs and req.num_computed + 1 == req.num_tokens:
            step.decode_seqs += 1
            step.context_tokens += req.num_computed
            if req.num_computed > step.max_context:
                step.max_context = req.num_computed
        else:
            step.prefill_tokens += n

    def complete(self, step: Step) -> tuple[int, list[SimRequest]]:
        """Apply a step's results: requests whose tokens are all computed get their next token. Returns the
        tokens generated and the requests that finished (already out of the running set)."""
        emitted = 0
        finished: list[SimRequest] = []
        running = self.running
        for req, n in step.items:
            if req.finish_reason is not None:
                continue  # aborted while the step ran
            req.num_computed += n
            if req.num_computed == req.num_tokens:
                req.append_token()
                emitted += 1
                if req.finish_reason is not None:
                    del running[req.request_id]
                    self._free(req)
                    finished.append(req)
        return emitted, finished


def _victim_key(req: SimRequest) -> tuple[int, int]:
    """Preemption order: the largest key goes first (batch before standard before interactive, then latest)."""
    return (req.rank, req.arrival)
