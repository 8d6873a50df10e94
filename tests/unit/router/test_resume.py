"""Mid-stream resume: which generations may be resumed, and the chunk tracker's relay of engine chunks."""

from __future__ import annotations

import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

from services.router.resume import ChunkTracker, ReplicaAborted, resumable


def chunk(ids=(), text="", served_by="", finish=0, completion=0) -> bytes:
    resp = engine_pb.GenerateResponse()
    c = resp.chunk
    c.token_ids.extend(ids)
    c.text = text
    if served_by:
        c.served_by.replica_id = served_by
    if finish:
        c.finish_reason = finish
        c.usage.completion_tokens = completion
    return resp.SerializeToString()


def parse(data: bytes) -> common_pb2.GenerateChunk:
    return engine_pb.GenerateResponse.FromString(data).chunk


@pytest.mark.parametrize(
    ("mode", "temperature", "seed", "expected"),
    [
        ("reproducible", 0.0, None, True),
        ("reproducible", 0.7, 3, True),
        ("reproducible", 0.7, None, False),
        ("always", 0.7, None, True),
        ("off", 0.0, 3, False),
    ],
)
def test_resumable_by_mode_and_sampling(mode, temperature, seed, expected):
    """reproducible resumes greedy or seeded sampling only; always resumes all; off none."""
    s = common_pb2.SamplingParams(temperature=temperature)
    if seed is not None:
        s.seed = seed
    assert resumable(s, mode) is expected


def test_tracker_passes_bytes_through_and_remembers_ids():
    """Chunks of the first attempt go out byte for byte; their token ids are remembered."""
    t = ChunkTracker()
    t.next_attempt()
    first = chunk([5, 6], " a b", served_by="r1")
    assert t.relay(first) is first
    second = chunk([7])
    assert t.relay(second) is second
    assert t.sent_ids == [5, 6, 7]


def test_resumed_attempt_drops_the_second_served_by_only():
    """The first chunk of a resumed attempt loses served_by (the client saw the first replica's); ids go on."""
    t = ChunkTracker()
    t.next_attempt()
    t.relay(chunk([1], served_by="r1"))
    t.next_attempt()
    out = parse(t.relay(chunk([2], served_by="r2")))
    assert not out.HasField("served_by") and list(out.token_ids) == [2]
    later = chunk([3], finish=common_pb2.FINISH_REASON_LENGTH, completion=3)
    assert t.relay(later) is later
    assert t.sent_ids == [1, 2, 3]


def test_unrequested_abort_is_withheld_and_raised():
    """An ABORT finish is raised as ReplicaAborted; its tokens go out without the finish and usage."""
    t = ChunkTracker()
    t.next_attempt()
    with pytest.raises(ReplicaAborted) as exc:
        t.relay(chunk([4], " x", finish=common_pb2.FINISH_REASON_ABORT, completion=1))
    out = parse(exc.value.args[0])
    assert list(out.token_ids) == [4] and out.finish_reason == 0 and not out.HasField("usage")
    with pytest.raises(ReplicaAborted) as exc:
        t.relay(chunk(finish=common_pb2.FINISH_REASON_ABORT))
    assert not exc.value.args
    assert t.sent_ids == [4]


def test_chunks_whose_bytes_look_like_an_abort_go_on_unchanged():
    """The ABORT is found by a byte search: bytes that only look like one (token ids 24, 3 and a text with the
    same two bytes encode them) make the tracker parse the chunk, which then goes on as it is; a real ABORT
    after them is still withheld and raised."""
    from shared.finish_bytes import ABORT_BYTES

    t = ChunkTracker()
    t.next_attempt()
    lookalikes = [chunk([24, 3], " a"), chunk([9], ABORT_BYTES.decode()), chunk([5], finish=1, completion=3)]
    assert ABORT_BYTES in lookalikes[0] and ABORT_BYTES in lookalikes[1]
    for data in lookalikes:
        assert t.relay(data) is data
    with pytest.raises(ReplicaAborted):
        t.relay(chunk([7], finish=common_pb2.FINISH_REASON_ABORT, completion=4))
    assert t.sent_ids == [24, 3, 9, 5, 7]


def test_every_abort_chunk_contains_the_searched_bytes():
    """No ABORT goes unseen: whatever else a chunk carries, its encoding contains ABORT_BYTES."""
    from shared.finish_bytes import ABORT_BYTES

    for ids in ((), (1,), (300, 70000), tuple(range(0, 400, 7))):
        for text in ("", " x", "é" * 40):
            for served_by in ("", "r1"):
                data = chunk(ids, text, served_by, finish=common_pb2.FINISH_REASON_ABORT, completion=len(ids))
                assert ABORT_BYTES in data
