"""Keeps an engine replica in the registry: register (retried with backoff), heartbeat its load on a client
stream, register again when the lease is lost or the registry restarts, drain and deregister at shutdown."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc

from shared.channels import open_channel
from shared.resilience import full_jitter
from shared.server import cancel_and_wait
from shared.tls import Tls

log = structlog.get_logger(__name__)

# A heartbeat stream is reopened after this long (every RPC carries a deadline, streams included).
HEARTBEAT_STREAM_S = 300.0


class Registration:
    """The registry client of one replica. start() returns at once; `registered` is set while a lease is held."""

    def __init__(
        self,
        registry_address: str,
        replica: reg_pb.Replica,
        load: Callable[[], common_pb2.ReplicaLoad],
        *,
        retry_base_s: float = 0.1,
        retry_max_s: float = 5.0,
        rpc_timeout_s: float = 2.0,
        stream_timeout_s: float = HEARTBEAT_STREAM_S,
        rng: random.Random | None = None,
        tls: Tls | None = None,
    ) -> None:
        self.registry_address = registry_address
        self.tls = tls
        self.replica = replica
        self._load = load
        self.retry_base_s = retry_base_s
        self.retry_max_s = retry_max_s
        self.rpc_timeout_s = rpc_timeout_s
        self.stream_timeout_s = stream_timeout_s
        self._rng = rng
        self.registered = asyncio.Event()
        self.registrations = 0
        self.register_attempts = 0
        self.heartbeats_sent = 0
        self._draining = False
        self._channel: grpc.aio.Channel | None = None
        self._stub: reg_grpc.RegistryServiceStub | None = None
        self._task: asyncio.Task | None = None

    @property
    def replica_id(self) -> str:
        return self.replica.replica_id

    def start(self) -> None:
        """Begin registering and heartbeating in the background."""
        self._channel = open_channel(self.registry_address, self.tls)
        self._stub = reg_grpc.RegistryServiceStub(self._channel)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine.registration")

    async def drain(self) -> None:
        """Tell the registry this replica takes no new requests (routers stop sending); heartbeats go on so
        its load stays visible, but a lost lease is no longer renewed."""
        self._draining = True
        if not self.registered.is_set():
            await self._stop_task()  # not registered yet: never become SERVING now
        await self._deregister(drain=True)

    async def others_serving(self) -> int:
        """How many other replicas of this replica's model and version the registry lists as serving."""
        if self._stub is None:
            return 0
        resp = await self._stub.ListReplicas(
            reg_pb.ListReplicasRequest(model=self.replica.model), timeout=self.rpc_timeout_s
        )
        return sum(
            1
            for r in resp.replicas
            if r.replica_id != self.replica_id
            and r.model_version == self.replica.model_version
            and r.state == reg_pb.REPLICA_STATE_SERVING
        )

    async def close(self) -> None:
        """Stop heartbeating and remove this replica from the registry (best effort), then close the channel."""
        self._draining = True
        await self._stop_task()
        await self._deregister(drain=False)
        self._stub = None
        if self._channel is not None:
            await self._channel.close(grace=None)
            self._channel = None

    # -- internals ----------------------------------------------------------------------------------

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        self.registered.clear()

    async def _deregister(self, drain: bool) -> None:
        if self._stub is None:
            return
        try:
            resp = await self._stub.DeregisterReplica(
                reg_pb.DeregisterReplicaRequest(replica_id=self.replica_id, drain=drain),
                timeout=min(self.rpc_timeout_s, 1.0),
            )
            log.info("engine.deregistered", replica_id=self.replica_id, drain=drain, found=resp.found)
        except grpc.aio.AioRpcError as e:
            # Shutting down anyway: the lease expires on its own if the registry is unreachable.
            log.warning("engine.deregister_failed", drain=drain, code=e.code().name, error=e.details())

    async def _run(self) -> None:
        while not self._draining:
            interval = await self._register()
            quick_failures = 0
            while True:
                loop = asyncio.get_running_loop()
                opened = loop.time()
                try:
                    await self._heartbeat(interval)
                except grpc.aio.AioRpcError as e:
                    self.registered.clear()
                    if self._draining:
                        log.info("engine.heartbeat_ended", code=e.code().name)
                        return
                    log.warning(
                        "engine.heartbeat_failed",
                        code=e.code().name,
                        error=e.details(),
                        will="register again",
                    )
                    if e.code() != grpc.StatusCode.NOT_FOUND:
                        await asyncio.sleep(full_jitter(0, self.retry_base_s, self.retry_max_s, self._rng))
                    break
                # The stream reached its deadline (normal rotation) or the registry ended it: open another,
                # backing off if that keeps happening at once.
                quick_failures = quick_failures + 1 if loop.time() - opened < interval else 0
                if quick_failures:
                    await asyncio.sleep(
                        full_jitter(quick_failures, self.retry_base_s, self.retry_max_s, self._rng)
                    )

    async def _register(self) -> float:
        """Register, retrying until the registry answers; the heartbeat interval it asks for."""
        assert self._stub is not None
        attempt = 0
        while True:
            self.register_attempts += 1
            try:
                resp = await self._stub.RegisterReplica(
                    reg_pb.RegisterReplicaRequest(replica=self.replica), timeout=self.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as e:
                if attempt % 10 == 0:  # not every retry: a registry down for minutes would flood the log
                    log.warning(
                        "engine.register_failed",
                        registry=self.registry_address,
                        attempt=attempt + 1,
                        code=e.code().name,
                        error=e.details(),
                    )
                await asyncio.sleep(full_jitter(attempt, self.retry_base_s, self.retry_max_s, self._rng))
                attempt += 1
                continue
            self.registrations += 1
            self.registered.set()
            interval = resp.heartbeat_interval_s if resp.heartbeat_interval_s > 0 else 1.0
            log.info(
                "engine.registered",
                registry=self.registry_address,
                replica_id=self.replica_id,
                address=self.replica.address,
                attempts=attempt + 1,
                lease_ttl_s=resp.lease_ttl_s,
                heartbeat_interval_s=interval,
            )
            return interval

    async def _heartbeat(self, interval: float) -> None:
        """One heartbeat stream: a report now, then one per interval, until the stream ends or fails."""
        assert self._stub is not None

        async def reports():
            while True:
                yield reg_pb.HeartbeatRequest(replica_id=self.replica_id, load=self._load())
                self.heartbeats_sent += 1
                await asyncio.sleep(interval)

        call = self._stub.Heartbeat(reports(), timeout=self.stream_timeout_s)
        try:
            await call
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
        finally:
            call.cancel()
