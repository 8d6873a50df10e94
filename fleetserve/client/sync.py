"""Client: fleetserve's public API (fleetserve.inference.v1) from plain blocking code; the same calls, retries
and deadlines as AsyncClient."""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Iterator

import grpc
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from fleetserve.client.base import ClientBase, StreamView, resumed, whole
from fleetserve.client.errors import FleetServeError, details_of
from fleetserve.client.messages import Completion, Message, StreamState
from fleetserve.client.retry import RetryPolicy


class Stream(StreamView):
    """One streamed generation: `for chunk in stream` yields GenerateChunks as they arrive (retried on another
    attempt while nothing has arrived yet); request_id, served_by, usage, finish_reason, ttft_s and text fill in
    as it goes. Use `with` (or cancel()) to stop it early and free the server's work at once."""

    def __init__(self, client: Client, chat: bool, request, timeout_s: float | None) -> None:
        self._client = client
        self._rpc = client._stub.Chat if chat else client._stub.Generate
        self._request = request
        self._timeout_s = timeout_s or client.timeout_s
        self._call = None
        self._iterating = False
        self._cancelled = False  # by our caller: its CANCELLED is never retried
        self.state = StreamState()

    def __iter__(self) -> Iterator:
        if self._iterating:
            raise RuntimeError("a stream is read once")
        self._iterating = True
        return self._chunks()

    def _chunks(self):
        client, state = self._client, self.state
        deadline = time.monotonic() + self._timeout_s
        attempt = 0
        while True:
            attempt += 1
            call = self._call = self._rpc(
                self._request, timeout=deadline - time.monotonic(), metadata=client._metadata
            )
            try:
                for resp in call:
                    if not state.request_id:
                        state.request_id = dict(call.initial_metadata()).get("x-request-id", "")
                    state.observe(resp.chunk)
                    yield resp.chunk
                return
            except grpc.RpcError as e:
                if self._cancelled:
                    raise
                details = details_of(e)
                if whole(state, details):
                    return  # the last chunk was here before the call broke off: the answer is complete
                # Once a chunk arrived the server has done work the caller has seen: never repeat it, only
                # continue after it (resume_token_ids).
                left = deadline - time.monotonic()
                nxt = resumed(self._request, state, details, attempt, client.retry, left, client._rng)
                if nxt is None:
                    raise FleetServeError(details, attempt, e) from None
                self._request, wait = nxt
                client._sleep(wait)
            finally:
                call.cancel()  # a no-op once the stream ended; otherwise the server stops generating

    def cancel(self) -> None:
        """Stop the stream: the gateway and engine abort the generation."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc) -> None:
        self.cancel()

    def completion(self) -> Completion:
        """Read the stream to its end; the whole generation."""
        for _ in self:
            pass
        return self.state.completion()


class Client(ClientBase):
    """The gateway's gRPC API from blocking code (settings: see ClientBase)."""

    def __init__(
        self,
        address: str,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout_s: float = 120.0,
        retry: RetryPolicy | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        options: Iterable[tuple[str, object]] = (),
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(api_key, model, timeout_s, retry, rng)
        options = list(options)
        self._channel = (
            grpc.secure_channel(address, credentials, options)
            if credentials is not None
            else grpc.insecure_channel(address, options)
        )
        self._stub = pb_grpc.InferenceServiceStub(self._channel)

    def _sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def generate(
        self, prompt: str, *, model: str | None = None, timeout_s: float | None = None, **fields
    ) -> Stream:
        """Stream a completion of prompt; fields: max_tokens, temperature, top_p, stop, seed, priority,
        session_id, user_id, idempotency_key, ignore_eos (and any other GenerateRequest field)."""
        return Stream(self, *self._generation(prompt, None, model, fields), timeout_s)

    def chat(
        self,
        messages: Iterable[Message],
        *,
        model: str | None = None,
        timeout_s: float | None = None,
        **fields,
    ) -> Stream:
        """Stream a chat reply; messages are {"role", "content"} dicts, (role, content) pairs or ChatMessages."""
        return Stream(self, *self._generation(None, messages, model, fields), timeout_s)

    def complete(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        model: str | None = None,
        timeout_s: float | None = None,
        **fields,
    ) -> Completion:
        """The whole generation of a prompt (or a chat reply to messages) at once."""
        with Stream(self, *self._generation(prompt, messages, model, fields), timeout_s) as stream:
            return stream.completion()

    def _unary(self, rpc, request, timeout_s: float | None, *, idempotent: bool = True):
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        attempt = 0
        while True:
            attempt += 1
            try:
                return rpc(request, timeout=deadline - time.monotonic(), metadata=self._metadata)
            except grpc.RpcError as e:
                details = details_of(e)
                wait = self.retry.delay(details, attempt, deadline - time.monotonic(), self._rng)
                if wait is None or not idempotent:
                    raise FleetServeError(details, attempt, e) from None
                self._sleep(wait)

    def models(self, timeout_s: float | None = None) -> list[pb.Model]:
        """The models the fleet serves, with their replica counts."""
        return list(self._unary(self._stub.ListModels, pb.ListModelsRequest(), timeout_s).models)

    def feedback(
        self, request_id: str, rating: int, tags: Iterable[str] = (), comment: str = "", **fields
    ) -> str:
        """Rate a response (1 bad .. 5 good) by its request id; the feedback id. Not retried (not idempotent)."""
        request = pb.FeedbackRequest(
            request_id=request_id, rating=rating, tags=list(tags), comment=comment, **fields
        )
        return self._unary(self._stub.Feedback, request, None, idempotent=False).feedback_id

    def submit_batch(
        self,
        items: Iterable[pb.BatchItem | dict],
        *,
        model: str | None = None,
        idempotency_key: str | None = None,
        timeout_s: float | None = None,
        **fields,
    ) -> pb.Job:
        """Submit a batch job (items: BatchItems or dicts with custom_id and prompt or messages)."""
        request = self._batch(items, model, idempotency_key, fields)
        return self._unary(self._stub.SubmitBatch, request, timeout_s).job

    def get_job(
        self, job_id: str, *, include_results: bool = False, timeout_s: float | None = None
    ) -> pb.GetJobResponse:
        """A job's state (and its items' results)."""
        return self._unary(
            self._stub.GetJob, pb.GetJobRequest(job_id=job_id, include_results=include_results), timeout_s
        )

    def cancel_job(self, job_id: str, *, timeout_s: float | None = None) -> pb.Job:
        """Cancel a job: items in flight are aborted, the rest never run."""
        return self._unary(self._stub.CancelJob, pb.CancelJobRequest(job_id=job_id), timeout_s).job

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
