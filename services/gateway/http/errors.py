"""The one place gRPC status codes and fleetserve errors become HTTP statuses and OpenAI-shaped error bodies."""

from __future__ import annotations

import math

import grpc

from shared.errors import ErrorDetails, FleetError, details_of

# gRPC code -> (HTTP status, OpenAI error type). The openai client picks its exception class from the status:
# 400 BadRequestError, 401 AuthenticationError, 403 PermissionDeniedError, 404 NotFoundError,
# 409 ConflictError, 422 UnprocessableEntityError, 429 RateLimitError, >=500 InternalServerError.
HTTP_STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    # 499 is nginx's "client closed request": only ever logged, the client is gone.
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: (501, "not_implemented_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
}
_INTERNAL = (500, "server_error")


def details_of_exception(exc: BaseException) -> ErrorDetails:
    """ErrorDetails of a FleetError raised here or a downstream hop's AioRpcError; INTERNAL for anything else."""
    if isinstance(exc, FleetError):
        return ErrorDetails(
            code=exc.code,
            message=exc.message,
            reason=exc.reason,
            retry_after_s=exc.retry_after_s,
            field_violations=tuple(exc.field_violations),
            quota_violations=tuple(exc.quota_violations),
        )
    if isinstance(exc, grpc.aio.AioRpcError):
        return details_of(exc)
    return ErrorDetails(
        code=grpc.StatusCode.INTERNAL,
        message="internal error; it has been logged",
        reason="INTERNAL",
        retry_after_s=1.0,
    )


def error_body(d: ErrorDetails) -> dict:
    """{"error": {message, type, param, code}} as OpenAI sends it; code is the stable reason, lower-cased
    (INVALID_API_KEY -> invalid_api_key, as OpenAI spells its own), param the first field in violation."""
    _, kind = HTTP_STATUS.get(d.code, _INTERNAL)
    error: dict[str, object] = {
        "message": d.message,
        "type": kind,
        "param": d.field_violations[0][0] if d.field_violations else None,
        "code": d.reason.lower() or None,
    }
    if len(d.field_violations) > 1:
        error["field_violations"] = [{"field": f, "description": s} for f, s in d.field_violations]
    elif d.field_violations:
        error["message"] = f"{d.message}: {d.field_violations[0][1]}"
    if d.quota_violations:
        error["quota_violations"] = [{"subject": s, "description": x} for s, x in d.quota_violations]
    if d.retry_after_s is not None:
        error["retry_after_s"] = d.retry_after_s
    return {"error": error}


def http_error(d: ErrorDetails) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, body, headers) for an error; Retry-After (whole seconds, rounded up, as the header
    requires) whenever the error advises a delay."""
    status, _ = HTTP_STATUS.get(d.code, _INTERNAL)
    headers = {}
    if d.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(d.retry_after_s)))
        # OpenAI's client prefers this one: it keeps sub-second precision.
        headers["retry-after-ms"] = str(max(0, round(d.retry_after_s * 1000)))
    return status, error_body(d), headers
