"""`python -m loadtest.hop_bench`: what a relaying hop costs on this machine, each hop against a bare grpc.aio
pass-through (loadtest/bare_hop.py) measured in the same run. A token source that streams pre-built chunks as
fast as it can stands in for the engine, so the hops are what is measured:

    direct    client -> source
    bare      client -> bare hop -> source             router    client -> router -> source
    bare2     client -> bare -> bare -> source         gateway   client -> gateway -> source
                                                        mesh      client -> gateway -> router -> source
                                                        embedded  client -> gateway + its router -> source
                                                                  (gateway --embedded-router: one process)
    (router and gateway again with --workers 2: router2, gateway2, mesh2, embedded2; with coalescing off: router-nc,
    gateway-nc, mesh-nc; with Python's default garbage-collector thresholds: mesh-gc0; without the services'
    periodic full collections, FLEETSERVE_GC_FULL_EVERY_S=0: mesh-gcf0; with the relays' hold of a lone chunk
    on a busy hop after a writer turn of S seconds (FLEETSERVE_RELAY_HOLD_AFTER_S, default 0.001) or never:
    router-hold0.002, mesh-holdoff; with the client on the
    gateway's OpenAI HTTP endpoint, streaming SSE, as `vllm bench serve` is: gateway-http, mesh-http; the bare
    hop reading upstream through ChunkRelay's pump, as ours do: bare-relay, bare2-relay; the bare hop's handler
    inside our services' channel, server, logging and heap set-up: bare-ours, bare-relay-ours; the real sim
    engine as the source instead, registered with the registry: any mode with -sim, e.g. direct-sim, bare2-sim,
    mesh-sim, mesh-sim@base: the requests' max_tokens is 64 whatever --tokens says)

A/B of two versions of the code in one run: `--base-tree DIR` (a checkout of the other commit, e.g. `git
worktree add DIR main`) and a mode with the suffix `@base` runs every process of that mode from DIR. A suffix
`#N` only makes a second label for the same mode (an A/A pair: `mesh@base,mesh,mesh@base#2`).

Per mode: relayed tokens/s at --streams (capacity; our hops merge the chunks a lagging reader has pending, so
messages and tokens differ), TTFT p50 at one stream and what it adds over direct, TTFT p50/p99 under load, and
the CPU each hop process spends per request and per token (psutil). With --flames, py-spy samples
each hop at --streams and the page gets the top frames (self time) of each."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc

MODEL = "sim-1b"


# -- the token source -------------------------------------------------------------------------------------------


def chunks(n: int) -> list[bytes]:
    """One request's response messages: served_by first, one token each, finish and usage last."""
    from fleetserve.common.v1 import common_pb2
    from fleetserve.engine.v1 import engine_service_pb2 as pb

    out = []
    for i in range(n):
        r = pb.GenerateResponse()
        r.chunk.text = f" tok{i}"
        r.chunk.token_ids.append(1000 + i)
        if i == 0:
            r.chunk.served_by.model = MODEL
            r.chunk.served_by.replica_id = "source"
        if i == n - 1:
            r.chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
            r.chunk.usage.prompt_tokens = 8
            r.chunk.usage.completion_tokens = n
        out.append(r.SerializeToString())
    return out


class Source(grpc.GenericRpcHandler):
    """Answers any */Generate (engine, router or inference: the messages are wire-identical) with the chunks."""

    def __init__(self, tokens: int) -> None:
        self.msgs = chunks(tokens)

    def service(self, details: grpc.HandlerCallDetails):
        if not details.method.endswith("/Generate"):
            return None
        msgs = self.msgs

        async def generate(request: bytes, context):
            for m in msgs:
                yield m

        return grpc.unary_stream_rpc_method_handler(generate)


