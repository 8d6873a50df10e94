"""Errors become gRPC statuses with google.rpc.Status details, and clients can read them back."""

from __future__ import annotations

import grpc
import pytest
from fleetserve.engine.v1 import engine_service_pb2 as pb

from shared import errors
from shared.server import Service, create_server


class _Servicer:
    """An engine-shaped servicer whose methods raise what the test asks for."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    @errors.rpc_boundary
    async def GetInfo(self, request, context):
        raise self.exc

    @errors.rpc_boundary
    async def Generate(self, request, context):
        yield pb.GenerateResponse()
        raise self.exc

    async def Abort(self, request, context):
        return pb.AbortResponse()

    async def GetLoad(self, request, context):
        return pb.GetLoadResponse()

    async def SubscribeKvEvents(self, request, context):
        yield pb.SubscribeKvEventsResponse()


async def _call(exc: BaseException, streaming: bool) -> errors.ErrorDetails:
    running = await create_server([Service(pb, "EngineService", _Servicer(exc))])
    try:
        async with grpc.aio.insecure_channel(running.address) as ch:
            if streaming:
                call = ch.unary_stream(
                    "/fleetserve.engine.v1.EngineService/Generate",
                    request_serializer=pb.GenerateRequest.SerializeToString,
                    response_deserializer=pb.GenerateResponse.FromString,
                )(pb.GenerateRequest(), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in call:
                        pass
            else:
                stub = ch.unary_unary(
                    "/fleetserve.engine.v1.EngineService/GetInfo",
                    request_serializer=pb.GetInfoRequest.SerializeToString,
                    response_deserializer=pb.GetInfoResponse.FromString,
                )
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub(pb.GetInfoRequest(), timeout=5)
        return errors.details_of(info.value)
    finally:
        await running.server.stop(None)


@pytest.mark.parametrize("streaming", [False, True])
async def test_typed_error_carries_reason_retry_and_field_violations(streaming):
    """A FleetError reaches the client with its code, ErrorInfo reason, RetryInfo and BadRequest details."""
    exc = errors.InvalidArgument(
        "max_tokens too large", field_violations=[("max_tokens", "must be <= 8192")], retry_after_s=None
    )
    d = await _call(exc, streaming)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert d.reason == "INVALID_ARGUMENT"
    assert d.field_violations == (("max_tokens", "must be <= 8192"),)
    assert d.retry_after_s is None


async def test_retryable_error_says_when():
    """NoHealthyReplica is UNAVAILABLE with reason NO_HEALTHY_REPLICA and a retry delay."""
    d = await _call(errors.NoHealthyReplica("no replica", retry_after_s=1.5), streaming=True)
    assert d.code == grpc.StatusCode.UNAVAILABLE
    assert d.reason == "NO_HEALTHY_REPLICA"
    assert d.retry_after_s == pytest.approx(1.5)


async def test_quota_failure_details():
    """ResourceExhausted carries QuotaFailure violations."""
    exc = errors.ResourceExhausted("slow down", retry_after_s=2, quota_violations=[("tenant:dev", "10 rps")])
    d = await _call(exc, streaming=False)
    assert d.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert d.quota_violations == (("tenant:dev", "10 rps"),)


async def test_unknown_exception_becomes_internal_without_leaking_text():
    """A bug becomes INTERNAL with a generic message (the exception text stays in the log)."""
    d = await _call(RuntimeError("secret internals"), streaming=False)
    assert d.code == grpc.StatusCode.INTERNAL
    assert "secret" not in d.message
    assert d.reason == "INTERNAL"
