"""The sim engine's scheduler, after vLLM v1's: continuous batching, chunked prefill under a per-step token
budget, paged KV-cache blocks, and recompute preemption when blocks run out. No clocks and no asyncio here:
the step loop (sim.py) asks for a step, waits the step's modelled time, then completes it."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from services.engine.sim_request import SimRequest

BLOCK_SIZE = 16


def blocks_for(tokens: int) -> int:
    """KV blocks that hold `tokens` tokens."""
    return -(-tokens // BLOCK_SIZE)


@dataclass(slots=True)
class Step:
    """One scheduled step: each request with how many of its tokens the step computes."""

    items: list[tuple[SimRequest, int]] = field(default_factory=list)
    decode_seqs: int = 0
    prefill_tokens: int = 0
    preempted: int = 0


class Scheduler:
    """Running requests go first (a decode step each, or the next chunk of their prefill), then waiting ones
    are admitted, interactive before standard before batch and first come first served within a tier, while
    the step has token budget, a sequence slot and KV blocks for them. Blocks are counted, not addressed:
    without prefix caching nothing needs a block's identity yet."""

    def __init__(
        self, max_num_seqs: int = 256, max_num_batched_tokens: int = 2048, num_kv_blocks: int = 32768
    ):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.num_kv_blocks = num_kv_blocks
        self.blocks_used = 0
        # One FIFO per priority rank (preempted requests rejoin at the front of theirs).
        self.waiting: tuple[deque[SimRequest], ...] = (deque(), deque(), deque())
        # In admission order (preemption takes from the back); a dict so aborts remove in O(1).
        self.running: dict[str, SimRequest] = {}
        self.preemptions = 0

    # -- membership ---------------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting)

    def has_work(self) -> bool:
        return bool(self.running) or any(self.waiting)

    def fits(self, total_tokens: int) -> bool:
        """Whether a request needing KV for total_tokens could ever run (alone, with every block free)."""
        return blocks_for(total_tokens) <= self.num_kv_blocks

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

    def _free(self, req: SimRequest) -> None:
        self.blocks_used -= req.num_blocks
        req.num_blocks = 0

    def _grow(self, req: SimRequest, tokens: int) -> bool:
        need = blocks_for(tokens) - req.num_blocks
        if need <= 0:
            return True
        if self.blocks_used + need > self.num_kv_blocks:
            return False
        self.blocks_used += need
        req.num_blocks += need
        return True

    def _preempt(self, req: SimRequest) -> None:
        # Recompute preemption: drop its KV; it prefills prompt and outputs again when readmitted, first in
        # its tier. Its outputs depend only on position, so its text does not change.
        del self.running[req.request_id]
        self._free(req)
        req.num_computed = 0
        self.waiting[req.rank].appendleft(req)
        self.preemptions += 1

    # -- steps --------------------------------------------------------------------------------------

    def schedule(self) -> Step:
        """Choose what the next step computes, allocating the KV blocks it needs."""
        step = Step()
        budget = self.max_num_batched_tokens
        running = list(self.running.values())
        end = len(running)
        i = 0
        while i < end and budget > 0:
            req = running[i]
            n = min(req.num_tokens - req.num_computed, budget)
            # Out of blocks: preempt from the back (the latest admitted) until this one fits, or preempt it.
            while not self._grow(req, req.num_computed + n):
                end -= 1
                self._preempt(running[end])
                step.preempted += 1
                if end == i:
                    break
            if end == i:
                break
            self._account(step, req, n)
            budget -= n
            i += 1
        # vLLM admits nothing in a step that had to preempt: the blocks are needed by those already running.
        if step.preempted:
            return step
        while budget > 0 and len(self.running) < self.max_num_seqs:
            queue = next((q for q in self.waiting if q), None)
            if queue is None:
                break
            req = queue[0]
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow(req, req.num_computed + n):
                break  # the head waits for blocks; no overtaking, so big requests are not starved
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