async def run_source(args) -> None:
    from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
    from grpc_health.v1 import health, health_pb2_grpc

    from shared.server import wait_for_signal, write_ready_file

    server = grpc.aio.server(handlers=[Source(args.tokens)])
    h = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(h, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    address = f"127.0.0.1:{port}"
    registration = None
    if args.registry:
        from fleetserve.common.v1 import common_pb2

        from services.engine.registration import Registration

        registration = Registration(
            args.registry,
            reg_pb.Replica(replica_id="source", address=address, model=MODEL, backend="sim"),
            common_pb2.ReplicaLoad,
        )
        registration.start()
    write_ready_file(args.ready_file, address=address)
    await wait_for_signal()
    if registration is not None:
        await registration.close()
    await server.stop(0)


# -- processes ----------------------------------------------------------------------------------------------------


class Procs:
    """Processes of one mode, each with a ready file; stopped with SIGTERM (killed after a while)."""

    def __init__(self, tmp: Path, cwd: str | None = None) -> None:
        self.tmp = tmp
        self.cwd = cwd  # the source tree the processes run from (None: this one)
        self.procs: dict[str, subprocess.Popen] = {}
        self.addresses: dict[str, str] = {}
        self.info: dict[str, dict] = {}

    def start(self, name: str, argv: list[str], timeout_s: float = 60.0, env: dict | None = None) -> str:
        ready = self.tmp / f"{name}.json"
        ready.unlink(missing_ok=True)
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        if self.cwd:
            # `python -m` puts the working directory first on sys.path: services/ and shared/ come from there.
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.cwd, env.get("PYTHONPATH", "")]))
        p = subprocess.Popen(
            [sys.executable, "-m", *argv, "--ready-file", str(ready)],
            stdout=log,
            stderr=log,
            env=env,
            cwd=self.cwd,
        )
        self.procs[name] = p
        deadline = time.monotonic() + timeout_s
        while not ready.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {(self.tmp / f'{name}.log').read_text()[-2000:]}")
            time.sleep(0.05)
        self.info[name] = json.loads(ready.read_text())
        self.addresses[name] = self.info[name]["address"]
        return self.addresses[name]

    def pids(self, name: str) -> list[int]:
        """The process and its workers (a supervisor's spawned children)."""
        import psutil

        root = psutil.Process(self.procs[name].pid)
        return [root.pid, *(c.pid for c in root.children(recursive=True))]

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)


def start_mode(mode: str, tmp: Path, args) -> tuple[Procs, str, list[str], str]:
    """Start one mode's processes; (procs, client target, hop names, request kind). When one fails to start,
    those started before it are stopped."""
    mode = mode.split("#")[0]
    if mode.endswith("@base"):
        if not args.base_tree:
            raise SystemExit(f"mode {mode}: --base-tree is needed")
        procs = Procs(tmp, cwd=str(Path(args.base_tree).resolve()))
        mode = mode.removesuffix("@base")
    else:
        procs = Procs(tmp)
    try:
        return _start_mode(procs, mode, tmp, args)
    except BaseException:
        procs.stop()
        raise


