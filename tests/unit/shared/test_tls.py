"""TLS helpers: files checked at start (naming the file), the name verified for multi-address targets, and a
server certificate renewed on disk served to new connections without a restart. Certificates from shared.pki."""

from __future__ import annotations

import shutil
import stat

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.channels import open_channel
from shared.pki import LocalPki
from shared.server import create_server
from shared.tls import Tls, TlsConfigError


def test_files_are_checked_when_tls_is_configured(tmp_path):
    """A certificate without its key, or a file that cannot be read, fails at once and names the file."""
    assert Tls.create() is None
    with pytest.raises(TlsConfigError, match="go together"):
        Tls.create(cert="c.pem")
    with pytest.raises(TlsConfigError, match="missing.pem"):
        Tls.create(cert=str(tmp_path / "missing.pem"), key=str(tmp_path / "k.pem"))


def test_keys_are_written_for_their_owner_only(tmp_path):
    pki = LocalPki(tmp_path / "tls")
    tls = pki.issue("router")
    assert stat.S_IMODE((tmp_path / "tls" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "tls" / "router.key").stat().st_mode) == 0o600
    assert tls.mutual and tls.ca == str(pki.ca_path)


def test_the_name_checked_for_a_list_of_addresses_is_the_first_host():
    """gRPC would check a name no certificate holds for ipv4:a:1,b:2 (the redundant registries' target)."""
    tls = Tls(ca="ca.pem")
    assert tls.channel_options("127.0.0.1:7004") == ()
    assert tls.channel_options("ipv4:127.0.0.1:1,127.0.0.1:2") == (
        ("grpc.ssl_target_name_override", "127.0.0.1"),
    )
    assert tls.channel_options("ipv6:[::1]:1,[::1]:2") == (("grpc.ssl_target_name_override", "::1"),)
    named = Tls(ca="ca.pem", server_name="fleetserve-internal")
    assert named.channel_options("10.1.2.3:7001") == (
        ("grpc.ssl_target_name_override", "fleetserve-internal"),
    )


async def _serving(address: str, tls: Tls) -> bool:
    async with open_channel(address, tls) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False
    return r.status == health_pb2.HealthCheckResponse.SERVING


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path):
    """The server's files are replaced by a certificate from another CA (a rotation): a client trusting only
    the new CA gets in on its next connection, the old CA's client no longer does."""
    old, new = LocalPki(tmp_path / "old"), LocalPki(tmp_path / "new")
    served = old.issue("registry")
    running = await create_server([], tls=served)
    try:
        assert await _serving(running.address, old.issue("cli"))
        renewed = new.issue("registry")
        for src, dst in ((renewed.cert, served.cert), (renewed.key, served.key), (renewed.ca, served.ca)):
            shutil.copyfile(src, dst)
        assert await _serving(running.address, new.issue("cli"))
        assert not await _serving(running.address, old.issue("cli2"))
    finally:
        await running.server.stop(0)


async def test_the_exec_probe_checks_a_tls_server_with_the_pods_certificate(tmp_path, monkeypatch):
    """`python -m shared.health` (the TLS pods' probe): SERVING with the fleet's certificate from FLEETSERVE_TLS_*,
    not serving without one."""
    import asyncio

    from shared.health import main

    pki = LocalPki(tmp_path / "tls")
    running = await create_server([], tls=pki.issue("gateway"))
    try:
        assert await asyncio.to_thread(main, [running.address]) == 1  # plaintext against TLS
        probe = pki.issue("probe")
        monkeypatch.setenv("FLEETSERVE_TLS_CERT", probe.cert)
        monkeypatch.setenv("FLEETSERVE_TLS_KEY", probe.key)
        monkeypatch.setenv("FLEETSERVE_TLS_CA", probe.ca)
        assert await asyncio.to_thread(main, [running.address]) == 0
    finally:
        await running.server.stop(0)
