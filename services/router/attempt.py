"""One routed request's attempts: an Attempt is one engine call on one replica (set-up, verdict, teardown);
RequestAttempts is what a request keeps across attempts (replicas that failed it, tokens sent, the retry and
resume decisions). The relay loop itself stays in RouterServicer.generate, the one per-chunk path."""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import grpc
import structlog
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.router.v1 import router_service_pb2 as pb
from opentelemetry import metrics

from services.router.membership import ReplicaInfo
from services.router.policies import cache_salt_for
from services.router.policies import record as record_decision
from services.router.resume import ChunkTracker, resumable
from services.router.router_metrics import RouterMetrics, tier_name
from services.router.stalls import ReplicaWatch
from services.router.traffic import NONE, Assignment
from services.router.versions import note
from shared.deadlines import HOP_MARGIN_S, wire_timeout
from shared.errors import DeadlineExceeded, FleetError, NoHealthyReplica, Unavailable
from shared.relay import ChunkRelay
from shared.resilience import BACKPRESSURE, full_jitter, is_retryable
from shared.telemetry import metadata_for_downstream

if TYPE_CHECKING:
    from services.router.servicer import RouterServicer

log = structlog.get_logger(__name__)


class Fault(Exception):
    """An attempt failed in a way another replica may fix (carries the code for the caller's error)."""

    def __init__(self, code: grpc.StatusCode, details: str, cause: BaseException) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.cause = cause


class AttemptCounters:
    """The router's attempt metrics (one set per servicer, shared by every request): OTel counters exported to
    the metrics service, and the same counts as Prometheus series."""

    def __init__(self, meter: metrics.Meter, prom: RouterMetrics) -> None:
        self.prom = prom
        self.attempts = meter.create_counter(
            "fleetserve.router.attempts",
            unit="{attempt}",
            description="Attempts sent to replicas, by outcome (ok, fault, backpressure, client).",
        )
        self.retries = meter.create_counter(
            "fleetserve.router.retries",
            unit="{retry}",
            description="Further attempts after a failed one, by kind (retry before the first token, resume).",
        )
        self.hedges = meter.create_counter(
            "fleetserve.router.hedges",
            unit="{hedge}",
            description="Hedged attempts sent, and by result (won: the hedge's first token came first).",
        )
        self.throttled = meter.create_counter(
            "fleetserve.router.retries_throttled",
            unit="{retry}",
            description="Retries refused by the model's retry budget.",
        )

    def attempt(self, model: str, outcome: str) -> None:
        self.attempts.add(1, {"fleetserve.model": model, "outcome": outcome})
        self.prom.attempts.labels(model, outcome).inc()

    def retry(self, model: str, kind: str) -> None:
        self.retries.add(1, {"fleetserve.model": model, "kind": kind})
        self.prom.retries.labels(model, kind).inc()

    def hedge(self, model: str, result: str) -> None:
        self.hedges.add(1, {"fleetserve.model": model, "result": result})
        self.prom.hedges.labels(model, result).inc()

    def throttle(self, model: str) -> None:
        self.throttled.add(1, {"fleetserve.model": model})
        self.prom.throttled.labels(model).inc()


