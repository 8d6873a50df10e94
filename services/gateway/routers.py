"""The gateway's connection to its routers: the ones it is given (--router-address a,b,...) and those that
register in the registry (--router-discovery), whether each answers, which one a request goes to (rendezvous
hashing of the request's affinity key over the healthy routers, so a conversation's turns meet the same
router's cache-aware state), and the calls: Generate with failover before the first token and mid-stream
resume through another router (the router's own guarantee for engines, one hop up), ListModels and GetStatus
on any router that answers."""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

import grpc
import structlog
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb

from services.router.resume import ChunkTracker, ReplicaAborted, ResumeMode, resumable
from shared.after_send import describe_after_send
from shared.channels import ChannelPool, open_channel
from shared.deadlines import wire_timeout
from shared.errors import DeadlineExceeded, Unavailable, details_of
from shared.relay import ChunkRelay
from shared.resilience import full_jitter

log = structlog.get_logger(__name__)

ROUTER_GENERATE = "/fleetserve.router.v1.RouterService/Generate"
ROUTER_LIST_MODELS = "/fleetserve.router.v1.RouterService/ListModels"
ROUTER_GET_STATUS = "/fleetserve.router.v1.RouterService/GetStatus"
_DETAILS_KEY = "grpc-status-details-bin"
# How much of a request's text decides its router when it names no session: the start of a conversation
# (system prompt, first turns) is what its later turns share, and what cache-aware routing keys on.
AFFINITY_CHARS = 512


