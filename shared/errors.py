"""Typed errors with stable reasons, turned into gRPC status + google.rpc.Status details at one boundary."""

from __future__ import annotations

import asyncio
import functools
import inspect
from typing import NoReturn

import grpc
import structlog
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from fleetserve.client.errors import DETAILS_KEY as _DETAILS_KEY
from fleetserve.client.errors import ErrorDetails, details_of  # noqa: F401  (the one parser; clients share it)

log = structlog.get_logger("fleetserve.errors")

DOMAIN = "fleetserve.dev"


class FleetError(Exception):
    """An error a caller should understand: a gRPC code, a stable reason and optional retry advice."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        retry_after_s: float | None = None,
        field_violations: list[tuple[str, str]] | None = None,
        quota_violations: list[tuple[str, str]] | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.retry_after_s = retry_after_s
        self.field_violations = field_violations or []
        self.quota_violations = quota_violations or []
        self.metadata = metadata or {}

    def to_status(self) -> grpc.Status:
        """The grpc.Status (code, message, trailing details) for this error."""
        details = []
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        details.append(info)
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(int(self.retry_after_s * 1e9))
            details.append(error_details_pb2.RetryInfo(retry_delay=delay))
        if self.field_violations:
            details.append(
                error_details_pb2.BadRequest(
                    field_violations=[
                        error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                        for f, d in self.field_violations
                    ]
                )
            )
        if self.quota_violations:
            details.append(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=s, description=d)
                        for s, d in self.quota_violations
                    ]
                )
            )
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        for d in details:
            status.details.add().Pack(d)
        return rpc_status.to_status(status)


class InvalidArgument(FleetError):
    """The request is malformed; retrying it unchanged will fail again."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"


class Unauthenticated(FleetError):
    """No valid API key."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "INVALID_API_KEY"


class PermissionDenied(FleetError):
    """The caller is known but may not do this (for example, a key without access to a model)."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class NotFound(FleetError):
    """The named thing (a model, a replica) does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class FailedPrecondition(FleetError):
    """The system is not in the state the operation needs (e.g. promoting a rollout that already ended); retrying
    unchanged fails until that state changes."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class KvEventsOff(FailedPrecondition):
    """The replica publishes no KV events (a vLLM engine started without --vllm-kv-events): a subscriber gets
    nothing from it until it is restarted with them."""

    reason = "KV_EVENTS_OFF"


class Aborted(FleetError):
    """A concurrent change won (a compare-and-set lost): read the current state again and retry."""

    code = grpc.StatusCode.ABORTED
    reason = "ABORTED"


class Unavailable(FleetError):
    """Transient: retry after the advised delay."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class NoHealthyReplica(Unavailable):
    """No replica can take the request now."""

    reason = "NO_HEALTHY_REPLICA"


class ShuttingDown(Unavailable):
    """This process is draining; another replica or a retry will serve the request."""

    reason = "SHUTTING_DOWN"


class DeadlineExceeded(FleetError):
    """The request's deadline passed before it finished."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class ResourceExhausted(FleetError):
    """A limit was hit; retry after the advised delay."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"


class Unimplemented(FleetError):
    """This server does not offer the operation."""

    code = grpc.StatusCode.UNIMPLEMENTED
    reason = "UNIMPLEMENTED"


async def abort(context: grpc.aio.ServicerContext, err: FleetError) -> NoReturn:
    """End the RPC with err's status and details."""
    status = err.to_status()
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable: context.abort raises")


async def relay(context: grpc.aio.ServicerContext, err: grpc.aio.AioRpcError) -> NoReturn:
    """End the RPC with a downstream hop's status, details included, so every hop reports the same."""
    trailing = tuple((k, v) for k, v in (err.trailing_metadata() or ()) if k == _DETAILS_KEY)
    await context.abort(err.code(), err.details() or "", trailing)
    raise AssertionError("unreachable: context.abort raises")


class Undecodable:
    """What a server's request deserializer returns for bytes that are not a valid message of the method's
    type (corrupt bytes, invalid UTF-8 in a string field): the servicer answers INVALID_ARGUMENT instead of
    gRPC's UNKNOWN "Unexpected DecodeError" (see shared/request_decoding.py)."""

    __slots__ = ("type_name", "error")

    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def to_error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.type_name} message: {self.error}",
            reason="MALFORMED_REQUEST",
            metadata={"message_type": self.type_name},
        )


# Set on servicer methods that answer an Undecodable request themselves (rpc_boundary), so the server needs no
# wrapper around them (a wrapper around a stream would cost a generator hop per message).
CHECKS_UNDECODABLE = "__fleetserve_checks_undecodable__"


async def _handle(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> NoReturn:
    if isinstance(exc, FleetError):
        await abort(context, exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        await relay(context, exc)
    log.exception("rpc.internal_error", method=method)
    await abort(context, FleetError("internal error; it has been logged", retry_after_s=1.0))


def rpc_boundary(fn):
    """Turn exceptions escaping a servicer method into statuses: FleetError -> its status, a downstream
    AioRpcError -> relayed unchanged, anything else -> INTERNAL (logged once). Cancellation passes through."""
    passthrough = (asyncio.CancelledError, grpc.aio.AbortError)
    name = fn.__qualname__
    if inspect.isasyncgenfunction(fn):

        @functools.wraps(fn)
        async def gen_wrapper(self, request, context):
            try:
                if type(request) is Undecodable:
                    raise request.to_error()
                async for item in fn(self, request, context):
                    yield item
            except passthrough:
                raise
            except Exception as exc:  # the one boundary where unknown errors become INTERNAL
                await _handle(context, exc, name)

        setattr(gen_wrapper, CHECKS_UNDECODABLE, True)
        return gen_wrapper

    @functools.wraps(fn)
    async def wrapper(self, request, context):
        try:
            if type(request) is Undecodable:
                raise request.to_error()
            return await fn(self, request, context)
        except passthrough:
            raise
        except Exception as exc:  # the one boundary where unknown errors become INTERNAL
            await _handle(context, exc, name)

    setattr(wrapper, CHECKS_UNDECODABLE, True)
    return wrapper
