"""One request inside the sim engine: its scheduling state, its output tokens, stop strings and stream buffer."""

from __future__ import annotations

import asyncio

from fleetserve.common.v1 import common_pb2

from services.engine.backend import StepOutput
from services.engine.sim_tokens import TOKEN_TEXT, token_at

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
ABORT = common_pb2.FINISH_REASON_ABORT

# Scheduling rank of each Priority (lower is served first); unspecified counts as standard.
PRIORITY_RANK = {
    common_pb2.PRIORITY_INTERACTIVE: 0,
    common_pb2.PRIORITY_UNSPECIFIED: 1,
    common_pb2.PRIORITY_STANDARD: 1,
    common_pb2.PRIORITY_BATCH: 2,
}


class SimRequest:
    """A request's state. The step loop appends tokens to a pending buffer and wakes the reader, which takes
    everything pending at once: a reader that lags gets one bigger output, not a backlog of small ones."""

    __slots__ = (
        "request_id", "rank", "arrival", "digest", "prompt_tokens", "max_tokens", "completion",
        "num_tokens", "num_computed", "num_blocks", "outputs", "stops", "_hold", "_tail", "_unsent",
        "pending_ids", "pending_text", "finish_reason", "waiter",
    )  # fmt: skip

    def __init__(
        self,
        request_id: str,
        *,
        prompt_tokens: int,
        resumed_ids: list[int],
        digest: int,
        max_tokens: int,
        stops: tuple[str, ...] = (),
        rank: int = 1,
        arrival: int = 0,
    ) -> None:
        self.request_id = request_id
        self.rank = rank
        self.arrival = arrival
        self.digest = digest
        self.prompt_tokens = prompt_tokens
        self.max_tokens = max_tokens
        # Position of the next output token; resumed tokens came first.
        self.completion = len(resumed_ids)
        # Tokens whose KV the request needs (prompt, resumed tokens, outputs) and how many are computed.
        self.num_tokens = prompt_tokens + len(resumed_ids)
        self.num_computed = 0
        self.num_blocks = 0
        # Tokens generated here (not resumed): a step with outputs > 0 and one token to compute is a decode.
        self.outputs = 0
        self.stops = stops
        # Stop strings may span tokens: the last (longest stop - 1) characters are held back until no stop can
        # start in them (vLLM does the same), and searched again together with the next token's text.
        self._hold = max((len(s) for s in stops), default=1) - 1
        tail = (
            "".join(TOKEN_TEXT[i] for i in resumed_ids[-self._hold :]) if self._hold and resumed_ids else ""
        )
        self._tail = tail[-self._hold :] if self._hold else ""
        self._unsent = 0  # characters at the end of _tail not yet delivered
        self.pending_ids: list[int] = []
        self.pending_text: list[str] = []
        self.finish_reason: int | None = None
        self.waiter: asyncio.Future | None = None
        if self.completion >= max_tokens:
            self.finish_reason = LENGTH  # an attempt resumed after its last token: nothing left to do

    def append_token(self) -> None:
        """Generate the next output token (called by the step that computed it) and check for the end."""
        tid = token_at(self.digest, self.completion)
        self.completion += 1
        self.outputs += 1
        self.num_tokens += 1
        self.pending_ids.append(tid)
        piece = TOKEN_TEXT[tid]
        if self.stops:
            if self._push_text(piece):
                self.finish_reason = STOP
                self.wake()
                return
        else:
            self.pending_text.append(piece)
        if self.completion >= self.max_tokens:
            if self._unsent:
                self.pending_text.append(self._tail[-self._unsent :])
                self._unsent = 0
            self.finish_reason = LENGTH
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
        return StepOutput(ids, text, self.finish_reason, self.prompt_tokens, 0, self.completion)
