"""Fixtures that start whole fleets as real processes (the same launcher `fleetserve up` uses), and the project
as `pip install` gives it."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from shared.cluster import Cluster, ClusterConfig
from tests.wheels import Installed, build_wheel, fresh_clone, install

# Fast but faithful: the sim runs 5x real time, leases are short so a dead replica leaves within ~1 s,
# and metrics are pushed every second so tests read them back quickly.
FAST = dict(
    speed_factor=5.0,
    lease_ttl_s=1.0,
    heartbeat_interval_s=0.2,
    metrics_export_interval_s=1.0,
    grace_period_s=5.0,
    start_timeout_s=60.0,
)


@contextlib.asynccontextmanager
async def running_cluster(tmp: Path, engines: int = 2, **overrides):
    """A started fleet in tmp; stopped (in order, every process reaped) when the block ends."""
    cluster = Cluster(ClusterConfig(data_dir=tmp, engines=engines, **{**FAST, **overrides}))
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


@pytest.fixture(scope="session")
def installed(tmp_path_factory) -> dict[str, Installed]:
    """The main wheel ("server") and the client-only wheel ("client") built from a fresh copy of the
    repository, each installed in its own fresh venv (tests/wheels.py)."""
    tmp = tmp_path_factory.mktemp("wheels")
    clone = fresh_clone(tmp / "clone")
    server = install(build_wheel(clone, tmp / "dist"), tmp / "venv")
    client = install(build_wheel(clone / "client", tmp / "client-dist"), tmp / "client-venv")
    return {"server": server, "client": client}