def router_unreachable(err: grpc.aio.AioRpcError) -> bool:
    """True when an error comes from the channel (router down or unreachable, or its connection broke
    mid-stream), not from the router: the router always attaches google.rpc.Status details to its own errors."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and not any(
        k == _DETAILS_KEY for k, _ in (err.trailing_metadata() or ())
    )


def unreachable_error(err: grpc.aio.AioRpcError | None) -> Unavailable:
    """What a client gets when no router can be reached: UNAVAILABLE, ROUTER_UNAVAILABLE, retry in 1 s."""
    why = err.details() if err is not None else "no router is known"
    return Unavailable(f"the router is unreachable: {why}", reason="ROUTER_UNAVAILABLE", retry_after_s=1.0)


def affinity_key(request: router_pb.GenerateRequest) -> str:
    """What keeps related requests on one router: the session id, else the start of the prompt or chat."""
    if request.routing.session_id:
        return "s:" + request.routing.session_id
    spec = request.spec
    if spec.prompt:
        return "p:" + spec.prompt[:AFFINITY_CHARS]
    text = "\x1e".join(f"{m.role}\x1f{m.content}" for m in spec.messages)
    return "m:" + text[:AFFINITY_CHARS]


def _score(key: str, address: str) -> int:
    # Rendezvous (highest-random-weight) hashing, hand-written: a few lines, and a router that leaves moves
    # only its own keys (no ring to rebuild); blake2b because Python's hash() differs between processes.
    return int.from_bytes(hashlib.blake2b(f"{key}\x00{address}".encode(), digest_size=8).digest(), "big")


@dataclass
class Router:
    """One router as the gateway knows it, with its stubs (one channel per router, reused)."""

    address: str
    # "static" (--router-address) or "registry" (discovered; leaves when the registry says so).
    source: str
    generate: grpc.aio.UnaryStreamMultiCallable
    list_models: grpc.aio.UnaryUnaryMultiCallable
    get_status: grpc.aio.UnaryUnaryMultiCallable
    # Monotonic time before which it is passed over (it failed to answer); 0: healthy.
    down_until: float = 0.0
    draining: bool = False
    # When it was last seen draining (monotonic): a static address answering a stream sent after that is a new
    # process there (a recycled or restarted router worker), no longer draining.
    draining_at: float = 0.0
    failures: int = field(default=0)


class RouterPool:
    """The routers of this gateway. order(key) is the failover order for a request: the healthy routers by
    rendezvous score, then the others (a router marked down may be back, and is better than nothing)."""

    def __init__(
        self,
        channels: ChannelPool,
        addresses: Sequence[str] = (),
        *,
        down_s: float = 2.0,
        resume: ResumeMode = "reproducible",
        max_attempts: int = 3,
        clock: Callable[[], float] = time.monotonic,
        coalesce: bool = True,
    ) -> None:
        self._channels = channels
        # Merge the chunks a stream has pending while our caller is busy (shared/relay.py).
        self.coalesce = coalesce
        self.down_s = down_s
        self.resume = resume
        self.max_attempts = max_attempts
        self._clock = clock
        self._routers: dict[str, Router] = {}
        self._tasks: list[asyncio.Task] = []
        # Registered routers: replica id -> address.
        self._registered: dict[str, str] = {}
        self.discovered = asyncio.Event()
        for a in addresses:
            self.add(a, "static")

    # -- membership ---------------------------------------------------------------------------------------

    def add(self, address: str, source: str) -> Router:
        router = self._routers.get(address)
        if router is None:
            ch = self._channels.get(address)
            router = Router(
                address,
                source,
                ch.unary_stream(
                    ROUTER_GENERATE,
                    request_serializer=router_pb.GenerateRequest.SerializeToString,
                    response_deserializer=None,
                ),
                ch.unary_unary(
                    ROUTER_LIST_MODELS,
                    request_serializer=router_pb.ListModelsRequest.SerializeToString,
                    response_deserializer=router_pb.ListModelsResponse.FromString,
                ),
                ch.unary_unary(
                    ROUTER_GET_STATUS,
                    request_serializer=router_pb.GetStatusRequest.SerializeToString,
                    response_deserializer=router_pb.GetStatusResponse.FromString,
                ),
            )
            self._routers[address] = router
            log.info("gateway.router_added", router=address, source=source)
        return router

    def remove(self, address: str) -> None:
        router = self._routers.get(address)
        if router is None or router.source == "static":
            return
        del self._routers[address]
        log.info("gateway.router_removed", router=address)
        # Streams still running on it keep the channel until they end; a later add() reuses it.

    @property
    def addresses(self) -> list[str]:
        return sorted(self._routers)

    @property
    def size(self) -> int:
        """Routers known (healthy or not)."""
        return len(self._routers)

    def healthy(self) -> list[Router]:
        now = self._clock()
        return [r for r in self._routers.values() if r.down_until <= now and not r.draining]

    def order(self, key: str = "") -> list[Router]:
        """Routers in the order a request with this affinity key tries them."""
        routers = self._routers
        if len(routers) == 1:
            return list(routers.values())  # nothing to rank: no hashing on the first token's path
        now = self._clock()
        ranked = sorted(routers.values(), key=lambda r: _score(key, r.address), reverse=True)
        return [r for r in ranked if r.down_until <= now and not r.draining] + [
            r for r in ranked if r.down_until > now or r.draining
        ]

    def channel_state(self, address: str) -> str:
        """The state of the channel to a router (READY, CONNECTING, TRANSIENT_FAILURE, IDLE; "" if none)."""
        return self._channels.state(address)

    def mark_down(self, router: Router, err: BaseException) -> None:
        router.failures += 1
        router.down_until = self._clock() + self.down_s
        log.warning("gateway.router_unreachable", router=router.address, error=str(err)[:200])

    def mark_up(self, router: Router, sent_at: float = 0.0) -> None:
        """A stream sent at sent_at completed on router."""
        if router.down_until or router.failures:
            router.down_until, router.failures = 0.0, 0
        if router.draining and router.source == "static" and sent_at > router.draining_at:
            router.draining = False  # the registry says so for discovered routers

    def mark_draining(self, router: Router) -> None:
        router.draining, router.draining_at = True, self._clock()

    # -- calls ----------------------------------------------------------------------------------------------

    async def unary(self, method: str, request, *, timeout_s: float, metadata=None):
        """Call ListModels or GetStatus ("list_models", "get_status") on the first router that answers; the
        router's own errors are raised as they are, ROUTER_UNAVAILABLE when none could be reached."""
        last: grpc.aio.AioRpcError | None = None
        deadline = self._clock() + timeout_s
        for router in self.order()[: self.max_attempts]:
            left = deadline - self._clock()
            if left <= 0:
                break
            try:
                resp = await getattr(router, method)(request, timeout=wire_timeout(left), metadata=metadata)
            except grpc.aio.AioRpcError as e:
                if not router_unreachable(e):
                    raise
                self.mark_down(router, e)
                last = e
                continue
            self.mark_up(router)
            return resp
        raise unreachable_error(last) from last

    def generate(
        self,
        request: router_pb.GenerateRequest,
        *,
        deadline: float,
        metadata=None,
        attempt: Callable[[str], None] | None = None,
        sent: Callable[[], None] | None = None,
    ) -> RouterStream:
        """The router's GenerateResponse bytes for request (iterate the stream; cancel() or aclose() ends it),
        from the router its affinity key picks; when that one cannot be reached another is tried, and when one
        dies mid-stream (its connection breaks, it is cut by its drain with SHUTTING_DOWN, or it ends the
        stream with an ABORT nobody here asked for) the generation resumes through another router from the
        last token relayed, for generations that may be resumed (self.resume, as the router's --resume).
        deadline is monotonic; attempt(address) is told each router tried (spans, logs). sent(), once, when the
        first call is on its way: after gRPC's task that sends it has run, so work done there (bookkeeping that
        decides nothing about the request) overlaps the router's, off the first token's path."""
        return RouterStream(self, request, deadline, metadata, attempt, sent)

    # -- discovery -----------------------------------------------------------------------------------------

    def start_discovery(self, registry_address: str, *, resubscribe_s: float = 300.0) -> None:
        """Follow the routers registered in the registry (WatchReplicas, role ROUTER): a SERVING router is
        added, a DRAINING one gets no new requests, one that left is removed."""
        self._tasks.append(
            asyncio.create_task(self._watch(registry_address, resubscribe_s), name="gateway.router_discovery")
        )

    async def _watch(
        self,
        registry_address: str,
        resubscribe_s: float,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        channel = open_channel(registry_address, self._channels.tls)
        stub = reg_grpc.RegistryServiceStub(channel)
        failures = 0
        rng = random.Random()
        try:
            while True:
                call = stub.WatchReplicas(
                    reg_pb.WatchReplicasRequest(role=reg_pb.REPLICA_ROLE_ROUTER), timeout=resubscribe_s
                )
                try:
                    async for event in call:
                        failures = 0
                        self._apply(event)
                except grpc.aio.AioRpcError as e:
                    if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                        failures += 1
                        log.warning(
                            "gateway.router_discovery_broken", error=e.code().name, kept=self.addresses
                        )
                finally:
                    call.cancel()
                await sleep(full_jitter(failures, 0.1, 5.0, rng) if failures else 0)
        finally:
            await channel.close(grace=None)

    def _apply(self, event: reg_pb.WatchReplicasResponse) -> None:
        if event.type == reg_pb.WATCH_EVENT_TYPE_SNAPSHOT:
            fresh = {r.replica_id for r in event.replicas}
            for rid in [rid for rid in self._registered if rid not in fresh]:
                self.remove(self._registered.pop(rid))
        for r in event.replicas:
            old = self._registered.pop(r.replica_id, None)
            if old is not None and (old != r.address or event.type == reg_pb.WATCH_EVENT_TYPE_REMOVED):
                self.remove(old)  # left, or came back elsewhere (a restarted router on a new port)
            if event.type == reg_pb.WATCH_EVENT_TYPE_REMOVED:
                continue
            self._registered[r.replica_id] = r.address
            router = self.add(r.address, "registry")
            router.draining = r.state == reg_pb.REPLICA_STATE_DRAINING
        self.discovered.set()

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _router_leaving(err: grpc.aio.AioRpcError) -> bool:
    """A router's error that another router may not share: it is shutting down. Its drain cut the stream
    (SHUTTING_DOWN), or its server stopped (GOAWAY) while the call was queued in gRPC, not yet handed to the
    router's code: gRPC cancels those, CANCELLED without the details the router puts on its own errors (our own
    cancel of a call raises CancelledError here, not an AioRpcError)."""
    if err.code() == grpc.StatusCode.CANCELLED:
        return not any(k == _DETAILS_KEY for k, _ in (err.trailing_metadata() or ()))
    return err.code() == grpc.StatusCode.UNAVAILABLE and details_of(err).reason == "SHUTTING_DOWN"


def _raise_with_details(err: grpc.aio.AioRpcError) -> NoReturn:
    """Raise err as the client should see it: a router's own error as it is; a broken connection (no details:
    reset, closed mid-stream) as UNAVAILABLE ROUTER_UNAVAILABLE with RetryInfo, never a bare status."""
    if router_unreachable(err):
        raise unreachable_error(err) from err
    raise err


class RouterStream:
    """One generation through the pool's routers (see RouterPool.generate). cancel() cancels the router call in
    progress (a drain's cut); the iteration then raises CancelledError."""

    def __init__(self, pool: RouterPool, request, deadline: float, metadata, attempt, sent=None) -> None:
        self._pool = pool
        self._request = request
        self._deadline = deadline
        self._metadata = metadata
        self._attempt = attempt
        self._sent = sent
        self._call: grpc.aio.UnaryStreamCall | None = None
        # What a drain that cuts this stream logs (describe()): set once per attempt, never per chunk.
        self._created = pool._clock()
        self._router = ""  # the router of the attempt in progress (or of the last one)
        self._attempts = 0
        self._relay: ChunkRelay | None = None  # the reader of the attempt in progress
        self._received = 0  # chunks read in the attempts before it
        self._gen = self._run()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen

    def cancel(self) -> None:
        if self._call is not None:
            self._call.cancel()

    @property
    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        """For an error raised here (no router reached): none. A router's own error is its AioRpcError, which
        carries the router's initial metadata (EmbeddedStream keeps its router's here instead)."""
        return ()

    def progress(self) -> int:
        """Chunks read from routers so far, over every attempt (a drain watches it move)."""
        relay = self._relay
        return self._received + (relay.received if relay is not None else 0)

    def describe(self) -> dict[str, object]:
        """Where this stream is, for a drain that cuts it: its request, its age, the router it waits on and the
        attempt, the stage (the router call sent and nothing back, streaming, between routers), chunks read and
        those our caller has not taken yet (a writer that stopped reading), and the channel's state."""
        relay = self._relay
        if relay is None:
            stage = "between_routers" if self._attempts else "not_sent"
        else:
            stage = "streaming" if relay.received else "awaiting_router"
        return {
            "request_id": self._request.request_id,
            "age_s": round(self._pool._clock() - self._created, 3),
            "stage": stage,
            "router": self._router,
            "attempts": self._attempts,
            "chunks": self.progress(),
            "unread": relay.unread if relay is not None else 0,
            "channel": self._pool.channel_state(self._router) if self._router else "",
        }

    async def aclose(self) -> None:
        await self._gen.aclose()

    async def _run(self) -> AsyncIterator[bytes]:
        pool, request = self._pool, self._request
        tracker = ChunkTracker() if resumable(request.spec.sampling, pool.resume) else None
        base_resume = list(request.spec.resume_token_ids)
        key: str | None = None  # the affinity key: computed only when there are routers to rank
        tried: set[str] = set()
        streamed = False
        last: grpc.aio.AioRpcError | None = None
        attempts = 0
        while True:
            if key is None and pool.size > 1:
                key = affinity_key(request)
            router = next((r for r in pool.order(key or "") if r.address not in tried), None)
            if router is None or attempts >= pool.max_attempts:
                if streamed and last is not None:
                    _raise_with_details(last)  # the stream broke and no router is left to resume it
                raise unreachable_error(last) from last
            attempts += 1
            self._attempts, self._router = attempts, router.address
            tried.add(router.address)
            if self._attempt is not None:
                self._attempt(router.address)
            if tracker is not None:
                tracker.next_attempt()
                if tracker.sent_ids:
                    del request.spec.resume_token_ids[:]
                    request.spec.resume_token_ids.extend(base_resume + tracker.sent_ids)
            left = self._deadline - pool._clock()
            if left <= 0:
                raise DeadlineExceeded("deadline exceeded while failing over between routers")
            sent_at = pool._clock()
            call = self._call = router.generate(request, timeout=wire_timeout(left), metadata=self._metadata)
            # Every read of the call goes through a ChunkRelay's own task (merging what arrived while our caller
            # wrote, when coalescing): our task is cancelled when our caller goes away and must not be the one
            # awaiting the call's read then (grpc.aio would leak that batch; shared/relay.py).
            chunks = self._relay = ChunkRelay(call.read, coalesce=pool.coalesce, cancel=call.cancel)
            try:
                if (sent := self._sent) is not None:
                    self._sent = None
                    await describe_after_send(sent)  # while the router works, not before the call goes out
                read = chunks.read
                while (data := await read()) is not grpc.aio.EOF:
                    if tracker is not None:
                        data = tracker.relay(data)
                    streamed = True
                    yield data
                pool.mark_up(router, sent_at)
                return
            except ReplicaAborted as e:
                # The router ended the stream with ABORT: it is shutting down; resume elsewhere.
                if e.args:
                    yield e.args[0]
                log.warning("gateway.router_aborted_stream", router=router.address)
                pool.mark_draining(router)
                continue
            except grpc.aio.AioRpcError as e:
                if _router_leaving(e):
                    pool.mark_draining(router)
                elif router_unreachable(e):
                    pool.mark_down(router, e)
                else:
                    raise  # the router's own answer (with details): relayed as it is
                last = e
                if streamed and tracker is None:
                    _raise_with_details(e)  # tokens went out and this generation may not be resumed
                log.info(
                    "gateway.router_failover",
                    router=router.address,
                    kind="resume" if streamed else "retry",
                    resumed_tokens=len(tracker.sent_ids) if tracker is not None else 0,
                )
            finally:
                self._call = self._relay = None
                self._received += chunks.received
                chunks.close()  # cancels the call: reaches router and engine when our caller went away
