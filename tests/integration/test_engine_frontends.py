"""One vLLM replica served by three front ends on one (fake) engine core, behind a real registry and router: one
replica with three endpoints in the registry, requests spread over the front ends, the replica's load and
counters summed over them, Abort and KV events on any front end, cancellation, engine death."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc
from prometheus_client.parser import text_string_to_metric_families

from services.engine import vllm_backend
from services.engine.app import start
from services.engine.config import EngineSettings
from services.engine.frontends import Frontend, auto_frontends
from services.engine.load_board import LoadBoard
from services.router.app import start as start_router
from services.router.config import RouterSettings
from shared.errors import details_of
from shared.health import check
from shared.prefix_hash import block_hashes
from shared.server import PARENT_PID_ENV
from shared.tokenizer import load as load_tokenizer
from tests.integration.test_engine import FAST_RETRY, Recorded, listed, start_registry
from tests.integration.test_engine_vllm import request
from tests.support import assert_eventually, stop_process

pytest.importorskip("zmq", reason="the vllm backend reads KV events with pyzmq")
from tests.fake_vllm import FakeAsyncLLM, fake_api, first_stored_hashes  # noqa: E402 - after the skip: it imports zmq

MODEL = "llama-tiny"
N = 3
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from infra.models.generate import main as generate

    out = tmp_path_factory.mktemp("model") / "tiny"
    generate([str(out), "--size", "tiny"])
    return str(out)


def exchanger(n: int):
    """What the supervisor does between front ends, in one process: collect every address, answer all."""
    addresses: list[str | None] = [None] * n
    done = asyncio.get_running_loop().create_future()

    def for_index(i: int):
        async def exchange(address: str) -> list[str]:
            addresses[i] = address
            if all(addresses) and not done.done():
                done.set_result(list(addresses))
            return await done

        return exchange

    return for_index


@contextlib.asynccontextmanager
async def replica(model_dir: str, monkeypatch, tmp_path, registry_address: str = "", kv_events: bool = True):
    """N front ends of replica "engine-fe" (the first call builds the shared fake engine core); without
    kv_events the supervisor gives them no KV-event endpoint, as it does without --vllm-kv-events."""
    engines: list[FakeAsyncLLM] = []
    monkeypatch.setattr(vllm_backend, "load_vllm_api", lambda: fake_api(model_dir, engines, step_s=0.003))
    rec = Recorded()
    board = LoadBoard(None, N)
    exchange = exchanger(N)
    kv = f"ipc://{tmp_path}/kv.sock" if kv_events else ""
    settings = EngineSettings(
        replica_id="engine-fe",
        model=MODEL,
        backend="vllm",
        vllm_args=f"--model {model_dir}",
        registry_address=registry_address,
        **FAST_RETRY,
    )

    async def one(i: int):
        fe = Frontend(i, N, {"client_index": i, "client_count": N}, kv, board.path, exchange(i))
        return await start(settings, rec.telemetry, fe)

    # The primary first: its client starts the fake engine core, which binds the KV-event socket.
    tasks = [asyncio.ensure_future(one(0))]
    await assert_eventually(lambda: bool(engines), timeout_s=5)
    tasks += [asyncio.ensure_future(one(i)) for i in range(1, N)]
    apps = await asyncio.gather(*tasks)
    for app in apps:
        app.backend.health_poll_s = 0.02
    channels = [grpc.aio.insecure_channel(a.address) for a in apps]
    try:
        yield apps, [engine_grpc.EngineServiceStub(c) for c in channels], engines[0]
    finally:
        for c in channels:
            await c.close()
        for app in apps:
            await app.stop(0)
        engines[0].shutdown()
        board.close()


def test_auto_frontends_is_a_quarter_of_the_cores_from_1_to_8():
    """--frontends 0 picks cores // 4 front ends, at least 1 and at most 8."""
    assert [auto_frontends(c) for c in (1, 2, 4, 16, 31, 64, 128)] == [1, 1, 1, 4, 7, 8, 8]


def test_sim_refuses_several_frontends():
    """The sim engine runs in one process: --frontends > 1 with it is a configuration error."""
    with pytest.raises(ValueError, match="frontends"):
        EngineSettings(backend="sim", frontends=2)
    assert EngineSettings(backend="sim").frontend_count == 1


