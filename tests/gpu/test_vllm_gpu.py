"""The vllm backend on a real GPU, in a five-process fleet: streaming through gateway -> router -> engine,
cancellation freeing the engine, prefix-cache hits, KV events with fleet hashes, engine death -> NOT_SERVING."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import urllib.request

import grpc
import pytest
import pytest_asyncio
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc

from services.router.config import RouterSettings
from shared import tokenizer as fleet_tokenizer
from shared.health import check
from shared.prefix_hash import block_hashes
from tests.integration.conftest import running_cluster
from tests.support import assert_eventually

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

MODEL = "llama-1b"
# One engine start (~35-50 s) serves the whole module; half the GPU leaves room for nothing else to fail.
VLLM_FLAGS = os.environ.get("FLEETSERVE_GPU_VLLM_FLAGS", "--load-format dummy --gpu-memory-utilization 0.5")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """$FLEETSERVE_GPU_MODEL_DIR, or a freshly generated 1B Llama-shaped directory (dummy weights)."""
    if d := os.environ.get("FLEETSERVE_GPU_MODEL_DIR"):
        return d
    from infra.models.generate import main as generate

    out = tmp_path_factory.mktemp("model") / "llama-1b"
    generate([str(out), "--size", "1b"])
    return str(out)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory, model_dir):
    extra = {
        # Two front ends whatever the host's cores (auto would pick one on a small host): the tests of a replica
        # with several front ends always run.
        "engine": [
            "--model",
            MODEL,
            f"--vllm-args=--model {model_dir} {VLLM_FLAGS}",
            "--grace-period-s",
            "5",
            "--frontends",
            "2",
            # Off by default (the publisher costs the engine core throughput): test_kv_events_carry_fleet_hashes.
            "--vllm-kv-events",
        ]
    }
    async with running_cluster(
        tmp_path_factory.mktemp("fleet"),
        engines=1,
        backend="vllm",
        model=MODEL,
        start_timeout_s=300.0,
        lease_ttl_s=2.0,
        extra_args=extra,
    ) as cluster:
        try:
            yield cluster
        finally:
            if logs := os.environ.get("FLEETSERVE_GPU_LOG_DIR"):
                # The services' logs, for a run on a machine that is gone once the tests end.
                shutil.make_archive(f"{logs}/gpu-tests-fleet-logs", "gztar", cluster.config.data_dir / "logs")


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def engine_address(cluster) -> str:
    return cluster.procs["engine-1"].address


async def mesh_stream(cluster, prompt: str, max_tokens: int, timeout_s: float = 60.0):
    ch = grpc.aio.insecure_channel(cluster.gateway)
    req = inf_pb.GenerateRequest(model=MODEL, prompt=prompt, max_tokens=max_tokens, ignore_eos=True)
    return ch, inf_grpc.InferenceServiceStub(ch).Generate(
        req, metadata=auth(cluster.api_key), timeout=timeout_s
    )


async def engine_load(address: str) -> engine_pb.GetLoadResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        return await engine_grpc.EngineServiceStub(ch).GetLoad(engine_pb.GetLoadRequest(), timeout=5)


async def test_streams_through_the_mesh(fleet):
    """A prompt sent to the gateway streams vLLM's tokens back as many chunks: served_by first, usage last."""
    ch, call = await mesh_stream(fleet, "Tell me about the fleet", 64)
    try:
        chunks = [r.chunk async for r in call]
    finally:
        await ch.close()
    assert chunks[0].served_by.replica_id == "engine-1" and chunks[0].served_by.model == MODEL
    assert len(chunks) >= 8, "tokens should stream, not arrive as one blob"
    assert sum(len(c.token_ids) for c in chunks) == 64
    last = chunks[-1]
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.usage.completion_tokens == 64 and last.usage.prompt_tokens > 0


