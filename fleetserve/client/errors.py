"""What a failed fleetserve call means to a client: the google.rpc.Status details every hop attaches (ErrorInfo
reason and metadata, RetryInfo, BadRequest and QuotaFailure violations), parsed from the trailing metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

# The trailing-metadata key gRPC's rich error model (grpcio-status) uses for the serialized google.rpc.Status.
DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class ErrorDetails:
    """What a client needs from a failed call: whose fault, whether and when to retry."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    retry_after_s: float | None = None
    field_violations: tuple[tuple[str, str], ...] = ()
    quota_violations: tuple[tuple[str, str], ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)


def details_of(err: grpc.RpcError) -> ErrorDetails:
    """Parse the google.rpc.Status details a fleetserve service attached to an error (sync or asyncio call)."""
    out: dict[str, Any] = {"code": err.code(), "message": err.details() or ""}
    raw = next((v for k, v in (err.trailing_metadata() or ()) if k == DETAILS_KEY), None)
    if raw:
        status = status_pb2.Status.FromString(raw)
        fv: list[tuple[str, str]] = []
        qv: list[tuple[str, str]] = []
        for any_ in status.details:
            if any_.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                any_.Unpack(info)
                out["reason"] = info.reason
                out["metadata"] = dict(info.metadata)
            elif any_.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                ri = error_details_pb2.RetryInfo()
                any_.Unpack(ri)
                out["retry_after_s"] = ri.retry_delay.ToNanoseconds() / 1e9
            elif any_.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                br = error_details_pb2.BadRequest()
                any_.Unpack(br)
                fv += [(v.field, v.description) for v in br.field_violations]
            elif any_.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
                qf = error_details_pb2.QuotaFailure()
                any_.Unpack(qf)
                qv += [(v.subject, v.description) for v in qf.violations]
        out["field_violations"] = tuple(fv)
        out["quota_violations"] = tuple(qv)
    return ErrorDetails(**out)


class FleetServeError(Exception):
    """A call failed after the client's retries: the status code, the fleet's reason and advice, how many attempts
    were made, and the gRPC error itself (`cause`)."""

    def __init__(self, details: ErrorDetails, attempts: int, cause: grpc.RpcError) -> None:
        hint = f"; retry after {details.retry_after_s:g}s" if details.retry_after_s is not None else ""
        reason = f" {details.reason}" if details.reason else ""
        super().__init__(f"{details.code.name}{reason}: {details.message}{hint}")
        self.details = details
        self.attempts = attempts
        self.cause = cause

    @property
    def code(self) -> grpc.StatusCode:
        return self.details.code

    @property
    def reason(self) -> str:
        return self.details.reason

    @property
    def retry_after_s(self) -> float | None:
        return self.details.retry_after_s
