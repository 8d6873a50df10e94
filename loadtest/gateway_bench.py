"""`fleetserve bench --gateway-overhead` / `python -m loadtest.gateway_bench`: what the gateway itself adds per
request. The same kind of request goes, interleaved in one run, straight to the router (the mesh without its
gateway), through the gateway over gRPC, and through the gateway's OpenAI-compatible HTTP (SSE); the JSON gives
each path's TTFT/TPOT/E2E percentiles and the differences, per request pair and of the percentiles."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as inference_pb
from fleetserve.router.v1 import router_service_pb2 as router_pb

from loadtest.fleet import SpawnedFleet, structlog_to_stderr
from loadtest.summary import RequestResult, StreamMeter, percentiles, summarize
from loadtest.workload import Workload
from shared.channels import open_channel
from shared.errors import details_of
from shared.tls import Tls, scheme

MODES = ("router", "gateway_grpc", "gateway_http")
GATEWAY_METHOD = "/fleetserve.inference.v1.InferenceService/Generate"
ROUTER_METHOD = "/fleetserve.router.v1.RouterService/Generate"
# The target from issue 5: streaming over HTTP adds at most this much to the first token compared with gRPC.
HTTP_TTFT_BUDGET_MS = 1.0

Runner = Callable[[int], Awaitable[RequestResult]]


def _stream_name(mode: str) -> str:
    # Each path gets prompts of its own, so no path finds another's prompt in the prefix cache.
    return f"overhead-{mode}"


async def _grpc_stream(call, request, metadata, timeout_s: float) -> RequestResult:
    clock = time.perf_counter
    meter = StreamMeter(clock())
    try:
        async for resp in call(request, metadata=metadata, timeout=timeout_s):
            meter.on_chunk(resp.chunk, clock())
        return meter.result(clock())
    except grpc.aio.AioRpcError as e:
        d = details_of(e)
        return meter.failed(clock(), e.code().name, d.reason, d.message)


def router_runner(channel: grpc.aio.Channel, workload: Workload, timeout_s: float) -> Runner:
    """Requests straight to the router, as the gateway would send them (same tenant, same tier)."""
    call = channel.unary_stream(
        ROUTER_METHOD,
        request_serializer=router_pb.GenerateRequest.SerializeToString,
        response_deserializer=router_pb.GenerateResponse.FromString,
    )

    async def run(i: int) -> RequestResult:
        spec = common_pb2.GenerationSpec(
            model=workload.model,
            prompt=workload.prompt(i, _stream_name("router")),
            sampling=workload.sampling(),
        )
        req = router_pb.GenerateRequest(
            request_id=uuid.uuid4().hex,
            spec=spec,
            routing=router_pb.RoutingContext(tenant_id="dev", priority=common_pb2.PRIORITY_STANDARD),
        )
        return await _grpc_stream(call, req, (), timeout_s)

    return run


def grpc_runner(channel: grpc.aio.Channel, api_key: str, workload: Workload, timeout_s: float) -> Runner:
    """InferenceService/Generate through the gateway."""
    call = channel.unary_stream(
        GATEWAY_METHOD,
        request_serializer=inference_pb.GenerateRequest.SerializeToString,
        response_deserializer=inference_pb.GenerateResponse.FromString,
    )
    metadata = (("authorization", f"Bearer {api_key}"),)

    async def run(i: int) -> RequestResult:
        return await _grpc_stream(
            call, workload.mesh_request(i, _stream_name("gateway_grpc")), metadata, timeout_s
        )

    return run


def http_runner(
    session: aiohttp.ClientSession, address: str, api_key: str, workload: Workload, timeout_s: float
) -> Runner:
    """POST /v1/completions with stream=true over a kept-alive connection. Per event the client does one
    line read and a prefix check; only the usage event at the end is parsed, so the client's own cost stays
    close to the gRPC client's one protobuf parse per chunk."""
    url = f"{address if '://' in address else 'http://' + address}/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"}
    timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def run(i: int) -> RequestResult:
        body = {
            "model": workload.model,
            "prompt": workload.prompt(i, _stream_name("gateway_http")),
            "max_tokens": workload.max_tokens,
            "ignore_eos": workload.ignore_eos,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        clock = time.perf_counter
        start = clock()
        ttft = None
        last = b""
        try:
            async with session.post(url, json=body, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    err = (await resp.json()).get("error", {})
                    return RequestResult(
                        None,
                        clock() - start,
                        0,
                        f"HTTP_{resp.status}",
                        err.get("code") or "",
                        err.get("message", ""),
                    )
                async for line in resp.content:
                    if not line.startswith(b"data: "):
                        continue
                    if ttft is None:
                        ttft = clock() - start
                    if line.startswith(b"data: [DONE]"):
                        break
                    last = line
        except (aiohttp.ClientError, TimeoutError) as e:
            return RequestResult(ttft, clock() - start, 0, "HTTP_ERROR", "", str(e))
        e2e = clock() - start
        event = json.loads(last[len(b"data: ") :])
        if "error" in event:
            return RequestResult(ttft, e2e, 0, "STREAM_ERROR", event["error"].get("code") or "", str(event))
        return RequestResult(ttft, e2e, int(event["usage"]["completion_tokens"]))

    return run


def _paired(a: list[RequestResult | None], b: list[RequestResult | None], metric: str) -> dict:
    """Percentiles of (a - b) over the rounds where both succeeded: the same moment's load on both paths."""
    diffs = []
    for x, y in zip(a, b, strict=True):
        if x is None or y is None or not x.ok or not y.ok:
            continue
        vx, vy = (x.ttft_s, y.ttft_s) if metric == "ttft" else (x.e2e_s, y.e2e_s)
        if vx is not None and vy is not None:
            diffs.append(vx - vy)
    return {"pairs": len(diffs), **percentiles(diffs)}


def _sub(a: dict, b: dict, key: str, p: str) -> float | None:
    x, y = a[key][p], b[key][p]
    return None if x is None or y is None else round(x - y, 3)


def overhead(
    records: dict[str, dict], results: dict[str, list[RequestResult | None]], a: str, b: str
) -> dict:
    """What path a adds over path b: paired per-round differences and differences of the percentiles (ms)."""
    out = {
        "paired_ttft_ms": _paired(results[a], results[b], "ttft"),
        "paired_e2e_ms": _paired(results[a], results[b], "e2e"),
    }
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for p in ("p50", "p99"):
            out[f"{key.removesuffix('_ms')}_{p}_ms_added"] = _sub(records[a], records[b], key, p)
    return out


async def measure(
    runners: dict[str, Runner],
    requests: int,
    concurrency: int,
    warmup: int,
    progress: bool = True,
) -> tuple[dict[str, list[RequestResult | None]], float]:
    """Rounds of one request per path, the order rotated each round so no path always goes first; `concurrency`
    rounds run at once. Warm-up rounds (connections, caches, JIT-free but allocator-warm) are not recorded."""
    modes = list(runners)
    results: dict[str, list[RequestResult | None]] = {m: [None] * requests for m in modes}

    async def round_(i: int, record: bool) -> None:
        k = i % len(modes)
        for mode in modes[k:] + modes[:k]:
            res = await runners[mode](i if record else requests + i)
            if record:
                results[mode][i] = res

    for i in range(warmup):
        await round_(i, record=False)
    rounds = iter(range(requests))
    done = 0

    async def worker() -> None:
        nonlocal done
        for i in rounds:
            await round_(i, record=True)
            done += 1
            if progress and done % max(1, requests // 10) == 0:
                print(f"gateway bench: {done}/{requests} rounds", file=sys.stderr, flush=True)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    return results, time.perf_counter() - start


async def run(args: argparse.Namespace) -> dict:
    """The whole gateway-overhead benchmark for parsed bench flags; one JSON record."""
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    workload = Workload(
        model=args.model, prompt_tokens=args.prompt_tokens, max_tokens=args.max_tokens, seed=seed
    )
    async with contextlib.AsyncExitStack() as stack:
        if args.spawn:
            state = await stack.enter_async_context(SpawnedFleet(args.engines or 1, args.speed_factor or 1.0))
        else:
            from loadtest.bench import _read_state

            state = _read_state(args.data_dir)
        api_key = args.api_key or state["api_key"]
        gateway = args.gateway or state["gateway"]
        http = state.get("gateway_http") or ""
        if not http:
            raise RuntimeError(
                "the cluster reports no gateway HTTP address (gateway_http): is HTTP turned off?"
            )
        tls = Tls.for_tools(state)  # a `fleetserve up --tls` fleet: its CA and the CLI's certificate
        router_ch = open_channel(state["router"], tls)
        gateway_ch = open_channel(gateway, tls)
        stack.push_async_callback(router_ch.close)
        stack.push_async_callback(gateway_ch.close)
        # One kept-alive connection per concurrent round, like a client library's pool.
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(
                limit=args.concurrency, ssl=tls.client_ssl_context() if tls is not None else True
            )
        )
        stack.push_async_callback(session.close)
        runners = {
            "router": router_runner(router_ch, workload, args.timeout),
            "gateway_grpc": grpc_runner(gateway_ch, api_key, workload, args.timeout),
            "gateway_http": http_runner(session, f"{scheme(tls)}://{http}", api_key, workload, args.timeout),
        }
        results, duration = await measure(
            runners, args.requests, args.concurrency, args.warmup, progress=not args.quiet
        )
    records = {
        m: summarize(
            [r for r in rs if r is not None],
            duration,
            mode=m,
            concurrency=args.concurrency,
            model=workload.model,
            prompt_tokens=workload.prompt_tokens,
            max_tokens=workload.max_tokens,
            seed=seed,
        )
        for m, rs in results.items()
    }
    grpc_over_router = overhead(records, results, "gateway_grpc", "router")
    http_over_grpc = overhead(records, results, "gateway_http", "gateway_grpc")
    http_ttft_added = http_over_grpc["paired_ttft_ms"]["p50"]
    load1, load5, _ = os.getloadavg()
    return {
        "benchmark": "gateway_overhead",
        "paths": {
            "router": "client -> router -> engine (gRPC)",
            "gateway_grpc": "client -> gateway -> router -> engine (gRPC)",
            "gateway_http": "client -> gateway (OpenAI HTTP, SSE) -> router -> engine",
        },
        "records": records,
        "gateway_grpc_minus_router": grpc_over_router,
        "gateway_http_minus_gateway_grpc": http_over_grpc,
        "target": {
            "http_ttft_added_p50_ms": http_ttft_added,
            "budget_ms": HTTP_TTFT_BUDGET_MS,
            "met": http_ttft_added is not None and http_ttft_added <= HTTP_TTFT_BUDGET_MS,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": round(load1, 2),
            "loadavg_5m_at_end": round(load5, 2),
        },
        "spawned": bool(args.spawn),
        "speed_factor": (args.speed_factor or 1.0) if args.spawn else None,
    }


def main(args: argparse.Namespace) -> int:
    """Run with the bench's parsed flags; print the JSON on stdout (and write it to --out when given)."""
    from loadtest.bench import UsageError, _run_async

    try:
        with structlog_to_stderr() if args.spawn else contextlib.nullcontext():
            record = _run_async(run(args))
    except KeyboardInterrupt:
        return 130
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(record, indent=2) + "\n"
    if getattr(args, "out", None):
        Path(args.out).write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    from loadtest import bench

    sys.exit(bench.main(["--gateway-overhead", *sys.argv[1:]]))
