"""The gateway's request path, independent of the protocol it arrived on: authenticate, validate, route and
relay the router's stream, and account for the request once. The gRPC servicer, the OpenAI-compatible HTTP
front end and batch jobs all call it, so every protocol gets the same rules."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import structlog
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.router.v1 import router_service_pb2 as router_pb
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace

from services.gateway.tenants import Tenant, TenantStore, bearer_key
from services.gateway.validation import to_spec
from shared.deadlines import wire_timeout
from shared.errors import FleetError, Unauthenticated, Unavailable
from shared.telemetry import bind_request, metadata_for_downstream

log = structlog.get_logger(__name__)

ROUTER_GENERATE = "/fleetserve.router.v1.RouterService/Generate"
ROUTER_LIST_MODELS = "/fleetserve.router.v1.RouterService/ListModels"
_DETAILS_KEY = "grpc-status-details-bin"


def router_unreachable(err: grpc.aio.AioRpcError) -> bool:
    """True when an error comes from the channel (router down or unreachable), not from the router: the router
    always attaches google.rpc.Status details to its own errors."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and not any(
        k == _DETAILS_KEY for k, _ in (err.trailing_metadata() or ())
    )


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
    extra: dict[str, object] = field(default_factory=dict)


class GatewayPipeline:
    """Authenticates and runs requests for every front end. generate() yields the router's response bytes
    unchanged (the gateway's GenerateResponse has the same wire form); only the first chunk (served_by) and
    the last (usage) are parsed, once the stream is over."""

    def __init__(
        self,
        tenants: TenantStore,
        router_channel: grpc.aio.Channel,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        *,
        default_deadline_s: float = 120.0,
        default_max_tokens: int = 256,
        max_tokens_limit: int = 8192,
        list_models_timeout_s: float = 5.0,
    ) -> None:
        self.tenants = tenants
        self.tracer = tracer
        self.default_deadline_s = default_deadline_s
        self.default_max_tokens = default_max_tokens
        self.max_tokens_limit = max_tokens_limit
        self.list_models_timeout_s = list_models_timeout_s
        self._generate = router_channel.unary_stream(
            ROUTER_GENERATE,
            request_serializer=router_pb.GenerateRequest.SerializeToString,
            response_deserializer=None,
        )
        self._list_models = router_channel.unary_unary(
            ROUTER_LIST_MODELS,
            request_serializer=router_pb.ListModelsRequest.SerializeToString,
            response_deserializer=router_pb.ListModelsResponse.FromString,
        )
        self._requests = meter.create_counter(
            "fleetserve.gateway.requests",
            unit="{request}",
            description="Generate requests by model and status code.",
        )

    def authenticate(self, authorization: str | None) -> Tenant:
        """The tenant of an "authorization: Bearer <key>" value, or Unauthenticated."""
        key = bearer_key(authorization)
        if key is None:
            raise Unauthenticated(
                'missing API key: send "authorization: Bearer <key>"', reason="MISSING_API_KEY"
            )
        tenant = self.tenants.authenticate(key)
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
    ) -> AsyncIterator[bytes]:
        """The router's GenerateResponse bytes for request. Raises FleetError (or the router's AioRpcError,
        relayed as is) before or during the stream; outcome says how it ended once the generator is closed.
        timeout_s is what the client gave (None: the default deadline). tenant, when given, is already
        authenticated (batch jobs, which run after their submitter's key is gone) and authorization is not read."""
        arrived = time.perf_counter()
        timeout = self.default_deadline_s if timeout_s is None else timeout_s
        deadline = arrived + timeout
        first: bytes | None = None
        last: bytes | None = None
        with self.tracer.start_as_current_span(span_name, context=parent, kind=trace.SpanKind.SERVER) as span:
            bind_request(outcome.request_id, span)
            span.set_attribute("fleetserve.request_id", outcome.request_id)
            span.set_attribute("fleetserve.model", request.model)
            try:
                tenant = tenant or self.authenticate(authorization)
                outcome.tenant_id = tenant.id
                span.set_attribute("fleetserve.tenant_id", tenant.id)
                spec = to_spec(
                    request,
                    default_max_tokens=self.default_max_tokens,
                    max_tokens_limit=self.max_tokens_limit,
                )
                span.set_attribute("fleetserve.deadline_left_ms", timeout * 1000.0)
                call = self._generate(
                    router_pb.GenerateRequest(
                        request_id=outcome.request_id,
                        spec=spec,
                        routing=router_pb.RoutingContext(
                            tenant_id=tenant.id,
                            priority=request.priority,
                            session_id=request.session_id,
                            user_id=request.user_id,
                        ),
                    ),
                    # Rounded so that the router never sees more time than the client gave.
                    timeout=wire_timeout(timeout),
                    metadata=metadata_for_downstream(),
                )
                try:
                    async for data in call:
                        if first is None:
                            first = data
                            outcome.ttft_ms = (time.perf_counter() - arrived) * 1000.0
                        last = data
                        yield data
                finally:
                    call.cancel()  # reaches router and engine when our client went away; no-op once done
                outcome.code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                outcome.code = e.code()
                if first is None and router_unreachable(e):
                    outcome.code = grpc.StatusCode.UNAVAILABLE
                    raise Unavailable(
                        f"the router is unreachable: {e.details()}",
                        reason="ROUTER_UNAVAILABLE",
                        retry_after_s=1.0,
                    ) from e
                raise
            except FleetError as e:
                outcome.code = e.code
                raise
            except Exception:
                outcome.code = grpc.StatusCode.INTERNAL
                raise
            finally:
                if outcome.code == grpc.StatusCode.CANCELLED and time.perf_counter() >= deadline:
                    outcome.code = grpc.StatusCode.DEADLINE_EXCEEDED
                self._finish(span, arrived, request.model, outcome, first, last)

    def _finish(
        self,
        span: trace.Span,
        arrived: float,
        model: str,
        outcome: Outcome,
        first: bytes | None,
        last: bytes | None,
    ) -> None:
        """Span attributes, the request counter and the canonical log line, once per request."""
        if first is not None:
            chunk = pb.GenerateResponse.FromString(first).chunk
            outcome.replica_id = chunk.served_by.replica_id
            if last is not first:
                chunk = pb.GenerateResponse.FromString(last).chunk
            if chunk.HasField("usage"):
                outcome.completion_tokens = chunk.usage.completion_tokens
                outcome.prompt_tokens = chunk.usage.prompt_tokens
                outcome.cached_tokens = chunk.usage.cached_tokens
                span.set_attribute("fleetserve.output_tokens", outcome.completion_tokens)
                span.set_attribute("fleetserve.prompt_tokens", outcome.prompt_tokens)
        if outcome.ttft_ms is not None:
            span.set_attribute("fleetserve.ttft_ms", outcome.ttft_ms)
        if outcome.replica_id:
            span.set_attribute("fleetserve.replica_id", outcome.replica_id)
        code = outcome.code
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        self._requests.add(1, {"model": model, "code": code.name})
        log.info(
            "gateway.request",
            tenant=outcome.tenant_id,
            model=model,
            status=code.name,
            replica=outcome.replica_id,
            ttft_ms=round(outcome.ttft_ms, 3) if outcome.ttft_ms is not None else None,
            output_tokens=outcome.completion_tokens,
            prompt_tokens=outcome.prompt_tokens,
            duration_ms=round((time.perf_counter() - arrived) * 1000.0, 3),
            **outcome.extra,
        )

    async def list_models(self, authorization: str | None, timeout_s: float | None) -> pb.ListModelsResponse:
        """The models with healthy replicas, for an authenticated caller."""
        self.authenticate(authorization)
        timeout = (
            self.list_models_timeout_s if timeout_s is None else min(timeout_s, self.list_models_timeout_s)
        )
        try:
            resp = await self._list_models(
                router_pb.ListModelsRequest(),
                timeout=wire_timeout(timeout),
                metadata=metadata_for_downstream(),
            )
        except grpc.aio.AioRpcError as e:
            if router_unreachable(e):
                raise Unavailable(
                    f"the router is unreachable: {e.details()}",
                    reason="ROUTER_UNAVAILABLE",
                    retry_after_s=1.0,
                ) from e
            raise
        return pb.ListModelsResponse(
            models=[pb.Model(name=m.model, replicas=m.replicas) for m in resp.models]
        )
