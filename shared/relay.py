"""Relaying a token stream with coalescing: a ChunkRelay reads one upstream call in its own task while the hop
writes downstream, and hands the writer everything that arrived meanwhile as one merged message. A writer that
keeps up gets every chunk alone the moment it arrives (nothing is held back to batch); a writer that lags (a
slow client, a busy hop) sends one message for all pending chunks instead of one each, which is what keeps a
hop's per-message cost from growing with the load behind it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

EOF = grpc.aio.EOF
# Engine, router and inference GenerateResponse messages are wire-identical (chunk = 1).
_parse = engine_pb.GenerateResponse.FromString
# Most chunks read ahead of a busy writer: then the relay stops reading, and HTTP/2 flow control holds the rest
# upstream (memory per stream stays bounded, and a slow client still slows what is read for it).
MAX_PENDING = 64


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


class ChunkRelay:
    """Reads an upstream call (read(): bytes, then grpc.aio.EOF; or raises) in a task of its own; read() gives
    the next message: the one pending chunk as is, several merged (see merge), EOF at the end, or the call's
    error once every chunk read before it was handed on (a resumed stream continues after exactly the tokens
    relayed). watch.chunks, when given, counts each chunk as it arrives (a stall watchdog's progress)."""

    __slots__ = ("_pending", "_waiter", "_space", "_end", "_task", "_watch", "merged")

    def __init__(self, read: Callable[[], Awaitable[bytes | object]], watch=None) -> None:
        self._pending: list[bytes] = []
        self._waiter: asyncio.Future | None = None
        self._space: asyncio.Future | None = None  # the pump waits on it while MAX_PENDING chunks wait
        self._end: object = None  # EOF, or the exception the call ended with
        self._watch = watch
        self.merged = 0  # messages saved by merging (chunks in merged messages minus those messages)
        self._task = asyncio.get_running_loop().create_task(self._pump(read))

    async def _pump(self, read) -> None:
        pending = self._pending
        watch = self._watch
        try:
            while (data := await read()) is not EOF:
                if watch is not None:
                    watch.chunks += 1
                pending.append(data)
                waiter = self._waiter
                if waiter is not None:
                    self._waiter = None
                    if not waiter.done():
                        waiter.set_result(None)
                elif len(pending) >= MAX_PENDING:
                    space = self._space = asyncio.get_running_loop().create_future()
                    await space
            self._end = EOF
        except BaseException as e:  # noqa: BLE001 - handed to the reader, after the chunks before it
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
                if isinstance(end, asyncio.CancelledError):
                    # The upstream call was cancelled by someone else (a drain, a stall watchdog): the reader
                    # sees what a direct read would have raised.
                    raise asyncio.CancelledError()
                raise end  # type: ignore[misc]
        space = self._space
        if space is not None:
            self._space = None
            if not space.done():
                space.set_result(None)
        if len(pending) == 1:
            return pending.pop()
        self.merged += len(pending) - 1
        data = merge(pending)
        pending.clear()
        return data

    def close(self) -> None:
        """Stop reading (the caller cancels the call itself)."""
        self._task.cancel()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
