"""InferenceService: authenticates, validates, opens the root span and relays the router's bytes to clients."""

from __future__ import annotations

import time
import uuid

import grpc
import structlog
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.router.v1 import router_service_pb2 as router_pb
from opentelemetry import metrics, trace

from services.gateway.tenants import Tenant, TenantStore, bearer_key
from services.gateway.validation import to_spec
from shared.deadlines import deadline_passed, downstream_timeout, wire_timeout
from shared.errors import FleetError, Unauthenticated, Unavailable, rpc_boundary
from shared.telemetry import bind_request, context_from_metadata, metadata_for_downstream

log = structlog.get_logger(__name__)

ROUTER_GENERATE = "/fleetserve.router.v1.RouterService/Generate"
ROUTER_LIST_MODELS = "/fleetserve.router.v1.RouterService/ListModels"
_DETAILS_KEY = "grpc-status-details-bin"


def _router_unreachable(err: grpc.aio.AioRpcError) -> bool:
    # The router always attaches google.rpc.Status details to its own errors; an UNAVAILABLE without them
    # comes from the channel: the router is down or cannot be reached.
    return err.code() == grpc.StatusCode.UNAVAILABLE and not any(
        k == _DETAILS_KEY for k, _ in (err.trailing_metadata() or ())
    )


class GatewayServicer:
    """fleetserve.inference.v1.InferenceService. Generate yields the router's response bytes unchanged; only
    the first chunk (served_by) and the last (usage) are parsed, once the stream is over."""

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
        # Responses stay bytes: the gateway's own GenerateResponse has the same wire form.
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

    def _authenticate(self, context: grpc.aio.ServicerContext) -> Tenant:
        auth = next((v for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None)
        key = bearer_key(auth if isinstance(auth, str) else None)
        if key is None:
            raise Unauthenticated(
                'missing API key: send metadata "authorization: Bearer <key>"', reason="MISSING_API_KEY"
            )
        tenant = self.tenants.authenticate(key)
        if tenant is None:
            raise Unauthenticated("invalid or revoked API key", reason="INVALID_API_KEY")
        return tenant

    @rpc_boundary
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        arrived = time.perf_counter()
        request_id = uuid.uuid4().hex
        model = request.model
        tenant_id = ""
        code = grpc.StatusCode.CANCELLED  # unless the stream completes or fails with a known code
        ttft_ms: float | None = None
        first: bytes | None = None
        last: bytes | None = None
        with self.tracer.start_as_current_span(
            "gateway.Generate", context=context_from_metadata(context), kind=trace.SpanKind.SERVER
        ) as span:
            bind_request(request_id, span)
            span.set_attribute("fleetserve.request_id", request_id)
            span.set_attribute("fleetserve.model", model)
            try:
                await context.send_initial_metadata((("x-request-id", request_id),))
                tenant = self._authenticate(context)
                tenant_id = tenant.id
                span.set_attribute("fleetserve.tenant_id", tenant_id)
                spec = to_spec(
                    request,
                    default_max_tokens=self.default_max_tokens,
                    max_tokens_limit=self.max_tokens_limit,
                )
                timeout = downstream_timeout(context, default_s=self.default_deadline_s, conservative=True)
                span.set_attribute("fleetserve.deadline_left_ms", timeout * 1000.0)
                call = self._generate(
                    router_pb.GenerateRequest(
                        request_id=request_id,
                        spec=spec,
                        routing=router_pb.RoutingContext(
                            tenant_id=tenant_id,
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
                            ttft_ms = (time.perf_counter() - arrived) * 1000.0
                        last = data
                        yield data
                finally:
                    call.cancel()  # reaches router and engine when our client went away; no-op once done
                code = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                code = e.code()
                if first is None and _router_unreachable(e):
                    code = grpc.StatusCode.UNAVAILABLE
                    raise Unavailable(
                        f"the router is unreachable: {e.details()}",
                        reason="ROUTER_UNAVAILABLE",
                        retry_after_s=1.0,
                    ) from e
                raise
            except FleetError as e:
                code = e.code
                raise
            except Exception:
                code = grpc.StatusCode.INTERNAL
                raise
            finally:
                if code == grpc.StatusCode.CANCELLED and deadline_passed(context):
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                self._finish(span, arrived, code, tenant_id, model, ttft_ms, first, last)

    def _finish(
        self,
        span: trace.Span,
        arrived: float,
        code: grpc.StatusCode,
        tenant_id: str,
        model: str,
        ttft_ms: float | None,
        first: bytes | None,
        last: bytes | None,
    ) -> None:
        """Span attributes, the request counter and the canonical log line, once per request."""
        served_by = ""
        output_tokens = prompt_tokens = None
        if first is not None:
            chunk = pb.GenerateResponse.FromString(first).chunk
            served_by = chunk.served_by.replica_id
            if last is not first:
                chunk = pb.GenerateResponse.FromString(last).chunk
            if chunk.HasField("usage"):
                output_tokens = chunk.usage.completion_tokens
                prompt_tokens = chunk.usage.prompt_tokens
                span.set_attribute("fleetserve.output_tokens", output_tokens)
                span.set_attribute("fleetserve.prompt_tokens", prompt_tokens)
        if ttft_ms is not None:
            span.set_attribute("fleetserve.ttft_ms", ttft_ms)
        if served_by:
            span.set_attribute("fleetserve.replica_id", served_by)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code != grpc.StatusCode.OK:
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        self._requests.add(1, {"model": model, "code": code.name})
        log.info(
            "gateway.request",
            tenant=tenant_id,
            model=model,
            status=code.name,
            replica=served_by,
            ttft_ms=round(ttft_ms, 3) if ttft_ms is not None else None,
            output_tokens=output_tokens,
            prompt_tokens=prompt_tokens,
            duration_ms=round((time.perf_counter() - arrived) * 1000.0, 3),
        )

    @rpc_boundary
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        self._authenticate(context)
        try:
            resp = await self._list_models(
                router_pb.ListModelsRequest(),
                timeout=wire_timeout(
                    downstream_timeout(context, default_s=self.list_models_timeout_s, conservative=True)
                ),
                metadata=metadata_for_downstream(),
            )
        except grpc.aio.AioRpcError as e:
            if _router_unreachable(e):
                raise Unavailable(
                    f"the router is unreachable: {e.details()}",
                    reason="ROUTER_UNAVAILABLE",
                    retry_after_s=1.0,
                ) from e
            raise
        return pb.ListModelsResponse(
            models=[pb.Model(name=m.model, replicas=m.replicas) for m in resp.models]
        )
