"""One request inside the sim engine: its scheduling state, its output tokens, stop strings and stream buffer."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from fleetserve.common.v1 import common_pb2

from services.engine.backend import StepOutput
from services.engine.sim_tokens import TOKEN_TEXT, detokenize, token_at
from shared.prefix_hash import BLOCK_SIZE, hash_block

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
ABORT = common_pb2.FINISH_REASON_ABORT


class SimRequest:
    """A request's state. The step loop appends tokens to a pending buffer and wakes the reader, which takes
    everything pending at once: a reader that lags gets one bigger output, not a backlog of small ones."""

    __slots__ = (
        "request_id", "rank", "arrival", "digest", "prompt_tokens", "max_tokens", "completion",
        "token_ids", "num_tokens", "num_computed", "blocks", "block_hashes", "num_cached_blocks",
        "cache_salt", "cached_tokens", "num_preemptions", "outputs", "stops", "_hold", "_tail", "_unsent",
        "pending_ids", "pending_text", "finish_reason", "waiter", "script", "end_at",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        *,
        prompt_ids: Sequence[int],
        resumed_ids: list[int],
        digest: int,
        max_tokens: int,
        stops: tuple[str, ...] = (),
        rank: int = 1,
        arrival: int = 0,
        cache_salt: str = "",
        script: tuple[int, ...] | None = None,
        end_at: int | None = None,
    ) -> None:
        self.request_id = request_id
        self.rank = rank
        self.arrival = arrival
        self.digest = digest
        self.prompt_tokens = len(prompt_ids)
        self.max_tokens = max_tokens
        # Position of the next output token; resumed tokens came first.
        self.completion = len(resumed_ids)
        # Tokens whose KV the request needs (prompt, resumed tokens, outputs) and how many are computed.
        self.token_ids = list(prompt_ids)
        self.token_ids.extend(resumed_ids)
        self.num_tokens = len(self.token_ids)
        self.num_computed = 0
        # KV blocks held (in chain order), the hashes of the full blocks of token_ids, how many of the held
        # blocks are in the prefix cache, and the salt that keeps tenants' hashes apart.
        self.blocks: list = []
        self.cache_salt = cache_salt
        self.block_hashes: list[int] = []
        self.num_cached_blocks = 0
        self.hash_full_blocks()
        # Prompt tokens served from the prefix cache at first admission (None before it), and preemptions.
        self.cached_tokens: int | None = None
        self.num_preemptions = 0
        # Tokens generated here (not resumed): a step with outputs > 0 and one token to compute is a decode.
        self.outputs = 0
        self.stops = stops
        # Stop strings may span tokens: the last (longest stop - 1) characters are held back until no stop can
        # start in them (vLLM does the same), and searched again together with the next token's text.
        self._hold = max((len(s) for s in stops), default=1) - 1
        tail = detokenize(resumed_ids[-self._hold :]) if self._hold and resumed_ids else ""
        self._tail = tail[-self._hold :] if self._hold else ""
        # Characters at the end of _tail not yet delivered. An attempt that streamed resumed_ids had delivered
        # all their text but the held-back tail (min(text length, hold) characters: the hold never drains while
        # no stop matches), so the resumed attempt owes the client exactly that tail.
        self._unsent = len(self._tail)
        self.pending_ids: list[int] = []
        self.pending_text: list[str] = []
        self.finish_reason: int | None = None
        self.waiter: asyncio.Future | None = None
        # Planted behaviour (sim_behaviour.py): output these token ids instead of the drawn ones, and end the
        # answer (finish reason stop) after end_at tokens.
        self.script = script
        if script is not None:
            end_at = len(script) if end_at is None else min(end_at, len(script))
        self.end_at = end_at
        if self.completion >= max_tokens:
            self.finish_reason = LENGTH  # an attempt resumed after its last token: nothing left to do
        elif end_at is not None and self.completion >= end_at:
            self.finish_reason = STOP

    def hash_full_blocks(self) -> None:
        """Extend block_hashes over the full blocks of token_ids (vLLM hashes as blocks fill)."""
        hashes, ids = self.block_hashes, self.token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), len(ids) // BLOCK_SIZE):
            parent = hash_block(parent, ids[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE], self.cache_salt)
            hashes.append(parent)

    def append_token(self) -> None:
        """Generate the next output token (called by the step that computed it) and check for the end."""
        script = self.script
        tid = script[self.completion] if script is not None else token_at(self.digest, self.completion)
        self.completion += 1
        self.outputs += 1
        self.token_ids.append(tid)
        self.num_tokens += 1
        if self.num_tokens % BLOCK_SIZE == 0:
            self.hash_full_blocks()
        self.pending_ids.append(tid)
        piece = TOKEN_TEXT[tid]
        if self.stops:
            if self._push_text(piece):
                self.finish_reason = STOP
                self.wake()
                return
        else:
            self.pending_text.append(piece)
        end_at = self.end_at
        if self.completion >= self.max_tokens or (end_at is not None and self.completion >= end_at):
            if self._unsent:
                self.pending_text.append(self._tail[-self._unsent :])
                self._unsent = 0
            self.finish_reason = LENGTH if self.completion >= self.max_tokens else STOP
        self.wake()

    def _push_text(self, piece: str) -> bool:
        """Add a token's text under stop-string matching; True when a stop string was produced (the text
        before it is delivered, the stop string and anything after it are not)."""
        buf = self._tail + piece
        start = len(buf) - self._unsent - len(piece)  # first character not yet delivered
        hit = min((i for i in (buf.find(s) for s in self.stops) if i >= 0), default=-1)
        if hit >= 0:
            if hit > start:
                self.pending_text.append(buf[start:hit])
            return True
        unsent = self._unsent + len(piece)
        release = unsent - self._hold
        if release > 0:
            self.pending_text.append(buf[start : start + release])
            unsent = self._hold
        self._unsent = unsent
        self._tail = buf[-self._hold :] if self._hold else ""
        return False

    def finish(self, reason: int) -> None:
        """End the request (abort, shutdown) and wake its reader."""
        self.finish_reason = reason
        self.wake()

    def wake(self) -> None:
        """Wake the reader waiting for output, if any."""
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def take_output(self) -> StepOutput:
        """Everything pending as one StepOutput (the last one when the request has finished)."""
        ids, self.pending_ids = self.pending_ids, []
        text = "".join(self.pending_text) if self.pending_text else ""
        self.pending_text = []
        return StepOutput(
            ids, text, self.finish_reason, self.prompt_tokens, self.cached_tokens or 0, self.completion
        )

    def tokens_left(self) -> int:
        """Tokens still to compute (prompt not yet prefilled, recompute after preemption) plus outputs to go."""
        return self.num_tokens - self.num_computed + self.max_tokens - self.completion
