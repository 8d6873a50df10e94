"""`python -m loadtest.metrics_overhead`: what metrics cost the token path, as gateway and router CPU per request.

Three fleets run side by side from two code trees: `baseline` (a checkout of the commit before Prometheus
metrics), `metrics` (this tree, every /metrics endpoint scraped once a second, as an eager Prometheus would) and
`metrics_unscraped` (this tree, nobody scraping: the instruments' own cost). The same requests go to each in
short batches, in an order rotated every round, so the machine's background load falls on all three alike.
Gateway and router CPU is read from /proc/<pid>/stat (Linux) around every batch and over the whole run, so it
counts everything those processes did: relaying, spans, logs, OTLP export, metrics, answering scrapes.

    git -C /work/main worktree add --detach /tmp/fleetserve-base 31ce27c
    python -m loadtest.metrics_overhead --baseline-dir /tmp/fleetserve-base --out docs/benchmarks/metrics_overhead.json

The baseline tree runs on this checkout's environment (.venv, generated protos): it must be importable with it."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from loadtest.capacity import _cpu_s
from loadtest.fleet import SpawnedFleet, structlog_to_stderr
from loadtest.summary import StreamMeter, summarize
from loadtest.workload import Workload
from shared.channels import open_channel
from shared.errors import details_of

ROOT = Path(__file__).resolve().parents[1]
HOPS = ("gateway", "router")
VARIANTS = ("baseline", "metrics", "metrics_unscraped")


class Scraper:
    """GETs every /metrics endpoint once per interval on a thread (Prometheus's work, minus storing it)."""

    def __init__(self, addresses: list[str], interval_s: float) -> None:
        self.addresses = addresses
        self.interval_s = interval_s
        self.scrapes = 0
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self) -> Scraper:
        if self.addresses and self.interval_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for address in self.addresses:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
                    self.bytes += len(r.read())
                self.scrapes += 1


class Target:
    """One fleet under test: its gateway, its key, the pids whose CPU is read, and what it measured."""

    def __init__(self, name: str, state: dict) -> None:
        self.name = name
        self.gateway = state["gateway"]
        self.key = state["api_key"]
        run = Path(state["data_dir"]) / "run"
        self.pids = {hop: json.loads((run / f"{hop}.json").read_text())["pid"] for hop in HOPS}
        self.metrics_addresses = list(state.get("metrics_addresses", {}).values())
        # Where the gateway and router were imported from (the baseline's must be the baseline checkout).
        self.code_dirs = {hop: str(Path(f"/proc/{pid}/cwd").resolve()) for hop, pid in self.pids.items()}
        self.results: list = []
        self.batch_cpu_ms_per_request: dict[str, list[float]] = {hop: [] for hop in HOPS}

    def cpu(self) -> dict[str, float]:
        return {hop: _cpu_s(pid) for hop, pid in self.pids.items()}


async def _drive(target: Target, channel, workload: Workload, indexes: range, concurrency: int, stream: str):
    """Generate calls for `indexes` through the target's gateway, `concurrency` at a time; their results."""
    call = pb_grpc.InferenceServiceStub(channel).Generate
    metadata = (("authorization", f"Bearer {target.key}"),)
    todo = iter(indexes)
    results = []

    async def one(i: int):
        clock = time.perf_counter
        meter = StreamMeter(clock())
        try:
            async for resp in call(workload.mesh_request(i, stream), metadata=metadata, timeout=120):
                meter.on_chunk(resp.chunk, clock())
            return meter.result(clock())
        except grpc.aio.AioRpcError as e:
            d = details_of(e)
            return meter.failed(clock(), e.code().name, d.reason, d.message)

    async def worker():
        for i in todo:
            results.append(await one(i))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


