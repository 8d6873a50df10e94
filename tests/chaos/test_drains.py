"""Draining a gateway or a router under load (SIGTERM): new requests get UNAVAILABLE + RetryInfo while the
port stays open (gRPC and OpenAI HTTP), streams longer than the grace period are cut shortly before it ends with
UNAVAILABLE, ErrorInfo SHUTTING_DOWN and RetryInfo (a status a client can act on, not "Cancelling all calls"),
their tokens up to the cut delivered; the process exits 0."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import grpc
import pytest
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc

from shared.errors import details_of
from tests.integration.conftest import running_cluster
from tests.support import assert_eventually, log_events, ready_address

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

GRACE_S = 3.0
LONG = dict(model="sim-1b", prompt="a long story", max_tokens=4000, ignore_eos=True)


async def _long_stream(stub, key: str, got: list) -> grpc.aio.AioRpcError | None:
    """A stream far longer than the grace period; its error (None if it ended OK), tokens counted in got."""
    call = stub.Generate(
        inf_pb.GenerateRequest(**LONG), metadata=(("authorization", f"Bearer {key}"),), timeout=60
    )
    try:
        async for r in call:
            got.append(len(r.chunk.token_ids))
    except grpc.aio.AioRpcError as e:
        return e
    return None


async def _drain_under_load(cluster, victim: str) -> tuple[list, list, list]:
    """Start 4 long streams, SIGTERM victim once tokens flow; then new gRPC requests during the drain. Returns
    (stream errors, tokens per stream, new-request errors)."""
    key = cluster.api_key
    async with grpc.aio.insecure_channel(cluster.gateway) as ch:
        stub = inf_grpc.InferenceServiceStub(ch)
        counts: list[list] = [[] for _ in range(4)]
        streams = [asyncio.create_task(_long_stream(stub, key, c)) for c in counts]
        await assert_eventually(lambda: all(len(c) >= 3 for c in counts), timeout_s=30)
        cluster.signal(victim, signal.SIGTERM)
        new_errors = []
        if victim == "gateway":
            # Once the drain has begun (it refuses new streams from the line it logs on): a fixed 0.3 s after the
            # signal was a race with a gateway slow to handle it on a busy host (a request served OK).
            await assert_eventually(lambda: _draining(cluster), timeout_s=30, interval_s=0.05)
            for _ in range(3):
                try:
                    await stub.ListModels(
                        inf_pb.ListModelsRequest(), metadata=(("authorization", f"Bearer {key}"),), timeout=5
                    )
                    call = stub.Generate(
                        inf_pb.GenerateRequest(model="sim-1b", prompt="hi", max_tokens=4),
                        metadata=(("authorization", f"Bearer {key}"),),
                        timeout=5,
                    )
                    async for _ in call:
                        pass
                    new_errors.append(None)
                except grpc.aio.AioRpcError as e:
                    new_errors.append(e)
        errors = await asyncio.wait_for(asyncio.gather(*streams), 30)
    assert await cluster.wait_exit(victim, 30) == 0
    return errors, [sum(c) for c in counts], new_errors


def _assert_cut_with_retry_advice(errors: list) -> None:
    for e in errors:
        assert e is not None, "a stream longer than the grace period ended OK?"
        d = details_of(e)
        assert d.code == grpc.StatusCode.UNAVAILABLE, d
        assert d.reason == "SHUTTING_DOWN" and d.retry_after_s and d.retry_after_s > 0, d


@pytest.mark.parametrize("embedded", [False, True], ids=["router", "embedded-router"])
async def test_gateway_drain_answers_new_requests_and_cuts_long_streams_with_retry_advice(tmp_path, embedded):
    """SIGTERM the gateway under 4 long streams: new requests during the drain get UNAVAILABLE SHUTTING_DOWN +
    RetryInfo (the port is open), on HTTP 503 + Retry-After; the long streams are cut with the same status after
    tokens flowed; the gateway exits 0. The same with the router inside the gateway (--embedded-router): its
    streams are cut by the gateway's drain, their engine calls aborted."""
    async with running_cluster(
        tmp_path, engines=1, speed_factor=1.0, grace_period_s=GRACE_S, embedded_router=embedded
    ) as cluster:
        http = f"http://{cluster.ready_info('gateway')['http_address']}/v1/completions"
        http_result: list = []

        async def http_during_drain() -> None:
            await asyncio.sleep(1.0)
            async with aiohttp.ClientSession() as s:
                async with s.post(
                    http,
                    json={"model": "sim-1b", "prompt": "hi", "max_tokens": 4},
                    headers={"Authorization": f"Bearer {cluster.api_key}"},
                ) as r:
                    http_result.append((r.status, r.headers.get("Retry-After"), json.loads(await r.text())))

        (errors, tokens, new_errors), _ = await asyncio.gather(
            _drain_under_load(cluster, "gateway"), _after_sigterm(cluster, http_during_drain)
        )
        cut = [e for e in log_events(cluster, "gateway") if e.get("event") == "drain.cutting_stream"]
    _assert_cut_with_retry_advice(errors)
    assert all(t > 0 for t in tokens), tokens
    assert new_errors and all(e is not None for e in new_errors), new_errors
    _assert_cut_with_retry_advice(new_errors)
    status, retry_after, body = http_result[0]
    assert status == 503 and retry_after and body["error"]["code"] == "shutting_down", http_result
    # Each stream cut says what it was doing: streaming from its router (not stuck), over a READY channel.
    assert len(cut) == 4, cut
    for e in cut:
        assert e["request_id"] and e["router"] and e["channel"] == ("in_process" if embedded else "READY"), e
        assert e["stage"] == "streaming" and e["chunks"] > 0 and e["silent_s"] < 1.0, e


