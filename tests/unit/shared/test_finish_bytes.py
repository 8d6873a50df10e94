"""shared.finish_bytes: a relayed chunk's finish (stop or length; or any) found by a byte search, lookalikes parsed."""

from __future__ import annotations

from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.inference.v1 import inference_service_pb2 as inference_pb

from shared.finish_bytes import _ANY_FINISH_BYTES, _FINISHED_BYTES, has_finish, is_finished


def chunk(ids=(), text="", finish=0, cls=engine_pb.GenerateResponse) -> bytes:
    resp = cls()
    resp.chunk.token_ids.extend(ids)
    resp.chunk.text = text
    if finish:
        resp.chunk.finish_reason = finish
        resp.chunk.usage.completion_tokens = len(ids)
    return resp.SerializeToString()


def test_a_stop_or_length_finish_ends_the_generation_and_nothing_else_does():
    stop, length = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH
    for ids in ((), (1,), (300, 70000), tuple(range(0, 400, 7))):
        for text in ("", " x", "é" * 40):
            assert is_finished(chunk(ids, text, stop)) and is_finished(chunk(ids, text, length))
            assert not is_finished(chunk(ids, text))
            assert not is_finished(chunk(ids, text, common_pb2.FINISH_REASON_ABORT))
    # The gateway relays the router's bytes as its own GenerateResponse: the same encoding.
    assert is_finished(chunk([5], " y", stop, inference_pb.GenerateResponse))


def test_bytes_that_only_look_like_a_finish_are_parsed_and_not_taken_for_one():
    stop_bytes = _FINISHED_BYTES[0]
    lookalikes = [chunk(list(stop_bytes)), chunk([9], stop_bytes.decode())]
    assert all(stop_bytes in data for data in lookalikes)
    assert not any(is_finished(data) for data in lookalikes)


def test_any_finish_reason_marks_the_last_chunk_and_lookalikes_do_not():
    reasons = [r for r in common_pb2.FinishReason.values() if r != common_pb2.FINISH_REASON_UNSPECIFIED]
    assert common_pb2.FINISH_REASON_ABORT in reasons and len(_ANY_FINISH_BYTES) == len(reasons)
    for ids in ((), (1,), (300, 70000), tuple(range(0, 400, 7))):
        for text in ("", " x", "é" * 40):
            assert all(has_finish(chunk(ids, text, reason)) for reason in reasons)
            assert not has_finish(chunk(ids, text))
    assert has_finish(chunk([5], " y", common_pb2.FINISH_REASON_ABORT, inference_pb.GenerateResponse))
    for pair in _ANY_FINISH_BYTES:
        lookalikes = [chunk(list(pair)), chunk([9], pair.decode())]
        assert all(pair in data for data in lookalikes)
        assert not any(has_finish(data) for data in lookalikes)
