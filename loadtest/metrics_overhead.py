"""`python -m loadtest.metrics_overhead`: what metrics cost the token path, as gateway, router and engine CPU per
request before and after the observability work (issue 9), with an A/A control.

Four fleets run side by side from two code trees: `baseline` (a checkout of the commit before any of it: no
Prometheus series, none of the metrics service's span attributes or the engine's output-quality checks),
`baseline_again` (the same code once more: how much two identical fleets differ), `metrics` (this tree, every
/metrics endpoint scraped once a second, as an eager Prometheus would) and `metrics_unscraped` (this tree,
nobody scraping: the instruments' own cost). The same requests go to each in short batches, in an order rotated
every round, so the machine's background load falls on all alike; the whole is repeated with fresh fleets.
CPU is read from /proc/<pid>/stat (Linux) around every batch and over each repeat, so it counts everything
those processes did: relaying, spans, logs, OTLP export, metrics, answering scrapes. The two trees differ by
more than metrics (every commit in between), so the run also times the per-request recording itself
(`recording_us`: the calls each request makes, in this process) to say what share of the difference is metrics.

    git -C /work/main worktree add --detach /tmp/fleetserve-base 058c93e
    python -m loadtest.metrics_overhead --baseline-dir /tmp/fleetserve-base --out docs/benchmarks/metrics_overhead.json

Each tree's fleet is started by that tree's own `fleetserve up`, its services importing protos generated from
its own protos/ (so an older checkout works with this checkout's environment)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
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
from loadtest.fleet import structlog_to_stderr
from loadtest.summary import StreamMeter, summarize
from loadtest.workload import Workload
from shared.channels import open_channel
from shared.errors import details_of

ROOT = Path(__file__).resolve().parents[1]
# Processes whose CPU is read, by their name in the fleet's run directory: the token path (gateway, router, the
# one engine) and the metrics service, which receives every span (off the token path; shown for completeness).
PROCS = {"gateway": "gateway", "router": "router", "engine": "engine-1", "collector": "metrics"}
HOPS = tuple(PROCS)
VARIANTS = ("baseline", "baseline_again", "metrics", "metrics_unscraped")


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


class TreeFleet:
    """A fleet started by a code tree's own `fleetserve up` (that tree's launcher passes the flags that tree's
    services know), with that tree's protos, in a temporary data directory; stopped with SIGTERM."""

    def __init__(self, code_dir: Path, gen_dir: Path, speed_factor: float) -> None:
        self.code_dir = code_dir
        self.gen_dir = gen_dir
        self.speed_factor = speed_factor
        self._tmp = tempfile.TemporaryDirectory(prefix="fleetserve-bench-")
        self.data_dir = Path(self._tmp.name)
        self.proc: subprocess.Popen | None = None
        self.state: dict = {}

    async def start(self, timeout_s: float = 180.0) -> dict:
        argv = [sys.executable, "-m", "shared.cli.main", "up", "--engines", "1", "--no-live"]
        argv += ["--speed-factor", str(self.speed_factor), "--data-dir", str(self.data_dir)]
        env = {**os.environ, "PYTHONPATH": str(self.gen_dir)}
        print(f"bench: fleetserve up in {self.code_dir} ({self.data_dir})", file=sys.stderr, flush=True)
        with open(self.data_dir / "up.log", "ab") as log:  # noqa: ASYNC230 - once per fleet
            # -m with the tree as working directory: its launcher, and the services it starts, come from it.
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                argv, cwd=self.code_dir, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )
        state_file = self.data_dir / "cluster.json"
        deadline = time.monotonic() + timeout_s
        while not state_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.data_dir / "up.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"fleetserve up in {self.code_dir} did not start:\n{tail}")
            await asyncio.sleep(0.2)
        self.state = json.loads(state_file.read_text())
        return self.state

    def pids(self) -> dict[str, int]:
        """Process name -> pid of every process with a /metrics endpoint."""
        run = self.data_dir / "run"
        return {
            n: json.loads((run / f"{n}.json").read_text())["pid"]
            for n in self.state.get("metrics_addresses", {})
        }

    async def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the launcher stops its fleet in order
            try:
                await asyncio.to_thread(self.proc.wait, 90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 10)
        self._tmp.cleanup()


