"""A relayed GenerateResponse's finish, found by a byte search instead of a parse: what hops that relay bytes
(router, gateway) need to know of a chunk without decoding every one."""

from __future__ import annotations

from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

ABORT = common_pb2.FINISH_REASON_ABORT
# The engine's, the router's and the gateway's GenerateResponse are the same bytes (relayed unparsed).
_parse = engine_pb.GenerateResponse.FromString


def _finish_bytes(reason: int) -> bytes:
    field = common_pb2.GenerateChunk.DESCRIPTOR.fields_by_name["finish_reason"].number
    assert field < 16 and reason < 128  # a one-byte tag and a one-byte value
    return bytes([field << 3, reason])


# A finish as it is encoded inside any chunk that carries one (finish_reason's tag, then the reason, one byte
# each; protobuf writes both canonically). A chunk without these two bytes in a row has no such finish and goes
# on unparsed; one that has them (the finish, or token ids or text that happen to encode the same bytes) is
# parsed.
ABORT_BYTES = _finish_bytes(ABORT)
_FINISHED_BYTES = tuple(
    _finish_bytes(reason) for reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
)
# Every finish reason there is (abort too, and any added later): what a stream's last chunk carries.
_ANY_FINISH_BYTES = tuple(
    _finish_bytes(reason)
    for reason in common_pb2.FinishReason.values()
    if reason != common_pb2.FINISH_REASON_UNSPECIFIED
)


def is_finished(data: bytes) -> bool:
    """Whether a relayed GenerateResponse ends its generation (a stop or length finish: an abort ends the stream
    with an error instead). Only a chunk holding one of the finish reason's byte pairs is parsed (token ids or
    text may hold them too): the others cost a byte search (~0.1 us), not a parse (~1.6 us)."""
    if _FINISHED_BYTES[0] not in data and _FINISHED_BYTES[1] not in data:
        return False
    return _parse(data).chunk.finish_reason in (
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
    )


def has_finish(data: bytes) -> bool:
    """Whether a relayed GenerateResponse is its stream's last chunk: it carries a finish reason, any of them.
    Parsed only when one of the reasons' byte pairs is in it, as in is_finished."""
    for pair in _ANY_FINISH_BYTES:  # a loop, not any(genexp): no generator object per relayed chunk
        if pair in data:
            return _parse(data).chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    return False
