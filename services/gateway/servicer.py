"""InferenceService over gRPC: a thin adapter from gRPC calls to the gateway pipeline, jobs and feedback."""

from __future__ import annotations

import grpc
from fleetserve.inference.v1 import inference_service_pb2 as pb

from services.gateway.feedback import FeedbackStore
from services.gateway.jobs import JobRunner
from services.gateway.pipeline import GatewayPipeline, Outcome
from shared.deadlines import downstream_timeout
from shared.early_metadata import EarlyMetadata
from shared.errors import InvalidArgument, rpc_boundary
from shared.telemetry import context_from_metadata, new_request_id, trace_context_of


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    return _authorization_in(context.invocation_metadata())


def _authorization_in(metadata) -> str | None:
    value = next((v for k, v in (metadata or ()) if k == "authorization"), None)
    return value if isinstance(value, str) else None


class GatewayServicer:
    """fleetserve.inference.v1.InferenceService. Generate and Chat yield the pipeline's bytes unchanged."""

    def __init__(self, pipeline: GatewayPipeline, jobs: JobRunner, feedback: FeedbackStore) -> None:
        self.pipeline = pipeline
        self.jobs = jobs
        self.feedback = feedback

    @rpc_boundary
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        async for data in self._generate(request, context, "gateway.Generate"):
            yield data

    @rpc_boundary
    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext):
        if not request.messages:
            raise InvalidArgument(
                "invalid request: messages", field_violations=[("messages", "required: at least one message")]
            )
        # ChatRequest has GenerateRequest's field numbers, and ChatResponse GenerateResponse's: the same bytes.
        generate = pb.GenerateRequest.FromString(request.SerializeToString())
        async for data in self._generate(generate, context, "gateway.Chat"):
            yield data

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext, span_name: str):
        outcome = Outcome(request_id=new_request_id())
        # The request id goes out once the router call is on its way (the pipeline's sent), not before: sending
        # it is a batch in gRPC's core whose set-up would otherwise run ahead of the router call's. Awaited
        # before the first chunk, and sent before an error ends a call refused before routing, so the id always
        # precedes both.
        request_id = (("x-request-id", outcome.request_id),)
        early = EarlyMetadata(context)

        # Conservative: the router must give up before our client does, so errors reach the client.
        timeout = downstream_timeout(context, default_s=self.pipeline.default_deadline_s, conservative=True)
        # Read once for both (~8 us each time grpc.aio builds the pairs, 3x that on a hop that was idle).
        metadata = context.invocation_metadata()
        stream = self.pipeline.generate(
            request,
            authorization=_authorization_in(metadata),
            outcome=outcome,
            timeout_s=timeout,
            parent=trace_context_of(metadata),
            span_name=span_name,
            sent=lambda: early.send(request_id),
        )
        first = True
        try:
            async for data in stream:
                if first:
                    first = False
                    await early.before_first(request_id)  # sent already: a first chunk follows sent()
                yield data
                if outcome.finished:
                    # The client's call ends (OK) with its last chunk, not after every hop behind us has ended
                    # its own (the pipeline reads that rest: finish_later).
                    break
        finally:
            try:
                if outcome.finished:
                    self.pipeline.finish_later(stream, outcome.request_id)
                else:
                    # Closing runs the pipeline's accounting now, while the client's cancellation is handled.
                    await stream.aclose()
            finally:
                await early.settle(
                    request_id
                )  # refused (or gone) before routing: the error still follows the id

    @rpc_boundary
    async def ListModels(self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext):
        timeout = downstream_timeout(
            context, default_s=self.pipeline.list_models_timeout_s, conservative=True
        )
        return await self.pipeline.list_models(_authorization(context), timeout)

    @rpc_boundary
    async def Feedback(self, request: pb.FeedbackRequest, context: grpc.aio.ServicerContext):
        tenant = await self.pipeline.authenticate(_authorization(context))
        with self.pipeline.tracer.start_as_current_span(
            "gateway.Feedback", context=context_from_metadata(context)
        ):
            return pb.FeedbackResponse(feedback_id=await self.feedback.record(tenant, request))

    @rpc_boundary
    async def SubmitBatch(self, request: pb.SubmitBatchRequest, context: grpc.aio.ServicerContext):
        tenant = await self.pipeline.authenticate(_authorization(context))
        return pb.SubmitBatchResponse(job=await self.jobs.submit(tenant, request))

    @rpc_boundary
    async def GetJob(self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext):
        tenant = await self.pipeline.authenticate(_authorization(context))
        return await self.jobs.get(tenant, request.job_id, request.include_results)

    @rpc_boundary
    async def CancelJob(self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext):
        tenant = await self.pipeline.authenticate(_authorization(context))
        return pb.CancelJobResponse(job=await self.jobs.cancel(tenant, request.job_id))