async def measure(args) -> dict:
    workload = Workload(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=args.seed)
    baseline_dir = args.baseline_dir

    def fleet(code_dir: Path, **config) -> SpawnedFleet:
        # Each tree's services with the protos generated from its own .proto files (the environment's gen/
        # follows another checkout, whose services may have RPCs an older servicer lacks).
        env = {"PYTHONPATH": str(_generated_protos(code_dir, args.gen_dir))}
        return SpawnedFleet(1, args.speed_factor, code_dir=code_dir, env=env, **config)

    fleets = {
        "baseline": fleet(baseline_dir, metrics_port=None),
        "metrics": fleet(ROOT),
        "metrics_unscraped": fleet(ROOT),
    }
    started: list[SpawnedFleet] = []
    try:
        targets = {}
        for name, fleet in fleets.items():  # one at a time: starting three at once overloads two cores
            targets[name] = Target(name, await fleet.__aenter__())
            started.append(fleet)
        channels = {name: open_channel(t.gateway) for name, t in targets.items()}
        for name, t in targets.items():
            await _drive(t, channels[name], workload, range(args.warmup), args.concurrency, "warmup")
        scraped = targets["metrics"].metrics_addresses
        load_before = os.getloadavg()
        with Scraper(scraped, args.scrape_interval_s) as scraper:
            totals0 = {name: t.cpu() for name, t in targets.items()}
            t0 = time.perf_counter()
            order = list(VARIANTS)
            for r in range(args.rounds):
                indexes = range(r * args.batch, (r + 1) * args.batch)
                for name in order:
                    t = targets[name]
                    before = t.cpu()
                    results = await _drive(t, channels[name], workload, indexes, args.concurrency, "measured")
                    after = t.cpu()
                    t.results.extend(results)
                    ok = sum(1 for x in results if x.ok) or 1
                    for hop in HOPS:
                        t.batch_cpu_ms_per_request[hop].append((after[hop] - before[hop]) * 1000.0 / ok)
                order = order[1:] + order[:1]
            duration = time.perf_counter() - t0
            totals1 = {name: t.cpu() for name, t in targets.items()}
        for ch in channels.values():
            await ch.close()
        report = _report(args, targets, totals0, totals1, duration, scraper, load_before, baseline_dir)
        if args.scrape_cost_s > 0:
            report["cpu_ms_per_scrape"] = await _scrape_cost(fleets["metrics_unscraped"], args.scrape_cost_s)
        return report
    finally:
        for fleet in reversed(started):
            await fleet.__aexit__(None, None, None)


async def _scrape_cost(fleet: SpawnedFleet, seconds: float) -> dict[str, float]:
    """CPU per /metrics scrape of every process of an idle fleet: its CPU while scraped 20 times a second,
    less its CPU over as long idle, per scrape."""
    procs = {name: p for name, p in fleet.cluster.procs.items() if p.metrics_address}

    def cpu() -> dict[str, float]:
        return {name: _cpu_s(p.process.pid) for name, p in procs.items()}

    c0 = cpu()
    await asyncio.sleep(seconds)
    idle = {name: v - c0[name] for name, v in cpu().items()}
    addresses = [p.metrics_address for p in procs.values()]

    def scrape_for(s: float) -> int:
        end, rounds = time.monotonic() + s, 0
        while time.monotonic() < end:
            for address in addresses:
                with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
                    r.read()
            rounds += 1
            time.sleep(0.05)
        return rounds

    c0 = cpu()
    rounds = await asyncio.to_thread(scrape_for, seconds)
    busy = {name: v - c0[name] for name, v in cpu().items()}
    return {name: round((busy[name] - idle[name]) * 1000.0 / rounds, 3) for name in procs}


