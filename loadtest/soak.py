"""`python -m loadtest.soak`: hundreds of thousands of streams through the gateway (gRPC and OpenAI HTTP), most
of them cancelled at a random point (before the first token, mid-stream, by a short deadline), while the RSS,
open fds, threads and asyncio tasks of every service are sampled; JSON (and a PNG plot) of the series, and the RSS
growth between two stream counts (the leak check: flat means bounded)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import grpc
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from shared.channels import open_channel
from shared.cluster import Cluster, ClusterConfig
from shared.process_stats import INTERVAL_ENV

MODES = ("early", "mid", "deadline", "complete")


@dataclass
class Tally:
    """What the client saw: streams by mode and by how they ended."""

    done: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    by_end: dict[str, int] = field(default_factory=dict)

    def add(self, mode: str, end: str) -> None:
        self.done += 1
        self.by_mode[mode] = self.by_mode.get(mode, 0) + 1
        self.by_end[end] = self.by_end.get(end, 0) + 1


async def grpc_stream(stub, key: str, mode: str, rng: random.Random) -> str:
    """One gRPC stream ended the way `mode` says; how it ended (OK, CANCELLED by us, or a status code)."""
    complete = mode == "complete"
    req = pb.GenerateRequest(
        model="sim-1b",
        prompt=f"soak {rng.randrange(1000)}",
        max_tokens=8 if complete else 200,
        ignore_eos=True,
    )
    timeout = rng.uniform(0.02, 0.3) if mode == "deadline" else 30.0
    call = stub.Generate(req, metadata=(("authorization", f"Bearer {key}"),), timeout=timeout)
    try:
        if mode == "early":
            await asyncio.sleep(rng.uniform(0, 0.005))
            call.cancel()
            return "CANCELLED"
        stop_after = rng.randint(1, 8) if mode == "mid" else 1 << 30
        n = 0
        async for _ in call:
            n += 1
            if n >= stop_after:
                call.cancel()
                return "CANCELLED"
        return "OK"
    except grpc.aio.AioRpcError as e:
        return e.code().name
    except asyncio.CancelledError:
        call.cancel()
        raise


async def http_stream(
    session: aiohttp.ClientSession, url: str, key: str, mode: str, rng: random.Random
) -> str:
    """One OpenAI HTTP stream (SSE), abandoned like grpc_stream's (the connection is closed under it)."""
    complete = mode == "complete"
    body = {
        "model": "sim-1b",
        "prompt": "soak",
        "max_tokens": 8 if complete else 200,
        "stream": True,
        "ignore_eos": True,
    }
    timeout = aiohttp.ClientTimeout(total=rng.uniform(0.02, 0.3) if mode == "deadline" else 30.0)
    try:
        async with session.post(
            url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=timeout
        ) as r:
            if r.status != 200:
                return f"HTTP_{r.status}"
            if mode == "early":
                return "CANCELLED"  # leaving the block closes the connection before any event is read
            stop_after = rng.randint(1, 8) if mode == "mid" else 1 << 30
            n = 0
            async for line in r.content:
                if line.startswith(b"data: [DONE]"):
                    return "OK"
                if line.startswith(b"data:"):
                    n += 1
                    if n >= stop_after:
                        return "CANCELLED"
            return "OK"
    except TimeoutError:
        return "DEADLINE_EXCEEDED"
    except aiohttp.ClientError as e:
        return type(e).__name__


def _children(pid: int) -> list[int]:
    """Child processes of pid (a supervisor's workers), from /proc."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def proc_stats(pid: int) -> dict[str, float]:
    """RSS (MB), open fds and threads of a process and its descendants (a service run with --workers: the
    supervisor and its workers), from /proc."""
    out = {"rss_mb": 0.0, "fds": 0, "threads": 0}
    todo, seen = [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        out["rss_mb"] += int(line.split()[1]) / 1024
                    elif line.startswith("Threads:"):
                        out["threads"] += int(line.split()[1])
            out["fds"] += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
        todo += _children(p)
    out["rss_mb"] = round(out["rss_mb"], 2)
    out["processes"] = len(seen)
    return out


def last_reported(log_file: Path) -> dict:
    """The service's last `process.stats` log line (it counts its own asyncio tasks and gc objects); {} if none."""
    try:
        with open(log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 65536))
            lines = f.read().splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        if b'"process.stats"' in line:
            try:
                return json.loads(line)
            except ValueError:
                return {}
    return {}