async def test_one_replica_whose_front_ends_share_the_requests(fleet):
    """The worker runs several front-end processes on one engine core (--frontends, 2 here): the
    registry lists one replica with each front end as an endpoint, and requests through the mesh are served
    by all of them once there are more at once than the router packs onto the first ones (--frontend-pack)."""
    info = fleet.ready_info("engine-1")
    frontends = info.get("frontends", [])
    assert len(frontends) == 2, f"engine-1 was started with --frontends 2 and reports {frontends}"
    async with grpc.aio.insecure_channel(fleet.registry) as ch:
        resp = await reg_grpc.RegistryServiceStub(ch).ListReplicas(reg_pb.ListReplicasRequest(), timeout=2)
    (rep,) = resp.replicas
    assert list(rep.endpoints) == frontends and rep.address == frontends[0]

    def served() -> list[int]:
        # Every line one JSON object: the front ends share this log file, each line is one write (WriteLogger).
        lines = fleet.procs["engine-1"].log_file.read_text().splitlines()
        return [json.loads(line)["pid"] for line in lines if '"engine.request"' in line]

    before = len(served())
    pack = RouterSettings().frontend_pack or 1
    n = pack * (len(frontends) - 1) + 16

    async def one(i: int) -> int:
        ch, call = await mesh_stream(fleet, f"front end spread {i}", 128)
        try:
            return sum([len(r.chunk.token_ids) async for r in call])
        finally:
            await ch.close()

    assert await asyncio.gather(*(one(i) for i in range(n))) == [128] * n
    await assert_eventually(lambda: len(served()) >= before + n, timeout_s=10)
    assert len(set(served()[before:])) == len(frontends)


def metrics_total(address: str, name: str, **labels: str) -> float:
    """The sum of a series' samples (with these labels) on a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_the_replica_serves_one_metrics_page_with_vllm_series_summed_over_front_ends(fleet):
    """The supervisor of a replica with several front ends serves its one /metrics, where vLLM's own series of
    every front end's AsyncLLM are merged: requests spread over the front ends add up there."""
    info = fleet.ready_info("engine-1")
    frontends, address = info.get("frontends", []), info.get("metrics_address", "")
    assert len(frontends) == 2, f"engine-1 was started with --frontends 2 and reports {frontends}"
    # The fleet gives every engine a metrics port: a replica of several front ends without one is the bug.
    assert address, f"engine-1 has {len(frontends)} front ends and no metrics_address in its ready file"
    tokens = lambda: metrics_total(address, "vllm:generation_tokens_total")  # noqa: E731
    done = lambda: metrics_total(address, "vllm:request_success_total", finished_reason="length")  # noqa: E731
    before_tokens, before_done = tokens(), done()
    n = 2 * len(frontends)
    for i in range(n):
        ch, call = await mesh_stream(fleet, f"metrics from every front end {i}", 8)
        try:
            [r async for r in call]
        finally:
            await ch.close()
    # Both series are awaited: the client's stream ends with its last chunk, before every hop has settled.
    await assert_eventually(
        lambda: (tokens(), done()) == (before_tokens + 8 * n, before_done + n), timeout_s=15, interval_s=0.2
    )


async def test_a_summarized_stream_on_vllm(fleet):
    """summarize (how the router reads shadow copies) on real vLLM: the first chunk, then only empty progress
    messages, then one message with the rest of the text, the usage and vLLM's own token times."""
    sampling = common_pb2.SamplingParams(max_tokens=48, ignore_eos=True)
    spec = common_pb2.GenerationSpec(
        model=MODEL, prompt="Compare the candidate with the live answer", sampling=sampling
    )
    req = engine_pb.GenerateRequest(request_id="gpu-summary", spec=spec, tenant_id="t", summarize=True)
    async with grpc.aio.insecure_channel(engine_address(fleet)) as ch:
        got = [r async for r in engine_grpc.EngineServiceStub(ch).Generate(req, timeout=60)]
    first, middle, last = got[0], got[1:-1], got[-1]
    assert len(got) >= 2 and first.chunk.text and first.chunk.served_by.replica_id == "engine-1"
    assert all(not m.chunk.text and not m.chunk.token_ids for m in middle), (
        "only progress between first and last"
    )
    assert (
        last.chunk.usage.completion_tokens == 48
        and last.chunk.finish_reason == common_pb2.FINISH_REASON_LENGTH
    )
    assert len(first.chunk.text + last.chunk.text) > 0
    assert 0 < last.summary.first_token_ms <= last.summary.last_token_ms
    assert last.summary.outputs >= 2, "vLLM's outputs are counted as if streamed"


async def test_cancel_mid_stream_frees_the_request_in_the_engine(fleet):
    """A client that goes away mid-stream: the engine aborts the request in vLLM (running drops to 0)."""
    before = await engine_load(engine_address(fleet))
    ch, call = await mesh_stream(fleet, "A long story, please", 3000)
    try:
        got = 0
        async for r in call:
            got += len(r.chunk.token_ids)
            if got >= 16:
                break
        call.cancel()
    finally:
        await ch.close()

    async def freed():
        load = await engine_load(engine_address(fleet))
        return load.requests_aborted > before.requests_aborted and load.load.running == 0 and load

    load = await assert_eventually(freed, timeout_s=15)
    assert load.load.in_flight_tokens == 0