async def test_one_replica_with_every_front_end_as_an_endpoint_and_requests_spread(
    model_dir, monkeypatch, tmp_path
):
    """The registry lists one replica whose endpoints are the three front ends (the primary's address first);
    a router sends its requests to all three, and the primary reports the whole replica's counters."""
    rec = Recorded()
    registry = await start_registry(rec)
    router = None
    try:
        async with replica(model_dir, monkeypatch, tmp_path, registry.address) as (apps, stubs, core):
            addresses = [a.address for a in apps]
            await assert_eventually(lambda: _listed(registry.address), timeout_s=5)
            rep = (await listed(registry.address))["engine-fe"]
            assert list(rep.endpoints) == addresses and rep.address == addresses[0]

            router = await start_router(
                # In turn (the default packs: these sequential requests would all take the first).
                RouterSettings(registry_address=registry.address, watch_backoff_base_s=0.05, frontend_pack=0),
                rec.telemetry,
            )
            await assert_eventually(lambda: len(router.membership.routable(MODEL)) == 1, timeout_s=10)
            async with grpc.aio.insecure_channel(router.address) as ch:
                stub = router_grpc.RouterServiceStub(ch)
                for i in range(2 * N):
                    req = router_request(f"spread me {i}", 4, f"r{i}")
                    chunks = [r.chunk async for r in stub.Generate(req, timeout=10)]
                    assert chunks[-1].usage.completion_tokens == 4
            owners = [r.owner for r in core.seen]
            assert sorted(owners) == sorted(list(range(N)) * 2)

            # Every front end's own counters, summed by the primary (heartbeats and GetLoad report the replica);
            # each front end publishes its row every board_interval_s.
            async def summed() -> bool:
                load = await stubs[0].GetLoad(pb.GetLoadRequest(), timeout=5)
                return (load.requests_finished, load.output_tokens) == (2 * N, 8 * N)

            await assert_eventually(summed, timeout_s=5)
    finally:
        if router is not None:
            await router.stop(0)
        await registry.stop(0)


def router_request(prompt: str, max_tokens: int, request_id: str) -> router_pb.GenerateRequest:
    return router_pb.GenerateRequest(
        request_id=request_id,
        spec=common_pb2.GenerationSpec(
            model=MODEL,
            prompt=prompt,
            sampling=common_pb2.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
        ),
    )


async def _listed(address: str) -> bool:
    return "engine-fe" in await listed(address)


async def test_router_workers_share_the_front_end_pack(model_dir, monkeypatch, tmp_path):
    """`python -m services.router --workers 2 --frontend-pack 3`: each worker packs ceil(3 / 2) = 2 streams per
    front end, so three streams through each worker put 4 on the first front end, 2 on the second, none on the
    third (each worker at the whole pack would put all 6 on the first; at floor(3 / 2) = 1, 2 on each)."""
    rec = Recorded()
    registry = await start_registry(rec)
    ready = tmp_path / "router.json"
    argv = [sys.executable, "-m", "services.router", "--workers=2", "--frontend-pack=3", "--port=0"]
    argv += [f"--registry-address={registry.address}", "--watch-backoff-base-s=0.05", "--metrics-port=-1"]
    argv += [f"--ready-file={ready}", "--grace-period-s=1", "--log-json"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", PARENT_PID_ENV: str(os.getpid())}
    proc = None
    calls: list[grpc.aio.UnaryStreamCall] = []
    channels: list[grpc.aio.Channel] = []
    try:
        async with replica(model_dir, monkeypatch, tmp_path, registry.address) as (apps, stubs, core):
            await assert_eventually(lambda: _listed(registry.address), timeout_s=5)
            with open(tmp_path / "router.log", "w") as log:  # noqa: ASYNC230 - once, before the streams
                proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)  # noqa: ASYNC220
            await assert_eventually(lambda: ready.exists() or proc.poll() is not None, timeout_s=120)
            assert proc.poll() is None, (tmp_path / "router.log").read_text()[-3000:]
            workers = json.loads(ready.read_text())["worker_addresses"]
            assert len(workers) == 2
            channels = [grpc.aio.insecure_channel(a) for a in workers]
            for w, ch in enumerate(channels):
                stub = router_grpc.RouterServiceStub(ch)
                for i in range(3):
                    req = router_request(f"pack me {w} {i}", 3000, f"w{w}-{i}")
                    # Held open (3000 tokens: seconds) so that each worker's later picks see it in flight.
                    calls.append(await _first_chunk(stub, req))
            owners = collections.Counter(r.owner for r in core.seen)
            assert [owners[i] for i in range(N)] == [4, 2, 0], owners
    finally:
        for call in calls:
            call.cancel()
        for ch in channels:
            await ch.close()
        if proc is not None:
            await stop_process(proc, 30)
        await registry.stop(0)