def sample(cluster: Cluster, done: int, started: float) -> dict:
    services = {}
    for name, proc in cluster.procs.items():
        if not proc.alive:
            continue
        s = proc_stats(proc.process.pid)
        reported = last_reported(proc.log_file)
        s["tasks"] = reported.get("tasks")
        # Python's view (of the supervisor, for a service in workers): tracked objects, full collections so far.
        s["gc_objects"] = reported.get("gc_objects")
        s["gc_full"] = reported.get("gc_full")
        services[name] = s
    return {"streams": done, "t_s": round(time.monotonic() - started, 1), "services": services}


def growth(samples: list[dict], service: str, at: int, end: int) -> dict | None:
    """RSS of service at the first sample with >= `at` streams and at the last with <= `end`; growth in %."""
    series = [(s["streams"], s["services"][service]["rss_mb"]) for s in samples if service in s["services"]]
    first = next(((n, r) for n, r in series if n >= at), None)
    last = next(((n, r) for n, r in reversed(series) if n <= end), None)
    if first is None or last is None or last[0] <= first[0]:
        return None
    # The same growth read off a least-squares line through every sample in between: two single samples
    # also carry the swings of a garbage collection or a recycled worker (tens of MB), the line the trend.
    window = [(n, r) for n, r in series if first[0] <= n <= last[0]]
    trend = None
    if len(window) >= 3:
        slope, intercept = statistics.linear_regression([n for n, _ in window], [r for _, r in window])
        start = intercept + slope * first[0]
        trend = round(slope * (last[0] - first[0]) / start * 100.0, 2)
    return {
        "from_streams": first[0],
        "to_streams": last[0],
        "rss_mb_from": first[1],
        "rss_mb_to": last[1],
        "growth_pct": round((last[1] - first[1]) / first[1] * 100.0, 2),
        "trend_growth_pct": trend,
        "rss_mb_min": min(r for _, r in window),
        "rss_mb_max": max(r for _, r in window),
    }


