"""Real external servers for tests (never mocks): each starts on free loopback ports in a tmp dir and is
stopped and reaped afterwards; a server that is not installed skips its tests with the reason."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest

from shared.etcd_process import EtcdMissing, EtcdProcess, free_port

__all__ = ["free_port", "etcd_server", "etcd", "EtcdPrefix"]


@pytest.fixture(scope="session")
def etcd_server(tmp_path_factory):
    """One etcd (Debian's etcd-server) for the whole test run; tests isolate themselves with a key prefix."""
    server = EtcdProcess(tmp_path_factory.mktemp("etcd") / "data")
    try:
        server.start()
    except EtcdMissing as e:
        pytest.skip(str(e))
    try:
        yield server
    finally:
        server.stop()


@dataclass(frozen=True)
class EtcdPrefix:
    """Where a test's keys go: the shared server's endpoint and a prefix no other test uses."""

    endpoint: str
    prefix: str


@pytest.fixture
def etcd(etcd_server) -> EtcdPrefix:
    return EtcdPrefix(etcd_server.endpoint, f"/test-{uuid.uuid4().hex[:12]}/")
