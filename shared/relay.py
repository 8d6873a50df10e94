"""Relaying a token stream with coalescing: a ChunkRelay reads one upstream call in its own task while the hop
writes downstream, and hands the writer everything that arrived meanwhile as one merged message. A writer that
keeps up gets every chunk alone the moment it arrives (nothing is held back to batch); a writer that lags (a
slow client, a busy hop) sends one message for all pending chunks instead of one each, which is what keeps a
hop's per-message cost from growing with the load behind it. On a hop busy enough that its own writes are slow,
a lone chunk waits briefly for the next one due (ChunkRelay._hold), since there chunks never pile up by
themselves.

The relay also keeps grpc.aio from leaking natively on cancelled streams: grpc.aio frees a batch's C-side
resources (its grpc_op array, a received message's buffer) only when the task awaiting the batch consumes its
result (grpc/grpc#43360). A hop's handler task is cancelled by grpc.aio whenever the hop's own caller goes away;
had it been awaiting `call.read()` itself, that receive batch would leak (about 1 KB per cancelled stream per hop,
loadtest/cancel_leak.py). So the hop reads its upstream call only through a relay, from the first chunk on, and
the relay's task is never cancelled: close() cancels the call, and the pending read then completes by itself."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable

import grpc
import structlog
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

from shared.finish_bytes import is_finished

log = structlog.get_logger(__name__)

EOF = grpc.aio.EOF
# Engine, router and inference GenerateResponse messages are wire-identical (chunk = 1).
_parse = engine_pb.GenerateResponse.FromString
# Most chunks read ahead of a busy writer: then the relay stops reading, and HTTP/2 flow control holds the rest
# upstream (memory per stream stays bounded, and a slow client still slows what is read for it).
MAX_PENDING = 64
# A busy hop holds a lone pending chunk for a companion (ChunkRelay._hold): only when the writer's last turn (from
# handing on a message to asking for the next) took HOLD_AFTER_S or more, and then for at most that turn, capped
# at HOLD_MAX_S. The environment variable is for benchmarks (loadtest/hop_bench.py's -hold modes).
HOLD_AFTER_S = float(os.environ.get("FLEETSERVE_RELAY_HOLD_AFTER_S", "0.001"))
HOLD_MAX_S = 0.02

# Pumps still running (the event loop keeps only weak references to tasks); each ends once its call has.
_pumps: set[asyncio.Task] = set()

# The pump's end once read() has raised it: a later read() is a caller's bug, and raises so.
_HANDED_ON = object()


def merge(chunks: list[bytes]) -> bytes:
    """One GenerateResponse equal to the chunks in order: text concatenated, token ids appended, served_by from
    the chunks that carry it (the first), finish_reason and usage from the last that carries them."""
    if len(chunks) == 1:
        return chunks[0]
    # Protobuf merges concatenated messages: repeated fields append, set scalars and sub-messages are taken
    # from the later message (finish_reason, usage, served_by each set on one chunk only). Strings are replaced
    # rather than appended, so the text is put back together separately.
    msg = _parse(b"".join(chunks))
    texts = [t for t in (_parse(c).chunk.text for c in chunks) if t]
    if len(texts) > 1:
        msg.chunk.text = "".join(texts)
    return msg.SerializeToString()


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class ChunkRelay:
    """Reads an upstream call (read(): bytes, then grpc.aio.EOF; or raises) in a task of its own; read() gives
    the next message: the one pending chunk as is, several merged (see merge; with coalesce=False the oldest
    alone), EOF at the end, or the call's error once every chunk read before it was handed on (a resumed stream
    continues after exactly the tokens relayed). watch.chunks, when given, counts each chunk as it arrives (a
    stall watchdog's progress). cancel, when given, cancels the call (close() calls it)."""

    __slots__ = (
        "_pending",
        "_waiter",
        "_space",
        "_end",
        "_task",
        "_watch",
        "_coalesce",
        "_cancel",
        "_closed",
        "merged",
        "ended_at",
        "received",
        "_handed_at",
        "_arrived_at",
        "_gap",
    )

    def __init__(
        self,
        read: Callable[[], Awaitable[bytes | object]],
        watch=None,
        *,
        coalesce: bool = True,
        cancel: Callable[[], object] | None = None,
    ) -> None:
        self._pending: list[bytes] = []
        self._waiter: asyncio.Future | None = None
        self._space: asyncio.Future | None = None  # the pump waits on it while MAX_PENDING chunks wait
        self._end: object = None  # EOF, or the exception the call ended with
        self._watch = watch
        self._coalesce = coalesce
        self._cancel = cancel
        self._closed = False
        self.merged = 0  # messages saved by merging (chunks in merged messages minus those messages)
        self.received = 0  # chunks read from the call so far (a drain looks at it to tell a stuck stream)
        self._handed_at = 0.0  # time.monotonic() when read() last handed on a message (0.0: none yet)
        self._arrived_at = 0.0  # when the latest chunk came from the call
        self._gap = float("inf")  # between the latest two chunks' arrivals (inf: fewer than two yet)
        self.ended_at = (
            0.0  # time.monotonic() when the upstream call ended normally (its last chunk had come)
        )
        task = self._task = asyncio.get_running_loop().create_task(self._pump(read))
        _pumps.add(task)
        task.add_done_callback(_pumps.discard)

    async def _pump(self, read) -> None:
        pending = self._pending
        watch = self._watch
        first = True
        data = b""
        try:
            while (data := await read()) is not EOF:
                self.received += 1
                now = time.monotonic()
                self._gap = now - self._arrived_at
                self._arrived_at = now
                if watch is not None:
                    watch.chunks += 1
                pending.append(data)
                waiter = self._waiter
                if waiter is not None:
                    self._waiter = None
                    if not waiter.done():
                        waiter.set_result(None)
                        if first:
                            # The first chunk's reader runs before this task asks gRPC for the next message:
                            # setting up that read (a batch in gRPC's core) is not on the first token's path.
                            await asyncio.sleep(0)
                elif len(pending) >= MAX_PENDING:
                    if self._closed:
                        pending.clear()  # closed: nobody reads these; the call ends soon
                        continue
                    space = self._space = asyncio.get_running_loop().create_future()
                    await space
                first = False
            self._end = EOF
            self.ended_at = time.monotonic()
        except grpc.aio.AioRpcError as e:
            if is_finished(data):
                # The call broke after its finish chunk, before its status (a connection lost just then): the
                # generation is whole, so it ends as one that ended normally. Handed on as the error, a hop would
                # take its upstream for down and resume a finished generation elsewhere.
                log.info("relay.call_broke_after_finish", code=e.code().name)
                self._end = EOF
                self.ended_at = time.monotonic()
            else:
                e.with_traceback(None)  # no reference cycle: see below
                self._end = e
        except BaseException as e:  # noqa: BLE001 - handed to the reader, after the chunks before it
            # Kept with its traceback, the error would hold this frame, which holds self, which holds the error:
            # a reference cycle per cancelled or failed stream that waits for a full collection (16-20 objects
            # per relay). gRPC's errors and cancellations carry what they mean in their status, not their frames.
            if isinstance(e, asyncio.CancelledError):
                e.with_traceback(None)
            self._end = e
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def read(self) -> bytes | object:
        """The next message (everything pending, merged), EOF, or the upstream call's error."""
        pending = self._pending
        if not pending:
            if self._end is None:
                waiter = self._waiter = asyncio.get_running_loop().create_future()
                await waiter
            if not pending:
                end = self._end
                if end is EOF:
                    return EOF
                if end is _HANDED_ON:
                    raise RuntimeError("ChunkRelay.read() after it raised the call's error")
                # Not kept once raised: the traceback gets this frame (self, end) and the caller's (which hold
                # this relay): a reference cycle otherwise (see _pump).
                self._end = _HANDED_ON
                if isinstance(end, asyncio.CancelledError):
                    # The upstream call was cancelled by someone else (a drain, a stall watchdog): the reader
                    # sees what a direct read would have raised.
                    raise asyncio.CancelledError()
                try:
                    raise end  # type: ignore[misc]
                finally:
                    del end
        elif len(pending) == 1 and self._handed_at and self._coalesce:
            await self._hold()  # the chunk was waiting for the writer, not the writer for it
        space = self._space
        if space is not None:
            self._space = None
            if not space.done():
                space.set_result(None)
        self._handed_at = time.monotonic()
        if len(pending) == 1:
            return pending.pop()
        if not self._coalesce:
            return pending.pop(0)
        self.merged += len(pending) - 1
        data = merge(pending)
        pending.clear()
        return data

    async def _hold(self) -> None:
        """On a busy hop, wait a little for a second chunk to go out with the one pending. Why: on a saturated
        hop every read and every write takes its own turn of the event loop, so chunks do not pile up by
        themselves and every token costs a write downstream (and a read there). A writer whose last turn took
        HOLD_AFTER_S or more waits for a companion at most that long again (capped at HOLD_MAX_S), and only when
        the upstream's last gap between chunks says one is due within that wait; a finish is never held. A hop
        that keeps up, or an upstream slower than the wait (an engine's time per token), holds nothing."""
        now = time.monotonic()
        wait = min(now - self._handed_at, HOLD_MAX_S)
        if wait < HOLD_AFTER_S or self._arrived_at + self._gap > now + wait or self._end is not None:
            return
        if is_finished(self._pending[0]):
            return
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        timer = loop.call_later(wait, _wake, waiter)
        try:
            await waiter  # the pump sets it at the next chunk or the call's end; close() cancels it
        finally:
            timer.cancel()
            if self._waiter is waiter:
                self._waiter = None

    @property
    def unread(self) -> int:
        """Chunks read from the call that the reader has not taken yet (a writer that stopped reading leaves
        them here)."""
        return len(self._pending)

    def close(self) -> None:
        """Stop: cancel the call (when a cancel was given; else the caller does), never the pump's task, whose
        pending read then completes (EOF or CancelledError) and ends it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._cancel is not None:
            self._cancel()
        space = self._space
        if space is not None:
            self._space = None
            if not space.done():
                space.set_result(None)  # a pump paused for space reads on, into the call's end
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
