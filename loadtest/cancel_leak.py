"""`python -m loadtest.cancel_leak`: a minimal reproduction of grpc.aio's native leak on cancelled streams
(grpc/grpc#43360: a batch's grpc_op array, and a received message's buffer, are never freed when the batch fails
or the task awaiting it is cancelled), and which relay patterns avoid it.

Three processes on loopback, bare grpc.aio, bytes only: a backend streaming N small messages, a relay (a hop like
router or gateway: server of the client, client of the backend) and this client, which cancels every stream
(before the first message, mid-stream, or by a deadline). Each server reports its native heap in use (glibc
mallinfo2: what tracemalloc and gc cannot see) and RSS; the JSON gives bytes per cancelled stream per process.

Relay patterns (--relay):
  naive     read the backend call in the handler's own task (`await call.read()` loop); the call is cancelled in
            `finally`. When the client cancels, grpc.aio cancels the handler's task while a RECV_MESSAGE batch on
            the backend call is in flight: that batch leaks.
  pump      shared.relay.ChunkRelay: a task per stream reads the backend call into a buffer the handler awaits;
            when the handler is cancelled (it waits on a plain future, not on a batch), the backend call is
            cancelled and the reader's pending read completes: no receive batch is abandoned.
  pump-cancelled  the same, but the reader's task is cancelled (rather than left to end with the call): its
            pending read leaks as in naive.
Backend patterns (--backend):
  raise     CancelledError propagates out of the handler (grpc.aio sends no status on a cancelled call).
  swallow   the handler catches CancelledError and returns: grpc.aio then sends a final status on the
            cancelled call; that batch fails, and leaks.
  --initial-metadata: the backend sends its initial metadata at once (the caller's call is then fully set up
            before the first message; without it, cancelling the call before the first message cancels grpc.aio's
            own set-up task while its RECV_INITIAL_METADATA batch is in flight).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import logging
import os
import random
import subprocess
import sys
import time

import grpc

from shared.relay import ChunkRelay

SERVICE = "leak.Stream"
STREAM = f"/{SERVICE}/Stream"
STATS = f"/{SERVICE}/Stats"
MESSAGE = b"x" * 96


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
    ]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def stats() -> dict:
    """This process's native heap in use (malloc'd, not freed: arenas + mmapped chunks), RSS and gc objects."""
    m = _libc.mallinfo2()
    with open(f"/proc/{os.getpid()}/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {
        "heap_in_use": m.uordblks + m.hblkhd,
        "rss": rss_pages * os.sysconf("SC_PAGE_SIZE"),
        "gc_objects": len(gc.get_objects()),
        "cpu_s": time.process_time(),
    }


_LOG_COUNTS: dict[str, int] = {}


class _CountGrpcLogs(logging.Handler):
    """Counts grpc.aio's debug records (a receive batch that failed, a cancelled RPC): what leaked, and where."""

    def emit(self, record: logging.LogRecord) -> None:
        key = record.msg if isinstance(record.msg, str) else str(record.msg)
        key = key.split(" [")[0][:60]
        _LOG_COUNTS[key] = _LOG_COUNTS.get(key, 0) + 1


async def _stats(request: bytes, context) -> bytes:
    gc.collect()
    return json.dumps({**stats(), "grpc_debug_logs": _LOG_COUNTS}).encode()


# -- backend ---------------------------------------------------------------------------------------------------


def backend_handler(pattern: str, initial_metadata: bool, interval_s: float):
    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        n = int(request or b"64")
        if initial_metadata:
            await context.send_initial_metadata(())
        try:
            for _ in range(n):
                await asyncio.sleep(interval_s)
                yield MESSAGE
        except asyncio.CancelledError:
            if pattern == "swallow":
                return
            raise

    return stream


# -- relay -----------------------------------------------------------------------------------------------------


def relay_handler(pattern: str, method):
    async def naive(request: bytes, context: grpc.aio.ServicerContext):
        call = method(request, timeout=context.time_remaining())
        try:
            read = call.read
            while (data := await read()) is not grpc.aio.EOF:
                yield data
        finally:
            call.cancel()

    async def pump(request: bytes, context: grpc.aio.ServicerContext):
        call = method(request, timeout=context.time_remaining())
        relay = ChunkRelay(call.read, coalesce=False, cancel=call.cancel)
        try:
            read = relay.read
            while (data := await read()) is not grpc.aio.EOF:
                yield data
        finally:
            relay.close()

    async def pump_cancelled(request: bytes, context: grpc.aio.ServicerContext):
        call = method(request, timeout=context.time_remaining())
        relay = ChunkRelay(call.read, coalesce=False)
        try:
            read = relay.read
            while (data := await read()) is not grpc.aio.EOF:
                yield data
        finally:
            relay._task.cancel()  # the pump cancelled while it awaits a read: that batch leaks
            call.cancel()

    return {"naive": naive, "pump": pump, "pump-cancelled": pump_cancelled}[pattern]


async def serve(role: str, args) -> None:
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    grpc_log.setLevel(logging.DEBUG)
    grpc_log.addHandler(_CountGrpcLogs())
    grpc_log.propagate = False
    handlers = {"Stats": grpc.unary_unary_rpc_method_handler(_stats)}
    channel = None
    if role == "backend":
        handlers["Stream"] = grpc.unary_stream_rpc_method_handler(
            backend_handler(args.backend, args.initial_metadata, args.interval_ms / 1000.0)
        )
    else:
        channel = grpc.aio.insecure_channel(args.upstream)
        handlers["Stream"] = grpc.unary_stream_rpc_method_handler(
            relay_handler(args.relay, channel.unary_stream(STREAM))
        )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


