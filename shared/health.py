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


def main(argv: list[str] | None = None) -> int:
    """`python -m shared.health HOST:PORT [SERVICE]`: exit 0 if the server reports SERVING, else 1. The exec probe
    of a TLS pod (Kubernetes' own gRPC probe speaks plaintext only): TLS from FLEETSERVE_TLS_* (shared.tls)."""
    import argparse

    from shared.tls import Tls

    p = argparse.ArgumentParser(prog="python -m shared.health", description=main.__doc__)
    p.add_argument("address")
    p.add_argument("service", nargs="?", default="")
    p.add_argument("--timeout-s", type=float, default=2.0)
    args = p.parse_args(argv)
    tls = Tls.for_tools({})
    ok = asyncio.run(check(args.address, args.service, timeout_s=args.timeout_s, tls=tls))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