async def _first_chunk(stub: router_grpc.RouterServiceStub, req) -> grpc.aio.UnaryStreamCall:
    """The call of `req` once its first chunk came (a router worker may not have seen the replica yet: retried
    on UNAVAILABLE, which leaves nothing in flight, for at most 10 s)."""
    for _ in range(100):
        call = stub.Generate(req, timeout=60)
        try:
            await call.read()
            return call
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE:
                raise
        await asyncio.sleep(0.1)
    raise AssertionError(f"{req.request_id}: no first chunk within 100 tries")


async def test_load_abort_and_cancel_across_front_ends(model_dir, monkeypatch, tmp_path):
    """A stream on the third front end: the primary's load counts it running; Abort sent to the primary ends it
    with ABORT (the primary asks its peers); a cancelled call on the second front end aborts in the engine."""
    async with replica(model_dir, monkeypatch, tmp_path) as (apps, stubs, core):
        call = stubs[2].Generate(request("abort me elsewhere", 3000, "a1"), timeout=30)
        it = call.__aiter__()
        await anext(it)
        await assert_eventually(lambda: apps[0].backend.load().running == 1, timeout_s=5)
        assert apps[0].backend.load().in_flight_tokens > 0
        assert (await stubs[0].Abort(pb.AbortRequest(request_id="a1"), timeout=5)).aborted
        rest = [r.chunk async for r in it]
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert not (await stubs[0].Abort(pb.AbortRequest(request_id="nobody"), timeout=5)).aborted

        call = stubs[1].Generate(request("cancel me", 3000, "c1"), timeout=30)
        await anext(call.__aiter__())
        call.cancel()
        await assert_eventually(lambda: "c1" in core.aborted, timeout_s=5)

        async def two_aborted() -> bool:
            return (await stubs[0].GetLoad(pb.GetLoadRequest(), timeout=5)).requests_aborted == 2

        await assert_eventually(two_aborted, timeout_s=5)
        await assert_eventually(lambda: apps[0].backend.load().running == 0, timeout_s=5)
        assert apps[0].backend.load().in_flight_tokens == 0


async def test_kv_events_from_any_front_end(model_dir, monkeypatch, tmp_path):
    """SubscribeKvEvents on a non-primary front end relays the primary's stream: a snapshot, then the fleet
    hashes of a prompt's blocks."""
    tok = load_tokenizer(model_dir)
    prompt = " ".join(f"w{i}" for i in range(60))
    want = block_hashes(tok.encode(prompt), "tenant")
    async with replica(model_dir, monkeypatch, tmp_path) as (apps, stubs, core):
        events = stubs[1].SubscribeKvEvents(pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=30)
        it = events.__aiter__()
        assert (await asyncio.wait_for(anext(it), 5)).batch.snapshot

        async def generate(i: int) -> None:
            [r async for r in stubs[2].Generate(request(prompt, 1, f"k{i}"), timeout=10)]

        stored = await first_stored_hashes(generate, it, core)
        events.cancel()
        assert stored[: len(want)] == want


async def test_front_ends_without_kv_events_read_none_say_so_and_still_serve(
    model_dir, monkeypatch, tmp_path
):
    """With no KV-event endpoint (the default, without --vllm-kv-events) no front end reads KV events, the engine
    core binds no publisher, SubscribeKvEvents on any front end (the others relay to the primary) answers
    FAILED_PRECONDITION KV_EVENTS_OFF, and every front end still streams."""
    async with replica(model_dir, monkeypatch, tmp_path, kv_events=False) as (apps, stubs, core):
        assert core.kv_endpoint == ""
        assert [app.backend._kv_reader for app in apps] == [None] * N
        for i, stub in enumerate(stubs):
            chunks = [r.chunk async for r in stub.Generate(request(f"front end {i}", 3, f"n{i}"), timeout=10)]
            assert chunks[-1].usage.completion_tokens == 3
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.SubscribeKvEvents(
                    pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=5
                ).read()
            err = details_of(e.value)
            assert (err.code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "KV_EVENTS_OFF")
            assert err.metadata["replica_id"] == "engine-fe" and "--vllm-kv-events" in err.message


