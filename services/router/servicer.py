"""RouterService: picks a replica per request, relays the engine's bytes, retries before the first token and
resumes mid-stream on another replica; circuit breakers and a retry budget keep a failing fleet from being stormed."""

from __future__ import annotations

import asyncio
import itertools
import random
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
import structlog
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.router.v1 import router_service_pb2 as pb
from opentelemetry import metrics, trace

from services.router import hedge, versions
from services.router.admission import AdmissionQueue
from services.router.attempt import AttemptCounters, Fault, RequestAttempts
from services.router.breakers import BreakerSettings, ReplicaBreakers
from services.router.membership import Change, Membership, ReplicaInfo
from services.router.outliers import OutlierDetector, OutlierSettings
from services.router.policies import Decision, Policy
from services.router.policies import record as record_decision
from services.router.resume import ReplicaAborted, ResumeMode
from services.router.router_metrics import RouterMetrics
from services.router.shadow import ShadowPair, ShadowRunner
from services.router.stalls import ReplicaWatch, StallDetector, StallSettings
from services.router.traffic import TrafficTable
from shared import prom
from shared.after_send import describe_after_send
from shared.channels import ChannelPool, raw_stream
from shared.deadlines import deadline_passed, downstream_timeout
from shared.drain import Drain, cancelled_by_caller
from shared.early_metadata import EarlyMetadata
from shared.errors import (
    InvalidArgument,
    NoHealthyReplica,
    NotFound,
    ResourceExhausted,
    ShuttingDown,
    Unavailable,
    rpc_boundary,
)
from shared.finish_bytes import is_finished
from shared.recycle import Recycler
from shared.resilience import BreakerState
from shared.telemetry import bind_request, context_from_metadata, stream_span

log = structlog.get_logger(__name__)

# Free admission slots of a model whose replicas have no in-flight cap.
UNCAPPED = 1 << 30


ENGINE_GENERATE = "/fleetserve.engine.v1.EngineService/Generate"
ENGINE_GET_LOAD = "/fleetserve.engine.v1.EngineService/GetLoad"
_serialize_engine_request = engine_pb.GenerateRequest.SerializeToString
_BREAKER_PB = {
    BreakerState.CLOSED: pb.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: pb.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: pb.BREAKER_STATE_HALF_OPEN,
}


@dataclass(frozen=True, slots=True)
class RetrySettings:
    """How failed attempts are retried (before the first token) and resumed (after it)."""

    max_attempts: int = 3
    backoff_base_s: float = 0.01
    backoff_max_s: float = 0.5
    resume: ResumeMode = "reproducible"
    # Hedging: a second replica gets the request when the first has sent nothing after this long (0: off).
    hedge_delay_s: float = 0.0
    hedge_delay_by_model: tuple[tuple[str, float], ...] = ()

    def hedge_delay(self, model: str) -> float:
        for m, d in self.hedge_delay_by_model:
            if m == model:
                return d
        return self.hedge_delay_s


# (model, version) pairs counted in GetStatus arrivals; pins beyond it are counted under the model alone.
MAX_ARRIVAL_KEYS = 1024