# -- client ----------------------------------------------------------------------------------------------------


async def one(method, rng: random.Random, mode: str, messages: int) -> str:
    kind = mode if mode != "mix" else rng.choice(("first", "mid", "mid", "deadline"))
    timeout = rng.uniform(0.02, 0.15) if kind == "deadline" else 30.0
    call = method(str(messages).encode(), timeout=timeout)
    try:
        if kind == "first":
            await asyncio.sleep(rng.uniform(0, 0.004))
        elif kind == "complete":
            while await call.read() is not grpc.aio.EOF:
                pass
            return "OK"
        elif kind == "mid":
            for _ in range(rng.randint(1, 8)):
                if await call.read() is grpc.aio.EOF:
                    break
        else:
            while await call.read() is not grpc.aio.EOF:
                pass
    except grpc.aio.AioRpcError as e:
        return e.code().name
    finally:
        call.cancel()
    return "CANCELLED"


async def drive(args) -> dict:
    env = dict(os.environ)
    procs = []

    def start(role: str, *extra: str) -> tuple[subprocess.Popen, int]:
        p = subprocess.Popen(
            [sys.executable, "-m", "loadtest.cancel_leak", "--serve", role, *extra, *common],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        procs.append(p)
        return p, int(p.stdout.readline())

    common = [
        "--relay",
        args.relay,
        "--backend",
        args.backend,
        "--interval-ms",
        str(args.interval_ms),
    ] + (["--initial-metadata"] if args.initial_metadata else [])
    try:
        _, backend_port = start("backend")
        _, relay_port = start("relay", "--upstream", f"127.0.0.1:{backend_port}")
        ports = {"backend": backend_port, "relay": relay_port}
        channels = {r: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for r, p in ports.items()}
        stat_calls = {r: ch.unary_unary(STATS) for r, ch in channels.items()}
        method = channels["relay"].unary_stream(STREAM)
        rng = random.Random(args.seed)

        async def sample() -> dict:
            return {r: json.loads(await c(b"", timeout=10)) for r, c in stat_calls.items()}

        ends: dict[str, int] = {}
        done = 0

        async def run(n: int) -> None:
            nonlocal done
            sem = asyncio.Semaphore(args.concurrency)

            async def guarded():
                nonlocal done
                async with sem:
                    code = await one(method, rng, args.cancel, args.messages)
                ends[code] = ends.get(code, 0) + 1
                done += 1

            await asyncio.gather(*(guarded() for _ in range(n)))

        started = time.perf_counter()
        await run(args.warmup)
        await asyncio.sleep(0.5)
        samples = [{"streams": done, **(await sample())}]
        for _ in range(args.steps):
            await run(args.step)
            await asyncio.sleep(0.5)  # let the last cancellations settle in the servers
            samples.append({"streams": done, **(await sample())})
        first, last = samples[0], samples[-1]
        n = last["streams"] - first["streams"]
        per_stream = {
            r: {
                "heap_bytes_per_stream": round((last[r]["heap_in_use"] - first[r]["heap_in_use"]) / n, 1),
                "rss_bytes_per_stream": round((last[r]["rss"] - first[r]["rss"]) / n, 1),
                "gc_objects_delta": last[r]["gc_objects"] - first[r]["gc_objects"],
                "cpu_us_per_stream": round((last[r]["cpu_s"] - first[r]["cpu_s"]) / n * 1e6, 1),
            }
            for r in ports
        }
        for ch in channels.values():
            await ch.close()
        return {
            "relay": args.relay,
            "backend": args.backend,
            "initial_metadata": args.initial_metadata,
            "cancel": args.cancel,
            "interval_ms": args.interval_ms,
            "messages": args.messages,
            "streams_measured": n,
            "seconds": round(time.perf_counter() - started, 1),
            "ends": ends,
            "per_stream": per_stream,
            "samples": samples,
        }
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(10)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.cancel_leak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--relay", choices=("naive", "pump", "pump-cancelled"), default="naive")
    p.add_argument("--backend", choices=("raise", "swallow"), default="raise")
    p.add_argument("--initial-metadata", action="store_true")
    p.add_argument("--cancel", choices=("first", "mid", "deadline", "mix", "complete"), default="mix")
    p.add_argument("--messages", type=int, default=64, help="messages per backend stream")
    p.add_argument("--interval-ms", type=float, default=2.0, help="backend pause between messages")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--warmup", type=int, default=2000)
    p.add_argument("--step", type=int, default=5000)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--samples", action="store_true", help="print every sample too")
    p.add_argument("--compact", action="store_true", help="one line of JSON")
    p.add_argument("--serve", choices=("backend", "relay"), help=argparse.SUPPRESS)
    p.add_argument("--upstream", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    import uvloop

    if args.serve:
        uvloop.run(serve(args.serve, args))
        return
    result = uvloop.run(drive(args))
    summary = {k: v for k, v in result.items() if k != "samples"}
    print(json.dumps(summary if not args.samples else result, indent=None if args.compact else 1))


if __name__ == "__main__":
    main()