async def test_engine_death_turns_every_front_end_not_serving_and_the_replica_leaves(
    model_dir, monkeypatch, tmp_path
):
    """When the supervisor reports the engine core dead (mark_dead, its SIGUSR1), every front end reports
    NOT_SERVING and the replica leaves the registry."""
    rec = Recorded()
    registry = await start_registry(rec)
    try:
        async with replica(model_dir, monkeypatch, tmp_path, registry.address) as (apps, stubs, core):
            await assert_eventually(lambda: _listed(registry.address), timeout_s=5)
            for app in apps:
                app.backend.mark_dead("test")
            for app in apps:
                await assert_eventually(lambda a=app: _not_serving(a.address), timeout_s=5)
            await assert_eventually(lambda: _gone(registry.address), timeout_s=5)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                [r async for r in stubs[1].Generate(request("anyone?", 2, "d1"), timeout=5)]
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await registry.stop(0)


async def _gone(address: str) -> bool:
    return "engine-fe" not in await listed(address)


async def _not_serving(address: str) -> bool:
    return not await check(address, timeout_s=1)


async def test_front_end_processes_serve_one_merged_metrics_page(model_dir, tmp_path):
    """`python -m services.engine --backend vllm --frontends 2` (on the fake vLLM, each front end its own process):
    the supervisor serves the replica's one /metrics, named in its ready file. Every family appears once, with
    one series per label set (no per-process `pid` series); the per-request series add up over both front-end
    processes (prometheus-client's multiprocess mode); the load gauges and token totals come from the shared
    load board. The directory of the processes' values is gone once the replica stopped."""
    ready = tmp_path / "engine.json"
    argv = [sys.executable, "-m", "tests.fake_vllm_replica", "--backend=vllm", "--frontends=2"]
    argv += [f"--model={MODEL}", f"--vllm-args=--model {model_dir}", "--replica-id=engine-mp", "--port=0"]
    argv += ["--metrics-port=0", f"--ready-file={ready}", "--grace-period-s=1"]
    with open(tmp_path / "engine.log", "w") as log:  # noqa: ASYNC230 - once, before the test starts
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    try:
        await assert_eventually(lambda: ready.exists() or proc.poll() is not None, timeout_s=120)
        assert proc.poll() is None, (tmp_path / "engine.log").read_text()[-3000:]
        info = json.loads(ready.read_text())
        assert len(info["frontends"]) == 2 and info["metrics_address"]
        prom_dir = tmp_path / f"engine-{info['pid']}-prometheus"
        assert prom_dir.is_dir()

        sent = {0: (3, 4), 1: (2, 6)}  # front end -> (requests, tokens each)
        prompt_tokens = 0
        for fe, (n, tokens) in sent.items():
            async with grpc.aio.insecure_channel(info["frontends"][fe]) as ch:
                stub = engine_grpc.EngineServiceStub(ch)
                for i in range(n):
                    call = stub.Generate(
                        request(f"front end {fe} request {i}", tokens, f"m{fe}-{i}"), timeout=30
                    )
                    chunks = [r.chunk async for r in call]
                    assert chunks[-1].usage.completion_tokens == tokens
                    prompt_tokens += chunks[-1].usage.prompt_tokens
        requests = sum(n for n, _ in sent.values())
        tokens = sum(n * t for n, t in sent.values())

        def samples() -> dict[tuple, float]:
            with urllib.request.urlopen(f"http://{info['metrics_address']}/metrics", timeout=10) as r:
                text = r.read().decode()
            types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
            assert [n for n, c in collections.Counter(types).items() if c > 1] == []
            out: dict[tuple, float] = {}
            for family in text_string_to_metric_families(text):
                for s in family.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    assert key not in out and "pid" not in s.labels, key
                    out[key] = s.value
            return out

        replica = (("engine", "0"), ("model_name", MODEL))

        def value(name: str, **labels: str) -> float | None:
            return samples().get((name, tuple(sorted({**dict(replica), **labels}.items()))))

        # The board's rows are published every 50 ms: the totals arrive within a few.
        await assert_eventually(lambda: value("vllm:generation_tokens_total") == tokens, timeout_s=10)
        assert value("vllm:request_success_total", finished_reason="length") == requests
        assert value("vllm:time_to_first_token_seconds_count") == requests
        assert value("vllm:e2e_request_latency_seconds_count") == requests
        assert value("vllm:request_time_per_output_token_seconds_count") == requests
        assert value("vllm:prompt_tokens_total") == prompt_tokens
        assert value("vllm:num_requests_running") == 0
        assert value("vllm:num_requests_waiting") == 0
        assert value("vllm:prefix_cache_queries_total") is not None

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
        assert not prom_dir.exists()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(10)
