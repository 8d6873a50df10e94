"""Network faults between gateway and router through a TCP proxy (tests/tcp_proxy.py): latency with connections
sliced into pieces of a few bytes changes nothing a client sees; connections reset at random points end only
with a clear status (never UNKNOWN or INTERNAL), streams that complete are token-identical to an undisturbed
run, and nothing is left in flight on router or engines afterwards."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import grpc
import pytest
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb

from services.engine.app import start as start_engine
from services.engine.config import EngineSettings
from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from shared.errors import details_of
from tests.chaos.report import record
from tests.integration.test_router import API_KEY, MODEL, generate, in_process_fleet, request, router_spans
from tests.support import assert_eventually
from tests.tcp_proxy import Faults, TcpProxy

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(model=MODEL, prompt=f"net {i % 5}", max_tokens=120, seed=i % 5, temperature=0.8)


async def _run(stub, i: int) -> tuple[str, str]:
    """(text, "" or 'CODE REASON')."""
    chunks = []
    try:
        async for r in stub.Generate(
            _request(i), metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=30
        ):
            chunks.append(r.chunk.text)
    except grpc.aio.AioRpcError as e:
        d = details_of(e)
        return "".join(chunks), f"{d.code.name} {d.reason}".strip()
    return "".join(chunks), ""


async def test_latency_slicing_and_resets_between_gateway_and_router(tmp_path):
    """Through the proxy: (1) 1 ms per piece, pieces of 1-7 bytes: every stream OK and identical to the direct
    path; (2) each connection reset after 2-40 KB: failures are UNAVAILABLE with a reason, OK streams identical;
    then no work is left on router or engines."""
    async with in_process_fleet(tmp_path, engines=2, gateway=True) as fleet:
        direct = pb_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))
        reference = {i: (await _run(direct, i))[0] for i in range(5)}
        proxy = await TcpProxy(fleet.router.address, Faults(latency_s=0.001, slice_max=7)).start()
        gateway = await start_gateway(
            GatewaySettings(
                router_address=proxy.address,
                db_path=str(tmp_path / "gw-proxied.db"),
                bootstrap_api_key=API_KEY,
                http_port=-1,
            ),
            fleet.telemetry,
        )
        try:
            stub = pb_grpc.InferenceServiceStub(fleet.channel(gateway.address))
            sliced = await asyncio.gather(*(_run(stub, i) for i in range(12)))
            assert [e for _, e in sliced if e] == []
            assert all(text == reference[i % 5] for i, (text, _) in enumerate(sliced))

            proxy.faults = Faults(reset_after=(2_000, 40_000))
            proxy.reset_all()  # the gateway reconnects under the new faults
            results = []
            for batch in range(6):
                results += await asyncio.gather(*(_run(stub, batch * 6 + i) for i in range(6)))
            errors = [e for _, e in results if e]
            assert proxy.connections > 2, "the gateway never reconnected after a reset"
            assert all(e.startswith("UNAVAILABLE ") and len(e.split()) == 2 for e in errors), errors
            ok = [(i, t) for i, (t, e) in enumerate(results) if not e]
            assert all(t == reference[i % 5] for i, t in ok)
            record(
                "network_resets_gateway_router",
                requests=len(results),
                failed=len(errors),
                failures_by_status={e: errors.count(e) for e in set(errors)},
                resets=proxy.resets,
                lost_or_duplicated_tokens=0,
            )
            print(f"network: {len(results)} requests, {proxy.resets} resets, errors {sorted(set(errors))}")

            async def idle():
                loads = [await fleet.engine_load(n) for n in fleet.engines]
                busy = sum(x.load.running + x.load.waiting for x in loads)
                return busy == 0 and fleet.router.servicer.in_flight.total() == 0

            await assert_eventually(idle, timeout_s=30, interval_s=0.1, message="work left after resets")
        finally:
            await gateway.stop(0.5)
            await proxy.stop()


async def _http_completion(address: str, stream: bool) -> tuple[int, str, str]:
    """(status, text, finish_reason) of one greedy completion over the OpenAI HTTP endpoint."""
    body = {"model": MODEL, "prompt": "whole 1", "max_tokens": 40, "temperature": 0, "stream": stream}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"http://{address}/v1/completions", json=body, headers=headers, timeout=20) as r:
            if not stream:
                data = await r.json()
                if r.status != 200:
                    return r.status, "", str(data)
                return r.status, data["choices"][0]["text"], data["choices"][0]["finish_reason"]
            text, finish = "", ""
            async for line in r.content:
                if line.startswith(b"data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice.get("text") or ""
                    finish = choice.get("finish_reason") or finish
            return r.status, text, finish


async def test_a_cut_between_the_last_chunk_and_the_trailers_leaves_every_answer_whole(tmp_path):
    """The router-to-gateway connection reset in place of each call's trailers (after its finish chunk, before
    its status): a gRPC client gets every chunk with the finish reason, and HTTP clients, streaming or not, a
    complete answer with status 200, each identical to an undisturbed run; the router stays up in the gateway's
    pool; nothing is left in flight."""
    async with in_process_fleet(tmp_path, engines=1, gateway=True) as fleet:
        direct = pb_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))
        req = pb.GenerateRequest(model=MODEL, prompt="whole 1", max_tokens=40, temperature=0)
        auth = (("authorization", f"Bearer {API_KEY}"),)
        reference = "".join([r.chunk.text async for r in direct.Generate(req, metadata=auth, timeout=20)])
        proxy = await TcpProxy(fleet.router.address, Faults(cut_trailers_after=2)).start()
        gateway = await start_gateway(
            GatewaySettings(
                router_address=proxy.address,
                db_path=str(tmp_path / "gw-cut.db"),
                bootstrap_api_key=API_KEY,
                http_port=0,
            ),
            fleet.telemetry,
        )
        try:
            chunks, error = [], None
            try:
                stub = pb_grpc.InferenceServiceStub(fleet.channel(gateway.address))
                async for r in stub.Generate(req, metadata=auth, timeout=20):
                    chunks.append(r.chunk)
            except grpc.aio.AioRpcError as e:
                error = e.code()
            assert "".join(c.text for c in chunks) == reference
            assert chunks[-1].finish_reason != 0 and chunks[-1].usage.completion_tokens == 40
            assert error is None  # the gateway ends the call OK with its last chunk (docs/protocols.md)
            for n, stream in enumerate((False, True), start=1):
                # The cut closes the whole connection: the next request goes on a new one.
                await assert_eventually(lambda n=n: proxy.trailers_cut >= n and proxy.open_connections == 0)
                status, text, finish = await _http_completion(gateway.http_address, stream)
                assert (status, text, finish) == (200, reference, "length"), f"stream={stream}"
            await assert_eventually(lambda: proxy.trailers_cut >= 3)
            # A call that broke after its finish chunk is a whole generation: its router is not marked down (nor
            # is a resume of it tried elsewhere).
            assert [r.address for r in gateway.servicer.pipeline.routers.healthy()] == [proxy.address]

            async def idle():
                load = await fleet.engine_load(next(iter(fleet.engines)))
                return (
                    load.load.running + load.load.waiting == 0
                    and fleet.router.servicer.in_flight.total() == 0
                )

            await assert_eventually(idle, timeout_s=30, interval_s=0.1, message="work left after the cuts")
        finally:
            await gateway.stop(0.5)
            await proxy.stop()


async def test_an_engine_call_cut_after_its_finish_chunk_ends_ok_at_the_router(tmp_path):
    """The engine-to-router connection closed in place of the engine call's trailers: the router relays the whole
    generation and ends its own call OK, resuming nothing (its only engine is the cut one, so a resume would
    fail the request) and counting no fault against the engine."""
    async with in_process_fleet(tmp_path, engines=0) as fleet:
        engine = await start_engine(
            EngineSettings(registry_address="", replica_id="engine-cut", model=MODEL, speed_factor=20.0),
            fleet.telemetry,
        )
        proxy = await TcpProxy(engine.address, Faults(cut_trailers_after=2)).start()
        try:
            # Registered by hand under the proxy's address: the router reaches the engine only through it.
            replica = reg_pb.Replica(
                replica_id="engine-cut", address=proxy.address, model=MODEL, model_version="v1"
            )
            await fleet.registry_stub().RegisterReplica(
                reg_pb.RegisterReplicaRequest(replica=replica), timeout=5
            )
            await assert_eventually(lambda: fleet.router.servicer.membership.get("engine-cut") is not None)
            for i in range(3):
                await assert_eventually(
                    lambda: proxy.open_connections == 0
                )  # a cut closes every stream on it
                chunks = await generate(fleet, request(max_tokens=40, request_id=f"cut-{i}", ignore_eos=True))
                assert chunks[-1].finish_reason != 0 and chunks[-1].usage.completion_tokens == 40
                assert sum(len(c.token_ids) for c in chunks) == 40
            await assert_eventually(lambda: proxy.trailers_cut >= 3)
            spans = [s for i in range(3) for s in router_spans(fleet, f"cut-{i}")]
            assert [s.attributes["fleetserve.attempts"] for s in spans] == [1, 1, 1]
        finally:
            await proxy.stop()
            await engine.stop(0)
