"""What the blocking and the asyncio client share: their settings and how they turn arguments into requests (no
I/O here), and the view a stream gives of what it has received."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterable

import grpc
from fleetserve.inference.v1 import inference_service_pb2 as pb

from fleetserve.client.errors import ErrorDetails
from fleetserve.client.messages import Message, StreamState, batch_item, generation_request
from fleetserve.client.retry import RetryPolicy


class ClientBase:
    """A client's settings. `api_key` defaults to $FLEETSERVE_API_KEY; `model` is the default for calls that name
    none; `timeout_s` is each call's deadline, retries included; `retry` says what is retried and how
    (fleetserve.client.NO_RETRY: nothing)."""

    def __init__(
        self,
        api_key: str | None,
        model: str | None,
        timeout_s: float,
        retry: RetryPolicy | None,
        rng: random.Random | None,
    ) -> None:
        key = api_key if api_key is not None else os.environ.get("FLEETSERVE_API_KEY", "")
        self._metadata = (("authorization", f"Bearer {key}"),) if key else ()
        self.model = model
        self.timeout_s = timeout_s
        self.retry = retry or RetryPolicy()
        self._rng = rng or random.Random()

    def _model(self, model: str | None) -> str:
        model = model or self.model
        if not model:
            raise ValueError("no model: pass model=... to the call or to the client")
        return model

    def _generation(
        self, prompt: str | None, messages: Iterable[Message] | None, model: str | None, fields: dict
    ) -> tuple[bool, pb.GenerateRequest | pb.ChatRequest]:
        """(is a chat, the request). A request without an idempotency_key gets one: a resumed attempt sends the
        same key, so the fleet knows it continues the same generation."""
        request = generation_request(self._model(model), prompt, messages, fields)
        if not request.idempotency_key:
            request.idempotency_key = f"client-{uuid.uuid4()}"
        return messages is not None, request

    def _batch(
        self,
        items: Iterable[pb.BatchItem | dict],
        model: str | None,
        idempotency_key: str | None,
        fields: dict,
    ) -> pb.SubmitBatchRequest:
        # A made-up idempotency key makes the submit safe to retry: a repeat returns the same job.
        return pb.SubmitBatchRequest(
            model=self._model(model),
            items=[batch_item(i) for i in items],
            idempotency_key=idempotency_key or f"client-{uuid.uuid4()}",
            **fields,
        )


# After the last chunk, what only the connection can cause: it broke (the gateway died, a proxy cut it) or the
# deadline fell between the last chunk and the call's status.
_AFTER_THE_END = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def whole(state: StreamState, details: ErrorDetails) -> bool:
    """Whether a stream that failed had its whole answer already: its last chunk (with its finish reason and
    usage) came before the call broke off for a reason only the connection or the clock gives. The gateway settles
    a request before it sends that chunk, so nothing is lost and the stream ends as complete, not failed."""
    return bool(state.finish_reason) and details.code in _AFTER_THE_END


def resumed(
    request, state: StreamState, details: ErrorDetails, attempt: int, retry: RetryPolicy, left_s, rng
):
    """(the request for the next attempt, seconds to wait first) after an attempt failed with details, or None:
    raise. Before any chunk: the same request, if the policy retries this failure. After chunks (the stream
    broke mid-way): the request continuing after the tokens received, if the policy resumes it."""
    if not state.chunks:
        wait = retry.delay(details, attempt, left_s, rng)
        return None if wait is None else (request, wait)
    if state.finish_reason:
        return None  # the last chunk arrived: nothing is left to resume
    wait = retry.resume_delay(details, attempt, left_s, rng)
    if wait is None:
        return None
    follow = type(request)()
    follow.CopyFrom(request)
    del follow.resume_token_ids[:]
    follow.resume_token_ids.extend(state.token_ids)
    state.resumes += 1
    return follow, wait


class StreamView:
    """What a stream has received so far (its StreamState), as attributes of the stream."""

    state: StreamState

    request_id = property(lambda self: self.state.request_id)
    served_by = property(lambda self: self.state.served_by)
    usage = property(lambda self: self.state.usage)
    finish_reason = property(lambda self: self.state.finish_reason)
    ttft_s = property(lambda self: self.state.ttft_s)
    text = property(lambda self: self.state.text)
    resumes = property(lambda self: self.state.resumes)
