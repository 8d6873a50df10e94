"""Gateway and router with --workers 2, each worker its own process: both router workers get traffic through the
gateway's HTTP and gRPC, cancellation still reaches the engine, a killed worker is restarted, limits hold, and each
service's one /metrics shows its workers' CPU and memory."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import aiohttp
import grpc
import pytest
import pytest_asyncio
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc
from prometheus_client.parser import text_string_to_metric_families

from shared.health import check
from tests.integration.conftest import running_cluster
from tests.support import assert_eventually, log_events

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with running_cluster(
        tmp_path_factory.mktemp("workers"), engines=1, router_workers=2, gateway_workers=2
    ) as cluster:
        yield cluster


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def router_requests_by_pid(cluster) -> dict[int, int]:
    """router.request log lines per router worker process (each worker logs its pid's lines)."""
    counts: dict[int, int] = {}
    for line in cluster.procs["router"].log_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "router.request":
            counts[rec["pid"]] = counts.get(rec["pid"], 0) + 1
    return counts


async def test_requests_reach_both_router_workers_over_grpc_and_http(fleet):
    """Distinct prompts from the gateway (gRPC and OpenAI HTTP) land on both router workers."""
    info = fleet.ready_info("router")
    assert len(info["worker_addresses"]) == 2
    for a in info["worker_addresses"]:
        assert await check(a)
    async with grpc.aio.insecure_channel(fleet.gateway) as ch:
        stub = inf_grpc.InferenceServiceStub(ch)
        for i in range(12):
            req = inf_pb.GenerateRequest(model="sim-1b", prompt=f"prompt number {i}", max_tokens=4)
            chunks = [r.chunk async for r in stub.Generate(req, metadata=auth(fleet.api_key), timeout=30)]
            assert chunks[-1].usage.completion_tokens == 4
    http = fleet.ready_info("gateway")["http_address"]
    async with aiohttp.ClientSession() as s:
        for i in range(6):
            async with s.post(
                f"http://{http}/v1/completions",
                json={"model": "sim-1b", "prompt": f"http prompt {i}", "max_tokens": 3},
                headers={"Authorization": f"Bearer {fleet.api_key}"},
            ) as r:
                assert r.status == 200, await r.text()
                assert (await r.json())["usage"]["completion_tokens"] == 3

    # The router writes its canonical line and counts a request after the client has its last chunk (both
    # front ends end the client's answer with that chunk): wait for them rather than read them at once.
    def on_both_workers():
        counts = router_requests_by_pid(fleet)
        return len(counts) == 2 and sum(counts.values()) >= 18

    await assert_eventually(on_both_workers, timeout_s=10)

    # One /metrics for the router, summing both workers' counters (Prometheus multiprocess mode).
    async def ok_counted() -> bool:
        async with aiohttp.ClientSession() as s, s.get(f"http://{info['metrics_address']}/metrics") as r:
            text = await r.text()
        ok = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("fleetserve:router_requests_total") and 'code="OK"' in line
        )
        return ok >= 18

    await assert_eventually(ok_counted, timeout_s=10)


WORKER_SERIES = (
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "fleetserve:worker_cpu_busy_ratio",
)