def _start_mode(procs: Procs, mode: str, tmp: Path, args) -> tuple[Procs, str, list[str], str]:
    common = ["--log-json", "--grace-period-s", "1"]
    embedded = mode.startswith("embedded")  # the router inside the gateway: a registry, no router process
    needs_router = mode.startswith("router") or mode.startswith("mesh") or embedded
    registry = ""
    if needs_router:
        registry = procs.start(
            "registry", ["services.registry", "--db-path", str(tmp / f"{mode}-reg.db"), *common]
        )
    base, *variants = mode.split("-")
    if "sim" in variants:
        # -sim: the real engine (the sim backend, its gRPC service) is the source, so what the engine service
        # does on the first token's path (its initial metadata, its first chunk) is in the numbers. Its modelled
        # GPU time (prefill, one step per token) runs --sim-speed times faster than real time.
        source = procs.start(
            "engine",
            ["services.engine", "--replica-id", "sim", "--model", MODEL, "--startup-s", "0",
             "--speed-factor", str(args.sim_speed), "--log-json", "--grace-period-s", "1"]
            + (["--registry-address", registry] if registry else []),
        )  # fmt: skip
    else:
        source = procs.start(
            "source",
            ["loadtest.hop_bench", "source", "--tokens", str(args.tokens)]
            + (["--registry", registry] if registry else []),
        )
    workers = "2" if base.endswith("2") else "1"  # router2, mesh2-nc, ...: --workers 2
    http = "http" in variants
    if "nc" in variants:
        common = [*common, "--no-coalesce"]
    # -gc0: the hops with Python's default collector thresholds instead of the services' (shared/server.py);
    # -gcf0: without the periodic full collections (settle_heap's collect_fully_forever).
    hop_env = {"FLEETSERVE_GC_THRESHOLD": "700,10,10"} if "gc0" in variants else {}
    if "gcf0" in variants:
        hop_env["FLEETSERVE_GC_FULL_EVERY_S"] = "0"
    # -holdS: a relay holds a lone chunk only after a writer's turn of S seconds (-holdoff: never).
    for v in variants:
        if v.startswith("hold"):
            hop_env["FLEETSERVE_RELAY_HOLD_AFTER_S"] = "inf" if v == "holdoff" else v[4:]
    hops: list[str] = []
    if base == "direct":
        return procs, source, hops, "engine"
    if base in ("bare", "bare2"):
        up = source
        extra = (["--relay"] if "relay" in variants else []) + (["--ours"] if "ours" in variants else [])
        for i in range(1 if base == "bare" else 2):
            up = procs.start(f"bare{i}", ["loadtest.bare_hop", "--upstream", up, *extra])
            hops.append(f"bare{i}")
        return procs, up, hops, "engine"
    router = ""
    if needs_router and not embedded:
        router_args = ["services.router", "--registry-address", registry, "--workers", workers, *common]
        router = procs.start("router", router_args, env=hop_env)
        hops.append("router")
        _await_routable(router)
        if mode.startswith("router"):
            return procs, router, hops, "router"
    routers = ",".join(procs.info.get("router", {}).get("worker_addresses") or [router or source])
    key = "fsk-bench-" + "k" * 20
    if embedded:
        # The router's own flags: what the router process of the mesh modes gets beyond the common ones.
        flags = ["--no-coalesce"] if "nc" in variants else []
        upstream = ["--embedded-router", "--registry-address", registry, f"--router-flags={' '.join(flags)}"]
    else:
        upstream = ["--router-address", routers]
    gw = [
        "services.gateway", *upstream, "--workers", workers, "--db-path", str(tmp / f"{mode}-gw.db"),
        "--http-port", "0" if http else "-1", "--extra-models", MODEL, *common,
    ]  # fmt: skip
    # A secret never goes on a command line: the gateway refuses it as a flag.
    gateway = procs.start("gateway", gw, env={"FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY": key, **hop_env})
    hops.append("gateway")
    if embedded:
        info = procs.info["gateway"]
        for address in info.get("router_addresses") or [info["router_address"]]:
            _await_routable(address)  # each worker's router has seen the source
    procs.api_key = key  # type: ignore[attr-defined]
    if http:
        return procs, procs.info["gateway"]["http_address"], hops, "http"
    return procs, gateway, hops, "gateway"


