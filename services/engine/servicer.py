"""fleetserve.engine.v1.EngineService: streams a backend's generations as chunks; abort, load and identity."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as pb
from opentelemetry import metrics, trace

from services.engine.backend import EngineBackend
from services.engine.engine_metrics import EngineMetrics
from services.engine.output_quality import OutputSample, is_refusal
from shared.channels import open_channel
from shared.deadlines import caller_time_left, deadline_passed
from shared.early_metadata import EarlyMetadata
from shared.errors import InvalidArgument, NotFound, rpc_boundary
from shared.recycle import Recycler
from shared.telemetry import bind_request, context_from_metadata, stream_span
from shared.tls import Tls

log = structlog.get_logger(__name__)

MAX_STOP_STRINGS = 16
ENGINE_ABORT = "/fleetserve.engine.v1.EngineService/Abort"
ENGINE_KV_EVENTS = "/fleetserve.engine.v1.EngineService/SubscribeKvEvents"
# Metadata of an Abort one front end passes to the replica's others (so they do not pass it on again).
FORWARDED_KEY = "x-fleetserve-abort-forwarded"
_FINISH_NAMES = {v.number: v.name for v in common_pb2.FinishReason.DESCRIPTOR.values}
# Finishes whose output is whole (not cut short by an abort): the ones whose last chunk carries the refusal check.
_CHECKED_FINISHES = frozenset((common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH))


def validate(request: pb.GenerateRequest, model: str, model_version: str = "") -> None:
    """Raise InvalidArgument listing every bad field (NotFound for another model's or version's request)."""
    spec = request.spec
    if spec.model and spec.model != model:
        raise NotFound(
            f"model {spec.model!r} is not served by this replica (it serves {model!r})",
            reason="MODEL_NOT_FOUND",
            metadata={"model": spec.model, "available_models": model},
        )
    if spec.model_version and spec.model_version != model_version:
        raise NotFound(
            f"version {spec.model_version!r} of model {model!r} is not served by this replica (it serves "
            f"{model_version!r})",
            reason="MODEL_VERSION_NOT_FOUND",
            metadata={
                "model": model,
                "model_version": spec.model_version,
                "available_versions": model_version,
            },
        )
    bad: list[tuple[str, str]] = []
    if not spec.prompt and not spec.messages:
        bad.append(("spec.prompt", "required: set spec.prompt or spec.messages"))
    elif spec.prompt and spec.messages:
        bad.append(("spec.messages", "set spec.prompt or spec.messages, not both"))
    for i, m in enumerate(spec.messages):
        if not m.role:
            bad.append((f"spec.messages[{i}].role", "must not be empty"))
    sampling = spec.sampling
    if len(sampling.stop) > MAX_STOP_STRINGS:
        bad.append(("spec.sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings"))
    for i, s in enumerate(sampling.stop):
        if not s:
            bad.append((f"spec.sampling.stop[{i}]", "must not be empty"))
    # "not within" so that NaN is rejected too.
    if not sampling.temperature >= 0.0:
        bad.append(("spec.sampling.temperature", f"must be >= 0; got {sampling.temperature}"))
    if not 0.0 <= sampling.top_p <= 1.0:
        bad.append(("spec.sampling.top_p", f"must be in [0, 1] (0 means 1); got {sampling.top_p}"))
    if request.priority not in common_pb2.Priority.values():
        bad.append(("priority", f"unknown priority {request.priority}"))
    if bad:
        raise InvalidArgument("invalid request: " + ", ".join(f for f, _ in bad), field_violations=bad)


class Summary:
    """A summarized stream after its first chunk (GenerateRequest.summarize): the text kept for one last message
    with the engine's token times; an empty message at most every progress_ms while tokens come."""

    __slots__ = ("started", "progress_s", "texts", "outputs", "last_sent")

    def __init__(self, started: float, progress_ms: int) -> None:
        self.started = started
        self.progress_s = progress_ms / 1000.0
        self.texts: list[str] = []
        self.outputs = 1  # the first chunk's
        self.last_sent = time.perf_counter()

    def add(self, out, first_token_ms: float) -> pb.GenerateResponse | None:
        """The message to send for this output, if any: the last one, or a progress message when it is due."""
        now = time.perf_counter()
        self.outputs += 1
        if out.text:
            self.texts.append(out.text)
        if out.finish_reason is None:
            if self.progress_s and now - self.last_sent >= self.progress_s:
                self.last_sent = now
                return _PROGRESS
            return None
        resp = pb.GenerateResponse()
        chunk = resp.chunk
        chunk.text = "".join(self.texts)
        chunk.finish_reason = out.finish_reason
        usage = chunk.usage
        usage.prompt_tokens = out.prompt_tokens
        usage.completion_tokens = out.completion_tokens
        usage.cached_tokens = out.cached_tokens
        self.timed(resp, first_token_ms, (now - self.started) * 1000.0, self.outputs)
        return resp

    @staticmethod
    def timed(resp: pb.GenerateResponse, first_ms: float, last_ms: float, outputs: int) -> None:
        s = resp.summary
        s.first_token_ms = first_ms
        s.last_token_ms = last_ms
        s.outputs = outputs


