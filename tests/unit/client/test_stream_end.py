"""When a stream that broke off had its whole answer: its last chunk came before the connection or the clock ended
the call (a gateway killed between its last chunk and the call's status, test_multihost_chaos 12-04 16:20)."""

from __future__ import annotations

import grpc
import pytest
from fleetserve.common.v1 import common_pb2

from fleetserve.client import ErrorDetails
from fleetserve.client.base import resumed, whole
from fleetserve.client.messages import StreamState
from fleetserve.client.retry import RetryPolicy


def state_after(*chunks: common_pb2.GenerateChunk) -> StreamState:
    state = StreamState()
    for c in chunks:
        state.observe(c)
    return state


TOKENS = common_pb2.GenerateChunk(token_ids=[1, 2], text="ab")
LAST = common_pb2.GenerateChunk(
    token_ids=[3],
    text="c",
    finish_reason=common_pb2.FINISH_REASON_LENGTH,
    usage=common_pb2.Usage(prompt_tokens=4, completion_tokens=3),
)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED])
def test_a_call_broken_off_after_its_last_chunk_is_whole(code):
    state = state_after(TOKENS, LAST)
    assert whole(state, ErrorDetails(code=code, message="Socket closed"))
    assert state.usage.completion_tokens == 3 and state.token_ids == [1, 2, 3]
    # What the client did before: nothing to resume after a finished chunk, so the stream failed.
    assert resumed(object(), state, ErrorDetails(code=code, message=""), 1, RetryPolicy(), 10.0, None) is None


def test_a_call_broken_off_mid_way_or_failed_by_the_server_is_not():
    mid_way = state_after(TOKENS)
    assert not whole(mid_way, ErrorDetails(code=grpc.StatusCode.UNAVAILABLE, message="Socket closed"))
    # An error a service sent on purpose after the last chunk is still the caller's to see.
    finished = state_after(TOKENS, LAST)
    for code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
        assert not whole(finished, ErrorDetails(code=code, message=""))