class Attempt:
    """One engine call on one replica. From start() until close() it counts in the replica's in-flight number
    and its breaker has a call outstanding; every attempt gives the breaker exactly one verdict (answered,
    failed, or neutral at close: cancelled, a client error, an empty stream)."""

    __slots__ = (
        "router",
        "replica",
        "breaker",
        "call",
        "first",
        "sent_at",
        "endpoint",
        "timeout",
        "watch",
        "streaming",
        "interrupted",
        "relay",
        "request_id",
        "_verdict",
        "_closed",
    )

    def __init__(self, router: RouterServicer, replica: ReplicaInfo) -> None:
        self.router = router
        self.replica = replica
        self.breaker = router.breakers.get(replica.replica_id, replica.model)
        self.call: grpc.aio.UnaryStreamCall | None = None
        # The first read when it was started elsewhere (hedging races first reads); None: read the call.
        self.first: asyncio.Future | None = None
        self.sent_at = 0.0
        self.endpoint = ""  # the front end this attempt went to (replicas with several)
        self.timeout = 0.0
        self.watch: ReplicaWatch | None = None
        self.streaming = False  # the replica answered (its first chunk came)
        self.interrupted: Unavailable | None = None  # why the stall watchdog or a drain ended this attempt
        self.relay: ChunkRelay | None = None  # reads the call (and merges what the writer is behind on)
        self.request_id = ""
        self._verdict = False
        self._closed = False

    @classmethod
    def start(
        cls,
        router: RouterServicer,
        replica: ReplicaInfo,
        engine_request: engine_pb.GenerateRequest,
        deadline: float,
        metadata,
    ) -> Attempt:
        """Send the request to the replica (the one place an engine call is set up)."""
        attempt = cls(router, replica)
        attempt.request_id = engine_request.request_id
        attempt.breaker.on_call()
        router.in_flight[replica.replica_id] += 1
        try:
            # Rounded so that the engine never sees more time than this hop has left.
            attempt.timeout = wire_timeout(deadline - time.monotonic())
            attempt.sent_at = time.monotonic()
            attempt.endpoint = router.endpoint(replica)
            attempt.call = router.stub(attempt.endpoint)(
                engine_request, timeout=attempt.timeout, metadata=metadata
            )
            attempt.watch = router.stalls.add(replica.replica_id, attempt)
            # Every read of the call, the first included, goes through the relay's own task: our handler is
            # cancelled when our caller goes away and must not be the task awaiting the call's read then
            # (grpc.aio would leak that batch; shared/relay.py).
            attempt.relay = ChunkRelay(
                attempt.call.read, attempt.watch, coalesce=router.coalesce, cancel=attempt.call.cancel
            )
            router.drain.track(attempt)
        except BaseException:
            attempt.close()
            raise
        return attempt

    async def first_chunk(self):
        """The call's first message (bytes or grpc.aio.EOF); raises the call's error."""
        first = self.first
        if first is None:
            return await self.relay.read()
        self.first = None
        return first.result()

    def answered(self, streaming: bool = True, at: float | None = None) -> None:
        """The replica sent its first chunk: a half-open breaker's probe closes; its TTFT feeds outlier
        detection. streaming=False for a summarized stream (no message per token): the stall watchdog then keeps
        it out of the replica's inter-token pace and judges its silence as a first token's. at: when the first
        chunk came (time.monotonic(); default now), for a caller that relays it before saying so."""
        self._verdict = True
        self.breaker.on_success()
        replica = self.replica
        ttft_s = (time.monotonic() if at is None else at) - self.sent_at
        self.router.outliers.record_ttft(replica.replica_id, replica.model, ttft_s * 1000.0)
        if streaming:
            if self.watch is not None:
                self.router.stalls.answered(self.watch, ttft_s)
            self.streaming = True

    def finished(self) -> None:
        """The stream ended normally."""
        router, model = self.router, self.replica.model
        router.breakers.budget(model).on_success()
        router.outliers.record_result(self.replica.replica_id, model, fault=False)
        router.counters.attempt(model, "ok")

    def retryable(self, error: grpc.aio.AioRpcError) -> bool:
        """Whether another replica may fix this call's error; a non-retryable one is counted as the client's."""
        # The replica got our time left rounded down to the grpc-timeout unit (up to ~0.1 s less), so a timeout
        # near the end of what it got is the caller's deadline.
        caller_deadline = time.monotonic() + HOP_MARGIN_S >= self.sent_at + self.timeout
        if is_retryable(error.code(), caller_deadline):
            return True
        self.router.counters.attempt(self.replica.model, "client")
        return False

    def failed(self, fault: Fault) -> None:
        """Account a failure another replica may fix: backpressure is neutral for the breaker; a fault counts
        against the replica (breaker, outlier detection, out of rotation for a short cooldown)."""
        self._verdict = True
        router, replica = self.router, self.replica
        model = replica.model
        if fault.code in BACKPRESSURE:
            outcome = "backpressure"
            self.breaker.on_neutral()
        else:
            outcome = "fault"
            self.breaker.on_fault()
            router.outliers.record_result(replica.replica_id, model, fault=True)
            # Out of rotation at once for a short cooldown; the breaker decides about longer.
            router.membership.mark_unroutable(replica.replica_id)
        router.breakers.budget(model).on_failure()
        router.counters.attempt(model, outcome)
        log.warning(
            "router.replica_failed",
            replica=replica.replica_id,
            address=replica.address,
            code=fault.code.name,
            error=fault.details,
        )

    def close(self) -> None:
        """End the attempt (idempotent): a neutral verdict if it had none, the call cancelled (this reaches the
        engine when our caller went away; a no-op once the call is done), the replica released."""
        if self._closed:
            return
        self._closed = True
        if self.watch is not None:
            self.router.stalls.discard(self.watch, self)
        self.router.drain.untrack(self)
        if not self._verdict:
            self.breaker.on_neutral()
        if self.first is not None:
            self.first.cancel()
        if self.relay is not None:
            self.relay.close()
        if self.call is not None:
            self.call.cancel()
        if self.endpoint:
            self.router.endpoint_done(self.endpoint)
        self.router.release(self.replica.replica_id, self.replica.model)

    def progress(self) -> int:
        """Chunks read from the replica so far (a drain watches it move)."""
        return self.relay.received if self.relay is not None else 0

    def describe(self) -> dict[str, object]:
        """Where this attempt is, for a drain that cuts it: its request, replica and front end, its age, whether
        the replica answered yet, chunks read and those the relay loop has not taken yet (a caller that stopped
        reading)."""
        relay = self.relay
        return {
            "request_id": self.request_id,
            "replica": self.replica.replica_id,
            "endpoint": self.endpoint,
            "age_s": round(time.monotonic() - self.sent_at, 3),
            "stage": "streaming" if relay is not None and relay.received else "awaiting_replica",
            "chunks": self.progress(),
            "unread": relay.unread if relay is not None else 0,
        }

    def cancel(self) -> None:
        """Cut by the router's drain: the relay loop ends the stream with the drain's ShuttingDown."""
        self.stall(self.router.drain.error("more time for this stream"))

    def stall(self, reason: Unavailable) -> None:
        """End the attempt (its replica went silent, or the router drains): the pending read raises
        CancelledError, which the relay loop turns into a Fault (the request resumes elsewhere) or, for a drain,
        into reason itself."""
        self.interrupted = reason
        if self.first is not None:
            self.first.cancel()
        if self.call is not None:
            self.call.cancel()