class Target:
    """One fleet under test: its gateway, its key, the pids whose CPU is read, and what it measured."""

    def __init__(self, name: str, state: dict) -> None:
        self.name = name
        self.gateway = state["gateway"]
        self.key = state["api_key"]
        run = Path(state["data_dir"]) / "run"
        self.pids = {hop: json.loads((run / f"{PROCS[hop]}.json").read_text())["pid"] for hop in HOPS}
        self.metrics_addresses = list(state.get("metrics_addresses", {}).values())
        # Where each process was imported from (the baseline's must be the baseline checkout).
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
    """`repeats` times: start the four fleets, feed them the same batches in rotated order, stop them. Each
    repeat is a fresh set of processes, so what one fleet's processes happen to cost (where they run, what
    the machine does meanwhile) varies between repeats like a code change would; `baseline_again` runs the
    baseline's code a second time and shows that variation. With --out, the report of the repeats done so far
    is written after each (a run stopped by a time limit keeps them; --combine joins runs)."""
    recording = recording_cost(output_tokens=args.max_tokens)
    repeats = []
    for i in range(args.repeats):
        print(f"bench: repeat {i + 1} of {args.repeats}", file=sys.stderr, flush=True)
        repeats.append(await _one_repeat(args, scrape_cost=args.scrape_cost_s if i == 0 else 0))
        if args.out:
            text = json.dumps(_report(args, repeats, recording), indent=2)
            Path(args.out).write_text(text + "\n")  # noqa: ASYNC240 - between repeats, nothing else runs
    return _report(args, repeats, recording)


async def _one_repeat(args, scrape_cost: float) -> dict:
    workload = Workload(prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=args.seed)

    fleets = {
        "baseline": TreeFleet(args.baseline_dir, args.gen_dirs[args.baseline_dir], args.speed_factor),
        "baseline_again": TreeFleet(args.baseline_dir, args.gen_dirs[args.baseline_dir], args.speed_factor),
        "metrics": TreeFleet(ROOT, args.gen_dirs[ROOT], args.speed_factor),
        "metrics_unscraped": TreeFleet(ROOT, args.gen_dirs[ROOT], args.speed_factor),
    }
    started: list[TreeFleet] = []
    try:
        targets = {}
        for name, f in fleets.items():  # one at a time: starting four at once overloads two cores
            started.append(f)
            targets[name] = Target(name, await f.start())
        channels = {name: open_channel(t.gateway) for name, t in targets.items()}
        for name, t in targets.items():
            await _drive(t, channels[name], workload, range(args.warmup), args.concurrency, "warmup")
        load_before = os.getloadavg()
        with Scraper(targets["metrics"].metrics_addresses, args.scrape_interval_s) as scraper:
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
        runs = {}
        for name, t in targets.items():
            ok = sum(1 for r in t.results if r.ok) or 1
            runs[name] = summarize(
                t.results,
                duration,
                mode=name,
                concurrency=args.concurrency,
                cpu_ms_per_request={
                    hop: round((totals1[name][hop] - totals0[name][hop]) * 1000.0 / ok, 4) for hop in HOPS
                },
                batch_cpu_ms_per_request=t.batch_cpu_ms_per_request,
                metrics_endpoints=len(t.metrics_addresses),
                code_dirs=t.code_dirs,
            )
        repeat = {
            "duration_s": round(duration, 2),
            "scrapes": scraper.scrapes,
            "scraped_bytes": scraper.bytes,
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "runs": runs,
        }
        if scrape_cost > 0:
            repeat["cpu_ms_per_scrape"] = await _scrape_cost(fleets["metrics_unscraped"], scrape_cost)
        return repeat
    finally:
        for f in reversed(started):
            await f.stop()


async def _scrape_cost(fleet: TreeFleet, seconds: float) -> dict[str, float]:
    """CPU per /metrics scrape of every process of an idle fleet: its CPU while scraped 20 times a second,
    less its CPU over as long idle, per scrape."""
    procs = {name: (pid, fleet.state["metrics_addresses"][name]) for name, pid in fleet.pids().items()}

    def cpu() -> dict[str, float]:
        return {name: _cpu_s(pid) for name, (pid, _) in procs.items()}

    c0 = cpu()
    await asyncio.sleep(seconds)
    idle = {name: v - c0[name] for name, v in cpu().items()}
    addresses = [address for _, address in procs.values()]

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