class RouterServicer:
    """fleetserve.router.v1.RouterService. Generate yields the engine's response bytes (the three hops'
    GenerateResponse messages are wire-identical); chunks are parsed only when the generation may be resumed
    after a mid-stream failure, to remember which token ids the caller has (resume.ChunkTracker)."""

    def __init__(
        self,
        membership: Membership,
        policy: Policy,
        pool: ChannelPool,
        tracer: trace.Tracer,
        *,
        meter: metrics.Meter | None = None,
        max_attempts: int = 3,
        default_timeout_s: float = 120.0,
        ready_wait_s: float = 2.0,
        retry: RetrySettings | None = None,
        breakers: BreakerSettings | None = None,
        retry_budget_max_tokens: float = 50.0,
        retry_budget_token_ratio: float = 0.1,
        outliers: OutlierSettings | None = None,
        max_in_flight_per_replica: int = 0,
        frontend_pack: int = 0,
        queue_max_waiting: int = 1000,
        queue_retry_after_s: float = 1.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        prom_metrics: RouterMetrics | None = None,
        wake_models: frozenset[str] = frozenset(),
        stalls: StallSettings | None = None,
        traffic: TrafficTable | None = None,
        coalesce: bool = True,
    ) -> None:
        self.membership = membership
        # Merge the chunks a stream has pending when its caller lags (shared/relay.py); off: one message each.
        self.coalesce = coalesce
        # --max-requests-per-worker: set by the app in a supervised worker (shared/recycle.py).
        self.recycler: Recycler | None = None
        # Rollout splits, experiments and flags (from the registry's WatchTraffic; empty: any version).
        self.traffic = traffic or TrafficTable()
        self.shadows = ShadowRunner(self)
        self.policy = policy
        self.pool = pool
        self.tracer = tracer
        self.retry = retry or RetrySettings(max_attempts=max_attempts)
        self.max_attempts = self.retry.max_attempts
        self.default_timeout_s = default_timeout_s
        self.ready_wait_s = ready_wait_s
        meter = meter or metrics.get_meter("fleetserve.router")
        # Prometheus series (the app serves this registry; a servicer built without one keeps them unserved).
        self.prom = prom_metrics or RouterMetrics(prom.new_registry())
        self.breakers = ReplicaBreakers(
            breakers or BreakerSettings(),
            meter,
            retry_budget_max_tokens,
            retry_budget_token_ratio,
            clock=clock,
            prom=self.prom,
        )
        self.outliers = OutlierDetector(outliers or OutlierSettings(enabled=False), clock=clock)
        self.stalls = StallDetector(stalls, clock=clock)
        # Summarized shadow copies send a progress message twice per probe delay (and 5 times per first-token
        # threshold): a candidate that generates is neither probed nor held out of rotation; a silent one is hung.
        st = self.stalls.settings
        self.shadows.progress_ms = max(50, int(min(st.probe_after_s / 2, st.first_token_s / 5) * 1000))
        self.drain = Drain("router")
        self.rng = rng or random.Random()
        self.sleep = sleep
        self.counters = AttemptCounters(meter, self.prom)
        self.in_flight: Counter[str] = Counter()
        # Requests admitted per (model, version) since start, for GetStatus (the autoscaler's arrival rate).
        self.arrivals: Counter[tuple[str, str]] = Counter()
        # Names this lifetime of those counters (GetStatus arrivals_incarnation): a restarted router, even one that
        # counts past its predecessor's last value before the next poll, is told from the same one. From the OS's
        # randomness, not self.rng (which tests seed alike in every router).
        self.arrivals_incarnation = secrets.token_hex(8)
        # 0: no cap, requests go straight to replicas (engines queue themselves); else the admission queue
        # holds requests while every replica of the model has this many attempts in flight.
        self.max_in_flight_per_replica = max_in_flight_per_replica
        # Models that may have no replica for a while (scaled to zero, cold starting): their requests wait in the
        # admission queue, within their deadline, instead of failing.
        self.wake_models = wake_models
        membership.expect(wake_models)
        self.admission = AdmissionQueue(self._free_slots, queue_max_waiting, queue_retry_after_s, self.wakes)
        meter.create_observable_gauge(
            "fleetserve.router.queue_depth",
            callbacks=[self._observe_queue],
            description="Requests waiting in the router's admission queue, by model and tier.",
        )
        self._stubs: dict[str, grpc.aio.UnaryStreamMultiCallable] = {}
        # Channels of replicas that left while requests still streamed from them: closed once idle.
        self._discard_when_idle: dict[str, tuple[str, ...]] = {}
        # Replicas with several front-end processes: requests take their endpoints in turn (one channel, so one
        # HTTP/2 connection, each: all streams of one connection would reach one front end).
        self._turns: dict[str, itertools.count] = {}
        # Or packed (frontend_pack > 0): this router's attempts in flight per front-end address.
        self.frontend_pack = frontend_pack
        self.endpoint_live: Counter[str] = Counter()
        self._tasks: set[asyncio.Task] = set()
        membership.subscribe(self._on_change)

    # -- membership changes ------------------------------------------------------------------------

    def _on_change(self, change: Change, replica: ReplicaInfo) -> None:
        if change is Change.REMOVED:
            self.policy.remove(replica.replica_id)
            self.breakers.remove(replica.replica_id)
            self.outliers.remove(replica.replica_id)
            self.stalls.remove(replica.replica_id)
            self._turns.pop(replica.replica_id, None)
            if self.in_flight[replica.replica_id] > 0:
                self._discard_when_idle[replica.replica_id] = replica.addresses
            else:
                self._discard_channels(replica.addresses)
        else:
            self._discard_when_idle.pop(replica.replica_id, None)
            self.policy.on_load_update(replica)
        if self.max_in_flight_per_replica or self.wakes(replica.model):
            self.admission.pump(replica.model)

    def _discard_channels(self, addresses: tuple[str, ...]) -> None:
        # Another replica may have taken over an address (a restarted engine on the same port).
        in_use = {a for r in self.membership.replicas() for a in r.addresses}
        for address in addresses:
            if address in in_use:
                continue
            self._stubs.pop(address, None)
            task = asyncio.get_running_loop().create_task(self.pool.discard(address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def endpoint(self, replica: ReplicaInfo) -> str:
        """The replica's address for the next attempt: its front ends in turn (or packed, see frontend_pack), or
        its one address. The caller gives it back with endpoint_done."""
        endpoints = replica.endpoints
        live = self.endpoint_live
        if not endpoints:
            address = replica.address
        elif self.frontend_pack:
            address = next((a for a in endpoints if live[a] < self.frontend_pack), None)
            if address is None:
                address = min(endpoints, key=live.__getitem__)
        else:
            turn = self._turns.get(replica.replica_id)
            if turn is None:
                turn = self._turns[replica.replica_id] = itertools.count()
            address = endpoints[next(turn) % len(endpoints)]
        live[address] += 1
        return address

    def endpoint_done(self, address: str) -> None:
        n = self.endpoint_live[address] - 1
        if n > 0:
            self.endpoint_live[address] = n
        else:
            self.endpoint_live.pop(address, None)

    def stub(self, address: str) -> grpc.aio.UnaryStreamMultiCallable:
        stub = self._stubs.get(address)
        if stub is None:
            stub = raw_stream(self.pool.get(address), ENGINE_GENERATE, _serialize_engine_request)
            self._stubs[address] = stub
        return stub

    def release(self, replica_id: str, model: str = "") -> None:
        self.policy.on_complete(replica_id)
        n = self.in_flight[replica_id] - 1
        if n > 0:
            self.in_flight[replica_id] = n
        else:
            del self.in_flight[replica_id]
            addresses = self._discard_when_idle.pop(replica_id, None)
            if addresses is not None:
                self._discard_channels(addresses)
        if self.max_in_flight_per_replica and model:
            self.admission.pump(model)

    # -- admission ----------------------------------------------------------------------------------

    def _has_room(self, replica_id: str) -> bool:
        cap = self.max_in_flight_per_replica
        return not cap or self.in_flight.get(replica_id, 0) < cap

    def wakes(self, model: str) -> bool:
        """Whether a request for model waits for a replica to start rather than failing when none is routable."""
        return model in self.wake_models

    def _free_slots(self, model: str) -> int | None:
        """Attempts the model's routable replicas take before their cap (None: no routable replica; without a
        cap, as many as anyone asks)."""
        cap = self.max_in_flight_per_replica
        routable = [
            r
            for r in self.membership.routable(model)
            if self.breakers.allows(r.replica_id) and not self.outliers.ejected(r.replica_id)
        ]
        if not routable:
            return None
        if not cap:
            return UNCAPPED
        return sum(max(0, cap - self.in_flight.get(r.replica_id, 0)) for r in routable)

    def _observe_queue(self, options):
        for model, counts in self.admission.waiting().items():
            for tier, n in zip(("interactive", "standard", "batch"), counts, strict=True):
                yield metrics.Observation(n, {"fleetserve.model": model, "fleetserve.tier": tier})

    def _model_label(self, request: pb.GenerateRequest, run: RequestAttempts | None) -> str:
        """The model as a metric label: after alias resolution when routing got that far; a name this fleet
        does not know is "unknown" (names come from callers: a label each would grow without bound)."""
        model = run.model if run is not None else request.spec.model
        return model if self.membership.knows_model(model) else "unknown"

    # -- choosing -----------------------------------------------------------------------------------

    async def _await_membership(self, timeout_s: float | None) -> None:
        """Wait (briefly) for the registry's first membership snapshot and traffic configuration."""
        if self.membership.ready.is_set() and self.traffic.ready.is_set():
            return
        wait = self.ready_wait_s if timeout_s is None else min(self.ready_wait_s, timeout_s)
        try:
            async with asyncio.timeout(wait):
                await self.membership.ready.wait()
                await self.traffic.ready.wait()
        except TimeoutError:
            what = "membership" if not self.membership.ready.is_set() else "traffic configuration"
            raise NoHealthyReplica(
                f"the router has no {what} from the registry yet", retry_after_s=1.0
            ) from None

    def choose(
        self,
        request: pb.GenerateRequest,
        exclude: set[str],
        version: str = "",
        decisions: list[Decision] | None = None,
    ) -> ReplicaInfo:
        """A replica of the request's model (of version, when given) that is not in exclude. The decision is
        explained on the current span at once, or appended to decisions for the caller to record later (off the
        first token's path)."""
        model = request.spec.model
        routable = self.membership.routable(model, exclude)
        if version:
            routable = [r for r in routable if r.model_version == version]
        breakers = self.breakers
        outliers = self.outliers
        allowed = [
            r for r in routable if breakers.allows(r.replica_id) and not outliers.ejected(r.replica_id)
        ]
        candidates = allowed  # without an in-flight cap every allowed replica has room
        if self.max_in_flight_per_replica and allowed:
            candidates = [r for r in allowed if self._has_room(r.replica_id)]
        if not candidates and allowed:
            raise ResourceExhausted(
                f"every replica of model {model!r} is at its in-flight cap",
                reason="ROUTER_QUEUE_FULL",
                retry_after_s=self.admission.retry_after_s,
                metadata={"model": model},
            )
        if candidates:
            decision = self.policy.decide(candidates, request)
            if decisions is not None:
                decisions.append(decision)
            else:
                # Span attributes + debug log: every candidate's score and the reason.
                record_decision(decision)
            return decision.replica
        if routable:
            # Every replica that could take it has an open breaker: fail fast rather than pile on.
            wait = breakers.min_open_left(r.replica_id for r in routable)
            raise NoHealthyReplica(
                f"every replica of model {model!r} has an open circuit breaker",
                retry_after_s=round(max(0.1, wait or 1.0), 3),
                metadata={"model": model, "breakers": "open"},
            )
        if not self.membership.knows_model(model):
            available = sorted(self.membership.models())
            listed = ", ".join(available) if available else "none"
            raise NotFound(
                f"model {model!r} is not served by this fleet; available models: {listed}",
                reason="MODEL_NOT_FOUND",
                metadata={"model": model, "available_models": ",".join(available)},
            )
        which = f"model {model!r}" + (f" version {version!r}" if version else "")
        raise NoHealthyReplica(
            f"no healthy replica of {which} can take the request now",
            retry_after_s=1.0,
            metadata={"model": model, "model_version": version} if version else {"model": model},
        )

    # -- RPCs ---------------------------------------------------------------------------------------

    async def generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        """Generate's stream without its rpc_boundary: for a caller in this process (gateway --embedded-router),
        to which a FleetError is raised as itself. context: what of a ServicerContext it reads is
        invocation_metadata(), time_remaining() and send_initial_metadata()."""
        started = time.perf_counter()
        arrived = time.monotonic()
        run: RequestAttempts | None = None
        pair: ShadowPair | None = None
        status = "CANCELLED"  # unless the stream completes or fails with a known code
        model = request.spec.model  # as asked (policy.prepare resolves an alias in place)
        with stream_span(
            self.tracer, "router.Generate", context=context_from_metadata(context), kind=trace.SpanKind.SERVER
        ) as span:
            # The log context and the span's attributes wait until the engine call is on its way (or the request
            # ends before it): they describe the request and decide nothing, and at c=1 they were ~25 us before
            # the call. The span's ids, which go on to the engine, are fixed already.
            annotated = False
            # The initial metadata: see where it starts, below.
            early = EarlyMetadata(context)
            checked = False
            try:
                self.drain.check()
                checked = True
                run = await self._admit(request, context, span)
                while True:
                    attempt = await run.next()
                    shadow = run.assignment.shadow
                    if shadow is not None and run.attempts == 1:
                        # After the live attempt started: the copy's task (replica choice, call) runs after the
                        # live call's send, so it cannot delay it.
                        pair = self.shadows.start(run, shadow, arrived)
                    try:
                        if not annotated:
                            # Cancelled here, the attempt's close below cancels the call.
                            await describe_after_send(
                                self._engine_call_sent, early, run, request, model, span
                            )
                            annotated = True
                        if (delay := run.hedge_delay()) > 0:
                            attempt = await hedge.race(run, attempt, delay)
                            run.replica_id = attempt.replica.replica_id
                        try:
                            data = await attempt.first_chunk()
                            if data is not grpc.aio.EOF:
                                answered_at = time.monotonic()
                                # The hot path: per message one read, the tracker's parse when resumable, a
                                # yield. The call is read by the attempt's ChunkRelay while we write: what
                                # arrives while a write is under way goes out merged in the next one (every
                                # chunk goes out alone at once when our caller keeps up); it counts each chunk
                                # for the stall watchdog as it arrives.
                                relay = run.tracker.relay if run.tracker is not None else None
                                keep = pair.live_chunks.append if pair is not None else None
                                read = attempt.relay.read
                                while True:
                                    if relay is not None:
                                        data = relay(data)
                                    if keep is not None:
                                        keep(data)  # parsed once the pair is complete, off this path
                                    if not run.streamed:
                                        run.streamed = True
                                        await early.before_first()
                                        data = self._first(run, data, pair)
                                        try:
                                            yield data
                                        finally:
                                            # After the first chunk went out (the breaker's verdict, the
                                            # replica's TTFT for outliers and stalls, timed on its arrival),
                                            # given whatever the write came to, as before it.
                                            attempt.answered(at=answered_at)
                                        # After the first chunk went out: explaining the choice waited for it.
                                        run.record(span)
                                    else:
                                        yield data
                                    if attempt.watch is not None and is_finished(data):
                                        # Its last chunk is here: what is left (the call's end) is no sign of
                                        # a hang, and a watchdog that cut it would fail a complete answer.
                                        self.stalls.discard(attempt.watch, attempt)
                                    data = await read()
                                    if data is grpc.aio.EOF:
                                        break
                                if pair is not None:
                                    pair.live_upstream_end(attempt.relay.ended_at)
                        except ReplicaAborted as e:
                            if e.args:
                                run.streamed = True
                                await early.before_first()
                                yield e.args[0]
                            raise Fault(
                                grpc.StatusCode.UNAVAILABLE, "the replica aborted the generation", e
                            ) from None
                        except grpc.aio.AioRpcError as e:
                            if not attempt.retryable(e):
                                raise
                            raise Fault(e.code(), e.details() or "", e) from None
                        except asyncio.CancelledError:
                            # The stall watchdog or a drain cancelled this attempt's call (not our caller).
                            if attempt.interrupted is None or cancelled_by_caller():
                                raise
                            if isinstance(attempt.interrupted, ShuttingDown):
                                raise attempt.interrupted from None  # this router is going away: no resume here
                            raise Fault(
                                grpc.StatusCode.UNAVAILABLE, attempt.interrupted.message, attempt.interrupted
                            ) from None
                        attempt.finished()
                        status = "OK"
                        return
                    except Fault as fault:
                        run.lost(attempt, fault)
                        await run.after_fault(fault)
                    finally:
                        attempt.close()
            except grpc.aio.AioRpcError as e:
                status = e.code().name
                raise
            except Exception as e:
                status = getattr(getattr(e, "code", None), "name", "INTERNAL")
                raise
            finally:
                if checked:
                    self.drain.done()
                if not annotated:
                    self._annotate(request, model, span)  # refused or gone before an engine call was sent
                # Sent (or failed: a caller gone) before the error or the stream's end goes out; refused before
                # an engine call was sent, the error still names the version (and arm).
                versioned = run is not None and run.assignment.version and not early.started
                await early.settle(versions.metadata(run.assignment) if versioned else None)
                if status == "CANCELLED" and deadline_passed(context):
                    status = "DEADLINE_EXCEEDED"
                replica_id = run.replica_id if run is not None else ""
                attempts = run.attempts if run is not None else 0
                if run is not None:
                    run.record(span)  # decisions of attempts that sent nothing (or ended before the write)
                span.set_attribute("fleetserve.replica_id", replica_id)
                span.set_attribute("fleetserve.attempts", attempts)
                code = getattr(grpc.StatusCode, status, grpc.StatusCode.UNKNOWN)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                self.prom.requests.labels(self._model_label(request, run), code.name).inc()
                if pair is not None:
                    pair.live_ended(code)
                log.info(
                    "router.request",
                    model=run.model if run is not None else request.spec.model,
                    model_version=run.assignment.version if run is not None else request.spec.model_version,
                    replica=replica_id,
                    attempts=attempts,
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000.0, 3),
                )
                if self.recycler is not None:
                    self.recycler.served_one()

    def _engine_call_sent(
        self, early: EarlyMetadata, run: RequestAttempts, request: pb.GenerateRequest, model: str, span
    ) -> None:
        """Once the first engine call has gone out: the initial metadata starts, the request is annotated."""
        # The initial metadata (the version's, or none) goes out now, not with the first chunk: the caller's gRPC
        # receives it while the engine works and has its read of the first message under way when that arrives
        # (without it, a grpc.aio caller asks for the message only once the metadata has come, a second wake-up
        # on the first token's path). Awaited before the first chunk is written.
        early.send(versions.metadata(run.assignment))
        self._annotate(request, model, span)

    @staticmethod
    def _annotate(request: pb.GenerateRequest, model: str, span) -> None:
        """The request's ids on every log line of this task, and its id and model (as asked) on its span."""
        bind_request(request.request_id, span)
        span.set_attribute("fleetserve.request_id", request.request_id)
        span.set_attribute("fleetserve.model", model)

    async def _admit(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, span
    ) -> RequestAttempts:
        """Validate the request, fix its deadline, wait for membership and let the policy prepare it."""
        if not request.spec.model:
            raise InvalidArgument("spec.model is required", field_violations=[("spec.model", "required")])
        timeout = downstream_timeout(context, default_s=self.default_timeout_s, conservative=True)
        span.set_attribute("fleetserve.deadline_left_ms", timeout * 1000.0)
        deadline = time.monotonic() + timeout
        await self._await_membership(timeout)
        # Resolves a model alias (sets spec.model); the prompt is tokenized at most once, if a policy asks.
        routed = self.policy.prepare(request)
        assignment = versions.assign(self, request, routed.model)
        if assignment.version:
            request.spec.model_version = assignment.version  # the engine refuses any other version
            span.set_attribute("fleetserve.model_version", assignment.version)
            span.set_attribute("fleetserve.traffic", assignment.source)
            # Its initial metadata (the version and arm, before any chunk: a request that fails still names
            # them) goes out once the engine call is on its way (Generate), not before it.
        if assignment.experiment:
            span.set_attribute("fleetserve.experiment", assignment.experiment)
            span.set_attribute("fleetserve.arm", assignment.arm)
        if assignment.policy:
            routed.policy_override = assignment.policy
        # Every request arrives here once: the autoscaler's arrival rate (GetStatus arrivals), by the version it
        # was given. Models nobody serves (a typo, a scan) are refused later and must not grow the table, nor may
        # made-up version pins.
        if self.membership.knows_model(routed.model):
            key = (routed.model, request.spec.model_version)
            if key not in self.arrivals and len(self.arrivals) >= MAX_ARRIVAL_KEYS:
                key = (routed.model, "")
            self.arrivals[key] += 1
        return RequestAttempts(self, request, routed, deadline, assignment)

    @staticmethod
    def _first(run: RequestAttempts, data: bytes, pair: ShadowPair | None) -> bytes:
        """The request's first chunk as relayed: with the experiment arm appended, timed for the shadow pair."""
        if pair is not None:
            pair.live_first()
        return data + run.note if run.note else data

    async def list_models(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        # A router just started (a recycled worker's successor) knows no model until the registry's first
        # snapshot: an empty list now would make the gateway answer NOT_FOUND for every model.
        await self._await_membership(context.time_remaining())
        counts = self.membership.models()
        models = [pb.ModelReplicas(model=m, replicas=n) for m, n in counts.items()]
        # Aliases are models to callers (the gateway checks names against this list): each is listed with the
        # replicas of its pools, while any of them has one or has had one (as models below).
        known = self.membership.known_models()
        model_router = getattr(self.policy, "model_router", None)
        for alias, route in (model_router.aliases if model_router is not None else {}).items():
            n = counts.get(route.small, 0) + (counts.get(route.large, 0) if route.large != route.small else 0)
            if alias not in counts and (n or route.small in known or route.large in known):
                models.append(pb.ModelReplicas(model=alias, replicas=n))
        # Models with no replica now are still served: those that wake on demand (a request starts one), and
        # those whose replicas all went away for a while (restarting, recycling, replaced): the gateway then
        # passes their requests here, which answer UNAVAILABLE with a retry delay, not NOT_FOUND for good.
        listed = {m.model for m in models}
        models.extend(
            pb.ModelReplicas(model=m, replicas=0) for m in sorted(self.wake_models | known) if m not in listed
        )
        return pb.ListModelsResponse(models=models)

    async def get_status(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext):
        resp = pb.GetStatusResponse()
        for r in self.membership.replicas():
            st = resp.replicas.add(
                replica_id=r.replica_id,
                address=r.address,
                model=r.model,
                model_version=r.model_version,
                in_flight=self.in_flight.get(r.replica_id, 0),
                load=r.load,
                breaker_state=pb.BREAKER_STATE_CLOSED,
            )
            b = self.breakers.peek(r.replica_id)
            if b is not None:
                st.breaker_state = _BREAKER_PB[b.current()]
                st.consecutive_failures = b.failures
                st.breaker_open_seconds_left = b.open_seconds_left()
                st.breaker_opened_total = b.opened
            ejected, left, reason, ttft_ms, err = self.outliers.status(r.replica_id)
            st.ejected, st.ejected_seconds_left, st.ejection_reason = ejected, left, reason
            st.ttft_ewma_ms, st.error_rate_ewma = ttft_ms, err
            st.routable = self.membership.is_routable(r) and (b is None or b.allows()) and not ejected
        for model, budget in self.breakers.budgets():
            resp.retry_budgets.add(
                model=model,
                tokens=budget.tokens,
                max_tokens=budget.max_tokens,
                throttled_total=budget.throttled,
            )
        for model, (interactive, standard, batch) in self.admission.waiting().items():
            resp.queues.add(model=model, interactive=interactive, standard=standard, batch=batch)
        resp.shadows.extend(self.shadows.reports())
        for (model, version), n in self.arrivals.items():
            resp.arrivals.add(model=model, version=version, requests_total=n)
        resp.arrivals_incarnation = self.arrivals_incarnation
        return resp

    # The RPCs: the methods above behind the boundary that turns exceptions into statuses (shared/errors.py).
    Generate = rpc_boundary(generate)
    ListModels = rpc_boundary(list_models)
    GetStatus = rpc_boundary(get_status)

    async def watch_stalls(self) -> None:
        """Forever: every check interval, end the attempts of replicas that have gone silent (stalls.py)."""
        interval = self.stalls.settings.check_interval_s
        while True:
            await asyncio.sleep(interval)
            for watch, silence, limit in self.stalls.check():
                self._stalled(watch, silence, limit)
            for watch in self.stalls.probes_due():
                task = asyncio.get_running_loop().create_task(self._probe(watch))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _probe(self, watch: ReplicaWatch) -> None:
        """Ask a silent replica for its progress counters (stalls.py): no answer in time is a hang."""
        attempt = next(iter(watch.attempts), None)
        if attempt is None:
            watch.probing = False
            return
        timeout = self.stalls.settings.probe_timeout_s
        get_load = self.pool.get(attempt.replica.address).unary_unary(
            ENGINE_GET_LOAD,
            request_serializer=engine_pb.GetLoadRequest.SerializeToString,
            response_deserializer=engine_pb.GetLoadResponse.FromString,
        )
        # While it is in doubt, new requests go elsewhere (a request sent to a hung replica waits out the
        # detection: the TTFT tail of a hang), if there is an elsewhere; an answer puts it back at once.
        held = None
        if any(r.replica_id != watch.replica_id for r in self.membership.routable(attempt.replica.model)):
            held = self.membership.mark_unroutable(watch.replica_id, cooldown_s=timeout)
        try:
            resp = await get_load(engine_pb.GetLoadRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                watch.probing = False  # refused or reset: the attempts fail by themselves
                return
            hung = self.stalls.probe_unanswered(watch)
            if hung is not None:
                self._stalled(watch, hung[0], self.stalls.threshold(watch), probe_s=hung[1])
            return
        except BaseException:
            watch.probing = False
            raise
        if held is not None:
            self.membership.lift_unroutable(watch.replica_id, held)
        self.stalls.probe_answered(watch, resp.output_tokens + resp.requests_finished + resp.requests_aborted)

    def _stalled(
        self, watch: ReplicaWatch, silence: float, limit: float, probe_s: float | None = None
    ) -> None:
        """A hung replica: out of rotation (its breaker opens at once: a half-open probe later tells whether it
        is back), and each of its attempts ends as a fault, so that its streams resume on other replicas.
        probe_s: found by a progress probe unanswered for that long (else by its silence passing limit)."""
        attempts = list(watch.attempts)
        if not attempts:
            return
        attempts[0].breaker.trip()
        self.membership.mark_unroutable(watch.replica_id)
        log.warning(
            "router.replica_stalled",
            replica=watch.replica_id,
            silence_ms=round(silence * 1000.0, 1),
            threshold_ms=round(limit * 1000.0, 1),
            attempts=len(attempts),
            streaming=watch.streaming,
            itl_ms=round(watch.itl_s * 1000.0, 2),
            by="silence" if probe_s is None else "probe",
            probe_ms=None if probe_s is None else round(probe_s * 1000.0, 1),
        )
        why = (
            f"threshold {limit * 1000.0:.0f} ms"
            if probe_s is None
            else f"no answer to a progress probe in {probe_s * 1000.0:.0f} ms"
        )
        reason = Unavailable(
            f"replica {watch.replica_id} stalled: no chunk for {silence * 1000.0:.0f} ms ({why})",
            reason="REPLICA_STALLED",
            retry_after_s=1.0,
            metadata={"replica": watch.replica_id},
        )
        for attempt in attempts:
            attempt.stall(reason)

    async def close(self) -> None:
        """Cancel shadow copies, wait for channel closes still under way."""
        await self.shadows.close()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