class RequestAttempts:
    """What one request keeps across its attempts: the engine request (with the resume point), the replicas
    that failed it, whether anything reached the caller, and the decision to retry, resume or give up.

    Hooks: a replica choice that waits or picks a version goes in choose(); a retry/resume rule in
    after_fault(); anything per chunk belongs to the relay loop in RouterServicer.generate."""

    __slots__ = (
        "router",
        "request",
        "routed",
        "model",
        "deadline",
        "engine_request",
        "metadata",
        "tracker",
        "failed",
        "streamed",
        "attempts",
        "replica_id",
        "assignment",
        "note",
        "decisions",
    )

    def __init__(
        self,
        router: RouterServicer,
        request: pb.GenerateRequest,
        routed,
        deadline: float,
        assignment: Assignment = NONE,
    ) -> None:
        self.router = router
        self.request = request
        # The version (and maybe experiment arm, policy, shadow copy) the traffic splits chose: every attempt
        # stays on that version, so a request never flips versions and a version's errors stay its own.
        self.assignment = assignment
        # Appended to the first chunk relayed (served_by.experiment/arm), or b"".
        self.note = note(assignment)
        # The request as the policy prepared it (model alias resolved, prompt tokenized at most once).
        self.routed = routed
        self.model: str = routed.model
        self.deadline = deadline
        self.engine_request = engine_pb.GenerateRequest(
            request_id=request.request_id,
            spec=request.spec,
            tenant_id=request.routing.tenant_id,
            cache_salt=cache_salt_for(request.routing.tenant_id),
            priority=request.routing.priority,
            # A request with a shadow copy: the engine puts its token times on the last chunk, so the shadow
            # report times the live answer on the engine's clock as it does the copy (one field per request).
            token_times=assignment.shadow is not None,
        )
        self.metadata = metadata_for_downstream()
        # Parses relayed chunks only when the generation may be resumed after a mid-stream failure.
        self.tracker = ChunkTracker() if resumable(request.spec.sampling, router.retry.resume) else None
        if self.tracker is not None and request.spec.resume_token_ids:
            # A resume the gateway asked for (another router died mid-stream): a later resume here must carry
            # those tokens too, not only the ones this router relayed.
            self.tracker.sent_ids.extend(request.spec.resume_token_ids)
        self.failed: set[str] = set()
        self.streamed = False  # anything sent to our caller, over all attempts
        self.attempts = 0
        self.replica_id = ""  # the replica of the latest attempt (the hedge's when it won)
        # Routing decisions not yet explained on the span: recorded once the first chunk went out (record()).
        self.decisions: list = []

    def choose(self, exclude: set[str]) -> ReplicaInfo:
        """The replica for the next attempt (or a hedge) among those not excluded."""
        return self.router.choose(self.routed, exclude, self.assignment.version, self.decisions)

    def record(self, span) -> None:
        """Explain the routing decisions made so far on span (attributes, debug lines), in the order made."""
        decisions = self.decisions
        while decisions:
            record_decision(decisions.pop(0), span)

    async def next(self) -> Attempt:
        """Wait for admission (when in-flight attempts are capped), choose a replica that has not failed this
        request and send it the request, resuming after the tokens already sent."""
        router = self.router
        if router.max_in_flight_per_replica or router.wakes(self.model):
            routing = self.request.routing
            prom, tier = router.counters.prom, tier_name(routing.priority)
            waiting = prom.queue_waiting.labels(self.model, tier)
            waiting.inc()
            queued = time.monotonic()
            try:
                await router.admission.acquire(
                    self.model,
                    routing.priority,
                    routing.tenant_id,
                    self.deadline - time.monotonic(),
                    urgent=self.attempts > 0,  # a retry or resume of an admitted request goes first
                )
            finally:
                waiting.dec()
                prom.queue_time.labels(self.model, tier).observe(time.monotonic() - queued)
        replica = self.choose(self.failed)
        self.replica_id = replica.replica_id
        self.attempts += 1
        tracker = self.tracker
        if tracker is not None:
            tracker.next_attempt()
            if tracker.sent_ids:
                resume_ids = self.engine_request.spec.resume_token_ids
                del resume_ids[:]
                resume_ids.extend(tracker.sent_ids)
        return Attempt.start(router, replica, self.engine_request, self.deadline, self.metadata)

    def hedge_delay(self) -> float:
        """How long the first attempt may stay silent before a hedge is sent (0: no hedge). Only the first
        token is hedged, never a resume."""
        return 0.0 if self.streamed else self.router.retry.hedge_delay(self.model)

    def spare(self, busy: Attempt) -> Attempt | None:
        """A hedge: the request sent to another replica than busy's, or None when there is none to spare."""
        try:
            replica = self.choose(self.failed | {busy.replica.replica_id})
        except FleetError:
            return None
        return Attempt.start(self.router, replica, self.engine_request, self.deadline, self.metadata)

    def lost(self, attempt: Attempt, fault: Fault) -> None:
        """Account a failed attempt and keep its replica out of this request's further attempts."""
        attempt.failed(fault)
        self.failed.add(attempt.replica.replica_id)

    async def after_fault(self, fault: Fault) -> None:
        """Raise when the request cannot go on (tokens went out and may not be resumed; attempts, retry budget
        or deadline spent); else back off (full jitter, within the deadline) and return."""
        cause = fault.cause
        if self.streamed and self.tracker is None:
            # Tokens went out and this generation may not be resumed: the stream ends here.
            raise cause from None
        router, model, attempts = self.router, self.model, self.attempts
        retry = router.retry
        if attempts >= retry.max_attempts:
            raise NoHealthyReplica(
                f"{attempts} attempts on replicas of model {model!r} failed; last: "
                f"{fault.code.name} {fault.details}",
                retry_after_s=1.0,
                metadata={"model": model, "attempts": str(attempts)},
            ) from cause
        if not router.breakers.budget(model).can_retry():
            router.counters.throttle(model)
            raise Unavailable(
                f"replicas of model {model!r} are failing and the router's retry budget is spent; last: "
                f"{fault.code.name} {fault.details}",
                reason="RETRY_BUDGET_EXHAUSTED",
                retry_after_s=1.0,
                metadata={"model": model, "attempts": str(attempts)},
            ) from cause
        delay = full_jitter(attempts - 1, retry.backoff_base_s, retry.backoff_max_s, router.rng)
        if time.monotonic() + delay + HOP_MARGIN_S >= self.deadline:
            raise DeadlineExceeded("deadline exceeded while failing over between replicas") from cause
        kind = "resume" if self.streamed else "retry"
        router.counters.retry(model, kind)
        log.info("router.retrying", kind=kind, attempt=attempts + 1, backoff_ms=round(delay * 1000, 3))
        if delay > 0:
            await router.sleep(delay)
