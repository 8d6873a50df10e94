"""TLS across the fleet (`fleetserve up --tls`): clients holding the fleet's CA stream through the gateway over
gRPC and over OpenAI HTTP (the official openai client), clients without it are refused, and the internal ports
(router, engine, registry, metrics) accept only the fleet's own certificates: a certificate from another CA, or
none, cannot send a router any tenant_id or abort an engine's requests. Certificates are made by the test."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys

import grpc
import openai
import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc

from fleetserve.client import AsyncClient
from loadtest.bench import Target, run_load
from loadtest.workload import Workload
from shared.channels import open_channel
from shared.cluster import read_state
from shared.pki import LocalPki
from shared.tls import Tls
from tests.docs_commands import ROOT, code_blocks, logical_lines
from tests.integration.conftest import running_cluster

pytestmark = pytest.mark.slow


def _router_request() -> router_pb.GenerateRequest:
    """What a stranger who reached the router would send: any tenant (another tenant's limits and cache salt)."""
    return router_pb.GenerateRequest(
        request_id="stranger-1",
        spec=common_pb2.GenerationSpec(
            model="sim-1b", prompt="hello", sampling=common_pb2.SamplingParams(max_tokens=4)
        ),
        routing=router_pb.RoutingContext(tenant_id="someone-elses-tenant"),
    )


async def _router_generate(address: str, tls: Tls | None) -> grpc.StatusCode:
    """The status of a router Generate from a client with this TLS (OK only if text streamed back)."""
    async with open_channel(address, tls) as ch:
        try:
            stream = router_grpc.RouterServiceStub(ch).Generate(_router_request(), timeout=10)
            chunks = [c async for c in stream]
        except grpc.aio.AioRpcError as e:
            return e.code()
    assert any(c.chunk.text for c in chunks), chunks
    return grpc.StatusCode.OK


async def _engine_abort(address: str, tls: Tls | None) -> grpc.StatusCode:
    async with open_channel(address, tls) as ch:
        try:
            await engine_grpc.EngineServiceStub(ch).Abort(
                engine_pb.AbortRequest(request_id="any-id"), timeout=10
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def _registry_list(address: str, tls: Tls | None) -> grpc.StatusCode:
    async with open_channel(address, tls) as ch:
        try:
            await reg_grpc.RegistryServiceStub(ch).ListReplicas(reg_pb.ListReplicasRequest(), timeout=10)
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


async def test_tls_fleet_serves_clients_with_its_ca_and_only_fleet_certificates_inside(tmp_path):
    """One `fleetserve up --tls` fleet: gRPC and openai clients with the CA stream; without it they are refused;
    router, engine and registry refuse a client certificate from another CA and a client without one, and
    accept the fleet's own (the CLI's)."""
    stranger_pki = LocalPki(tmp_path / "stranger-ca")  # a CA the fleet never heard of
    async with running_cluster(tmp_path / "fleet", engines=1, tls=True) as cluster:
        state = cluster.state()
        ca = state["tls"]["ca"]
        key = cluster.api_key
        public = Tls(ca=ca)  # a public client: trusts the CA, has no certificate

        # -- the public ports: gRPC and OpenAI HTTP over TLS -------------------------------------------------
        creds = public.channel_credentials()
        async with AsyncClient(cluster.gateway, key, model="sim-1b", credentials=creds) as client:
            done = await client.generate("hello over tls", max_tokens=8, temperature=0.0).completion()
        assert done.usage.completion_tokens == 8 and done.text

        http = state["gateway_http"]
        async with openai.DefaultAsyncHttpxClient(verify=public.client_ssl_context()) as http_client:
            oa = openai.AsyncOpenAI(base_url=f"https://{http}/v1", api_key=key, http_client=http_client)
            stream = await oa.chat.completions.create(
                model="sim-1b", messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True
            )
            deltas = [
                c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content
            ]
        assert deltas, "the openai client streamed nothing over TLS"

        # The load generator (`fleetserve bench`) against the TLS fleet: the mesh and an engine directly.
        workload = Workload(model="sim-1b", prompt_tokens=16, max_tokens=4)
        mesh = await run_load(Target("mesh", cluster.gateway, key, public), workload, 2, 4, progress=False)
        direct = await run_load(
            Target("direct", state["engines"]["engine-1"], tls=cluster.client_tls),
            workload,
            2,
            4,
            progress=False,
        )
        assert (mesh["requests"], mesh["errors"], direct["requests"], direct["errors"]) == (4, 0, 4, 0)

        # Without the CA (the system's roots only) neither protocol gets through; plaintext neither.
        async with openai.DefaultAsyncHttpxClient() as http_client:
            oa = openai.AsyncOpenAI(
                base_url=f"https://{http}/v1", api_key=key, http_client=http_client, max_retries=0
            )
            with pytest.raises(openai.APIConnectionError):
                await oa.models.list()
        async with AsyncClient(
            cluster.gateway, key, model="sim-1b", credentials=grpc.ssl_channel_credentials()
        ) as client:
            with pytest.raises(Exception) as refused:
                await client.generate("no ca", max_tokens=2).completion()
            assert "UNAVAILABLE" in str(refused.value)
        assert await _registry_list(cluster.gateway, None) == grpc.StatusCode.UNAVAILABLE

        # -- the internal ports: only the fleet's certificates ------------------------------------------------
        stranger = stranger_pki.issue("stranger")
        # The stranger trusts the fleet's CA (it found ca.pem), but its own certificate is from another CA.
        stranger = Tls(stranger.cert, stranger.key, ca)
        engine = state["engines"]["engine-1"]
        for who in (stranger, public, None):
            assert await _router_generate(cluster.router, who) == grpc.StatusCode.UNAVAILABLE, who
            assert await _engine_abort(engine, who) == grpc.StatusCode.UNAVAILABLE, who
            assert await _registry_list(cluster.registry, who) == grpc.StatusCode.UNAVAILABLE, who
        fleet = cluster.client_tls  # the CLI's certificate, issued by the fleet's CA
        assert fleet is not None and fleet.mutual
        assert await _router_generate(cluster.router, fleet) == grpc.StatusCode.OK
        assert await _engine_abort(engine, fleet) == grpc.StatusCode.OK
        assert await _registry_list(cluster.registry, fleet) == grpc.StatusCode.OK

        # -- the CLI finds the fleet's TLS in the state file ---------------------------------------------------
        from shared.cluster import write_state

        write_state(state, tmp_path / "fleet")
        env = {**os.environ, "FLEETSERVE_HOME": str(tmp_path / "fleet")}
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "shared.cli.main", "status", "--json"],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        (replica,) = json.loads(out.stdout)["replicas"]
        assert replica["healthy"] and replica["breaker"] == "closed"
        assert read_state(tmp_path / "fleet")["tls"]["ca"] == ca

        # -- what docs/deployment.md shows a client of a TLS fleet: curl with the CA ----------------------------
        (block,) = [
            b for lang, b in code_blocks((ROOT / "docs/deployment.md").read_text()) if "--cacert" in b
        ]
        lines = [line for line in logical_lines(block) if not line.startswith("fleetserve up")]
        out = await asyncio.to_thread(
            subprocess.run,
            ["bash", "-c", "\n".join(["set -eo pipefail", *lines])],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert "sim-1b" in [m["id"] for m in json.loads(out.stdout)["data"]], out.stdout

    # Keys never readable by others.
    for f in (tmp_path / "fleet" / "tls").glob("*.key"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
