"""`fleetserve bench --compare-policies a,b,c`: for each routing policy, a fresh sim fleet, the same workload sent
straight to its router (tenant and session in the routing context), and one JSON record of what it measured."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass

import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc

from loadtest.fleet import SpawnedFleet
from loadtest.summary import RequestResult, StreamMeter, summarize
from loadtest.workload import Conversation, PolicyWorkload
from shared.channels import open_channel
from shared.errors import details_of

ROUTER_METHOD = "/fleetserve.router.v1.RouterService/Generate"

# The sim fleet the published comparison runs on. The GPU profile defaults to h100-llama-8b (bench flag
# --sim-profile): routing for the prefix cache pays in proportion to prefill cost, which an 8B model makes
# visible (0.065 ms per prompt token against a 7 ms decode step) where a 1B model's is lost in its fixed
# per-request front-end time. The 2-core machine must not be what limits the run, so the modelled GPU runs
# 20x slower than real time (speed factor 0.05): a 7 ms step takes 140 ms, each engine takes < 10 steps/s and
# streams ~7 tokens/s per sequence, and a scheduling hiccup of the shared CPU is small against the modelled
# times, which keep the GPU's proportions (divide by 20 for H100 milliseconds). A KV cache of 4,096 blocks
# (64k tokens) per replica holds its share of the conversations but not all of them, as a real fleet's would.
DEFAULT_SPEED_FACTOR = 0.05
DEFAULT_ENGINE_ARGS = ("--num-kv-blocks", "4096")


@dataclass
class _Outcome:
    result: RequestResult
    text: str
    prompt_tokens: int
    cached_tokens: int


async def _one(call, request: router_pb.GenerateRequest, timeout_s: float) -> _Outcome:
    clock = time.perf_counter
    meter = StreamMeter(clock())
    parts: list[str] = []
    usage = None
    try:
        async for resp in call(request, timeout=timeout_s):
            chunk = resp.chunk
            meter.on_chunk(chunk, clock())
            if chunk.text:
                parts.append(chunk.text)
            if chunk.finish_reason:
                usage = chunk.usage
        result = meter.result(clock())
    except grpc.aio.AioRpcError as e:
        d = details_of(e)
        result = meter.failed(clock(), e.code().name, d.reason, d.message)
    prompt = usage.prompt_tokens if usage is not None else 0
    cached = usage.cached_tokens if usage is not None else 0
    return _Outcome(result, "".join(parts), prompt, cached)


def _request(
    conv: Conversation, messages: list[common_pb2.ChatMessage], model: str
) -> router_pb.GenerateRequest:
    return router_pb.GenerateRequest(
        request_id=f"pbench-{uuid.uuid4().hex}",
        spec=common_pb2.GenerationSpec(
            model=model,
            messages=messages,
            sampling=common_pb2.SamplingParams(max_tokens=conv.max_tokens, ignore_eos=True),
        ),
        routing=router_pb.RoutingContext(tenant_id=conv.tenant, session_id=conv.session),
    )


async def _converse(call, conv: Conversation, model: str, timeout_s: float, out: list[_Outcome]) -> None:
    """The turns of one conversation in order; each carries the history, replies as the model streamed them."""
    messages = [common_pb2.ChatMessage(role="system", content=conv.system)] if conv.system else []
    for turn in conv.turns:
        messages.append(common_pb2.ChatMessage(role="user", content=turn))
        o = await _one(call, _request(conv, messages, model), timeout_s)
        out.append(o)
        messages.append(common_pb2.ChatMessage(role="assistant", content=o.text))


async def drive(
    router: str, workload: PolicyWorkload, *, model: str = "sim-1b", timeout_s: float = 300.0
) -> tuple[list[_Outcome], float]:
    """Send the workload to the router: closed loop over `concurrency` conversation slots, or open loop at
    the conversations' start times. The outcomes and the run's duration."""
    channel = open_channel(router)
    out: list[_Outcome] = []
    try:
        call = channel.unary_stream(
            ROUTER_METHOD,
            request_serializer=router_pb.GenerateRequest.SerializeToString,
            response_deserializer=router_pb.GenerateResponse.FromString,
        )
        start = time.perf_counter()
        if workload.concurrency:
            pending = iter(workload.conversations)

            async def slot(i: int) -> None:
                await asyncio.sleep(i * workload.ramp_s)
                for conv in pending:
                    await _converse(call, conv, model, timeout_s, out)

            await asyncio.gather(*(slot(i) for i in range(workload.concurrency)))
        else:

            async def at(conv: Conversation) -> None:
                delay = start + (conv.start_s or 0.0) - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                await _converse(call, conv, model, timeout_s, out)

            await asyncio.gather(*(at(c) for c in workload.conversations))
        duration = time.perf_counter() - start
    finally:
        await channel.close(grace=None)
    return out, duration


async def wait_routable(router: str, replicas: int, model: str, timeout_s: float = 60.0) -> None:
    """Until the router routes to every replica and a tiny request succeeds (bounded by timeout_s)."""
    deadline = time.monotonic() + timeout_s
    async with open_channel(router) as channel:
        stub = router_grpc.RouterServiceStub(channel)
        while True:
            status = await stub.GetStatus(router_pb.GetStatusRequest(), timeout=5.0)
            if sum(r.routable for r in status.replicas) >= replicas:
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"router sees {len(status.replicas)} of {replicas} replicas")
            await asyncio.sleep(0.2)
        tiny = Conversation("warmup", "", "", ("hello",), 2)
        call = channel.unary_stream(
            ROUTER_METHOD,
            request_serializer=router_pb.GenerateRequest.SerializeToString,
            response_deserializer=router_pb.GenerateResponse.FromString,
        )
        o = await _one(
            call, _request(tiny, [common_pb2.ChatMessage(role="user", content="hello")], model), 30.0
        )
        if not o.result.ok:
            raise RuntimeError(f"warm-up request failed: {o.result.error} {o.result.message}")


def record(
    policy: str, workload: PolicyWorkload, outcomes: list[_Outcome], duration_s: float, **extra
) -> dict:
    """One policy's JSON record: the issue's fields first, then counts and settings."""
    s = summarize(
        [o.result for o in outcomes], duration_s, mode="router", concurrency=workload.concurrency or 0
    )
    ok = [o for o in outcomes if o.result.ok]
    prompt = sum(o.prompt_tokens for o in ok)
    cached = sum(o.cached_tokens for o in ok)
    return {
        "policy": policy,
        "workload": workload.name,
        "ttft_p50_ms": s["ttft_ms"]["p50"],
        "ttft_p95_ms": s["ttft_ms"]["p95"],
        "ttft_p99_ms": s["ttft_ms"]["p99"],
        "tpot_p99_ms": s["tpot_ms"]["p99"],
        "output_tokens_per_s": s["output_tokens_per_s"],
        "prefix_cache_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "requests": s["requests"],
        "errors": s["errors"],
        "error_codes": s["error_codes"],
        "first_error": s["first_error"],
        "e2e_p99_ms": s["e2e_ms"]["p99"],
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "duration_s": s["duration_s"],
        **extra,
    }


async def run_policy(
    policy: str,
    workload: PolicyWorkload,
    *,
    replicas: int,
    speed_factor: float,
    seed: int,
    engine_args: tuple[str, ...] = DEFAULT_ENGINE_ARGS,
    router_args: tuple[str, ...] = (),
    model: str = "sim-1b",
    timeout_s: float = 300.0,
) -> dict:
    """A fresh fleet routed by `policy`, the workload, the record."""
    # The router's stall watchdog counts wall-clock silence; the sim's modelled time runs 1/speed_factor slower,
    # so a long prefill at speed 0.05 looks like a hung replica unless its thresholds stretch the same way.
    stretched = [
        "--stall-min-silence-s",
        f"{1.0 / speed_factor:g}",
        "--stall-first-token-s",
        f"{2.5 / speed_factor:g}",
    ]
    extra_args = {"router": ["--policy", policy, *stretched, *router_args], "engine": list(engine_args)}
    async with SpawnedFleet(replicas, speed_factor, extra_args=extra_args) as state:
        await wait_routable(state["router"], replicas, model)
        print(
            f"bench {policy}: {workload.requests} requests ({workload.name}) ...", file=sys.stderr, flush=True
        )
        outcomes, duration = await drive(state["router"], workload, model=model, timeout_s=timeout_s)
    rec = record(
        policy,
        workload,
        outcomes,
        duration,
        replicas=replicas,
        seed=seed,
        speed_factor=speed_factor,
        engine_args=" ".join(engine_args),
    )
    print(
        f"bench {policy}: ttft p99 {rec['ttft_p99_ms']} ms, {rec['output_tokens_per_s']} tok/s, "
        f"hit rate {rec['prefix_cache_hit_rate']}, errors {rec['errors']}",
        file=sys.stderr,
        flush=True,
    )
    return rec


async def compare_policies(policies: list[str], workload: PolicyWorkload, **kwargs) -> list[dict]:
    """One record per policy, each on its own fresh fleet, in the order given."""
    return [await run_policy(policy, workload, **kwargs) for policy in policies]


def main(args) -> int:
    """`--compare-policies`: run and print one JSON record per policy (one per line) on stdout. 0 when every
    fleet ran (request errors are in the records), 1 when a fleet failed to start, 130 on Ctrl-C."""
    import json
    import random

    from loadtest.bench import _run_async
    from loadtest.fleet import structlog_to_stderr
    from loadtest.workload import policy_workload

    seed = args.seed if args.seed is not None else random.randrange(2**31)
    speed_factor = args.speed_factor or DEFAULT_SPEED_FACTOR
    workload = policy_workload(args.workload, args.requests, seed, speed_factor)
    try:
        with structlog_to_stderr():
            records = _run_async(
                compare_policies(
                    args.compare_policies,
                    workload,
                    replicas=args.replicas,
                    speed_factor=speed_factor,
                    seed=seed,
                    engine_args=(*DEFAULT_ENGINE_ARGS, "--profile", args.sim_profile),
                    model=args.model,
                    timeout_s=args.timeout,
                )
            )
    except KeyboardInterrupt:
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for rec in records:
        sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()
    return 0