def _report(args, repeats: list[dict], recording: dict) -> dict:
    summary = {}
    for hop in HOPS:
        row: dict = {}
        per_repeat = {v: [rep["runs"][v]["cpu_ms_per_request"][hop] for rep in repeats] for v in VARIANTS}
        base = statistics.median(per_repeat["baseline"])
        for v in VARIANTS:
            row[f"{v}_cpu_ms_per_request"] = {
                "median": round(statistics.median(per_repeat[v]), 4),
                "repeats": per_repeat[v],
            }
        for v in VARIANTS[1:]:
            med = statistics.median(per_repeat[v])
            # Paired by batch: the same requests moments apart, so slow changes of load cancel; pooled over repeats.
            diffs = [
                b - a
                for rep in repeats
                for a, b in zip(
                    rep["runs"]["baseline"]["batch_cpu_ms_per_request"][hop],
                    rep["runs"][v]["batch_cpu_ms_per_request"][hop],
                    strict=True,
                )
            ]
            q = statistics.quantiles(diffs, n=4)
            row[f"{v}_minus_baseline_ms"] = round(med - base, 4)
            row[f"{v}_ratio"] = round(med / base, 4) if base else None
            # Paired by repeat: each repeat's fleets ran side by side.
            row[f"{v}_ratio_per_repeat"] = [
                round(b / a, 4) if a else None
                for a, b in zip(per_repeat["baseline"], per_repeat[v], strict=True)
            ]
            row[f"{v}_paired_batch_difference_ms"] = {
                "median": round(statistics.median(diffs), 4),
                "q1": round(q[0], 4),
                "q3": round(q[2], 4),
            }
        row["verdict"] = _verdict(row)
        summary[hop] = row
    # Measured here, or (--combine) read from the runs combined.
    commits = getattr(args, "commits", None) or {
        "baseline_commit": _git(args.baseline_dir, "rev-parse", "HEAD"),
        "metrics_commit": _git(ROOT, "rev-parse", "HEAD"),
        "metrics_tree_dirty": bool(_git(ROOT, "status", "--porcelain", "--untracked-files=no")),
    }
    return {
        "bench": "metrics_overhead",
        "command": "python -m loadtest.metrics_overhead " + " ".join(sys.argv[1:]),
        **commits,
        "workload": {
            "repeats": len(repeats),
            "rounds": args.rounds,
            "batch": args.batch,
            "requests_per_variant": len(repeats) * args.rounds * args.batch,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "prompt_tokens": args.prompt_tokens,
            "max_tokens": args.max_tokens,
            "speed_factor": args.speed_factor,
            "scrape_interval_s": args.scrape_interval_s,
        },
        "cpu_ms_per_scrape": repeats[0].get("cpu_ms_per_scrape") or getattr(args, "cpu_ms_per_scrape", None),
        "recording_us": recording,
        "summary": summary,
        "repeats": repeats,
    }


def _verdict(row: dict) -> dict:
    """After vs before against the A/A control: the change two fleets of identical code showed (the largest over
    the repeats) is the noise floor; a change within it is not measurable in this run."""
    aa = [abs(r - 1.0) for r in row["baseline_again_ratio_per_repeat"] if r is not None]
    floor = max(aa) if aa else None
    out: dict = {"aa_largest_change": None if floor is None else round(floor, 4)}
    for v in ("metrics_unscraped", "metrics"):
        ratio = row[f"{v}_ratio"]
        change = None if ratio is None else round(ratio - 1.0, 4)
        out[f"{v}_change"] = change
        out[f"{v}_beyond_aa"] = None if change is None or floor is None else abs(change) > floor
    return out