async def run(args: argparse.Namespace) -> dict:
    os.environ[INTERVAL_ENV] = str(args.stats_interval_s)
    if args.tracemalloc:
        os.environ["FLEETSERVE_TRACEMALLOC"] = str(args.tracemalloc)
    data_dir = Path(args.data_dir or tempfile.mkdtemp(prefix="fleetserve-soak-"))
    # The bounded caches (each stops at its bound), sized so that they are full early in the run when asked.
    extra: dict[str, list[str]] = {}
    if args.kv_blocks:
        extra["engine"] = ["--num-kv-blocks", str(args.kv_blocks)]
    if args.max_spans:
        extra.setdefault("metrics", []).extend(["--max-spans", str(args.max_spans)])
    if args.quality_recent:
        extra.setdefault("metrics", []).extend(["--quality-recent-requests", str(args.quality_recent)])
    if args.feedback_index:
        extra["gateway"] = ["--feedback-index-size", str(args.feedback_index)]
    if args.max_requests_per_worker:
        # Recycled workers (shared/recycle.py) bound what grpc.aio leaks natively per cancelled stream; an engine
        # is recycled as one worker (its replica drained in the registry, a fresh process on its port).
        for service in ("router", "gateway", "engine"):
            extra.setdefault(service, []).extend(
                [
                    "--max-requests-per-worker",
                    str(args.max_requests_per_worker),
                    "--max-requests-jitter",
                    str(args.max_requests_jitter),
                ]
            )
    cluster = Cluster(
        ClusterConfig(
            data_dir=data_dir,
            engines=args.engines,
            speed_factor=args.speed_factor,
            metrics_port=-1,
            extra_args=extra,
            router_workers=args.workers,
            gateway_workers=args.workers,
        )
    )
    await cluster.start()
    rng = random.Random(args.seed)
    tally = Tally()
    samples: list[dict] = []
    started = time.monotonic()
    try:
        http_url = f"http://{cluster.ready_info('gateway')['http_address']}/v1/completions"
        key = cluster.api_key
        async with (
            open_channel(cluster.gateway) as channel,
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency)) as session,
        ):
            stub = pb_grpc.InferenceServiceStub(channel)
            samples.append(sample(cluster, 0, started))
            next_sample = args.sample_every
            issued = 0

            async def worker(wid: int) -> None:
                nonlocal issued, next_sample
                wrng = random.Random(args.seed * 1000 + wid)
                while issued < args.streams:
                    issued += 1
                    mode = wrng.choices(MODES, weights=(30, 40, 15, 15))[0]
                    if wrng.random() < args.http_fraction:
                        end = await http_stream(session, http_url, key, mode, wrng)
                    else:
                        end = await grpc_stream(stub, key, mode, wrng)
                    tally.add(mode, end)
                    if tally.done >= next_sample:
                        next_sample += args.sample_every
                        s = sample(cluster, tally.done, started)
                        samples.append(s)
                        rate = tally.done / max(1e-9, s["t_s"])
                        brief = {n: v["rss_mb"] for n, v in s["services"].items()}
                        print(
                            json.dumps({"streams": tally.done, "per_s": round(rate, 1), "rss_mb": brief}),
                            file=sys.stderr,
                            flush=True,
                        )

            await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
            # Let in-flight cancellations settle, then the last sample.
            await asyncio.sleep(max(3.0, args.stats_interval_s * 2))
            samples.append(sample(cluster, tally.done, started))
    finally:
        await cluster.stop()
    del rng
    services = sorted(samples[-1]["services"])
    result = {
        "command": " ".join(["python -m loadtest.soak", *sys.argv[1:]]),
        "service_args": extra,
        "streams": tally.done,
        "duration_s": samples[-1]["t_s"],
        "streams_per_s": round(tally.done / max(1e-9, samples[-1]["t_s"]), 1),
        "by_mode": tally.by_mode,
        "by_end": tally.by_end,
        "rss_growth": {s: growth(samples, s, args.growth_from, args.streams) for s in services},
        "samples": samples,
    }
    return result


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    services = sorted({n for s in samples for n in s["services"]})
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for ax, metric, label in zip(
        axes.flat,
        ("rss_mb", "fds", "threads", "tasks"),
        ("RSS (MB)", "open fds", "threads", "asyncio tasks"),
        strict=True,
    ):
        for name in services:
            pts = [
                (s["streams"], s["services"][name][metric])
                for s in samples
                if name in s["services"] and s["services"][name][metric] is not None
            ]
            if pts:
                ax.plot([p[0] / 1000 for p in pts], [p[1] for p in pts], label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("streams (thousands), mostly cancelled")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"soak: {result['streams']} streams, {result['streams_per_s']}/s")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--streams", type=int, default=200_000)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--engines", type=int, default=2)
    p.add_argument("--speed-factor", type=float, default=20.0, help="the sim's speed (streams end sooner)")
    p.add_argument("--http-fraction", type=float, default=0.2, help="share of streams over OpenAI HTTP")
    p.add_argument("--sample-every", type=int, default=2000, help="streams between samples")
    p.add_argument("--stats-interval-s", type=float, default=2.0, help="services' process.stats log period")
    p.add_argument(
        "--growth-from", type=int, default=50_000, help="RSS growth is measured from this stream count"
    )
    p.add_argument(
        "--kv-blocks", type=int, default=0, help="engines' --num-kv-blocks (default: the GPU profile's)"
    )
    p.add_argument(
        "--max-spans", type=int, default=0, help="metrics service's --max-spans (default: its own)"
    )
    p.add_argument(
        "--feedback-index", type=int, default=0, help="gateway's --feedback-index-size (default: its own)"
    )
    p.add_argument(
        "--quality-recent",
        type=int,
        default=0,
        help="metrics service's --quality-recent-requests (default: its own)",
    )
    p.add_argument(
        "--workers", type=int, default=1, help="router and gateway --workers (RSS: supervisor + workers)"
    )
    p.add_argument(
        "--max-requests-per-worker",
        type=int,
        default=0,
        help="router, gateway and engine --max-requests-per-worker (router and gateway: with --workers 2+)",
    )
    p.add_argument(
        "--max-requests-jitter", type=int, default=0, help="router, gateway and engine --max-requests-jitter"
    )
    p.add_argument("--tracemalloc", type=int, default=0, help="log the N allocation sites that grew most")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--data-dir", default="", help="where the fleet's logs go (default: a tmp dir)")
    p.add_argument("--out", default="", help="write the JSON here (else stdout)")
    p.add_argument(
        "--plot", default="", help="write a PNG plot here (needs matplotlib: pip install -e '.[soak]')"
    )
    args = p.parse_args(argv)
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    if args.plot:
        plot(result, args.plot)
    summary = {k: result[k] for k in ("streams", "streams_per_s", "by_end", "rss_growth")}
    print(json.dumps(summary), file=sys.stderr)
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
