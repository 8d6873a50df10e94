"""`fleetserve bench` / `python -m loadtest.bench`: closed-loop streaming load on the mesh (through the gateway) or
straight on one engine, or both in one run (--compare), printed as one JSON object on stdout."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.inference.v1 import inference_service_pb2 as inference_pb

from loadtest.fleet import SpawnedFleet, structlog_to_stderr
from loadtest.summary import RequestResult, StreamMeter, compare, summarize
from loadtest.workload import Workload
from shared.channels import open_channel
from shared.errors import details_of
from shared.tls import Tls

MESH_METHOD = "/fleetserve.inference.v1.InferenceService/Generate"
ENGINE_METHOD = "/fleetserve.engine.v1.EngineService/Generate"


class UsageError(Exception):
    """Bad flags or no cluster to run against (exit status 2)."""


@dataclass(frozen=True)
class Target:
    """Where the load goes: the gateway ("mesh", with an API key) or one engine ("direct")."""

    mode: str
    address: str
    api_key: str = ""
    # The fleet's TLS as a client sees it (a `fleetserve up --tls` fleet: its CA and the CLI's certificate).
    tls: Tls | None = None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.api_key}"),) if self.mode == "mesh" else ()

    def stub(self, channel: grpc.aio.Channel) -> grpc.aio.UnaryStreamMultiCallable:
        if self.mode == "mesh":
            return channel.unary_stream(
                MESH_METHOD,
                request_serializer=inference_pb.GenerateRequest.SerializeToString,
                response_deserializer=inference_pb.GenerateResponse.FromString,
            )
        return channel.unary_stream(
            ENGINE_METHOD,
            request_serializer=engine_pb.GenerateRequest.SerializeToString,
            response_deserializer=engine_pb.GenerateResponse.FromString,
        )

    def request(self, workload: Workload, index: int, stream: str | None = None):
        stream = stream or self.mode
        if self.mode == "mesh":
            return workload.mesh_request(index, stream)
        return workload.engine_request(index, stream)


# -- flags -----------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The bench flags (shared by `python -m loadtest.bench` and `fleetserve bench`)."""
    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency",
        type=_positive_int,
        default=32,
        help="requests in flight at all times (closed loop; default 32)",
    )
    load.add_argument("--requests", type=_positive_int, default=256, help="requests in all (default 256)")
    load.add_argument(
        "--prompt-tokens",
        type=_positive_int,
        default=128,
        help="words in each random prompt, about one token each (default 128)",
    )
    load.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=256,
        help="tokens to generate per request; EOS is ignored so each makes exactly this many (default 256)",
    )
    load.add_argument("--model", default="sim-1b", help="model name (default sim-1b)")
    load.add_argument(
        "--seed", type=int, help="workload seed (default: random; the JSON reports the one used)"
    )
    load.add_argument(
        "--timeout",
        type=_positive_float,
        default=300.0,
        help="deadline of each request in seconds (default 300)",
    )
    load.add_argument(
        "--ready-timeout",
        type=float,
        default=30.0,
        help="before measuring, retry a tiny request this long while the mesh answers UNAVAILABLE (it may not "
        "know its engines yet); 0 skips the check (default 30 s)",
    )
    load.add_argument("--quiet", action="store_true", help="no progress lines on stderr")

    target = parser.add_argument_group("target")
    which = target.add_mutually_exclusive_group()
    which.add_argument(
        "--direct",
        action="store_true",
        help="load one engine directly (EngineService/Generate) instead of the gateway",
    )
    which.add_argument(
        "--compare",
        action="store_true",
        help="run direct, then through the mesh, and report both and their ratios (direct loads one engine and "
        "the mesh spreads over all: compare on a one-engine fleet)",
    )
    target.add_argument("--gateway", help="gateway host:port (default: the running cluster's)")
    target.add_argument(
        "--api-key", help="API key (default: $FLEETSERVE_API_KEY or the running cluster's dev key)"
    )
    target.add_argument(
        "--engine", help="engine host:port for --direct/--compare (default: the cluster's first)"
    )
    target.add_argument(
        "--data-dir",
        help="where the running cluster keeps cluster.json (default $FLEETSERVE_HOME "
        "or ~/.local/state/fleetserve)",
    )

    spawn = parser.add_argument_group("spawn")
    spawn.add_argument(
        "--spawn",
        action="store_true",
        help="start a fresh local fleet in a temp dir for this run, and stop it after",
    )
    spawn.add_argument("--engines", type=_positive_int, help="engines of the spawned fleet (default 1)")
    spawn.add_argument(
        "--speed-factor",
        type=_positive_float,
        help="sim engine speed-up of the spawned fleet (default 1 = real H100 timings)",
    )

    gateway = parser.add_argument_group("gateway overhead (loadtest/gateway_bench.py)")
    gateway.add_argument(
        "--gateway-overhead",
        action="store_true",
        help="interleave the same requests straight to the router, through the gateway over gRPC and over its "
        "OpenAI HTTP, and print what the gateway adds (TTFT/TPOT/E2E, per request pair and per percentile)",
    )
    gateway.add_argument(
        "--warmup", type=int, default=5, help="with --gateway-overhead: unrecorded rounds first (default 5)"
    )
    gateway.add_argument("--out", help="with --gateway-overhead: also write the JSON to this file")

    routing = parser.add_argument_group("routing policies (each on a fleet of its own)")
    routing.add_argument(
        "--compare-policies",
        metavar="A,B,C",
        help="start a sim fleet per routing policy, send each the same --workload straight to its router, and "
        "print one JSON record per policy",
    )
    routing.add_argument(
        "--workload",
        choices=("multiturn", "mixed", "bursty"),
        default="multiturn",
        help="with --compare-policies: multi-turn chats sharing system prompts (closed loop), mixed short/long "
        "requests (Poisson arrivals) or bursty arrivals (default multiturn)",
    )
    routing.add_argument(
        "--replicas", type=_positive_int, default=4, help="with --compare-policies: sim engines per fleet (4)"
    )
    routing.add_argument(
        "--sim-profile",
        default="h100-llama-8b",
        help="with --compare-policies: the sim engines' GPU profile (infra/profiles; default h100-llama-8b)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    return add_arguments(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the flags; argparse's SystemExit(2) on bad ones."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare_policies:
        from services.router import policies

        names = [p.strip() for p in args.compare_policies.split(",") if p.strip()]
        unknown = [p for p in names if p not in policies.available()]
        if not names or unknown:
            parser.error(
                f"--compare-policies: unknown {unknown}; available: {', '.join(policies.available())}"
            )
        args.compare_policies = names
        return args
    if not args.spawn and (args.engines is not None or args.speed_factor is not None):
        parser.error("--engines and --speed-factor apply only with --spawn")
    if args.spawn and (args.gateway or args.api_key or args.engine or args.data_dir):
        parser.error("--spawn starts its own fleet: drop --gateway/--api-key/--engine/--data-dir")
    if args.ready_timeout < 0:
        parser.error("--ready-timeout must be >= 0")
    return args


def modes(args: argparse.Namespace) -> list[str]:
    """The runs to make, in order."""
    if args.compare:
        return ["direct", "mesh"]
    return ["direct"] if args.direct else ["mesh"]


def resolve_targets(
    args: argparse.Namespace, state: Callable[[], dict], use_env: bool = True
) -> dict[str, Target]:
    """Targets for the requested modes: flags first, then $FLEETSERVE_API_KEY (if use_env), then the cluster state
    (read only when something is missing). UsageError when nothing says where to go."""
    cached: dict = {}

    def st() -> dict:
        if not cached:
            cached.update(state())
        return cached

    targets = {}
    for mode in modes(args):
        if mode == "mesh":
            gateway = args.gateway or st().get("gateway")
            env_key = os.environ.get("FLEETSERVE_API_KEY") if use_env else None
            key = args.api_key or env_key or st().get("api_key")
            if not gateway or not key:
                raise UsageError(
                    "no gateway address or API key: pass --gateway and --api-key or start a cluster"
                )
            targets[mode] = Target("mesh", gateway, key, Tls.for_tools(cached or None))
        else:
            engine = args.engine
            if not engine:
                engines = st().get("engines") or {}
                if not engines:
                    raise UsageError("no engine address: pass --engine or start a cluster with engines")
                engine = engines[sorted(engines)[0]]
            targets[mode] = Target("direct", engine, tls=Tls.for_tools(cached or None))
    return targets


def _read_state(data_dir: str | None) -> dict:
    from shared.cluster import read_state

    try:
        return read_state(Path(data_dir) if data_dir else None)
    except SystemExit as e:  # read_state's "no running cluster" message
        raise UsageError(str(e.code)) from None


# -- the load ----------------------------------------------------------------------------------------


class Progress:
    """Counts while a run goes, and prints a line to stderr about every second (never stdout: that is the JSON)."""

    def __init__(self, label: str, total: int, enabled: bool = True, interval_s: float = 1.0) -> None:
        self.label, self.total, self.enabled, self.interval_s = label, total, enabled, interval_s
        self.done = self.errors = self.tokens = 0
        self.start = time.perf_counter()

    def add(self, result: RequestResult) -> None:
        self.done += 1
        if result.ok:
            self.tokens += result.output_tokens
        else:
            self.errors += 1

    async def report(self) -> None:
        """Print until cancelled."""
        if not self.enabled:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            now = time.perf_counter()
            # Tokens are counted when a request ends, so the average since the start reads steadier than a rate
            # over the last second.
            rate = self.tokens / (now - self.start)
            print(
                f"bench {self.label}: {self.done}/{self.total} done, {self.errors} errors, "
                f"{rate:,.0f} tok/s, {now - self.start:.1f} s",
                file=sys.stderr,
                flush=True,
            )


async def _one(call, target: Target, request, timeout_s: float) -> RequestResult:
    # The per-chunk work is kept to a clock read and two field reads: the client must not be the bottleneck.
    clock = time.perf_counter
    meter = StreamMeter(clock())
    try:
        async for resp in call(request, metadata=target.metadata, timeout=timeout_s):
            meter.on_chunk(resp.chunk, clock())
        return meter.result(clock())
    except grpc.aio.AioRpcError as e:
        d = details_of(e)
        return meter.failed(clock(), e.code().name, d.reason, d.message)


async def wait_ready(call, target: Target, workload: Workload, timeout_s: float) -> None:
    """Send tiny requests until one succeeds: a freshly started mesh may not yet know its engines. Retries only
    the mesh's UNAVAILABLE, for at most timeout_s; any other outcome starts the run (its errors go into the JSON)."""
    tiny = Workload(model=workload.model, prompt_tokens=4, max_tokens=2, seed=workload.seed)
    deadline = time.monotonic() + timeout_s
    for attempt in range(1_000_000):
        res = await _one(call, target, target.request(tiny, attempt, "ready"), max(1.0, min(10.0, timeout_s)))
        if res.ok:
            return
        # Only the mesh's own UNAVAILABLE (it has a reason, e.g. NO_HEALTHY_REPLICA) is worth waiting out; a
        # refused connection (a stale state file) fails fast.
        if res.error != "UNAVAILABLE" or not res.reason or time.monotonic() >= deadline:
            why = " ".join(x for x in (res.error, res.reason, res.message) if x)
            print(f"bench {target.mode}: warm-up request failed: {why}", file=sys.stderr, flush=True)
            return
        await asyncio.sleep(0.2)


async def run_load(
    target: Target,
    workload: Workload,
    concurrency: int,
    requests: int,
    *,
    timeout_s: float = 300.0,
    ready_timeout_s: float = 0.0,
    progress: bool = True,
) -> dict:
    """Drive `requests` streamed generations at `target`, `concurrency` in flight (closed loop), over one channel;
    the summary record."""
    channel = open_channel(target.address, target.tls)
    try:
        call = target.stub(channel)
        if ready_timeout_s > 0:
            await wait_ready(call, target, workload, ready_timeout_s)
        results: list[RequestResult | None] = [None] * requests
        indices = iter(range(requests))  # shared by the workers: each takes the next request when one ends
        meter = Progress(target.mode, requests, enabled=progress)

        async def worker() -> None:
            for i in indices:
                res = await _one(call, target, target.request(workload, i), timeout_s)
                results[i] = res
                meter.add(res)

        reporter = asyncio.create_task(meter.report())
        start = time.perf_counter()
        try:
            await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
        finally:
            duration = time.perf_counter() - start
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter
    finally:
        await channel.close(grace=None)
    return summarize(
        [r for r in results if r is not None],
        duration,
        mode=target.mode,
        concurrency=concurrency,
        target=target.address,
        model=workload.model,
        prompt_tokens=workload.prompt_tokens,
        max_tokens=workload.max_tokens,
        seed=workload.seed,
    )


async def run(args: argparse.Namespace) -> dict:
    """The whole benchmark for parsed flags: one record, or {direct, mesh, ratio} with --compare."""
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    workload = Workload(
        model=args.model, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=seed
    )
    async with contextlib.AsyncExitStack() as stack:
        if args.spawn:
            state = await stack.enter_async_context(SpawnedFleet(args.engines or 1, args.speed_factor or 1.0))
            # The spawned fleet's own key, whatever $FLEETSERVE_API_KEY says (it belongs to another cluster).
            targets = resolve_targets(args, lambda: state, use_env=False)
        else:
            targets = resolve_targets(args, lambda: _read_state(args.data_dir))
        records = {}
        for mode, target in targets.items():
            records[mode] = await run_load(
                target,
                workload,
                args.concurrency,
                args.requests,
                timeout_s=args.timeout,
                ready_timeout_s=args.ready_timeout,
                progress=not args.quiet,
            )
    if args.compare:
        return compare(records["direct"], records["mesh"])
    return next(iter(records.values()))


def _run_async(coro):
    try:
        import uvloop
    except ImportError:  # Windows: plain asyncio
        return asyncio.run(coro)
    return uvloop.run(coro)


def _no_running_loop() -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(
        "loadtest.bench.main() blocks and runs its own loop: call it where no event loop runs "
        "(e.g. asyncio.to_thread(main, argv)), or await run(parse_args(argv))"
    )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its JSON on stdout. 0 when the run completed (request errors are in the JSON),
    2 on bad flags or no cluster to run against, 1 when a spawned fleet failed to start, 130 on Ctrl-C."""
    _no_running_loop()
    raw = sys.argv[1:] if argv is None else argv
    if "--autoscale" in raw:  # scaling decisions in virtual time: its own flags (loadtest/autoscale_bench.py)
        from loadtest import autoscale_bench

        return autoscale_bench.main([a for a in raw if a != "--autoscale"])
    try:
        args = parse_args(argv)
    except SystemExit as e:  # argparse: 2 on bad flags, 0 for --help
        return e.code if isinstance(e.code, int) else 2
    if args.compare_policies:
        from loadtest import policy_bench

        return policy_bench.main(args)
    if args.gateway_overhead:
        from loadtest import gateway_bench

        return gateway_bench.main(args)
    try:
        with structlog_to_stderr() if args.spawn else contextlib.nullcontext():
            record = _run_async(run(args))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:  # a spawned fleet that would not start
        print(f"error: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(record, indent=2) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