async def _after_sigterm(cluster, fn) -> None:
    await assert_eventually(lambda: _draining(cluster), timeout_s=30, interval_s=0.05)
    await fn()


def _draining(cluster) -> bool:
    log = cluster.procs["gateway"].log_file.read_text(errors="replace")
    return '"drain.started"' in log


async def test_router_drain_cuts_long_streams_with_retry_advice(tmp_path):
    """SIGTERM the router under 4 long streams: the clients' streams end UNAVAILABLE SHUTTING_DOWN + RetryInfo
    (relayed by the gateway) after tokens flowed, instead of a bare 'Cancelling all calls'; the router exits 0."""
    async with running_cluster(tmp_path, engines=1, speed_factor=1.0, grace_period_s=GRACE_S) as cluster:
        errors, tokens, _ = await _drain_under_load(cluster, "router")
        cut = [e for e in log_events(cluster, "router") if e.get("event") == "drain.cutting_stream"]
    _assert_cut_with_retry_advice(errors)
    assert all(t > 0 for t in tokens), tokens
    assert len(cut) == 4, cut
    for e in cut:
        assert e["request_id"] and e["replica"] == "engine-1", e
        assert e["stage"] == "streaming" and e["chunks"] > 0 and e["silent_s"] < 1.0, e


async def test_router_drain_moves_its_streams_to_another_router_without_loss(tmp_path):
    """Two routers found through the registry; greedy streams pinned (by session) to router B, which is then
    SIGTERMed with a 0.4 s grace period (the in-process engines are fast): B cuts them with SHUTTING_DOWN, the gateway resumes each on router A,
    and every client stream is exactly the undisturbed one (text, token count, one served_by), with no error."""
    from services.gateway.app import start as start_gateway
    from services.gateway.config import GatewaySettings
    from services.gateway.routers import _score
    from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
    from tests.integration.test_router_failover import router_process

    async with in_process_fleet(tmp_path, engines=2) as fleet:
        fleet.gateway = await start_gateway(
            GatewaySettings(
                router_address="",
                registry_address=fleet.registry.address,
                db_path=str(tmp_path / "gateway.db"),
                bootstrap_api_key=API_KEY,
                http_port=-1,
            ),
            fleet.telemetry,
        )
        known = lambda: fleet.gateway.servicer.pipeline.routers.addresses  # noqa: E731
        with router_process(tmp_path, fleet.registry.address, "router-b", ["--grace-period-s=0.4"]) as (
            proc,
            ready,
        ):
            b = await assert_eventually(lambda: ready_address(ready), timeout_s=60)
            await assert_eventually(lambda: b in known(), timeout_s=20)
            a = fleet.router.address
            sessions = [f"c-{i}" for i in range(2000) if _score(f"s:c-{i}", b) > _score(f"s:c-{i}", a)][:3]
            stub = inf_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))
            md = (("authorization", f"Bearer {API_KEY}"),)

            def request(session: str) -> inf_pb.GenerateRequest:
                return inf_pb.GenerateRequest(
                    model=MODEL,
                    prompt=f"story {session}",
                    max_tokens=3000,
                    ignore_eos=True,
                    temperature=0,
                    session_id=session,
                )

            calls = [stub.Generate(request(s), metadata=md, timeout=90) for s in sessions]
            got = [[await c.read() for _ in range(10)] for c in calls]
            assert fleet.router.servicer.in_flight.total() == 0, "the streams are not on router B"
            proc.send_signal(signal.SIGTERM)

            async def rest(call, chunks):
                while (c := await call.read()) is not grpc.aio.EOF:
                    chunks.append(c)

            await asyncio.wait_for(asyncio.gather(*(rest(c, g) for c, g in zip(calls, got, strict=True))), 90)
            assert await asyncio.to_thread(proc.wait, 30) == 0
        b_log = (tmp_path / "router-b.log").read_text(errors="replace")
        assert '"drain.cutting_streams"' in b_log, "router B's drain did not have to cut (streams too short?)"
        for session, chunks in zip(sessions, got, strict=True):
            reference = [r async for r in stub.Generate(request(session), metadata=md, timeout=90)]
            assert "".join(c.chunk.text for c in chunks) == "".join(r.chunk.text for r in reference)
            assert sum(len(c.chunk.token_ids) for c in chunks) == 3000
            assert chunks[-1].chunk.usage.completion_tokens == 3000
            assert sum(c.chunk.HasField("served_by") for c in chunks) == 1
