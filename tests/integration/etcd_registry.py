"""A registry started in the test's own process over the etcd members it is given (tests of following etcd)."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from services.registry import app as registry_app
from services.registry.config import RegistrySettings
from shared.etcd_process import EtcdCluster
from shared.telemetry import Telemetry


async def start_registry(
    endpoints: list[str], tmp_path: Path, name: str, prefix: str, lease_ttl_s: float = 30
) -> registry_app.RegistryApp:
    """Registry `name` talking only to `endpoints`, its keys under `prefix`; each has its own /metrics registry,
    so two in one process never count each other's watch breaks."""
    tp, mp = TracerProvider(), MeterProvider()
    settings = RegistrySettings(
        port=0,
        store="etcd",
        etcd_endpoint=",".join(endpoints),
        etcd_prefix=prefix,
        db_path=str(tmp_path / f"{name}.db"),
        lease_ttl_s=lease_ttl_s,
        heartbeat_interval_s=1,
    )
    return await registry_app.start(settings, Telemetry(tp.get_tracer("t"), mp.get_meter("t"), tp, mp))


@contextlib.asynccontextmanager
async def on_one_member(
    tmp_path: Path, etcd_cluster: EtcdCluster, prefix: str, lease_ttl_s: float = 30
) -> AsyncIterator[tuple[registry_app.RegistryApp, grpc.aio.Channel, subprocess.Popen]]:
    """(registry, channel to it, process of its only etcd member); the member is resumed (SIGCONT) at the end, so a
    failed test never leaves it stopped."""
    app = await start_registry(etcd_cluster.endpoints[:1], tmp_path, "a", prefix, lease_ttl_s=lease_ttl_s)
    member = etcd_cluster.members[0].process
    try:
        async with grpc.aio.insecure_channel(app.address) as ch:
            yield app, ch, member
    finally:
        member.send_signal(signal.SIGCONT)
        await app.stop(0.2)