def _await_routable(router: str) -> None:
    from fleetserve.router.v1 import router_service_pb2 as pb

    ch = grpc.insecure_channel(router)
    status = ch.unary_unary(
        "/fleetserve.router.v1.RouterService/GetStatus",
        request_serializer=pb.GetStatusRequest.SerializeToString,
        response_deserializer=pb.GetStatusResponse.FromString,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if any(r.routable for r in status(pb.GetStatusRequest(), timeout=2).replicas):
                ch.close()
                return
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the router never saw the source")


# -- the client ---------------------------------------------------------------------------------------------------


def request_bytes(kind: str, i: int, request_id: str = "") -> bytes:
    """Request i (one of 64 prompts) for a hop of `kind`; engine and router requests carry request_id (by
    default r{i}: give each request its own, an engine refuses an id it is still serving)."""
    from fleetserve.common.v1 import common_pb2
    from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
    from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
    from fleetserve.router.v1 import router_service_pb2 as router_pb

    prompt = f"request {i} " + "word " * 32
    sampling = common_pb2.SamplingParams(max_tokens=64, ignore_eos=True)
    spec = common_pb2.GenerationSpec(model=MODEL, prompt=prompt, sampling=sampling)
    request_id = request_id or f"r{i}"
    if kind == "engine":
        return engine_pb.GenerateRequest(request_id=request_id, spec=spec).SerializeToString()
    if kind == "router":
        return router_pb.GenerateRequest(request_id=request_id, spec=spec).SerializeToString()
    return inf_pb.GenerateRequest(
        model=MODEL, prompt=prompt, max_tokens=64, ignore_eos=True
    ).SerializeToString()


def unique_ids(kind: str) -> Callable[[int], bytes]:
    """For engine and router requests: request i's request_id field, unique in this run and across runs
    (a prefix of its own per run, then i), as bytes to append to request_bytes(kind, i % 64): protobuf's
    last value of a field wins, so the prompt's bytes are built once. b"" for the gateway (it makes the id)."""
    if kind not in ("engine", "router"):
        return lambda i: b""
    from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

    run = os.urandom(4).hex()
    # request_id is field 1 in both requests (checked against the router's in the tests).
    return lambda i: engine_pb.GenerateRequest(request_id=f"{run}-r{i}").SerializeToString()


METHODS = {
    "engine": "/fleetserve.engine.v1.EngineService/Generate",
    "router": "/fleetserve.router.v1.RouterService/Generate",
    "gateway": "/fleetserve.inference.v1.InferenceService/Generate",
}


class Tally:
    """One load run's counts, as both clients (gRPC and HTTP/SSE) keep them."""

    __slots__ = ("messages", "tokens", "requests", "ttfts", "gaps", "errors")

    def __init__(self) -> None:
        self.messages = self.tokens = self.requests = 0
        self.ttfts: list[float] = []
        self.gaps: list[float] = []  # between one stream's consecutive messages (ITL as a client sees it)
        self.errors: collections.Counter[str] = collections.Counter()

    def result(self, wall: float) -> dict:
        ttfts = self.ttfts
        gaps = sorted(self.gaps)

        def gap(q: float) -> float | None:
            return round(gaps[int(q * (len(gaps) - 1))] * 1000, 3) if gaps else None

        return {
            "tokens_per_s": self.tokens / wall,
            "messages_per_s": self.messages / wall,
            "requests": self.requests,
            "wall_s": wall,
            "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else None,
            "ttft_p99_ms": sorted(ttfts)[int(0.99 * (len(ttfts) - 1))] * 1000 if ttfts else None,
            "itl_p50_ms": gap(0.5),
            "itl_p99_ms": gap(0.99),
            "itl_p999_ms": gap(0.999),
            "itl_max_ms": gap(1.0),
            "errors": dict(self.errors),
        }


async def closed_loop(
    streams: int, duration_s: float, gap_s: float, one_request: Callable[[int], Awaitable[None]]
) -> float:
    """`streams` loops for duration_s, each awaiting one_request(i) after the other (stream k sends i = k,
    k + streams, ...) and pausing gap_s after each (a client that is not back at once, as when each request
    streams for a while on a GPU); the wall time taken."""
    clock = time.perf_counter
    end = clock() + duration_s

    async def one_stream(i: int) -> None:
        while clock() < end:
            await one_request(i)
            i += streams
            if gap_s:
                await asyncio.sleep(gap_s)

    t0 = clock()
    await asyncio.gather(*(one_stream(k) for k in range(streams)))
    return clock() - t0


async def load(
    target: str,
    kind: str,
    streams: int,
    duration_s: float,
    api_key: str,
    gap_s: float = 0.0,
    cancel_every: int = 0,
) -> dict:
    """A closed loop of `streams` requests for duration_s: messages, tokens, requests, TTFTs. cancel_every N > 0:
    every Nth request is cancelled by the client after its 8th message (counted under errors as CANCELLED_BY_CLIENT),
    as a soak's clients that go away do (a cancelled stream leaves reference cycles for the collector)."""
    if kind == "http":
        return await load_http(target, streams, duration_s, api_key, gap_s)
    from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

    parse = engine_pb.GenerateResponse.FromString  # the three hops' responses are wire-identical
    channel = grpc.aio.insecure_channel(target)
    call = channel.unary_stream(METHODS[kind])
    metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()
    reqs = [request_bytes(kind, i) for i in range(64)]
    ids = unique_ids(kind)
    tally = Tally()
    clock = time.perf_counter

    async def one_request(i: int) -> None:
        body = reqs[i % len(reqs)] + ids(i)
        t0 = clock()
        first = True
        last = 0.0
        cancel_at = 8 if cancel_every and i % cancel_every == 0 else -1
        try:
            stream = call(body, metadata=metadata, timeout=60)
            while (m := await stream.read()) is not grpc.aio.EOF:
                now = clock()
                if first:
                    tally.ttfts.append(now - t0)
                    first = False
                else:
                    tally.gaps.append(now - last)
                last = now
                tally.messages += 1
                tally.tokens += len(parse(m).chunk.token_ids)
                if cancel_at > 0 and (cancel_at := cancel_at - 1) == 0:
                    stream.cancel()
                    tally.errors["CANCELLED_BY_CLIENT"] += 1
                    return
            tally.requests += 1
        except grpc.aio.AioRpcError as e:
            tally.errors[e.code().name] += 1

    wall = await closed_loop(streams, duration_s, gap_s, one_request)
    await channel.close()
    return tally.result(wall)


async def load_http(target: str, streams: int, duration_s: float, api_key: str, gap_s: float = 0.0) -> dict:
    """load() over the gateway's OpenAI endpoint: POST /v1/completions with stream=true, as `vllm bench serve`
    does; TTFT is the first SSE event with text, a message is an event with text (a merged one may hold
    several tokens: tokens are counted from the usage of the last event)."""
    import aiohttp

    url = f"http://{target}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    bodies = [
        json.dumps({"model": MODEL, "prompt": f"request {i} " + "word " * 32, "max_tokens": 64,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
        for i in range(64)
    ]  # fmt: skip
    tally = Tally()
    clock = time.perf_counter
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def one_request(i: int) -> None:
            t0 = clock()
            first = True
            try:
                async with session.post(url, data=bodies[i % len(bodies)],
                                        headers={"Content-Type": "application/json"}) as resp:  # fmt: skip
                    if resp.status != 200:
                        tally.errors[str(resp.status)] += 1
                        await resp.read()
                        return
                    async for line in resp.content:
                        if not line.startswith(b"data: {"):
                            continue
                        event = json.loads(line[6:])
                        if event.get("choices") and event["choices"][0].get("text"):
                            if first:
                                tally.ttfts.append(clock() - t0)
                                first = False
                            tally.messages += 1
                        if event.get("usage"):
                            tally.tokens += event["usage"]["completion_tokens"]
                tally.requests += 1
            except aiohttp.ClientError as e:
                tally.errors[type(e).__name__] += 1

        wall = await closed_loop(streams, duration_s, gap_s, one_request)
    return tally.result(wall)


def cpu_seconds(pids: list[int]) -> float:
    import psutil

    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def flame(pids: list[int], seconds: float, out: Path) -> list[tuple[str, float]]:
    """py-spy samples of the hop's processes for `seconds` (raw collapsed stacks); its top self-time frames."""
    spy = Path(sys.executable).with_name("py-spy")
    procs = []
    for pid in pids:
        f = out.with_name(f"{out.stem}-{pid}.txt")
        procs.append((subprocess.Popen([str(spy), "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "200",
                                        "-f", "raw", "-o", str(f), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f))  # fmt: skip
    self_time: collections.Counter[str] = collections.Counter()
    total = 0
    for p, f in procs:
        p.wait(seconds + 30)
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            if not n.isdigit():
                continue
            frame = stack.split(";")[-1]
            frame = (
                frame.split(" (")[0] + " (" + frame.split(" (")[-1].split("/")[-1] if " (" in frame else frame
            )
            self_time[frame] += int(n)
            total += int(n)
        f.unlink()
    return [(k, round(v / total, 3)) for k, v in self_time.most_common(12)] if total else []


def gc_fulls(log: Path, since: int) -> list[dict]:
    """The process.gc_full lines a hop logged after byte offset `since` (full collections during a run)."""
    out = []
    with open(log, "rb") as f:
        f.seek(since)
        for line in f:
            if b'"process.gc_full"' in line:
                e = json.loads(line)
                out.append({k: e.get(k) for k in ("unreachable", "ms", "cpu_ms", "next_s")})
    return out


def measure(
    mode: str,
    target: str,
    kind: str,
    key: str,
    hop_pids: dict[str, list[int]],
    args,
    logs: dict | None = None,
) -> dict:
    """One run of a started mode: one stream for --c1-seconds, then --streams for --seconds (when > 1), with
    the CPU its hop processes used and the full collections they logged meanwhile."""
    rec: dict = {"mode": mode, "hops": list(hop_pids), "load_average_before": list(os.getloadavg())}
    runs = [(1, args.c1_seconds)] + ([(args.streams, args.seconds)] if args.streams > 1 else [])
    for streams, duration in runs:
        before = {h: cpu_seconds(p) for h, p in hop_pids.items()}
        offsets = {h: f.stat().st_size for h, f in (logs or {}).items()}
        gap = args.c1_gap_s if streams == 1 else 0.0
        cancel_every = getattr(args, "cancel_every", 0) if streams > 1 else 0
        r = asyncio.run(load(target, kind, streams, duration, key, gap, cancel_every))
        used = {h: cpu_seconds(p) - before[h] for h, p in hop_pids.items()}
        r["hop_cpu_cores"] = {h: round(u / r["wall_s"], 3) for h, u in used.items()}
        r["hop_cpu_ms_per_request"] = {h: round(1000 * u / max(1, r["requests"]), 3) for h, u in used.items()}
        msgs = r["messages_per_s"] * r["wall_s"]
        r["hop_cpu_us_per_message"] = {h: round(1e6 * u / max(1, msgs), 2) for h, u in used.items()}
        toks = r["tokens_per_s"] * r["wall_s"]
        r["hop_cpu_us_per_token"] = {h: round(1e6 * u / max(1, toks), 2) for h, u in used.items()}
        r["load_average_after"] = list(os.getloadavg())
        r["gc_full"] = {h: gc_fulls(f, offsets[h]) for h, f in (logs or {}).items()}
        rec[f"c{streams}"] = r
        print(f"hop_bench: {mode} c={streams}: {json.dumps(r)}", file=sys.stderr, flush=True)
    return rec


def run_all_up(modes: list[str], args, tmp: Path, runs: dict[str, list[dict]], save) -> None:
    """--all-up: every mode's processes started once, side by side (an idle fleet costs nothing), then the
    measurements interleaved mode by mode, --repeats times: no start-up between them, so many short
    repeats fit in one hold of the machine."""
    fleets: dict[str, tuple] = {}
    try:
        for i, mode in enumerate(modes):
            d = tmp / f"fleet{i}"
            d.mkdir()
            procs, target, hops, kind = start_mode(mode, d, args)
            fleets[mode] = (procs, target, kind, getattr(procs, "api_key", ""), hops)
            asyncio.run(load(target, kind, 8, 1.0, fleets[mode][3]))  # warm up
        pids = {m: {h: f[0].pids(h) for h in f[4]} for m, f in fleets.items()}
        for rep in range(args.repeats):
            order = modes if rep % 2 == 0 else modes[::-1]  # neither side always measured first
            for mode in order:
                _, target, kind, key, _ = fleets[mode]
                logs = {h: fleets[mode][0].tmp / f"{h}.log" for h in fleets[mode][4]}
                runs[mode].append(measure(mode, target, kind, key, pids[mode], args, logs))
                save()
    finally:
        for f in fleets.values():
            f[0].stop()


def run_mode(mode: str, args, tmp: Path, flames: bool = False) -> dict:
    procs, target, hops, kind = start_mode(mode, tmp, args)
    key = getattr(procs, "api_key", "")
    try:
        asyncio.run(load(target, kind, 8, 1.0, key))  # warm up: channels, caches, first-call paths
        hop_pids = {h: procs.pids(h) for h in hops}
        rec = measure(mode, target, kind, key, hop_pids, args, {h: procs.tmp / f"{h}.log" for h in hops})
        if flames and hops and args.streams > 1:
            box: dict = {}

            async def loaded():
                box["r"] = await load(target, kind, args.streams, args.flame_seconds + 2, key)

            import threading

            t = threading.Thread(target=lambda: asyncio.run(loaded()))
            t.start()
            time.sleep(1.0)
            rec["flames"] = {
                h: flame(p, args.flame_seconds, tmp / f"{mode}-{h}") for h, p in hop_pids.items()
            }
            t.join()
    finally:
        procs.stop()
    return rec


def median_record(recs: list[dict]) -> dict:
    """One mode's repeats as one record: every number the median over the repeats (per hop for per-hop
    numbers), flames from the repeat that took them, the repeats themselves under "repeats"."""

    def med(values: list):
        if all(isinstance(v, dict) for v in values):
            return {k: med([v[k] for v in values if k in v]) for k in values[0]}
        nums = [v for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
        return statistics.median(nums) if len(nums) == len(values) and nums else values[-1]

    out = {"mode": recs[0]["mode"], "hops": recs[0]["hops"]}
    for key in recs[0]:
        if key.startswith("c") and key[1:].isdigit():
            out[key] = med([r[key] for r in recs])
    for r in recs:
        if "flames" in r:
            out["flames"] = r["flames"]
    if len(recs) > 1:
        out["repeats"] = recs
    return out


def markdown(doc: dict) -> str:
    by = {r["mode"]: r for r in doc["records"]}
    n = doc["streams"]
    if n <= 1:
        return markdown_c1(doc)
    cn = f"c{n}"
    base1 = by.get("direct", {}).get("c1", {}).get("ttft_p50_ms") or 0
    lines = [
        f"| mode | tokens/s at {n} streams | vs bare | msgs/s | TTFT p50 c=1 ms | added vs direct | "
        f"TTFT p50 / p99 at {n} ms | ITL p99 / max at {n} ms | hop CPU ms/request (c=1) | "
        f"hop CPU us/token (c={n}) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in by.items():
        cap = r[cn].get("tokens_per_s", r[cn]["messages_per_s"])
        vs = ""
        ref = reference(mode)
        if ref and ref in by:
            rc = by[ref][cn]
            vs = f"{cap / rc.get('tokens_per_s', rc['messages_per_s']):.2f} of {ref}"
        c1, cl = r["c1"], r[cn]
        per_token = cl.get("hop_cpu_us_per_token", cl["hop_cpu_us_per_message"])
        lines.append(
            f"| {mode} | {cap:,.0f} | {vs} | {cl['messages_per_s']:,.0f} | {c1['ttft_p50_ms']:.2f} | "
            f"{c1['ttft_p50_ms'] - base1:+.2f} | {cl['ttft_p50_ms']:,.0f} / {cl['ttft_p99_ms']:,.0f} | "
            f"{cl.get('itl_p99_ms') or 0:,.1f} / {cl.get('itl_max_ms') or 0:,.0f} | "
            f"{sum(c1['hop_cpu_ms_per_request'].values()):.2f} | {sum(per_token.values()):.1f} |"
        )
    return "\n".join(lines) + "\n"


def markdown_c1(doc: dict) -> str:
    """The one-stream table (--streams 0 or 1): TTFT p50 and hop CPU per request, median and range over the
    repeats, and each mode's TTFT against its pair's in the same repeat (MODE against MODE@base)."""
    by = {r["mode"]: r for r in doc["records"]}

    def each(r: dict, f) -> list[float]:
        return [f(x["c1"]) for x in r.get("repeats", [r])]

    def span(values: list[float], fmt: str) -> str:
        return f"{statistics.median(values):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    lines = [
        "| mode | TTFT p50 c=1 ms, median [range] | paired vs @base, median [range] | hop CPU ms/request | requests |",
        "|---|---|---|---|---|",
    ]
    for mode, r in by.items():
        ttft = each(r, lambda c: c["ttft_p50_ms"])
        cpu = each(r, lambda c: sum(c["hop_cpu_ms_per_request"].values()))
        pair = ""
        # MODE against MODE@base; an A/A label (MODE@base#2) against MODE@base.
        plain = mode.split("#")[0]
        base = plain if plain.endswith("@base") else plain + "@base"
        if base != mode and base in by:
            diffs = [a - b for a, b in zip(ttft, each(by[base], lambda c: c["ttft_p50_ms"]), strict=False)]
            pair = span(diffs, "+.3f") + " ms"
        reqs = sum(each(r, lambda c: c["requests"]))
        lines.append(f"| {mode} | {span(ttft, '.3f')} | {pair} | {span(cpu, '.3f')} | {reqs:,.0f} |")
    return "\n".join(lines) + "\n"


def reference(mode: str) -> str:
    """The bare-hop mode a mode is compared with (the same number of hops)."""
    if mode in ("direct", "bare"):
        return ""
    if mode == "bare2" or mode.startswith("mesh"):
        return "bare2" if mode != "bare2" else "bare"
    return "bare"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.hop_bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("source")
    s.add_argument("--tokens", type=int, default=64)
    s.add_argument("--registry", default="")
    s.add_argument("--ready-file", default="")
    p.add_argument(
        "--modes",
        default="direct,bare,router,gateway,bare2,mesh,router-nc,gateway-nc,mesh-nc,mesh-gc0,router2,gateway2,mesh2",
    )
    p.add_argument("--streams", type=int, default=256)
    p.add_argument("--tokens", type=int, default=64, help="messages per request")
    p.add_argument(
        "--sim-speed",
        type=float,
        default=10.0,
        help="-sim modes: the engine's speed factor (10: TTFT ~1 ms, a token every ~0.25 ms at c=1)",
    )
    p.add_argument("--seconds", type=float, default=8.0, help="each capacity run")
    p.add_argument("--c1-seconds", type=float, default=4.0, help="each one-stream run")
    p.add_argument(
        "--c1-gap-s", type=float, default=0.0, help="the one-stream client's pause after each request"
    )
    p.add_argument(
        "--cancel-every",
        type=int,
        default=0,
        help="at --streams, the client cancels every Nth request after its 8th message (0: none)",
    )
    p.add_argument("--flames", action="store_true", help="py-spy each hop at --streams (needs py-spy)")
    p.add_argument("--flame-seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=1, help="runs of every mode, interleaved; medians reported")
    p.add_argument("--base-tree", default="", help="the checkout that modes named MODE@base run from")
    p.add_argument(
        "--all-up", action="store_true", help="start every mode once, then interleave the runs (no flames)"
    )
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.cmd == "source":
        import uvloop

        uvloop.run(run_source(args))
        return 0
    # A time limit's SIGTERM unwinds through run_mode's finally, which stops the mode's processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    modes = [m for m in args.modes.split(",") if m]
    runs: dict[str, list[dict]] = {m: [] for m in modes}

    def document(complete: bool) -> dict:
        done = [m for m in modes if runs[m]]
        return {
            "command": "python -m loadtest.hop_bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "cores": os.cpu_count(),
            "streams": args.streams,
            "tokens_per_request": args.tokens,
            "repeats": args.repeats,
            # False: cut short (a time limit); the repeats that finished are all in the records.
            "complete": complete,
            "load_average": list(os.getloadavg()),
            "records": [median_record(runs[m]) for m in done],
        }

    def save() -> None:
        if args.out:  # what is done so far survives a time limit
            Path(args.out).write_text(json.dumps(document(False), indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="hop-bench-") as tmp:
        try:
            if args.all_up:
                run_all_up(modes, args, Path(tmp), runs, save)
            for rep in range(0 if args.all_up else args.repeats):
                for mode in modes:  # interleaved: a busy spell of the machine hits every mode alike
                    flames = args.flames and rep == args.repeats - 1
                    runs[mode].append(run_mode(mode, args, Path(tmp), flames))
                    save()
        except SystemExit:
            if not any(runs.values()):
                raise
            print("hop_bench: stopped early; the JSON has the runs that finished", file=sys.stderr)
    doc = document(all(len(r) == args.repeats for r in runs.values()))
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
