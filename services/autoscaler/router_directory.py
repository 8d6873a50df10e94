"""The routers the autoscaler polls for arrivals and queues: those it was given (--router-addresses) and, with
--router-discovery, those registered in the registry (role ROUTER), looked up each round, so a router that comes
back on a new port (a restarted gateway worker's embedded router) is followed under its registry id."""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc

from shared.channels import ChannelPool
from shared.tls import Tls


class RouterDirectory:
    """Each poll's routers as (key, stub): a static router keyed by its address, a registered one by its replica id
    (its arrival counters follow it across addresses; a restarted process's reset counters are caught up by the
    ArrivalMeter). A registered router at a static address is polled once, as the static one."""

    def __init__(
        self,
        static: Sequence[str],
        registry: grpc.aio.Channel,
        *,
        discovery: bool = False,
        tls: Tls | None = None,
    ) -> None:
        self._static = list(dict.fromkeys(static))
        self._registry = reg_grpc.RegistryServiceStub(registry)
        self.discovery = discovery
        self._channels = ChannelPool(tls)  # one per router address, static or found
        self._found: set[str] = set()  # addresses of the registered routers polled last round

    @property
    def any(self) -> bool:
        """Whether there are routers to ask (given, or looked up): else arrivals come from the metrics service."""
        return bool(self._static) or self.discovery

    @property
    def found(self) -> list[str]:
        """The addresses of the registered routers polled last round (not given by address)."""
        return sorted(self._found)

    def _stub(self, address: str) -> router_grpc.RouterServiceStub:
        # A stub is a few attribute lookups over the pool's channel: made per round, not kept.
        return router_grpc.RouterServiceStub(self._channels.get(address))

    async def routers(self, timeout_s: float) -> list[tuple[str, router_grpc.RouterServiceStub]]:
        """This round's routers. A registry that does not answer leaves the given ones (and no registered one:
        one left unpolled for a round adds nothing and loses nothing, the meter catches up on the next)."""
        out = [(a, self._stub(a)) for a in self._static]
        if not self.discovery:
            return out
        try:
            resp = await self._registry.ListReplicas(
                reg_pb.ListReplicasRequest(role=reg_pb.REPLICA_ROLE_ROUTER), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return out
        seen: set[str] = set()
        for r in resp.replicas:
            if not r.address or r.address in self._static or r.address in seen:
                continue
            seen.add(r.address)
            out.append(("id:" + r.replica_id, self._stub(r.address)))
        for address in self._found - seen:
            await self._channels.discard(address)  # gone from the registry (or moved)
        self._found = seen
        return out

    async def close(self) -> None:
        await self._channels.close()
        self._found = set()