def process_series(text: str) -> dict[str, list[tuple[str, float]]]:
    """The worker CPU and memory samples of a /metrics page: name -> [(pid label, value)]."""
    out: dict[str, list[tuple[str, float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in WORKER_SERIES:
                out.setdefault(sample.name, []).append((sample.labels.get("pid", ""), sample.value))
    return out


async def test_each_service_shows_its_workers_cpu_and_memory_on_its_one_metrics_page(fleet):
    """prometheus-client's own process_* cannot be merged over workers: the workers record theirs, the CPU counter
    grows with traffic, and every live worker has its busy share under its pid."""

    async def scrape(service: str) -> dict[str, list[tuple[str, float]]]:
        address = fleet.ready_info(service)["metrics_address"]
        async with aiohttp.ClientSession() as s, s.get(f"http://{address}/metrics") as r:
            return process_series(await r.text())

    before = {}
    for service in ("gateway", "router"):
        pids = set(fleet.ready_info(service)["worker_pids"])

        async def recorded(service=service, pids=pids) -> bool:
            series = await scrape(service)
            busy = {pid for pid, _ in series.get("fleetserve:worker_cpu_busy_ratio", [])}
            return (
                len(series.get("process_cpu_seconds_total", [])) == 1
                and series["process_cpu_seconds_total"][0][1] > 0
                and series.get("process_resident_memory_bytes", [("", 0)])[0][1] > 20e6
                and {str(pid) for pid in pids} <= busy
            )

        await assert_eventually(recorded, timeout_s=15)
        before[service] = (await scrape(service))["process_cpu_seconds_total"][0][1]
    async with grpc.aio.insecure_channel(fleet.gateway) as ch:
        stub = inf_grpc.InferenceServiceStub(ch)
        for i in range(20):
            req = inf_pb.GenerateRequest(model="sim-1b", prompt=f"cpu {i}", max_tokens=8)
            [r async for r in stub.Generate(req, metadata=auth(fleet.api_key), timeout=30)]
    for service in ("gateway", "router"):

        async def grew(service=service) -> bool:
            return (await scrape(service))["process_cpu_seconds_total"][0][1] > before[service]

        await assert_eventually(grew, timeout_s=15)


async def test_cancel_through_two_worker_hops_reaches_the_engine(fleet):
    """A client that cancels mid-stream: the engine aborts the request and is idle again."""
    engine = fleet.procs["engine-1"].address

    async def counters() -> engine_pb.GetLoadResponse:
        async with grpc.aio.insecure_channel(engine) as ch:
            return await engine_grpc.EngineServiceStub(ch).GetLoad(engine_pb.GetLoadRequest(), timeout=2)

    before = (await counters()).requests_aborted
    async with grpc.aio.insecure_channel(fleet.gateway) as ch:
        call = inf_grpc.InferenceServiceStub(ch).Generate(
            inf_pb.GenerateRequest(model="sim-1b", prompt="a long one", max_tokens=5000, ignore_eos=True),
            metadata=auth(fleet.api_key),
            timeout=60,
        )
        async for resp in call:
            if resp.chunk.token_ids:
                break
        call.cancel()

    async def aborted_and_idle() -> bool:
        c = await counters()
        return c.requests_aborted > before and c.load.running + c.load.waiting == 0

    await assert_eventually(aborted_and_idle, timeout_s=10)


async def test_a_killed_router_worker_is_restarted_and_requests_keep_succeeding(fleet):
    """SIGKILL of one router worker: the supervisor starts another; requests through the gateway succeed."""
    pids = fleet.ready_info("router")["worker_pids"]
    os.kill(pids[0], signal.SIGKILL)
    ok = 0
    async with grpc.aio.insecure_channel(fleet.gateway) as ch:
        stub = inf_grpc.InferenceServiceStub(ch)
        for i in range(40):
            req = inf_pb.GenerateRequest(model="sim-1b", prompt=f"after the kill {i}", max_tokens=2)
            try:
                [r async for r in stub.Generate(req, metadata=auth(fleet.api_key), timeout=30)]
                ok += 1
            except grpc.aio.AioRpcError as e:
                # The dead worker's connection fails its calls until the new worker listens.
                assert e.code() == grpc.StatusCode.UNAVAILABLE
                await asyncio.sleep(0.1)
            if ok >= 10:
                break
    assert ok >= 10
    assert fleet.procs["router"].alive


async def test_workers_are_recycled_after_max_requests_without_losing_a_request(tmp_path):
    """--max-requests-per-worker 5 on 2 router and 2 gateway workers: a worker that served 5 requests is drained
    and replaced, one worker of a service at a time (the other serves meanwhile). Through router recycles no
    request fails (the gateway retries a draining router worker's SHUTTING_DOWN on the other); a request that
    reaches a draining gateway worker gets UNAVAILABLE SHUTTING_DOWN with RetryInfo, and the client's retry is
    served."""
    async with running_cluster(
        tmp_path,
        engines=1,
        router_workers=2,
        gateway_workers=2,
        extra_args={
            "router": ["--max-requests-per-worker", "5"],
            "gateway": ["--max-requests-per-worker", "5"],
        },
    ) as cluster:
        recycled: dict[str, int] = {}
        retried = 0
        for i in range(300):  # bounded; stops once each service recycled a worker
            for _ in range(50):  # bounded retries, as a client honouring RetryInfo would
                try:
                    # A fresh channel each time: the kernel spreads connections over the gateway workers.
                    async with grpc.aio.insecure_channel(cluster.gateway) as ch:
                        stub = inf_grpc.InferenceServiceStub(ch)
                        req = inf_pb.GenerateRequest(model="sim-1b", prompt=f"recycle {i}", max_tokens=2)
                        chunks = [
                            r async for r in stub.Generate(req, metadata=auth(cluster.api_key), timeout=60)
                        ]
                    assert chunks, i
                    break
                except grpc.aio.AioRpcError as e:
                    # A draining gateway worker's SHUTTING_DOWN (or its connection closing): retried.
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, e
                    retried += 1
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"request {i} not served after 50 tries")
            await asyncio.sleep(0.05)
            if i % 10 == 9:
                recycled = {
                    svc: sum(
                        1 for e in log_events(cluster, svc) if e.get("event") == f"{svc}.worker_recycled"
                    )
                    for svc in ("router", "gateway")
                }
                if min(recycled.values()) >= 1:
                    break
        assert min(recycled.values()) >= 1, recycled
        for svc in ("router", "gateway"):
            assert not [e for e in log_events(cluster, svc) if e.get("event") == f"{svc}.worker_exited"]
        print(f"workers recycled {recycled}; {retried} client retries on UNAVAILABLE")