_PROGRESS = pb.GenerateResponse()


class EngineServicer:
    """Generate relays a backend's StepOutputs one chunk each: served_by on the first, finish reason and usage
    on the last. When the caller goes away or its deadline passes, the request is aborted in the backend."""

    def __init__(
        self,
        backend: EngineBackend,
        *,
        replica_id: str,
        model: str,
        tracer: trace.Tracer,
        meter: metrics.Meter,
        model_version: str = "",
        prom_metrics: EngineMetrics | None = None,
    ) -> None:
        self.backend = backend
        self.metrics = prom_metrics
        self.replica_id = replica_id
        self.model = model
        self.model_version = model_version
        self.tracer = tracer
        self._attrs = {
            "fleetserve.model": model,
            "fleetserve.model_version": model_version,
            "fleetserve.replica_id": replica_id,
        }
        self._peers: list[str] = []
        self._primary = ""
        # --max-requests-per-worker (shared/recycle.py): counts requests, asks to be recycled at the limit.
        self.recycler: Recycler | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._peer_abort: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._output_tokens = meter.create_counter(
            "fleetserve.engine.output_tokens",
            unit="{token}",
            description="Output tokens generated, added when each request ends.",
        )

    @rpc_boundary
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        started = time.perf_counter()
        request_id = request.request_id or f"engine-{uuid.uuid4().hex}"
        status = "CANCELLED"  # unless the stream ends or fails otherwise
        finish: int | None = None
        first_token_ms: float | None = None
        prompt_tokens = completion = 0
        resumed = len(request.spec.resume_token_ids)
        sample = OutputSample()
        early = EarlyMetadata(context)
        with stream_span(
            self.tracer, "engine.Generate", context=context_from_metadata(context), kind=trace.SpanKind.SERVER
        ) as span:
            bind_request(request_id, span)
            span.set_attribute("fleetserve.request_id", request_id)
            span.set_attributes(self._attrs)
            left = caller_time_left(context)
            if left is not None:
                span.set_attribute("fleetserve.deadline_left_ms", left * 1000.0)
            try:
                validate(request, self.model, self.model_version)
                outputs = self.backend.generate(
                    request_id, request.spec, cache_salt=request.cache_salt, priority=request.priority
                )
                # Admitted: the (empty) initial metadata goes out now, while the engine works on the request, not
                # with the first chunk: a grpc.aio caller (the router) asks for the first message only once the
                # metadata has come, so metadata sent with it costs the first token a second wake-up there.
                # Awaited before the first chunk is written; a request refused above sends none.
                early.send(())
                summary = Summary(started, request.summary_progress_ms) if request.summarize else None
                # The engine's token times on a per-token stream's last message (GenerateRequest.token_times); a
                # resumed attempt's would time only the continuation.
                token_times = request.token_times and summary is None and not resumed
                async for out in outputs:
                    if summary is not None and first_token_ms is not None:
                        # A summarized stream after its first chunk: nothing per token (its text is kept for
                        # the last message), an empty message now and then for the caller's stall watchdog.
                        sample.feed(out.token_ids, out.text)
                        if out.finish_reason is not None:
                            finish = out.finish_reason
                            prompt_tokens, completion = out.prompt_tokens, out.completion_tokens
                        else:
                            completion = out.completion_tokens
                        if (resp := summary.add(out, first_token_ms)) is not None:
                            yield resp
                        continue
                    resp = pb.GenerateResponse()
                    chunk = resp.chunk
                    chunk.text = out.text
                    chunk.token_ids.extend(out.token_ids)
                    sample.feed(out.token_ids, out.text)
                    if first_token_ms is None:
                        first_token_ms = (time.perf_counter() - started) * 1000.0
                        served_by = chunk.served_by
                        served_by.model = self.model
                        served_by.model_version = self.model_version
                        served_by.replica_id = self.replica_id
                        await early.before_first()
                    if out.finish_reason is not None:
                        finish = out.finish_reason
                        prompt_tokens, completion = out.prompt_tokens, out.completion_tokens
                        chunk.finish_reason = finish
                        usage = chunk.usage
                        usage.prompt_tokens = prompt_tokens
                        usage.completion_tokens = completion
                        usage.cached_tokens = out.cached_tokens
                        if summary is not None:  # a summarized stream of one message
                            summary.timed(resp, first_token_ms, first_token_ms, 1)
                        elif not resumed and finish in _CHECKED_FINISHES:
                            # The refusal check of the whole output, for the gateway's root span (an A/B arm's
                            # refusal_rate); once, on the last chunk. A resumed attempt saw only the continuation.
                            chunk.output_refusal = is_refusal(sample.text)
                            if token_times:
                                # Timed as a summarized stream's last message is, so the router's shadow report
                                # compares like with like. Not on an abort: its stream ends in an error.
                                last_ms = (time.perf_counter() - started) * 1000.0
                                Summary.timed(resp, first_token_ms, last_ms, 0)
                    else:
                        completion = out.completion_tokens
                    yield resp
                status = "OK"
            except Exception as e:
                status = getattr(getattr(e, "code", None), "name", "INTERNAL")
                raise
            finally:
                if finish is None:
                    # Caller gone, deadline passed, or an error: free the request's blocks and slot now.
                    self.backend.abort(request_id)
                    if status == "CANCELLED" and deadline_passed(context):
                        status = "DEADLINE_EXCEEDED"
                generated = max(0, completion - resumed)
                duration_s = time.perf_counter() - started
                if self.metrics is not None:
                    self.metrics.finished(
                        finish_reason=finish,
                        aborted=status in ("CANCELLED", "DEADLINE_EXCEEDED"),
                        e2e_s=duration_s,
                        ttft_s=None if first_token_ms is None else first_token_ms / 1000.0,
                        prompt_tokens=prompt_tokens,
                        output_tokens=generated,
                    )
                reason = _FINISH_NAMES.get(finish, "") if finish is not None else ""
                span.set_attribute("fleetserve.output_tokens", generated)
                span.set_attribute("fleetserve.finish_reason", reason)
                if finish is not None:
                    span.set_attributes(sample.attributes(generated, opening_seen=not resumed))
                code = getattr(grpc.StatusCode, status, grpc.StatusCode.UNKNOWN)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if generated:
                    self._output_tokens.add(generated, self._attrs)
                if self.recycler is not None:
                    self.recycler.served_one()
                log.info(
                    "engine.request",
                    model_version=self.model_version,
                    status=status,
                    finish_reason=reason,
                    prompt_tokens=prompt_tokens,
                    output_tokens=generated,
                    resumed_tokens=resumed,
                    priority=request.priority,
                    ttft_ms=None if first_token_ms is None else round(first_token_ms, 3),
                    duration_ms=round(duration_s * 1000.0, 3),
                )
                # A send still under way (the stream ended or failed before its first chunk) is done, or failed
                # with the caller gone, before the status goes out.
                await early.settle()

    def set_peers(self, own: str, addresses: list[str], primary: str, tls: Tls | None = None) -> None:
        """The replica's other front-end processes (Abort asks them for a request this one does not have) and
        its primary (the one that reads KV events; the others relay its stream), reached with the fleet's TLS."""
        self._peers = [a for a in addresses if a != own]
        self._primary = "" if primary == own else primary
        channels = {a: open_channel(a, tls) for a in addresses}
        self._channels = channels
        self._peer_abort = {
            a: channels[a].unary_unary(
                ENGINE_ABORT,
                request_serializer=pb.AbortRequest.SerializeToString,
                response_deserializer=pb.AbortResponse.FromString,
            )
            for a in self._peers
        }

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close(grace=None)
        self._channels = {}

    @rpc_boundary
    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        aborted = self.backend.abort(request.request_id)
        forwarded = any(k == FORWARDED_KEY for k, _ in context.invocation_metadata() or ())
        if not aborted and self._peer_abort and not forwarded:
            # The request may be streaming from another front end of this replica.
            answers = await asyncio.gather(
                *(
                    abort(request, timeout=2.0, metadata=((FORWARDED_KEY, "1"),))
                    for abort in self._peer_abort.values()
                ),
                return_exceptions=True,
            )
            aborted = any(isinstance(a, pb.AbortResponse) and a.aborted for a in answers)
        log.info("engine.abort", request_id=request.request_id, aborted=aborted)
        return pb.AbortResponse(aborted=aborted)

    @rpc_boundary
    async def GetLoad(self, request: pb.GetLoadRequest, context) -> pb.GetLoadResponse:
        c = self.backend.replica_counters()
        return pb.GetLoadResponse(
            load=self.backend.load(),
            requests_finished=c.finished,
            requests_aborted=c.aborted,
            output_tokens=c.output_tokens,
        )

    @rpc_boundary
    async def GetInfo(self, request: pb.GetInfoRequest, context) -> pb.GetInfoResponse:
        info = self.backend.info()
        return pb.GetInfoResponse(
            replica_id=self.replica_id,
            model=self.model,
            model_version=self.model_version,
            backend=self.backend.name,
            block_size=info.block_size,
            kv_blocks_total=info.kv_blocks_total,
            max_model_len=info.max_model_len,
        )

    @rpc_boundary
    async def SubscribeKvEvents(self, request: pb.SubscribeKvEventsRequest, context):
        if self._primary:
            # Only the primary front end reads the engine core's KV events: relay its stream, unparsed.
            call = self._channels[self._primary].unary_stream(
                ENGINE_KV_EVENTS,
                request_serializer=pb.SubscribeKvEventsRequest.SerializeToString,
                response_deserializer=None,
            )(request)
            try:
                async for data in call:
                    yield data
            finally:
                call.cancel()
            return
        batches = 0
        # A replica without KV events raises KvEventsOff here (FAILED_PRECONDITION), before anything is logged:
        # routers retry every few seconds, and each warns once.
        stream = self.backend.subscribe_kv_events(request.include_snapshot)
        log.info("engine.kv_events_subscribed", include_snapshot=request.include_snapshot)
        try:
            async for batch in stream:
                batches += 1
                # Mounted as a relaying method (the other front ends pass this stream on as bytes).
                yield pb.SubscribeKvEventsResponse(batch=batch).SerializeToString()
        finally:
            await stream.aclose()
            log.info("engine.kv_events_ended", batches=batches)