async def test_prefix_cache_hit_on_a_repeated_prompt(fleet):
    """The same long prompt from the same tenant a second time is served partly from vLLM's prefix cache."""
    prompt = "The quick brown fox jumps over the lazy dog. " * 60
    usages = []
    for _ in range(2):
        ch, call = await mesh_stream(fleet, prompt, 4)
        try:
            chunks = [r.chunk async for r in call]
        finally:
            await ch.close()
        usages.append(chunks[-1].usage)
    assert usages[0].prompt_tokens > 256
    assert usages[1].cached_tokens >= 256, usages

    async def counted():
        # With several front ends the step's stats reach one of them; the primary sums their rows.
        load = (await engine_load(engine_address(fleet))).load
        return load.prefix_cache_hit_tokens > 0 and load.prefix_cache_queried_tokens > 0

    await assert_eventually(counted, timeout_s=10)


async def test_kv_events_carry_fleet_hashes(fleet, model_dir):
    """SubscribeKvEvents: a snapshot first, then BlockStored events whose hashes are the fleet hashes of the
    prompt's tokens under the request's salt (what a router computes), recomputed from vLLM's events."""
    tok = fleet_tokenizer.load(model_dir)
    prompt = "Numbers: " + " ".join(str(i) for i in range(200))
    ids = tok.encode(prompt)
    want = block_hashes(ids, "gpu-test-salt")
    async with grpc.aio.insecure_channel(engine_address(fleet)) as ch:
        stub = engine_grpc.EngineServiceStub(ch)
        events = stub.SubscribeKvEvents(engine_pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=60)
        it = events.__aiter__()
        first = await asyncio.wait_for(anext(it), 10)
        assert first.batch.snapshot
        req = engine_pb.GenerateRequest(
            request_id="gpu-kv-1",
            spec=common_pb2.GenerationSpec(
                model=MODEL, prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=2)
            ),
            tenant_id="gpu-test",
            cache_salt="gpu-test-salt",
        )
        [r async for r in stub.Generate(req, timeout=30)]
        stored: list[int] = []

        async def until_stored():
            while not set(want) <= set(stored):
                batch = (await anext(it)).batch
                for e in batch.events:
                    if e.HasField("block_stored"):
                        stored.extend(e.block_stored.block_hashes)

        await asyncio.wait_for(until_stored(), 15)
        events.cancel()
    assert set(want) <= set(stored)
    assert set(want).isdisjoint(block_hashes(ids, "another-tenant"))


async def test_engine_death_turns_the_replica_not_serving_and_leaves_the_registry(fleet):
    """Killing vLLM's engine-core process: the worker reports NOT_SERVING and the registry drops it. (Last: it
    breaks the fleet's only engine.)"""
    import psutil

    proc = fleet.procs["engine-1"]
    # With several front ends the worker is their supervisor: kill the engine core, not the front ends.
    frontends = set(fleet.ready_info("engine-1").get("frontend_pids", []))
    spared = {p.pid for f in frontends for p in [psutil.Process(f), *psutil.Process(f).children(True)]}
    children = [c for c in psutil.Process(proc.process.pid).children(recursive=True) if c.pid not in spared]
    assert children, "vLLM's engine core runs in a child process of the worker"
    for c in children:
        os.kill(c.pid, signal.SIGKILL)
    address = engine_address(fleet)
    await assert_eventually(lambda: _not_serving(address), timeout_s=30)
    assert proc.alive, "the worker stays up, reporting NOT_SERVING, rather than crashing"

    async def dropped():
        async with grpc.aio.insecure_channel(fleet.registry) as ch:
            resp = await reg_grpc.RegistryServiceStub(ch).ListReplicas(
                reg_pb.ListReplicasRequest(), timeout=2
            )
        return "engine-1" not in {r.replica_id for r in resp.replicas}

    await assert_eventually(dropped, timeout_s=30)
    ch, call = await mesh_stream(fleet, "anyone there?", 4, timeout_s=10)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            [r async for r in call]
    finally:
        await ch.close()
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE


async def _not_serving(address: str) -> bool:
    return not await check(address, timeout_s=2)
