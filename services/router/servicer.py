"""RouterService: picks a replica per request, relays the engine's bytes, fails over before the first token."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import grpc
import structlog
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.router.v1 import router_service_pb2 as pb
from opentelemetry import trace

from services.router.membership import Change, Membership, ReplicaInfo
from services.router.policies import Policy
from shared.channels import ChannelPool, raw_stream
from shared.deadlines import HOP_MARGIN_S, deadline_passed, downstream_timeout, wire_timeout
from shared.errors import DeadlineExceeded, InvalidArgument, NoHealthyReplica, NotFound, rpc_boundary
from shared.telemetry import bind_request, context_from_metadata, metadata_for_downstream

log = structlog.get_logger(__name__)

ENGINE_GENERATE = "/fleetserve.engine.v1.EngineService/Generate"
_serialize_engine_request = engine_pb.GenerateRequest.SerializeToString


class RouterServicer:
    """fleetserve.router.v1.RouterService. Generate yields the engine's response bytes unchanged (the
    three hops' GenerateResponse messages are wire-identical), so no chunk is parsed here."""

    def __init__(
        self,
        membership: Membership,
        policy: Policy,
        pool: ChannelPool,
        tracer: trace.Tracer,
        *,
        max_attempts: int = 3,
        default_timeout_s: float = 120.0,
        ready_wait_s: float = 2.0,
    ) -> None:
        self.membership = membership
        self.policy = policy
        self.pool = pool
        self.tracer = tracer
        self.max_attempts = max_attempts
        self.default_timeout_s = default_timeout_s
        self.ready_wait_s = ready_wait_s
        self.in_flight: Counter[str] = Counter()
        self._stubs: dict[str, grpc.aio.UnaryStreamMultiCallable] = {}
        # Channels of replicas that left while requests still streamed from them: closed once idle.
        self._discard_when_idle: dict[str, str] = {}
        self._tasks: set[asyncio.Task] = set()
        membership.subscribe(self._on_change)

    # -- membership changes ------------------------------------------------------------------------

    def _on_change(self, change: Change, replica: ReplicaInfo) -> None:
        if change is Change.REMOVED:
            self.policy.remove(replica.replica_id)
            if self.in_flight[replica.replica_id] > 0:
                self._discard_when_idle[replica.replica_id] = replica.address
            else:
                self._discard_channel(replica.address)
        else:
            self._discard_when_idle.pop(replica.replica_id, None)
            self.policy.on_load_update(replica)

    def _discard_channel(self, address: str) -> None:
        # Another replica may have taken over the address (a restarted engine on the same port).
        if any(r.address == address for r in self.membership.replicas()):
            return
        self._stubs.pop(address, None)
        task = asyncio.get_running_loop().create_task(self.pool.discard(address))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stub(self, address: str) -> grpc.aio.UnaryStreamMultiCallable:
        stub = self._stubs.get(address)
        if stub is None:
            stub = raw_stream(self.pool.get(address), ENGINE_GENERATE, _serialize_engine_request)
            self._stubs[address] = stub
        return stub

    def _release(self, replica_id: str) -> None:
        self.policy.on_complete(replica_id)
        n = self.in_flight[replica_id] - 1
        if n > 0:
            self.in_flight[replica_id] = n
            return
        del self.in_flight[replica_id]
        address = self._discard_when_idle.pop(replica_id, None)
        if address is not None:
            self._discard_channel(address)

    # -- choosing -----------------------------------------------------------------------------------

    async def _await_membership(self, timeout_s: float | None) -> None:
        if self.membership.ready.is_set():
            return
        wait = self.ready_wait_s if timeout_s is None else min(self.ready_wait_s, timeout_s)
        try:
            await asyncio.wait_for(self.membership.ready.wait(), wait)
        except TimeoutError:
            raise NoHealthyReplica(
                "the router has no membership from the registry yet", retry_after_s=1.0
            ) from None

    def _choose(self, request: pb.GenerateRequest, exclude: set[str]) -> ReplicaInfo:
        model = request.spec.model
        candidates = self.membership.routable(model, exclude)
        if candidates:
            return self.policy.select(candidates, request)
        if not self.membership.knows_model(model):
            available = sorted(self.membership.models())
            listed = ", ".join(available) if available else "none"
            raise NotFound(
                f"model {model!r} is not served by this fleet; available models: {listed}",
                reason="MODEL_NOT_FOUND",
                metadata={"model": model, "available_models": ",".join(available)},
            )
        raise NoHealthyReplica(
            f"no healthy replica of model {model!r} can take the request now",
            retry_after_s=1.0,
            metadata={"model": model},
        )

    # -- RPCs ---------------------------------------------------------------------------------------

    @rpc_boundary
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        model = request.spec.model
        attempts = 0
        replica_id = ""
        status = "CANCELLED"  # unless the stream completes or fails with a known code
        with self.tracer.start_as_current_span(
            "router.Generate", context=context_from_metadata(context), kind=trace.SpanKind.SERVER
        ) as span:
            bind_request(request.request_id, span)
            span.set_attribute("fleetserve.request_id", request.request_id)
            span.set_attribute("fleetserve.model", model)
            try:
                if not model:
                    raise InvalidArgument(
                        "spec.model is required", field_violations=[("spec.model", "required")]
                    )
                timeout = downstream_timeout(context, default_s=self.default_timeout_s, conservative=True)
                span.set_attribute("fleetserve.deadline_left_ms", timeout * 1000.0)
                deadline = time.monotonic() + timeout
                await self._await_membership(timeout)
                engine_request = engine_pb.GenerateRequest(
                    request_id=request.request_id,
                    spec=request.spec,
                    tenant_id=request.routing.tenant_id,
                    cache_salt=request.routing.tenant_id,
                    priority=request.routing.priority,
                )
                metadata = metadata_for_downstream()
                tried: set[str] = set()
                while True:
                    replica = self._choose(request, tried)
                    replica_id = replica.replica_id
                    tried.add(replica_id)
                    attempts += 1
                    self.in_flight[replica_id] += 1
                    streamed = False
                    call = None
                    try:
                        # Rounded so that the engine never sees more time than this hop has left.
                        left = wire_timeout(deadline - time.monotonic())
                        call = self._stub(replica.address)(engine_request, timeout=left, metadata=metadata)
                        async for data in call:
                            streamed = True
                            yield data
                        status = "OK"
                        return
                    except grpc.aio.AioRpcError as e:
                        if streamed or e.code() != grpc.StatusCode.UNAVAILABLE:
                            raise  # mid-stream (resume is not built yet) or not the replica's fault
                        self._failed_before_first_chunk(replica, e, attempts, deadline)
                    finally:
                        if call is not None:
                            call.cancel()  # reaches the engine when our caller went away; no-op once done
                        self._release(replica_id)
            except grpc.aio.AioRpcError as e:
                status = e.code().name
                raise
            except Exception as e:
                status = getattr(getattr(e, "code", None), "name", "INTERNAL")
                raise
            finally:
                if status == "CANCELLED" and deadline_passed(context):
                    status = "DEADLINE_EXCEEDED"
                span.set_attribute("fleetserve.replica_id", replica_id)
                span.set_attribute("fleetserve.attempts", attempts)
                code = getattr(grpc.StatusCode, status, grpc.StatusCode.UNKNOWN)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                log.info(
                    "router.request",
                    model=model,
                    replica=replica_id,
                    attempts=attempts,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
                )

    def _failed_before_first_chunk(
        self, replica: ReplicaInfo, err: grpc.aio.AioRpcError, attempts: int, deadline: float
    ) -> None:
        """Take the replica out of rotation; raise if no further attempt is allowed, else return to retry."""
        self.membership.mark_unroutable(replica.replica_id)
        log.warning(
            "router.replica_failed",
            replica=replica.replica_id,
            address=replica.address,
            attempt=attempts,
            code=err.code().name,
            error=err.details(),
        )
        if time.monotonic() + HOP_MARGIN_S >= deadline:
            raise DeadlineExceeded("deadline exceeded while failing over between replicas") from err
        if attempts >= self.max_attempts:
            raise NoHealthyReplica(
                f"{attempts} replicas of model {replica.model!r} failed before streaming; last: "
                f"{err.code().name} {err.details()}",
                retry_after_s=1.0,
                metadata={"model": replica.model, "attempts": str(attempts)},
            ) from err

    @rpc_boundary
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        return pb.ListModelsResponse(
            models=[pb.ModelReplicas(model=m, replicas=n) for m, n in self.membership.models().items()]
        )

    @rpc_boundary
    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext):
        return pb.GetStatusResponse(
            replicas=[
                pb.ReplicaStatus(
                    replica_id=r.replica_id,
                    address=r.address,
                    model=r.model,
                    in_flight=self.in_flight.get(r.replica_id, 0),
                    load=r.load,
                    routable=self.membership.is_routable(r),
                )
                for r in self.membership.replicas()
            ]
        )

    async def close(self) -> None:
        """Wait for channel closes still under way."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