def _report(args, targets, totals0, totals1, duration, scraper, load_before, baseline_dir) -> dict:
    records = {}
    for name, t in targets.items():
        ok = sum(1 for r in t.results if r.ok) or 1
        records[name] = summarize(
            t.results,
            duration,
            mode=name,
            concurrency=args.concurrency,
            cpu_ms_per_request={
                hop: round((totals1[name][hop] - totals0[name][hop]) * 1000.0 / ok, 4) for hop in HOPS
            },
            batch_cpu_ms_per_request_median={
                hop: round(statistics.median(t.batch_cpu_ms_per_request[hop]), 4) for hop in HOPS
            },
            metrics_endpoints=len(t.metrics_addresses),
            metrics_endpoints_scraped=len(scraper.addresses) if name == "metrics" else 0,
            code_dirs=t.code_dirs,
        )
    summary = {}
    for hop in HOPS:
        base = records["baseline"]["cpu_ms_per_request"][hop]
        row: dict = {"baseline_cpu_ms_per_request": base}
        for name in VARIANTS[1:]:
            new = records[name]["cpu_ms_per_request"][hop]
            # Paired by round: the same requests, moments apart, so slow changes of load cancel.
            diffs = [
                b - a
                for a, b in zip(
                    targets["baseline"].batch_cpu_ms_per_request[hop],
                    targets[name].batch_cpu_ms_per_request[hop],
                    strict=True,
                )
            ]
            q = statistics.quantiles(diffs, n=4)
            row[f"{name}_cpu_ms_per_request"] = new
            row[f"{name}_minus_baseline_ms"] = round(new - base, 4)
            row[f"{name}_ratio"] = round(new / base, 4) if base else None
            row[f"{name}_paired_batch_difference_ms"] = {
                "median": round(statistics.median(diffs), 4),
                "q1": round(q[0], 4),
                "q3": round(q[2], 4),
            }
        # How much two batches of the same code differ: the noise floor the differences above sit on.
        base_batches = targets["baseline"].batch_cpu_ms_per_request[hop]
        bq = statistics.quantiles(base_batches, n=4)
        row["baseline_batch_iqr_ms"] = round(bq[2] - bq[0], 4)
        summary[hop] = row
    return {
        "bench": "metrics_overhead",
        "command": "python -m loadtest.metrics_overhead " + " ".join(sys.argv[1:]),
        "baseline_commit": _git(baseline_dir, "rev-parse", "HEAD"),
        "metrics_commit": _git(ROOT, "rev-parse", "HEAD"),
        "metrics_tree_dirty": bool(_git(ROOT, "status", "--porcelain", "--untracked-files=no")),
        "workload": {
            "rounds": args.rounds,
            "batch": args.batch,
            "requests_per_variant": args.rounds * args.batch,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "speed_factor": args.speed_factor,
            "scrape_interval_s": args.scrape_interval_s,
        },
        "scrapes": scraper.scrapes,
        "scraped_bytes": scraper.bytes,
        "duration_s": round(duration, 2),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "summary": summary,
        "runs": records,
    }


def _generated_protos(code_dir: Path, parent: Path) -> Path:
    """code_dir's protos/ compiled into a new directory under parent: what its services import."""
    out = Path(tempfile.mkdtemp(prefix="gen-", dir=parent))
    protos = sorted(str(p.relative_to(code_dir)) for p in (code_dir / "protos").rglob("*.proto"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-Iprotos",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
        ]
        + protos,
        cwd=code_dir,
        check=True,
    )
    return out


def _git(code_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(code_dir), *args], capture_output=True, text=True).stdout.strip()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.metrics_overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--baseline-dir", required=True, help="a checkout of the baseline commit")
    p.add_argument("--rounds", type=int, default=40, help="rounds of one batch per fleet (default 40)")
    p.add_argument("--batch", type=int, default=25, help="requests per batch (default 25)")
    p.add_argument("--warmup", type=int, default=50, help="requests per fleet before measuring (default 50)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight (default 4)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length, about (default 64)")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=8,
        help="output tokens: few, so that per-request work shows (default 8)",
    )
    p.add_argument("--speed-factor", type=float, default=4.0, help="sim engine speed-up (default 4)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--scrape-interval-s", type=float, default=1.0, help="how often every /metrics is scraped (default 1)"
    )
    p.add_argument(
        "--scrape-cost-s",
        type=float,
        default=10.0,
        help="afterwards, seconds idle and seconds scraped 20/s to measure CPU per scrape (0: skip; default 10)",
    )
    p.add_argument("--out", help="write the JSON here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.baseline_dir = Path(args.baseline_dir).resolve()
    with structlog_to_stderr(), tempfile.TemporaryDirectory(prefix="fleetserve-bench-gen-") as gen_dir:
        args.gen_dir = Path(gen_dir)
        result = asyncio.run(measure(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
