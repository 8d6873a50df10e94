"""Gateways over several routers: routers register in the registry and a gateway discovers them, a
conversation's requests stay on one router, and a router SIGKILLed mid-stream loses no token: the stream
resumes through another router (the router's own no-token-lost guarantee for engines, one hop up)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from services.gateway.routers import _score
from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
from tests.support import assert_eventually, ready_address

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def router_process(tmp: Path, registry: str, name: str, extra: list[str] | None = None):
    """A router as its own process, registered in the registry; killed when the block ends if still alive."""
    ready = tmp / f"{name}.json"
    log = open(tmp / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.router",
            f"--registry-address={registry}",
            f"--ready-file={ready}",
            f"--router-id={name}",
            "--metrics-port=-1",
            *(extra or []),
        ],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "FLEETSERVE_ROUTER_LOG_JSON": "true"},
    )
    try:
        yield proc, ready
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        log.close()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    """Registry, 2 engines, router A in this process; a gateway that knows no router but discovers them."""
    tmp = tmp_path_factory.mktemp("failover")
    async with in_process_fleet(tmp, engines=2) as f:
        f.gateway = await start_gateway(
            GatewaySettings(
                router_address="",
                registry_address=f.registry.address,
                db_path=str(tmp / "gateway.db"),
                bootstrap_api_key=API_KEY,
                http_port=-1,
            ),
            f.telemetry,
        )
        yield f


def routers_known(fleet) -> list[str]:
    return fleet.gateway.servicer.pipeline.routers.addresses


async def stream(fleet, **kw) -> tuple[str, list[pb.GenerateResponse]]:
    s = pb_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))
    call = s.Generate(
        pb.GenerateRequest(model=MODEL, **kw), metadata=(("authorization", f"Bearer {API_KEY}"),), timeout=60
    )
    chunks = [c async for c in call]
    return "".join(c.chunk.text for c in chunks), chunks


async def test_routers_register_and_the_gateway_discovers_them(fleet, tmp_path):
    """A router that starts registers with role ROUTER (engine lists do not show it) and the gateway starts
    using it; when it stops it leaves the gateway's list again. Bound to every interface (a pod), it registers
    its advertised address (--advertise-host, the pod IP on Kubernetes), not 0.0.0.0."""
    await assert_eventually(lambda: routers_known(fleet) == [fleet.router.address], timeout_s=10)
    listed = await fleet.registry_stub().ListReplicas(
        reg_pb.ListReplicasRequest(role=reg_pb.REPLICA_ROLE_ROUTER), timeout=2
    )
    assert [r.address for r in listed.replicas] == [fleet.router.address]
    engines = await fleet.registry_stub().ListReplicas(reg_pb.ListReplicasRequest(), timeout=2)
    assert {r.replica_id for r in engines.replicas} == {"engine-1", "engine-2"}
    extra = ["--host=0.0.0.0", "--advertise-host=127.0.0.1"]
    with router_process(tmp_path, fleet.registry.address, "router-b", extra) as (proc, ready):
        bound = await assert_eventually(lambda: ready_address(ready), timeout_s=60)
        assert bound.startswith("0.0.0.0:")
        b = "127.0.0.1:" + bound.rsplit(":", 1)[1]
        await assert_eventually(lambda: b in routers_known(fleet), timeout_s=20)
        listed = await fleet.registry_stub().ListReplicas(
            reg_pb.ListReplicasRequest(role=reg_pb.REPLICA_ROLE_ROUTER), timeout=2
        )
        assert sorted(r.address for r in listed.replicas) == sorted([fleet.router.address, b])
        text, chunks = await stream(fleet, prompt="hello", max_tokens=4, temperature=0)
        assert chunks[-1].chunk.usage.completion_tokens >= 1
        proc.send_signal(signal.SIGTERM)  # drains: DRAINING, then deregistered
        # In a thread: the registry it deregisters from runs on this event loop.
        await asyncio.to_thread(proc.wait, 30)
    await assert_eventually(lambda: routers_known(fleet) == [fleet.router.address], timeout_s=20)


async def test_a_router_killed_mid_stream_loses_no_token(fleet, tmp_path):
    """A greedy stream through router B (its session's affinity picks B); B is SIGKILLed mid-stream: the
    client's stream goes on through router A and ends with exactly the text and token count of an undisturbed
    run, nothing lost or repeated, and no error."""
    with router_process(tmp_path, fleet.registry.address, "router-b") as (proc, ready):
        b = await assert_eventually(lambda: ready_address(ready), timeout_s=60)
        await assert_eventually(lambda: b in routers_known(fleet), timeout_s=20)
        a = fleet.router.address
        session = next(
            f"conv-{i}" for i in range(1000) if _score(f"s:conv-{i}", b) > _score(f"s:conv-{i}", a)
        )
        req = dict(
            prompt="tell me a long story", max_tokens=600, ignore_eos=True, temperature=0, session_id=session
        )
        s = pb_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))
        call = s.Generate(
            pb.GenerateRequest(model=MODEL, **req),
            metadata=(("authorization", f"Bearer {API_KEY}"),),
            timeout=60,
        )
        got = [await call.read() for _ in range(20)]
        assert fleet.router.servicer.in_flight.total() == 0, "the stream is not on router B"
        proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        while (c := await call.read()) is not grpc.aio.EOF:
            got.append(c)
    # An operator's cleanup of the dead router (its lease would end it in 30 s).
    await fleet.registry_stub().DeregisterReplica(
        reg_pb.DeregisterReplicaRequest(replica_id="router-b"), timeout=2
    )
    text = "".join(c.chunk.text for c in got)
    reference, ref_chunks = await stream(fleet, **req)  # through A, undisturbed
    assert got[-1].chunk.usage.completion_tokens == 600 == ref_chunks[-1].chunk.usage.completion_tokens
    assert sum(len(c.chunk.token_ids) for c in got) == 600
    assert text == reference
    assert sum(c.chunk.HasField("served_by") for c in got) == 1  # one served_by, on the first chunk


async def test_a_conversation_stays_on_one_router(fleet, tmp_path):
    """With two routers, every turn of a session goes to the same router (rendezvous hashing of the session),
    and different sessions spread over both."""
    with router_process(tmp_path, fleet.registry.address, "router-b") as (_proc, ready):
        b = await assert_eventually(lambda: ready_address(ready), timeout_s=60)
        await assert_eventually(lambda: b in routers_known(fleet), timeout_s=20)
        pool = fleet.gateway.servicer.pipeline.routers
        firsts = {}
        for session in (f"s-{i}" for i in range(16)):
            picks = {pool.order(f"s:{session}")[0].address for _ in range(3)}
            assert len(picks) == 1
            firsts[session] = picks.pop()
        assert set(firsts.values()) == {fleet.router.address, b}, firsts
