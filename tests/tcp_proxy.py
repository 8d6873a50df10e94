"""A TCP proxy for network faults between two hops (Debian ships no toxiproxy): added latency per forwarded
piece, connections sliced into tiny writes, resets (RST) after a random number of bytes, and a close in place of
a call's trailers (an HTTP/2 frame boundary, which no byte count can hit). Hand-written: a few dozen lines of
asyncio do what the tests need, with no server of its own to install and run."""

from __future__ import annotations

import asyncio
import random
import socket
import struct
from dataclasses import dataclass, field


@dataclass
class Faults:
    """What the proxy does to the bytes it forwards (both directions)."""

    latency_s: float = 0.0  # before forwarding each read
    slice_max: int = 0  # > 0: forward in pieces of 1..slice_max bytes
    reset_after: tuple[int, int] | None = None  # reset each connection after a random count of bytes in range
    # > 0, upstream to client: close the connection instead of forwarding a HEADERS frame that ends a stream (a
    # gRPC call's trailers) which had at least this many DATA frames (a streamed answer, not a unary call's one
    # message): the client has every message of the call and then a broken connection, never its status.
    cut_trailers_after: int = 0
    # How long the cut waits after the stream's last DATA frame: gRPC drops messages its peer received and the
    # application has not read yet when the connection closes, and the cut is meant to come after them.
    cut_trailers_delay_s: float = 0.2
    rng: random.Random = field(default_factory=lambda: random.Random(7))


class TcpProxy:
    """Listens on 127.0.0.1:0 and forwards every connection to upstream, applying `faults` (changeable live)."""

    def __init__(self, upstream: str, faults: Faults | None = None) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.faults = faults or Faults()
        self.resets = 0
        self.connections = 0
        self.trailers_cut = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def address(self) -> str:
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"{host}:{port}"

    @property
    def open_connections(self) -> int:
        return len(self._writers) // 2

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def reset_all(self) -> None:
        """Reset every open connection (new ones get the faults in force then)."""
        for w in list(self._writers):
            _reset(w)
        self.resets += len(self._writers) // 2

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        self._tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:
            _reset(writer)
            self._tasks.discard(task)
            return
        budget = None
        if self.faults.reset_after is not None:
            budget = [self.faults.rng.randint(*self.faults.reset_after)]
        self._writers.update((writer, up_writer))
        back = (
            self._cut_trailers(up_reader, writer)
            if self.faults.cut_trailers_after > 0
            else self._pump(up_reader, writer, budget)
        )
        pumps = [asyncio.create_task(self._pump(reader, up_writer, budget)), asyncio.create_task(back)]
        try:
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            # A cut trailer closes both ends with FIN (below), not RST: an RST makes the peer's kernel drop what
            # it received and not yet read, and the call's last messages must arrive.
            if budget is not None and budget[0] <= 0:
                self.resets += 1
                _reset(writer)
                _reset(up_writer)
        finally:
            for p in pumps:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            for w in (writer, up_writer):
                w.close()
                self._writers.discard(w)
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, budget) -> None:
        f = self.faults
        while data := await reader.read(65536):
            if budget is not None:
                if len(data) >= budget[0]:
                    data = data[: max(0, budget[0])]
                    budget[0] = 0
                else:
                    budget[0] -= len(data)
            pieces = [data]
            if f.slice_max > 0:
                pieces, i = [], 0
                while i < len(data):
                    n = f.rng.randint(1, f.slice_max)
                    pieces.append(data[i : i + n])
                    i += n
            if f.latency_s:
                await asyncio.sleep(f.latency_s)
            for piece in pieces:
                writer.write(piece)
                await writer.drain()  # each piece its own write: the peer reads it sliced
            if budget is not None and budget[0] <= 0:
                return

    async def _cut_trailers(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Forward HTTP/2 frames (9-byte header: 3 bytes length, type, flags, stream id) from a server until one is
        a HEADERS frame (type 1) with END_STREAM (flag 1) on a stream that had cut_trailers_after DATA frames (type
        0): then close both ends (after what was forwarded) instead of forwarding it."""
        data_frames: dict[int, int] = {}
        while True:
            try:
                header = await reader.readexactly(9)
                payload = await reader.readexactly(int.from_bytes(header[:3], "big"))
            except asyncio.IncompleteReadError:
                return
            stream_id = int.from_bytes(header[5:9], "big") & 0x7FFFFFFF
            if header[3] == 0:
                data_frames[stream_id] = data_frames.get(stream_id, 0) + 1
            elif header[3] == 1 and header[4] & 1:
                if data_frames.pop(stream_id, 0) >= self.faults.cut_trailers_after:
                    self.trailers_cut += 1
                    await asyncio.sleep(self.faults.cut_trailers_delay_s)
                    return
            writer.write(header + payload)
            await writer.drain()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a middlebox would."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
