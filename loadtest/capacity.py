"""`python -m loadtest.capacity`: how many concurrent streams one sim engine process carries at speed factor 1,
i.e. where the engine's real step loop falls behind its cost model. Clients run in separate processes so the
client is not what saturates; one JSON object on stdout.

    python -m loadtest.capacity --streams 64,128,256 --client-procs 2 --out docs/benchmarks/engine_cpu_capacity.json

For each level c it runs c closed-loop streams straight at one engine (gRPC, long generations) and compares the
output tokens/s the clients receive in a measurement window with what the cost model gives for the same load on
a virtual clock (services/engine/calibration.py): ratio >= 0.95 means the process keeps up with the modelled
GPU. It also reports the engine process's CPU use (from /proc), its CPU time per streamed token, how long a
GetLoad took at the window's edges, and the engine's own step-loop account (late steps, time dropped).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc

from services.engine.calibration import closed_loop
from services.engine.profile import DEFAULT_PROFILE, load_profile
from shared.channels import open_channel, open_sync_channel

KEEP_UP = 0.95


async def _client(
    address: str, streams: int, proc: int, start_at: float, end_at: float, max_tokens: int, prompt_words: int
) -> dict:
    """streams closed-loop generations until end_at; chunk gaps seen inside [start_at, end_at]."""
    channel = open_channel(address)
    stub = engine_grpc.EngineServiceStub(channel)
    gaps: list[float] = []
    tokens = errors = 0

    async def stream(s: int) -> None:
        nonlocal tokens, errors
        n = 0
        while time.time() < end_at:
            n += 1
            req = pb.GenerateRequest(
                request_id=f"cap-{proc}-{s}-{n}",
                spec=common_pb2.GenerationSpec(
                    prompt=f"stream {proc} {s} {n} " + "load " * prompt_words,
                    sampling=common_pb2.SamplingParams(max_tokens=max_tokens),
                ),
            )
            last = None
            call = stub.Generate(req, timeout=max(1.0, end_at - time.time() + 30))
            try:
                async for r in call:
                    now = time.time()
                    if now > end_at:
                        call.cancel()
                        return
                    if now >= start_at:
                        tokens += len(r.chunk.token_ids)
                        if last is not None:
                            gaps.append(now - last)
                    last = now
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.CANCELLED:
                    errors += 1
                    await asyncio.sleep(0.1)

    try:
        await asyncio.gather(*(stream(s) for s in range(streams)))
    finally:
        await channel.close(grace=None)
    gaps.sort()
    pick = (
        (lambda q: round(gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1000, 3))
        if gaps
        else (lambda q: None)
    )
    return {"tokens": tokens, "errors": errors, "gap_p50_ms": pick(0.5), "gap_p99_ms": pick(0.99)}


def _client_proc(*args) -> dict:
    return asyncio.run(_client(*args))


def _warm(_: int) -> int:
    """Start a worker and import what clients need (spawned workers are slow to start under load)."""
    time.sleep(1.0)
    return os.getpid()


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _engine_tokens(stub: engine_grpc.EngineServiceStub) -> tuple[int, float]:
    """The engine's output-token counter, and how long GetLoad took (the event loop's responsiveness)."""
    t0 = time.perf_counter()
    load = stub.GetLoad(pb.GetLoadRequest(), timeout=60)
    return load.output_tokens, (time.perf_counter() - t0) * 1000.0


def _level(address: str, pid: int, c: int, args, pool: ProcessPoolExecutor, stub) -> dict:
    procs = min(args.client_procs, c)
    share = [c // procs + (1 if i < c % procs else 0) for i in range(procs)]
    t0 = time.time() + 0.5
    start_at, end_at = t0 + args.warmup_s, t0 + args.warmup_s + args.duration_s
    futures = [
        pool.submit(_client_proc, address, n, i, start_at, end_at, args.max_tokens, args.prompt_words)
        for i, n in enumerate(share)
    ]
    time.sleep(max(0.0, start_at - time.time()))
    # CPU at the window's edges first: a GetLoad can lag on a busy engine and must not move the window.
    cpu0, w0 = _cpu_s(pid), time.time()
    tok0, rpc0 = _engine_tokens(stub)
    time.sleep(max(0.0, end_at - time.time()))
    cpu1, w1 = _cpu_s(pid), time.time()
    tok1, rpc1 = _engine_tokens(stub)
    t1 = time.time()
    clients = [f.result() for f in futures]
    time.sleep(2.0)  # the cancelled streams drain before the next level
    engine_tps = (tok1 - tok0) / (t1 - w0 - rpc0 / 1000.0)
    client_tps = sum(x["tokens"] for x in clients) / args.duration_s
    gaps50 = [x["gap_p50_ms"] for x in clients if x["gap_p50_ms"] is not None]
    return {
        "streams": c,
        "client_procs": procs,
        "engine_output_tokens_per_s": round(engine_tps, 1),
        # Tokens the clients received inside the window: the measure (the GetLoad pair can lag when busy).
        "client_tokens_per_s": round(client_tps, 1),
        "engine_cpu_util": round((cpu1 - cpu0) / (w1 - w0), 3),
        # CPU cost of a streamed token in the engine process: less sensitive to a busy machine than the ratio.
        "engine_cpu_us_per_token": round((cpu1 - cpu0) / (w1 - w0) * 1e6 / client_tps, 2)
        if client_tps
        else None,
        "chunk_gap_p50_ms": round(statistics.median(gaps50), 3) if gaps50 else None,
        "chunk_gap_p99_ms": max((x["gap_p99_ms"] or 0) for x in clients),
        "errors": sum(x["errors"] for x in clients),
        "get_load_ms": round(max(rpc0, rpc1), 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="32,64,128,256", help="concurrency levels, comma separated")
    ap.add_argument("--client-procs", type=int, default=2, help="client processes (default 2)")
    ap.add_argument("--duration-s", type=float, default=10.0, help="measurement window per level")
    ap.add_argument("--warmup-s", type=float, default=3.0, help="ramp-up before the window")
    ap.add_argument(
        "--max-tokens", type=int, default=1000, help="output tokens per request (long: few restarts)"
    )
    ap.add_argument("--prompt-words", type=int, default=100, help="prompt length in words")
    ap.add_argument("--profile", default=DEFAULT_PROFILE, help="the engine's GPU profile")
    ap.add_argument("--engine-args", default="", help="extra engine flags, shell-quoted")
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.streams.split(",")]
    extra = shlex.split(args.engine_args)
    max_num_seqs = int(extra[extra.index("--max-num-seqs") + 1]) if "--max-num-seqs" in extra else 256
    budget = (
        int(extra[extra.index("--max-num-batched-tokens") + 1])
        if "--max-num-batched-tokens" in extra
        else 2048
    )
    cost = load_profile(args.profile).cost
    with tempfile.TemporaryDirectory(prefix="fleetserve-capacity-") as tmp:
        ready = Path(tmp) / "engine.json"
        log = open(Path(tmp) / "engine.log", "w")  # noqa: SIM115 - closed below, after the process
        cmd = [
            sys.executable,
            "-m",
            "services.engine",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--ready-file",
            str(ready),
            "--speed-factor",
            "1",
            "--profile",
            args.profile,
            "--replica-id",
            "capacity",
            "--startup-s",
            "0",  # measuring streams, not the modelled cold start
            *extra,
        ]
        engine = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        rows = []
        channel = None
        try:
            for _ in range(600):
                if ready.exists() or engine.poll() is not None:
                    break
                time.sleep(0.1)
            if not ready.exists():
                raise SystemExit(f"engine did not start: {(Path(tmp) / 'engine.log').read_text()[-2000:]}")
            address = json.loads(ready.read_text())["address"]
            channel = open_sync_channel(address)  # sync, outside any event loop, reused
            stub = engine_grpc.EngineServiceStub(channel)
            with ProcessPoolExecutor(args.client_procs, mp_context=get_context("spawn")) as pool:
                pids = set(pool.map(_warm, range(args.client_procs)))
                if len(pids) < args.client_procs:
                    raise SystemExit(f"only {len(pids)} of {args.client_procs} client processes started")
                for c in levels:
                    row = _level(address, engine.pid, c, args, pool, stub)
                    # What the cost model gives for the same closed loop on a virtual clock.
                    model = closed_loop(
                        cost,
                        c,
                        requests=2 * c,
                        prompt_tokens=row_prompt_tokens(args.prompt_words),
                        output_tokens=args.max_tokens,
                        max_num_seqs=max_num_seqs,
                        max_num_batched_tokens=budget,
                    )
                    row["modelled_tokens_per_s"] = model.output_tokens_per_s
                    row["ratio"] = round(row["client_tokens_per_s"] / model.output_tokens_per_s, 3)
                    row["keeps_up"] = row["ratio"] >= KEEP_UP
                    rows.append(row)
                    print(json.dumps(row), file=sys.stderr)
        finally:
            if channel is not None:
                channel.close()
            engine.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                engine.wait(10)
            if engine.poll() is None:
                engine.kill()
                engine.wait()
            log.close()
            stats = _step_loop_stats((Path(tmp) / "engine.log").read_text())
    carried = [r["streams"] for r in rows if r["keeps_up"]]
    result = {
        "command": "python -m loadtest.capacity " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "profile": args.profile,
        "engine_args": args.engine_args,
        "cpu_count": os.cpu_count(),
        "loadavg_at_end": os.getloadavg(),
        "max_tokens": args.max_tokens,
        "duration_s": args.duration_s,
        "keep_up_ratio": KEEP_UP,
        "max_streams_kept_up": max(carried) if carried else 0,
        # The engine's own account of the whole run: steps started late, and time dropped when > 20 ms behind.
        "engine_step_loop_stats": stats,
        "levels": rows,
    }
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


def _step_loop_stats(log_text: str) -> dict | None:
    """The engine's engine.step_loop_stats log line (written at shutdown), as a dict."""
    for line in reversed(log_text.splitlines()):
        if "engine.step_loop_stats" in line:
            with contextlib.suppress(ValueError):
                return {k: v for k, v in json.loads(line).items() if k not in ("timestamp", "level", "event")}
    return None


def row_prompt_tokens(words: int) -> int:
    """Prompt tokens of the clients' prompts ("stream p s n " + "load " x words, BOS included), roughly."""
    from shared import tokenizer

    return len(tokenizer.load().encode("stream 0 0 1 " + "load " * words))


if __name__ == "__main__":
    raise SystemExit(main())
