"""The interface every engine backend implements (the simulated engine now, vLLM's AsyncLLM later)."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Container
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

from shared.errors import FleetError, InvalidArgument, ShuttingDown, Unavailable

# Request defaults every backend applies the same way.
DEFAULT_MAX_TOKENS = 256
# Scheduling rank of each Priority, lower served first (vLLM's priority policy); unspecified counts as standard.
PRIORITY_RANK = {
    common_pb2.PRIORITY_INTERACTIVE: 0,
    common_pb2.PRIORITY_UNSPECIFIED: 1,
    common_pb2.PRIORITY_STANDARD: 1,
    common_pb2.PRIORITY_BATCH: 2,
}


class RequestIdInUse(FleetError):
    """A request with this id is already waiting or running on this replica."""

    code = grpc.StatusCode.ALREADY_EXISTS
    reason = "REQUEST_ID_IN_USE"


@dataclass(slots=True)
class StepOutput:
    """What one request got since its previous StepOutput (one step, or several when its reader lagged)."""

    token_ids: list[int]
    text: str
    # A common_pb2.FinishReason value on the last output of the request, None before.
    finish_reason: int | None
    prompt_tokens: int
    cached_tokens: int
    # Completion tokens so far, tokens resumed from an earlier attempt included.
    completion_tokens: int


@dataclass(slots=True)
class Counters:
    """Lifetime counters of a backend."""

    finished: int = 0
    aborted: int = 0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class BackendInfo:
    """What a backend tells GetInfo about its KV cache (the router's kv_aware index needs block_size)."""

    block_size: int
    kv_blocks_total: int
    # Longest prompt plus output, in tokens.
    max_model_len: int


def check_admissible(*, closing: bool, running: bool, request_id: str, live: Container[str]) -> None:
    """The checks every backend's generate() makes before it looks at the spec (same status from each)."""
    if closing:
        raise ShuttingDown("this engine replica is shutting down", retry_after_s=1.0)
    if not running:
        raise Unavailable("this engine replica is not running", retry_after_s=1.0)
    if request_id in live:
        raise RequestIdInUse(f"request {request_id!r} is already in this engine")


def check_resume_ids(resumed: list[int], vocab_size: int) -> None:
    """Reject resume_token_ids outside the backend's vocabulary."""
    if resumed and max(resumed) >= vocab_size:
        raise InvalidArgument(
            "resume_token_ids holds ids outside the vocabulary",
            field_violations=[("spec.resume_token_ids", f"ids must be < {vocab_size}")],
        )


def cap_max_tokens(prompt_tokens: int, resumed_tokens: int, max_tokens: int, max_model_len: int) -> int:
    """max_tokens of the whole generation (resumed tokens included), capped where the sequence reaches
    max_model_len: AsyncLLM ends a generation there with finish reason length, so a default or generous
    max_tokens is not an error. InvalidArgument when the prompt and resumed tokens leave no room for output."""
    context = prompt_tokens + resumed_tokens
    if context >= max_model_len:
        raise InvalidArgument(
            f"the prompt is {context} tokens; this model's context is {max_model_len} tokens",
            field_violations=[
                ("spec.prompt", f"{context} tokens; at most {max_model_len - 1} with room for output")
            ],
        )
    return min(max_tokens, max_model_len - prompt_tokens)


class TokenRate:
    """Output tokens per second over a sliding window of `window_s` seconds (per-step records, trimmed as they
    age out); both backends report ReplicaLoad.output_tokens_per_s from one."""

    __slots__ = ("window_s", "_started", "_window", "_tokens")

    def __init__(self, window_s: float, started: float) -> None:
        self.window_s = window_s
        self._started = started
        self._window: deque[tuple[float, int]] = deque()
        self._tokens = 0

    def add(self, now: float, tokens: int) -> None:
        """Record `tokens` output at `now` (once per engine step)."""
        self._window.append((now, tokens))
        self._tokens += tokens
        self._trim(now)

    def rate(self, now: float) -> float:
        """Tokens per second over the window (or since start, when that is shorter)."""
        self._trim(now)
        span = min(self.window_s, now - self._started)
        return self._tokens / span if span > 0 else 0.0

    def _trim(self, now: float) -> None:
        window, horizon = self._window, now - self.window_s
        while window and window[0][0] < horizon:
            self._tokens -= window.popleft()[1]


@runtime_checkable
class EngineBackend(Protocol):
    """One engine replica's generator of tokens.

    generate() admits the request at once (raising a shared.errors.FleetError when it cannot: shutting down,
    an id in use, a prompt that can never fit) and returns the request's stream of StepOutputs; the last one
    carries finish_reason. Resuming (spec.resume_token_ids) continues the same generation: the stream carries
    only new tokens, max_tokens bounds the whole generation and completion_tokens counts the resumed ones too.
    Closing the stream early aborts the request. abort() is idempotent: True the first time for a live
    request, whose KV blocks and queue slot are freed at once and whose stream ends with FINISH_REASON_ABORT.
    """

    name: str
    counters: Counters

    @property
    def shutting_down(self) -> bool:
        """True once shutdown() began: generate() refuses new requests."""
        ...

    async def start(self) -> None:
        """Start the step loop (or the real engine)."""
        ...

    def generate(
        self, request_id: str, spec: common_pb2.GenerationSpec, *, cache_salt: str, priority: int
    ) -> AsyncIterator[StepOutput]:
        """Admit a request; its outputs as they are generated."""
        ...

    def abort(self, request_id: str) -> bool:
        """Abort a request if it is waiting or running; False when unknown or already finished."""
        ...

    def replica_counters(self) -> Counters:
        """Lifetime counters of the whole replica (all its front-end processes; `counters` where it has one)."""
        ...

    def load(self) -> common_pb2.ReplicaLoad:
        """Current load, as heartbeats report it: running, waiting, kv_blocks_used/total, prefix-cache
        counters (queried/hit tokens since start and their ratio), output_tokens_per_s, in_flight_tokens."""
        ...

    def info(self) -> BackendInfo:
        """KV-cache geometry for GetInfo."""
        ...

    def subscribe_kv_events(self, include_snapshot: bool) -> AsyncIterator[engine_pb.KvEventBatch]:
        """This replica's KV events, one batch per engine step that stored or removed blocks, seq numbered
        from 1 per subscription (services/engine/kv_events.KvEventHub does the fan-out and bounding). With
        include_snapshot the first batch (snapshot=True) lists every block cached now. The stream ends when the
        backend shuts down; a subscriber too slow for its bounded queue sees a gap in seq."""
        ...

    async def shutdown(self) -> None:
        """Refuse new requests, abort the ones left, stop."""
        ...