def recording_cost(iterations: int = 20_000, output_tokens: int = 8) -> dict:
    """Microseconds of CPU that one request's metrics recording costs in each process, timed here with the
    services' own classes (the per-request calls of this tree; none of them existed in the baseline): what
    share of the fleets' difference is metrics, which the fleets alone cannot say (the trees differ by every
    commit in between). Gateway: the Prometheus series (started, finished, stopped) and the root span
    attributes the metrics service reads (tier, feature, served model, version, cached tokens). Router: its
    request and attempt series. Engine: the vLLM-named series, and the output-quality sample (fed once per
    engine step, judged once at the end) for `output_tokens` one-token steps."""
    import grpc as grpc_mod
    from fleetserve.common.v1 import common_pb2
    from opentelemetry.sdk.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from services.engine.engine_metrics import EngineMetrics
    from services.engine.output_quality import OutputSample
    from services.gateway.request_metrics import GatewayMetrics
    from services.router.router_metrics import RouterMetrics
    from shared import prom

    def per_call_us(fn) -> float:
        for _ in range(200):  # warm: first calls create label children
            fn()
        t0 = time.process_time()
        for _ in range(iterations):
            fn()
        return round((time.process_time() - t0) * 1e6 / iterations, 3)

    gw = GatewayMetrics(prom.new_registry())
    ok = grpc_mod.StatusCode.OK

    def gateway_prom() -> None:
        gw.started("sim-1b")
        gw.finished(
            model_label="sim-1b",
            tenant="t",
            code=ok,
            reason="",
            priority=2,
            e2e_s=0.05,
            ttft_s=0.01,
            prompt_tokens=64,
            cached_tokens=16,
            completion_tokens=output_tokens,
            degraded=False,
        )
        gw.stopped("sim-1b")

    span = TracerProvider().get_tracer("bench").start_span("gateway.Generate")

    def gateway_span_attributes() -> None:
        span.set_attribute("fleetserve.tenant_tier", "standard")
        span.set_attribute("fleetserve.feature", "chat")
        span.set_attribute("fleetserve.served_model", "sim-1b")
        span.set_attribute("fleetserve.model_version", "v1")
        span.set_attribute("fleetserve.cached_tokens", 16)

    rm = RouterMetrics(prom.new_registry())

    def router_prom() -> None:
        rm.requests.labels("sim-1b", "OK").inc()
        rm.attempts.labels("sim-1b", "ok").inc()

    # The backend is read only when Prometheus scrapes (never here; a registry without auto_describe does not
    # collect on registration).
    em = EngineMetrics(CollectorRegistry(), None, "sim-1b")  # type: ignore[arg-type]

    def engine_prom() -> None:
        em.finished(
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            aborted=False,
            e2e_s=0.05,
            ttft_s=0.01,
            prompt_tokens=64,
            output_tokens=output_tokens,
        )

    ids, texts = [[1000 + i] for i in range(output_tokens)], [f" w{i}" for i in range(output_tokens)]

    def engine_quality() -> None:
        sample = OutputSample()
        for i in range(output_tokens):
            sample.feed(ids[i], texts[i])
        sample.attributes(output_tokens)

    fed = OutputSample()

    def engine_quality_step() -> None:
        # One engine step's feed once the sample is full (the caps hold): what every later step costs.
        fed.feed(ids[0], texts[0])

    for _ in range(3000):
        fed.feed(ids[0], texts[0])

    parts = {
        "gateway_prometheus": per_call_us(gateway_prom),
        "gateway_span_attributes": per_call_us(gateway_span_attributes),
        "router_prometheus": per_call_us(router_prom),
        "engine_prometheus": per_call_us(engine_prom),
        "engine_output_quality": per_call_us(engine_quality),
        "engine_output_quality_per_later_step": per_call_us(engine_quality_step),
    }
    span.end()
    return {
        **parts,
        "gateway": round(parts["gateway_prometheus"] + parts["gateway_span_attributes"], 3),
        "router": parts["router_prometheus"],
        "engine": round(parts["engine_prometheus"] + parts["engine_output_quality"], 3),
        "output_tokens": output_tokens,
        "iterations": iterations,
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
    p.add_argument("--baseline-dir", help="a checkout of the baseline commit (required unless --combine)")
    p.add_argument(
        "--repeats", type=int, default=3, help="fresh sets of fleets, one after another (default 3)"
    )
    p.add_argument("--rounds", type=int, default=12, help="rounds of one batch per fleet (default 12)")
    p.add_argument("--batch", type=int, default=50, help="requests per batch (default 50)")
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
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="JSON",
        help="measure nothing: report the repeats of these earlier runs (same workload) as one run",
    )
    return p


def combine(paths: list[str]) -> dict:
    """One report from the repeats of several runs (each a short hold of a busy machine), which must share
    their workload and commits; the recording cost is timed again here."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    first = runs[0]
    keys = ("baseline_commit", "metrics_commit")

    def same(run: dict) -> dict:
        counts = ("repeats", "requests_per_variant")
        return {
            **{k: run[k] for k in keys},
            "workload": {n: v for n, v in run["workload"].items() if n not in counts},
        }

    for p, run in zip(paths[1:], runs[1:], strict=True):
        if same(run) != same(first):
            raise SystemExit(f"{p}: workload or commits differ from {paths[0]}'s")
    w = first["workload"]
    repeats = [rep for run in runs for rep in run["repeats"]]
    args = argparse.Namespace(**{**w, "repeats": len(repeats)})
    args.commits = {
        "baseline_commit": first["baseline_commit"],
        "metrics_commit": first["metrics_commit"],
        "metrics_tree_dirty": any(run["metrics_tree_dirty"] for run in runs),
    }
    args.cpu_ms_per_scrape = next((r["cpu_ms_per_scrape"] for r in runs if r.get("cpu_ms_per_scrape")), None)
    out = _report(args, repeats, recording_cost(output_tokens=w["max_tokens"]))
    out["combined_from"] = [{"command": r["command"], "repeats": len(r["repeats"])} for r in runs]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.combine:
        result = combine(args.combine)
    else:
        if not args.baseline_dir:
            parser().error("--baseline-dir is required")
        args.baseline_dir = Path(args.baseline_dir).resolve()
        with structlog_to_stderr(), tempfile.TemporaryDirectory(prefix="fleetserve-bench-gen-") as gen_dir:
            args.gen_dirs = {
                tree: _generated_protos(tree, Path(gen_dir)) for tree in {args.baseline_dir, ROOT}
            }
            result = asyncio.run(measure(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
