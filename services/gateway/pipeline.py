"""The gateway's request path, independent of the protocol it arrived on: authenticate, validate, check the
safety filter, shed or degrade under load, admit against the tenant's limits, route and relay the router's
stream, and account for the request once (limits, ledger). The gRPC servicer, the OpenAI-compatible HTTP front
end and batch jobs all call it, so every protocol gets the same rules."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.router.v1 import router_service_pb2 as router_pb
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from prometheus_client.registry import CollectorRegistry

from services.gateway.admission import Admission, Ticket
from services.gateway.budgets import Budgets
from services.gateway.config import GatewaySettings
from services.gateway.db import Database, DatabaseError
from services.gateway.feedback import RecentRequests
from services.gateway.ledger import Ledger, cost_usd
from services.gateway.limits import LimitBackend, LocalLimits, SplitLimits
from services.gateway.presence import PresenceTable
from services.gateway.redis_limits import RedisLimits
from services.gateway.request_metrics import UNKNOWN_MODEL, GatewayMetrics
from services.gateway.routers import RouterPool
from services.gateway.safety import (
    INPUT_BLOCKED,
    OUTPUT_BLOCKED,
    DenyPatterns,
    SafetyFilter,
    SafetyRefusal,
    input_texts,
)
from services.gateway.shedding import LoadShedder
from services.gateway.tenants import Tenant, TenantStore, bearer_key
from services.gateway.validation import check_prompt_tokens, to_spec
from shared.drain import Drain, cancelled_by_caller
from shared.errors import FleetError, NotFound, PermissionDenied, Unauthenticated
from shared.finish_bytes import has_finish, is_finished
from shared.recycle import Recycler
from shared.telemetry import bind_request, metadata_for_downstream, stream_span

if TYPE_CHECKING:  # the embedded router imports the router's servicer: only for the annotations here
    from services.gateway.embedded_router import EmbeddedRouter

log = structlog.get_logger(__name__)

_TIER_PRIORITY = {
    "interactive": common_pb2.PRIORITY_INTERACTIVE,
    "standard": common_pb2.PRIORITY_STANDARD,
    "batch": common_pb2.PRIORITY_BATCH,
}
# A stream slot outlives its deadline by this much before Redis frees it (a gateway died holding it).
_STREAM_LEASE_SLACK_S = 30.0


def limit_backend(
    settings: GatewaySettings, db: Database | None = None, registry: CollectorRegistry | None = None
) -> LimitBackend:
    """Where the settings keep rate limits and stream caps: Redis (shared by every gateway, each call bounded by
    --redis-timeout-s; its fallback counts the gateways in db's presence table, metrics on registry), else this
    process (with --workers N and no Redis, this worker's exact share)."""
    if settings.redis_url:
        return RedisLimits(
            settings.redis_url,
            timeout_s=settings.redis_timeout_s,
            fallback_gateways=settings.limits_fallback_gateways,
            unknown_gateways=settings.limits_fallback_unknown_gateways,
            presence=PresenceTable(db) if db is not None else None,
            metrics_registry=registry,
        )
    if settings.worker_count > 1:
        return SplitLimits(LocalLimits(), max(0, settings.worker_index), settings.worker_count)
    return LocalLimits()


def note_served(outcome: Outcome, served_by: common_pb2.ServedBy) -> None:
    """The replica, model version and experiment arm that served a request (its first chunk's served_by)."""
    outcome.replica_id = served_by.replica_id
    outcome.model_version = served_by.model_version
    outcome.experiment, outcome.arm = served_by.experiment, served_by.arm


def effective_priority(requested: int, tier: str) -> int:
    """The tier a request runs at: what it asked for (unspecified: its tenant's tier), never above the tenant's
    tier (higher tiers have lower numbers)."""
    cap = _TIER_PRIORITY.get(tier, common_pb2.PRIORITY_STANDARD)
    return max(requested or cap, cap)


def assigned(metadata, outcome: Outcome) -> None:
    """The version and experiment arm the router assigned, from its initial metadata (set before any chunk,
    so a request that failed still counts for its version's error rate and its arm)."""
    for key, value in metadata or ():
        if key == "x-fleetserve-model-version":
            outcome.model_version = value
        elif key == "x-fleetserve-experiment":
            outcome.experiment = value
        elif key == "x-fleetserve-arm":
            outcome.arm = value


@dataclass
class Outcome:
    """What one request came to; filled in while it streams, read by the caller after the stream ends."""

    request_id: str
    tenant_id: str = ""
    code: grpc.StatusCode = grpc.StatusCode.CANCELLED
    ttft_ms: float | None = None
    replica_id: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    # How the request was degraded under load ("" when it was not); also on the first chunk's served_by.
    degraded: str = ""
    # The tier it ran at (common.v1.Priority), after the tenant's tier capped it.
    priority: int = 0
    # The ErrorInfo reason when the gateway refused it (RATE_LIMITED, LOAD_SHED, ...); "" otherwise.
    reason: str = ""
    # The model version that served it, and the A/B experiment arm it counted for (from served_by).
    model_version: str = ""
    experiment: str = ""
    arm: str = ""
    extra: dict[str, object] = field(default_factory=dict)
    # The last chunk (a stop or length finish) came: set before the pipeline yields it, with the request
    # settled and served_by noted, so a front end may end its client's stream with it (finish_later).
    finished: bool = False


class GatewayPipeline:
    """Authenticates and runs requests for every front end. generate() yields the router's response bytes
    unchanged (the gateway's GenerateResponse has the same wire form); only the first chunk (served_by) and
    the last (usage) are parsed, once the stream is over."""

    def __init__(
        self,
        tenants: TenantStore,
        routers: RouterPool | EmbeddedRouter,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        *,
        default_deadline_s: float = 120.0,
        default_max_tokens: int = 256,
        max_tokens_limit: int = 8192,
        list_models_timeout_s: float = 5.0,
        admission: Admission | None = None,
        safety: SafetyFilter | None = None,
        shedder: LoadShedder | None = None,
        context_lengths: Mapping[str, int] | None = None,
        default_context_length: int | None = None,
        models_cache_ttl_s: float = 2.0,
        extra_models: Iterable[str] = (),
        prom: GatewayMetrics | None = None,
        ledger_sync: bool = False,
        recent_requests: int = 100_000,
    ) -> None:
        self.tenants = tenants
        # Who sent each recent request and what served it, for Feedback (both front ends' requests).
        self.recent = RecentRequests(recent_requests)
        # The usage row is committed before the last chunk is relayed (settings.ledger_sync).
        self.ledger_sync = ledger_sync
        self._finishing: set[asyncio.Task] = set()  # finish_later's tasks
        self.admission = admission
        self.safety = safety
        self.shedder = shedder
        self.context_lengths = dict(context_lengths or {})
        self.default_context_length = default_context_length
        self.models_cache_ttl_s = models_cache_ttl_s
        self.extra_models = frozenset(extra_models)
        self.prom = prom
        self.drain = Drain("gateway")
        # --max-requests-per-worker: set by the app in a supervised worker (shared/recycle.py).
        self.recycler: Recycler | None = None
        self._models: tuple[frozenset[str], float] | None = None
        self._models_fetch: asyncio.Future[frozenset[str] | None] | None = None
        self.tracer = tracer
        self.default_deadline_s = default_deadline_s
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.list_models_timeout_s = list_models_timeout_s
        self.routers = routers
        self._requests = meter.create_counter(
            "fleetserve.gateway.requests",
            unit="{request}",
            description="Generate requests by model and status code.",
        )
        self._refusals = meter.create_counter(
            "fleetserve.gateway.refusals",
            unit="{request}",
            description="Requests refused by the safety filter, by reason (input or output) and model.",
        )
        self._degraded = meter.create_counter(
            "fleetserve.gateway.degraded",
            unit="{request}",
            description="Requests served degraded under load (smaller model or capped max_tokens), by model.",
        )

    @classmethod
    def from_settings(
        cls,
        settings: GatewaySettings,
        tenants: TenantStore,
        routers: RouterPool | EmbeddedRouter,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        prom: GatewayMetrics | None = None,
    ) -> GatewayPipeline:
        """The pipeline with everything the settings turn on: limits (in process, or Redis), the ledger and
        budgets, the safety filter, load shedding. start() starts its background tasks, close() ends them."""
        backend = limit_backend(settings, tenants.db, prom.registry if prom is not None else None)
        ledger = Ledger(
            tenants.db,
            flush_interval_s=settings.ledger_flush_interval_s,
            refresh_s=settings.budget_refresh_s,
        )
        pipeline = cls(
            tenants,
            routers,
            tracer,
            meter,
            default_deadline_s=settings.default_deadline_s,
            default_max_tokens=settings.default_max_tokens,
            max_tokens_limit=settings.max_tokens_limit,
            list_models_timeout_s=settings.list_models_timeout_s,
            admission=Admission(
                backend,
                ledger,
                meter,
                prices=settings.model_prices,
                budgets=Budgets(tenants.db, hold_s=settings.budget_hold_s),
            ),
            safety=DenyPatterns(
                settings.safety_input_patterns, settings.safety_output_patterns, settings.safety_window_chars
            ),
            context_lengths=settings.context_lengths,
            default_context_length=settings.default_context_length,
            models_cache_ttl_s=settings.models_cache_ttl_s,
            extra_models=settings.extra_models,
            prom=prom,
            ledger_sync=settings.ledger_sync == "on"
            or (settings.ledger_sync == "auto" and tenants.db.dialect == "postgresql"),
            recent_requests=settings.feedback_index_size,
        )
        pipeline.shedder = LoadShedder(
            lambda: routers.unary("get_status", router_pb.GetStatusRequest(), timeout_s=1.0),
            batch_depth=settings.shed_batch_queue_depth,
            standard_depth=settings.shed_standard_queue_depth,
            poll_s=settings.shed_poll_s,
            degrade_models=settings.degrade_models,
            degrade_max_tokens=settings.degrade_max_tokens,
        )
        return pipeline

    def start(self) -> None:
        """Start the background work: ledger flushes, load polling, keeping key lookups fresh."""
        self.tenants.start_refresh()
        if self.admission is not None:
            self.admission.ledger.start()
            self.admission.budgets.start()
            self.admission.backend.start()
        if self.shedder is not None:
            self.shedder.start()

    def finish_later(self, stream: AsyncIterator[bytes], request_id: str) -> None:
        """Read the rest of a stream whose client already has its last chunk (outcome.finished) in a task of its
        own: what is left is every hop's end of the call, and a stream closed before its end would count as
        cancelled (metrics, spans, its log line). close() waits for these."""
        task = asyncio.get_running_loop().create_task(self._finish_later(stream, request_id))
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _finish_later(self, stream: AsyncIterator[bytes], request_id: str) -> None:
        try:
            async for _ in stream:
                pass
        except Exception as e:  # noqa: BLE001 - the client has its whole answer; the stream's end is logged
            log.info("gateway.after_finish", request_id=request_id, error=type(e).__name__)
        finally:
            await stream.aclose()  # type: ignore[attr-defined]

    async def close(self, finishing_timeout_s: float = 1.0) -> None:
        """Stop the background work, write the ledger's last rows, close the limits backend. Streams still
        ending behind finished answers get finishing_timeout_s, then are cut."""
        if self._finishing:
            _done, pending = await asyncio.wait(set(self._finishing), timeout=finishing_timeout_s)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await self.tenants.stop_refresh()
        if self.shedder is not None:
            await self.shedder.stop()
        if self.admission is not None:
            await self.admission.budgets.close()
            await self.admission.ledger.close()
            await self.admission.backend.close()

    async def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an "authorization: Bearer <key>" value, or Unauthenticated."""
        key = bearer_key(authorization)
        if key is None:
            raise Unauthenticated(
                'missing API key: send "authorization: Bearer <key>"', reason="MISSING_API_KEY"
            )
        tenant = await self.tenants.authenticate(key)
        if tenant is None:
            raise Unauthenticated("invalid or revoked API key", reason="INVALID_API_KEY")
        return tenant

    async def generate(
        self,
        request: pb.GenerateRequest,
        *,
        authorization: str | None,
        outcome: Outcome,
        timeout_s: float | None,
        parent: otel_context.Context | None = None,
        span_name: str = "gateway.Generate",
        tenant: Tenant | None = None,
        sent: Callable[[], None] | None = None,
        rateable: bool = True,
    ) -> AsyncIterator[bytes]:
        """The router's GenerateResponse bytes for request. Raises FleetError (or the router's AioRpcError,
        relayed as is) before or during the stream; outcome says how it ended once the generator is closed.
        timeout_s is what the client gave (None: the default deadline). tenant, when given, is already
        authenticated (batch jobs, which run after their submitter's key is gone) and authorization is not read.
        sent(), when given, is called once the router call is on its way (RouterPool.generate), not at all when
        the request ends before it. rateable: the request is remembered for Feedback (self.recent) once it has
        finished, before its last chunk is yielded, or when it ends otherwise; a front end's request is, a batch
        item is not."""
        arrived = time.perf_counter()
        timeout = self.default_deadline_s if timeout_s is None else timeout_s
        deadline = arrived + timeout
        first: bytes | None = None
        last: bytes | None = None
        with stream_span(self.tracer, span_name, context=parent, kind=trace.SpanKind.SERVER) as span:
            # The span's ids (and so the trace context sent on) are fixed already; what only describes the
            # request (log context, span attributes, the running gauge) is done once the router call is on its
            # way, while the router works (at c=1 it was ~50 us before the call), or at the end for a request
            # that never got that far. Nothing here decides whether or how the request runs.
            annotated = False

            def annotate() -> None:
                nonlocal annotated
                if annotated:
                    return
                annotated = True
                bind_request(outcome.request_id, span)
                span.set_attribute("fleetserve.request_id", outcome.request_id)
                span.set_attribute("fleetserve.model", request.model)
                if tenant is not None:
                    span.set_attribute("fleetserve.tenant_id", tenant.id)
                    span.set_attribute("fleetserve.tenant_tier", tenant.tier)
                    if request.feature:
                        span.set_attribute("fleetserve.feature", request.feature)

            def on_sent() -> None:
                nonlocal running_label
                annotate()
                span.set_attribute("fleetserve.deadline_left_ms", timeout * 1000.0)
                if self.prom is not None:
                    running_label = self._model_label(request.model)
                    self.prom.started(running_label)
                if sent is not None:
                    sent()

            ticket: Ticket | None = None
            call = None  # the router call, once made
            tried: list[tuple[str, int]] = []  # (router address, when) of each router call
            chunks = 0
            running_label: str | None = None  # the model label of the running gauge, once counted there
            checked = False
            try:
                self.drain.check()  # draining: UNAVAILABLE + RetryInfo, on gRPC and HTTP alike
                checked = True
                tenant = tenant or await self.authenticate(authorization)
                outcome.tenant_id = tenant.id
                spec = to_spec(
                    request,
                    default_max_tokens=self.default_max_tokens,
                    max_tokens_limit=self.max_tokens_limit,
                )
                prompt_tokens = await check_prompt_tokens(
                    spec,
                    self.context_length(request.model),
                    count=self.admission is not None and self.admission.counts_tokens(tenant),
                )
                await self._check_model(request.model)
                if not tenant.may_use(request.model):
                    raise PermissionDenied(
                        f"tenant {tenant.id!r} may not use model {request.model!r}",
                        reason="MODEL_NOT_ALLOWED",
                        metadata={
                            "model": request.model,
                            "allowed_models": ",".join(sorted(tenant.models or ())),
                        },
                    )
                outcome.priority = effective_priority(request.priority, tenant.tier)
                if self.safety is not None:
                    verdict = self.safety.check_input(input_texts(spec))
                    if verdict is not None:
                        raise self._refused(INPUT_BLOCKED, verdict.rule, request.model, span)
                if self.shedder is not None:
                    self._degrade(spec, outcome, span)
                if self.admission is not None:
                    ticket = await self.admission.admit(
                        tenant,
                        spec.model,
                        outcome.request_id,
                        prompt_tokens,
                        timeout + _STREAM_LEASE_SLACK_S,
                        max_tokens=spec.sampling.max_tokens,
                        idempotency_key=request.idempotency_key,
                        resumed_tokens=len(spec.resume_token_ids),
                    )
                    if ticket.max_tokens is not None:
                        # The budget has room for fewer tokens than asked: the generation stops there.
                        spec.sampling.max_tokens = ticket.max_tokens
                        capped = f"max_tokens {ticket.max_tokens} (budget)"
                        outcome.degraded = f"{outcome.degraded}; {capped}" if outcome.degraded else capped
                        span.set_attribute("fleetserve.degraded", outcome.degraded)
                call = self.routers.generate(
                    router_pb.GenerateRequest(
                        request_id=outcome.request_id,
                        spec=spec,
                        routing=router_pb.RoutingContext(
                            tenant_id=tenant.id,
                            priority=outcome.priority,
                            session_id=request.session_id,
                            user_id=request.user_id,
                        ),
                    ),
                    # Each router tried gets what is left of this, rounded down to the grpc-timeout unit.
                    deadline=time.monotonic() + timeout,
                    metadata=metadata_for_downstream(),
                    # Put on the span as events when the request ends (timestamped now): not on the first
                    # token's path.
                    attempt=lambda address: tried.append((address, time.time_ns())),
                    sent=on_sent,
                )
                checker = self.safety.output_checker() if self.safety is not None else None
                note = (
                    pb.GenerateResponse(
                        chunk=common_pb2.GenerateChunk(
                            served_by=common_pb2.ServedBy(degraded=outcome.degraded)
                        )
                    ).SerializeToString()
                    if outcome.degraded
                    else b""
                )
                self.drain.track(call)
                try:
                    async for data in call:
                        chunks += 1
                        if checker is not None:
                            verdict = checker.feed(pb.GenerateResponse.FromString(data).chunk.text)
                            if verdict is not None:
                                raise self._refused(OUTPUT_BLOCKED, verdict.rule, request.model, span)
                        if is_finished(data):
                            note_served(
                                outcome, pb.GenerateResponse.FromString(first or data).chunk.served_by
                            )
                            outcome.finished = True
                            if rateable:
                                # Before the client has its last chunk: it may rate the answer at once.
                                self.recent.remember(outcome.request_id, outcome, request.model)
                        if ticket is not None and (
                            outcome.finished or (self.ledger_sync and has_finish(data))
                        ):
                            # Settled before the client has its last chunk (both front ends end the client's
                            # stream with it, before the call's trailers): its next request finds its stream
                            # slot free and its tokens charged, as exact limits need. With ledger_sync the
                            # row is committed too: a gateway killed after this point loses no row, and one
                            # killed before it leaves the client a stream to resume elsewhere. Settled here
                            # whatever happens next (a cancel while the row commits must not settle it again).
                            settling, ticket = ticket, None
                            await self._settle_last(settling, outcome, chunks, first or data, data)
                        if first is None:
                            outcome.ttft_ms = (time.perf_counter() - arrived) * 1000.0
                            if note:
                                # Protobuf merges a message appended to another: served_by gains the note
                                # without decoding and re-encoding the chunk.
                                data += note
                            first = data
                        last = data
                        yield data
                except asyncio.CancelledError:
                    # The drain cut this stream's router call (not our client going away): say so.
                    if (cut := self.drain.cut_reason()) is None or cancelled_by_caller():
                        raise
                    raise cut from None
                finally:
                    self.drain.untrack(call)
                    await (
                        call.aclose()
                    )  # cancels the router call: reaches router and engine if our client left
                outcome.code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                outcome.code = e.code()
                if first is None:
                    # No served_by: the router's initial metadata says which version (and arm) it failed on.
                    assigned(e.initial_metadata(), outcome)
                raise
            except FleetError as e:
                outcome.code = e.code
                outcome.reason = e.reason
                if first is None and call is not None:
                    # An embedded router's own error: its initial metadata is kept on the stream.
                    assigned(call.initial_metadata, outcome)
                raise
            except Exception:
                outcome.code = grpc.StatusCode.INTERNAL
                raise
            finally:
                if checked:
                    self.drain.done()
                if outcome.code == grpc.StatusCode.CANCELLED and time.perf_counter() >= deadline:
                    outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED
                annotate()  # a request refused or gone before its router call: its span and log lines still say
                try:
                    for address, at in tried:
                        span.add_event("fleetserve.router", {"address": address}, timestamp=at)
                    self._finish(span, arrived, request.model, outcome, first, last)
                    if rateable and not outcome.finished:
                        # After _finish, which notes the version that served it.
                        self.recent.remember(outcome.request_id, outcome, request.model)
                finally:
                    if running_label is not None:
                        self.prom.stopped(running_label)  # type: ignore[union-attr]
                    # Whatever _finish did: an unsettled ticket holds a stream slot until its lease ends.
                    if self.recycler is not None:
                        self.recycler.served_one()
                    if ticket is not None:
                        await self._settle(ticket, spec, outcome, chunks)

    async def _settle_last(
        self, ticket: Ticket, outcome: Outcome, chunks: int, first: bytes, last: bytes
    ) -> None:
        """The ledger row of a request whose last chunk is here (committed with ledger_sync, in a group commit
        with every other row pending; a database that fails is logged and the row stays queued)."""
        served_by = pb.GenerateResponse.FromString(first).chunk.served_by
        usage = pb.GenerateResponse.FromString(last).chunk.usage
        try:
            await self.admission.finish(  # type: ignore[union-attr]
                ticket,
                status=grpc.StatusCode.OK.name,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                relayed_chunks=chunks,
                model_version=served_by.model_version,
            )
            if self.ledger_sync:
                await self.admission.ledger.flush()  # type: ignore[union-attr]
        except DatabaseError:
            log.exception("gateway.ledger_sync_failed", request_id=ticket.request_id)
        except Exception:  # noqa: BLE001 - accounting must not turn a served request into an error
            log.exception("gateway.settle_failed", request_id=ticket.request_id)

    def context_length(self, model: str) -> int | None:
        """The model's context length (None: not checked)."""
        return self.context_lengths.get(model, self.default_context_length)

    def _model_label(self, model: str) -> str:
        """model as a metric label: itself when the fleet serves it, else UNKNOWN_MODEL (names come from
        clients; a label per made-up name would grow the series without bound)."""
        if model in self.extra_models or (self._models is not None and model in self._models[0]):
            return model
        return UNKNOWN_MODEL

    def _refused(self, reason: str, rule: str, model: str, span: trace.Span) -> SafetyRefusal:
        self._refusals.add(1, {"reason": reason, "model": model})
        span.set_attribute("fleetserve.safety_blocked", reason)
        if self.prom is not None:
            self.prom.refused(self._model_label(model), reason)
        where = "prompt" if reason == INPUT_BLOCKED else "generated text"
        return SafetyRefusal(
            f"the {where} was refused by the safety filter (rule {rule})",
            reason=reason,
            metadata={"rule": rule},
        )

    def _degrade(self, spec, outcome: Outcome, span: trace.Span) -> None:
        """Shed the request (ResourceExhausted) or degrade spec in place, per the load shedder."""
        decision = self.shedder.decide(spec.model, outcome.priority, spec.sampling.max_tokens)  # type: ignore[union-attr]
        if not decision.note:
            return
        self._degraded.add(1, {"model": spec.model})
        if decision.model:
            spec.model = decision.model
        if decision.max_tokens:
            spec.sampling.max_tokens = decision.max_tokens
        outcome.degraded = decision.note
        span.set_attribute("fleetserve.degraded", decision.note)

    async def _settle(
        self, ticket: Ticket, spec: common_pb2.GenerationSpec, outcome: Outcome, chunks: int
    ) -> None:
        """Limits and ledger, after the stream; a failure here (Redis gone) is logged, never raised over the
        request's own outcome."""
        try:
            if chunks and not ticket.prompt_tokens and outcome.prompt_tokens is None:
                # Generation started but no usage came back (cancelled, failed mid-stream), and the prompt was
                # not counted on admission (no token limit): count it for the ledger.
                ticket.prompt_tokens = await check_prompt_tokens(spec, None, count=True)
        except Exception:  # noqa: BLE001 - the slot and the row below matter more than this count
            log.exception("gateway.prompt_count_failed", request_id=ticket.request_id)
        try:
            await self.admission.finish(  # type: ignore[union-attr]
                ticket,
                status=outcome.code.name,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                cached_tokens=outcome.cached_tokens,
                relayed_chunks=chunks,
                model_version=outcome.model_version,
            )
            if self.ledger_sync and chunks:
                # A stream cut mid-way: its partial row is committed before the client learns, so that the
                # client's resume elsewhere is billed net of it.
                await self.admission.ledger.flush()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - accounting must not turn a served request into an error
            log.exception("gateway.settle_failed", request_id=ticket.request_id)

    async def _model_names(self, max_age_s: float) -> frozenset[str] | None:
        """The router's model names, cached up to max_age_s; None when the router cannot say (then the router
        itself answers for the model). Concurrent requests share one ListModels call."""
        if self._models is not None and time.monotonic() - self._models[1] < max_age_s:
            return self._models[0]
        if self._models_fetch is None or self._models_fetch.done():
            self._models_fetch = asyncio.ensure_future(self._fetch_model_names())
        # Shielded: a request that goes away must not cancel the call others wait on.
        return await asyncio.shield(self._models_fetch)

    async def _fetch_model_names(self) -> frozenset[str] | None:
        try:
            resp = await self.routers.unary(
                "list_models",
                router_pb.ListModelsRequest(),
                timeout_s=min(1.0, self.list_models_timeout_s),
                metadata=metadata_for_downstream(),
            )
        except (grpc.aio.AioRpcError, FleetError) as e:
            log.debug("gateway.model_list_failed", error=str(e)[:200])
            return None
        self._models = (frozenset(m.model for m in resp.models), time.monotonic())
        return self._models[0]

    async def _check_model(self, model: str) -> None:
        """NotFound (with the available models) for a model the router does not serve."""
        if model in self.extra_models:
            return
        cached = self._models
        if cached is not None and model in cached[0]:
            # A model the list had: served from the list even when it is stale, which is refreshed meanwhile.
            # Waiting for the router's answer here would put a ListModels round trip, queued behind every
            # stream the router relays, before this request's first token.
            if time.monotonic() - cached[1] >= self.models_cache_ttl_s and (
                self._models_fetch is None or self._models_fetch.done()
            ):
                self._models_fetch = asyncio.ensure_future(self._fetch_model_names())
            return
        names = await self._model_names(self.models_cache_ttl_s)
        if names is not None and model not in names:
            # It may have come up since the list was read: look once more, unless the list is fresh.
            names = await self._model_names(min(0.25, self.models_cache_ttl_s))
        if names is None or model in names:
            return
        available = sorted(names)
        raise NotFound(
            f"model {model!r} is not served by this fleet; available models: {', '.join(available) or 'none'}",
            reason="MODEL_NOT_FOUND",
            metadata={"model": model, "available_models": ",".join(available)},
        )

    def _finish(
        self,
        span: trace.Span,
        arrived: float,
        model: str,
        outcome: Outcome,
        first: bytes | None,
        last: bytes | None,
    ) -> None:
        """Span attributes, the request counters and the canonical log line, once per request."""
        if first is not None:
            chunk = pb.GenerateResponse.FromString(first).chunk
            served_by = chunk.served_by
            note_served(outcome, served_by)
            # The model behind an alias (or a degraded request's smaller model): what cost and quality are
            # reported by (its version goes on the span in _versioned, for failed requests too).
            span.set_attribute("fleetserve.served_model", served_by.model)
            if last is not first:
                chunk = pb.GenerateResponse.FromString(last).chunk
            if chunk.HasField("usage"):
                outcome.completion_tokens = chunk.usage.completion_tokens
                outcome.prompt_tokens = chunk.usage.prompt_tokens
                outcome.cached_tokens = chunk.usage.cached_tokens
                span.set_attribute("fleetserve.output_tokens", outcome.completion_tokens)
                span.set_attribute("fleetserve.prompt_tokens", outcome.prompt_tokens)
                span.set_attribute("fleetserve.cached_tokens", outcome.cached_tokens)
            if chunk.HasField("output_refusal"):
                # The engine's refusal check of the whole output (unset after a resume): an A/B arm's
                # refusal_rate sample in the metrics service.
                span.set_attribute("fleetserve.output_refusal", chunk.output_refusal)
        if outcome.ttft_ms is not None:
            span.set_attribute("fleetserve.ttft_ms", outcome.ttft_ms)
        if outcome.replica_id:
            span.set_attribute("fleetserve.replica_id", outcome.replica_id)
        self._versioned(span, model, outcome)
        code = outcome.code
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        self._requests.add(1, {"model": model, "model_version": outcome.model_version, "code": code.name})
        duration_s = time.perf_counter() - arrived
        if self.prom is not None:
            self.prom.finished(
                model_label=self._model_label(model),
                tenant=outcome.tenant_id,
                code=code,
                reason=outcome.reason,
                priority=outcome.priority,
                e2e_s=duration_s,
                ttft_s=None if outcome.ttft_ms is None else outcome.ttft_ms / 1000.0,
                prompt_tokens=outcome.prompt_tokens,
                cached_tokens=outcome.cached_tokens,
                completion_tokens=outcome.completion_tokens,
                degraded=bool(outcome.degraded),
            )
        log.info(
            "gateway.request",
            tenant=outcome.tenant_id,
            model=model,
            model_version=outcome.model_version,
            status=code.name,
            replica=outcome.replica_id,
            ttft_ms=round(outcome.ttft_ms, 3) if outcome.ttft_ms is not None else None,
            output_tokens=outcome.completion_tokens,
            prompt_tokens=outcome.prompt_tokens,
            duration_ms=round(duration_s * 1000.0, 3),
            **outcome.extra,
        )

    def _versioned(self, span: trace.Span, model: str, outcome: Outcome) -> None:
        """The served version, the experiment arm and the request's cost (token prices) on the root span: the
        metrics service keys rollout guardrails by version and A/B outcomes by arm."""
        if outcome.model_version:
            span.set_attribute("fleetserve.model_version", outcome.model_version)
        if outcome.experiment:
            span.set_attribute("fleetserve.experiment", outcome.experiment)
            span.set_attribute("fleetserve.arm", outcome.arm)
            outcome.extra.setdefault("experiment", outcome.experiment)
            outcome.extra.setdefault("arm", outcome.arm)
        if self.admission is not None and outcome.completion_tokens is not None:
            cost = cost_usd(
                self.admission.prices, model, outcome.prompt_tokens or 0, outcome.completion_tokens
            )
            span.set_attribute("fleetserve.cost_usd", cost)

    async def list_models(self, authorization: str | None, timeout_s: float | None) -> pb.ListModelsResponse:
        """The models with healthy replicas, for an authenticated caller."""
        await self.authenticate(authorization)
        timeout = (
            self.list_models_timeout_s if timeout_s is None else min(timeout_s, self.list_models_timeout_s)
        )
        resp = await self.routers.unary(
            "list_models",
            router_pb.ListModelsRequest(),
            timeout_s=timeout,
            metadata=metadata_for_downstream(),
        )
        self._models = (frozenset(m.model for m in resp.models), time.monotonic())
        return pb.ListModelsResponse(
            models=[pb.Model(name=m.model, replicas=m.replicas) for m in resp.models]
        )
