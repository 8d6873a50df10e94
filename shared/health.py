"""Health probes over the standard grpc.health.v1 service."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from shared.channels import open_channel
from shared.tls import Tls


async def check(address: str, service: str = "", timeout_s: float = 1.0, tls: Tls | None = None) -> bool:
    """True if the server at address reports SERVING for service (\"\" = the whole server)."""
    async with open_channel(address, tls) as ch:
        try:
            resp = await health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


async def wait_healthy(
    address: str, timeout_s: float = 30.0, interval_s: float = 0.05, tls: Tls | None = None
) -> None:
    """Poll address until SERVING; TimeoutError after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await check(address, timeout_s=min(1.0, max(0.05, deadline - time.monotonic())), tls=tls):
            return
        await asyncio.sleep(interval_s)
    raise TimeoutError(f"{address} not healthy within {timeout_s}s")
