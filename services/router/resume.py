"""Mid-stream failover: which generations may be resumed on another replica, and the relay that keeps track of
the tokens already sent so a resumed attempt continues exactly where the client's stream stopped."""

from __future__ import annotations

from typing import Literal

from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

from shared.finish_bytes import ABORT, ABORT_BYTES

ResumeMode = Literal["reproducible", "always", "off"]

# ABORT_BYTES: see shared/finish_bytes.py (a chunk without them has no ABORT and goes on unparsed).
_parse = engine_pb.GenerateResponse.FromString


def resumable(sampling: common_pb2.SamplingParams, mode: ResumeMode) -> bool:
    """Whether a generation with these sampling parameters may be resumed after tokens were streamed.

    "reproducible": only greedy (temperature 0) or seeded generations, whose continuation is the text the first
    replica would have produced (exact on the sim; on vLLM exact for greedy, and for a seed a valid sample but
    not the same draw, since the seed's generator restarts at the resumed position). "always": also unseeded
    sampling, where the continuation is a fresh sample conditioned on the tokens already sent (no token is
    lost or repeated either way). "off": a replica dying mid-stream ends the stream with its error."""
    if mode == "off":
        return False
    if mode == "always":
        return True
    return sampling.temperature == 0.0 or sampling.HasField("seed")


class ReplicaAborted(Exception):
    """A replica ended a stream with FINISH_REASON_ABORT that nobody on this side asked for (it shut down)."""


class ChunkTracker:
    """Looks at each relayed chunk just enough to see an ABORT finish (a byte search, a parse only when the bytes
    could be one; and, on a resumed attempt's first chunk, a parse for its served_by), and keeps the chunk's
    bytes: the token ids already sent are read from them only when they are needed (a resume, its log line), so
    the per-token work is a byte search and a list append.

    On a resumed attempt the first chunk's served_by is cleared (the client saw the first replica's), and an
    ABORT finish the router did not cause is withheld (its tokens still go out) and raised as ReplicaAborted so
    the generation resumes elsewhere."""

    __slots__ = ("_ids", "_kept", "_resumed", "_first")

    def __init__(self) -> None:
        self._ids: list[int] = []
        # Relayed chunks whose token ids are not in _ids yet, their bytes back to back: iterating a parsed chunk's
        # token_ids into a list on every chunk was the larger half of this class's cost per chunk (py-spy,
        # hop_bench at 256 streams). One buffer, not a list of the chunks, so a long stream holds ~its bytes,
        # not an object per chunk; protobuf parses messages back to back as one merged message, whose repeated
        # token_ids are every chunk's in order.
        self._kept = bytearray()
        self._resumed = False
        self._first = True

    @property
    def sent_ids(self) -> list[int]:
        """The token ids relayed so far, in order (the list itself: a caller may extend it)."""
        kept = self._kept
        if kept:
            self._ids.extend(_parse(bytes(kept)).chunk.token_ids)
            kept.clear()
        return self._ids

    def next_attempt(self) -> None:
        """A new attempt starts; it is a resume when tokens were sent already."""
        self._resumed = bool(self.sent_ids)
        self._first = True

    def relay(self, data: bytes) -> bytes:
        """The bytes to send on for one engine chunk (data itself unless served_by had to be cleared). Raises
        ReplicaAborted, carrying the chunk's bytes without its ABORT when it has tokens or text to send."""
        resumed_first = self._first and self._resumed
        self._first = False
        if not resumed_first and ABORT_BYTES not in data:
            # Parsing every chunk here was 1.65 us per chunk per hop (loadtest/relay_bench.py --tracker).
            self._kept += data
            return data
        msg = _parse(data)
        chunk = msg.chunk
        dirty = False
        if resumed_first:
            if chunk.HasField("served_by"):
                chunk.ClearField("served_by")
                dirty = True
        self._kept += data
        if chunk.finish_reason == ABORT:
            if not chunk.token_ids and not chunk.text:
                raise ReplicaAborted()
            chunk.ClearField("finish_reason")
            chunk.ClearField("usage")
            chunk.ClearField("output_refusal")  # an engine sets none on an abort; never relay one mid-stream
            raise ReplicaAborted(msg.SerializeToString())
        return msg.SerializeToString() if dirty else data
