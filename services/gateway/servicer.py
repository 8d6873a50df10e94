"""InferenceService over gRPC: a thin adapter from gRPC calls to the gateway pipeline."""

from __future__ import annotations

import uuid

import grpc
from fleetserve.inference.v1 import inference_service_pb2 as pb

from services.gateway.pipeline import GatewayPipeline, Outcome
from shared.deadlines import downstream_timeout
from shared.errors import rpc_boundary
from shared.telemetry import context_from_metadata


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    value = next((v for k, v in (context.invocation_metadata() or ()) if k == "authorization"), None)
    return value if isinstance(value, str) else None


class GatewayServicer:
    """fleetserve.inference.v1.InferenceService. Generate yields the pipeline's bytes unchanged."""

    def __init__(self, pipeline: GatewayPipeline) -> None:
        self.pipeline = pipeline

    @rpc_boundary
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        outcome = Outcome(request_id=uuid.uuid4().hex)
        await context.send_initial_metadata((("x-request-id", outcome.request_id),))
        # Conservative: the router must give up before our client does, so errors reach the client.
        timeout = downstream_timeout(context, default_s=self.pipeline.default_deadline_s, conservative=True)
        stream = self.pipeline.generate(
            request,
            authorization=_authorization(context),
            outcome=outcome,
            timeout_s=timeout,
            parent=context_from_metadata(context),
        )
        try:
            async for data in stream:
                yield data
        finally:
            # Closing runs the pipeline's accounting now, while the client's cancellation is being handled.
            await stream.aclose()

    @rpc_boundary
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        timeout = downstream_timeout(
            context, default_s=self.pipeline.list_models_timeout_s, conservative=True
        )
        return await self.pipeline.list_models(_authorization(context), timeout)
