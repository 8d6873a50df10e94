"""`python -m loadtest.relay_bench`: CPU per relayed message of a hop's Python structure alone (no gRPC), the
bare hop's shape against ours: an upstream read that completes from a loop callback as grpc.aio's does, the
layers of async generators a message passes, ChunkRelay's pump hand-off, and a consumer that awaits a write per
message as grpc.aio's server loop does. Many streams interleave on one uvloop, as at 256 streams."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import grpc

from shared.relay import ChunkRelay

EOF = grpc.aio.EOF


class FakeCall:
    """An upstream call: read() completes from a loop callback (grpc.aio: a completion handed to the loop)."""

    __slots__ = ("_left", "_data", "_loop")

    def __init__(self, n: int, data: bytes) -> None:
        self._left = n
        self._data = data
        self._loop = asyncio.get_running_loop()

    async def _receive(self):
        fut = self._loop.create_future()
        if self._left:
            self._left -= 1
            self._loop.call_soon(fut.set_result, self._data)
        else:
            self._loop.call_soon(fut.set_result, EOF)
        return await fut

    async def read(self):
        # grpc.aio's read() -> _read() -> the Cython receive: three frames.
        return await self._read()

    async def _read(self):
        return await self._receive()

    def cancel(self) -> None:
        self._left = 0

    async def __aiter__(self):
        # grpc.aio's UnaryStreamCall.__aiter__: an async generator over _read().
        while (data := await self._read()) is not EOF:
            yield data


async def _reyield(gen):
    async for item in gen:
        yield item


async def bare(call: FakeCall):
    async for data in call:
        yield data


async def pumped(call: FakeCall):
    relay = ChunkRelay(call.read, cancel=call.cancel)
    try:
        read = relay.read
        while (data := await read()) is not EOF:
            yield data
    finally:
        relay.close()


def stack(name: str, layers: int):
    inner = {"bare": bare, "pumped": pumped}[name]

    def make(call: FakeCall):
        gen = inner(call)
        for _ in range(layers):
            gen = _reyield(gen)
        return gen

    return make


async def consume(make, n: int) -> int:
    """grpc.aio's server loop for a unary-stream handler: per message one awaited write."""
    loop = asyncio.get_running_loop()
    count = 0
    async for _ in make(FakeCall(n, b"x" * 24)):
        fut = loop.create_future()
        loop.call_soon(fut.set_result, None)
        await fut
        count += 1
    return count


async def measure(make, streams: int, messages: int, requests: int) -> float:
    t0 = time.process_time()
    total = 0
    for _ in range(requests):
        total += sum(await asyncio.gather(*(consume(make, messages) for _ in range(streams))))
    return (time.process_time() - t0) / total * 1e6


def tracker_us(relay_fn, msgs: list[bytes], requests: int) -> float:
    """Thread CPU per chunk of relay_fn(tracker, data) over `requests` streams of msgs."""
    from services.router.resume import ChunkTracker

    t0 = time.thread_time()
    for _ in range(requests):
        t = ChunkTracker()
        t.next_attempt()
        for m in msgs:
            relay_fn(t, m)
    return (time.thread_time() - t0) / (requests * len(msgs)) * 1e6


def parse_every_chunk(tracker, data: bytes) -> bytes:
    """ChunkTracker.relay before the byte search (c5f4fd1): every chunk parsed for its finish reason."""
    from services.router.resume import _parse

    chunk = _parse(data).chunk
    tracker._kept += data
    if chunk.finish_reason == 3:
        raise RuntimeError("no ABORT in these chunks")
    return data


def run_tracker(args) -> None:
    from loadtest.hop_bench import chunks
    from services.router.resume import ChunkTracker

    msgs = chunks(args.messages)
    variants = {"parse_every_chunk": parse_every_chunk, "byte_search": ChunkTracker.relay}
    results: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            results[name].append(tracker_us(fn, msgs, 2000))
    out = {
        v: {"median_us": round(statistics.median(r), 3), "runs_us": [round(x, 3) for x in r]}
        for v, r in results.items()
    }
    print(json.dumps(out, indent=1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.relay_bench", description=__doc__)
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--messages", type=int, default=64)
    p.add_argument("--requests", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--variants",
        default="bare+0,bare+1,bare+5,pumped+0,pumped+1,pumped+5",
        help="NAME+LAYERS: bare (read in the handler) or pumped (ChunkRelay), under LAYERS re-yielding generators",
    )
    p.add_argument(
        "--tracker",
        action="store_true",
        help="instead: the resume tracker's per-chunk work (ChunkTracker.relay) over hop_bench's chunks, "
        "against parsing every chunk (what it did before)",
    )
    args = p.parse_args(argv)
    if args.tracker:
        run_tracker(args)
        return
    import uvloop

    variants = args.variants.split(",")
    results: dict[str, list[float]] = {v: [] for v in variants}

    async def run() -> None:
        for _ in range(args.repeats):  # interleaved
            for v in variants:
                name, layers = v.split("+")
                results[v].append(
                    await measure(stack(name, int(layers)), args.streams, args.messages, args.requests)
                )

    uvloop.run(run())
    out = {
        v: {"median_us": round(statistics.median(r), 3), "runs_us": [round(x, 3) for x in r]}
        for v, r in results.items()
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
