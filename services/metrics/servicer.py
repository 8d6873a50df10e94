"""fleetserve.metrics.v1.MetricsService: latency and error summaries, traces, SLOs and their alerts."""

from __future__ import annotations

import asyncio
import re
import time

import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.cost import CostLedger
from services.metrics.counters import CounterStore
from services.metrics.experiments import ArmStore
from services.metrics.latency import RequestStats
from services.metrics.quality import DEFAULT_ALPHA, DEFAULT_MIN_SAMPLES, QualityStore, shift_tests, signals
from services.metrics.sketches import summarize
from services.metrics.slo import SloEngine, SloObject
from services.metrics.spans import SpanStore
from shared.errors import InvalidArgument, ResourceExhausted, rpc_boundary

log = structlog.get_logger(__name__)

_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")
# Alert batches queued per WatchAlerts stream; a watcher that falls this far behind is ended (it resubscribes
# and gets a fresh snapshot) rather than holding memory without bound.
WATCH_QUEUE = 256
_END = None
_OVERFLOW = object()


def require_model(model: str) -> None:
    if not model:
        raise InvalidArgument("model is required", field_violations=[("model", "required: a model name")])


def check_window(window_s: float, field: str = "window_s") -> None:
    if not window_s >= 0:  # "not >=" also refuses NaN
        raise InvalidArgument(
            f"{field} must not be negative", field_violations=[(field, "must be >= 0 (0: everything kept)")]
        )


class MetricsServicer:
    """Answers from what the OTLP receivers have stored."""

    def __init__(
        self,
        spans: SpanStore,
        stats: RequestStats,
        counters: CounterStore,
        slo: SloEngine,
        cost: CostLedger,
        arms: ArmStore | None = None,
        quality: QualityStore | None = None,
        clock=time.time,
    ) -> None:
        self.quality = quality or QualityStore(clock)
        self.arms = arms or ArmStore()
        self.spans = spans
        self.stats = stats
        self.counters = counters
        self.slo = slo
        self.cost = cost
        self._clock = clock
        self._watchers: set[asyncio.Queue] = set()

    @rpc_boundary
    async def Query(self, request: mpb.QueryRequest, context) -> mpb.QueryResponse:
        check_window(request.window_s)
        models = self.stats.query(request.model, request.window_s, version=request.model_version)
        if models:
            self._add_costs(models, request.window_s, request.model_version)
        return mpb.QueryResponse(models=models, counters=self.counters.totals())

    def _add_costs(self, models: list[mpb.ModelStats], window_s: float, version: str) -> None:
        """Each model's attributed cost over the window, from the cost report's model line (or, with a version
        filter, its model@version line): the same attribution as GetCost."""
        end = self._clock()
        start = end - (window_s or self.cost.retention_s)
        dim = mpb.COST_DIMENSION_VERSION if version else mpb.COST_DIMENSION_MODEL
        lines = {line.key: line for line in self.cost.report(start, end, [dim]).breakdowns[0].lines}
        for m in models:
            line = lines.get(f"{m.model}@{version}" if version else m.model)
            if line is not None:
                m.cost_usd = line.cost_usd

    @rpc_boundary
    async def GetTrace(self, request: mpb.GetTraceRequest, context) -> mpb.GetTraceResponse:
        if not _TRACE_ID.match(request.trace_id):
            raise InvalidArgument(
                "trace_id must be 32 hex digits", field_violations=[("trace_id", "must be 32 hex digits")]
            )
        # An unknown trace is an empty answer, not NOT_FOUND: its spans may simply not have arrived yet.
        return mpb.GetTraceResponse(spans=self.spans.trace(request.trace_id))

    def measured_ms(self, obj: SloObject, window_s: float, now: float) -> float:
        """A latency SLO's percentile (its objective, e.g. p99) over window_s, from the merged sketches."""
        b = self.stats.window(
            window_s, now, lambda k: k[0] == obj.model and (not obj.spec.tier or k[2] == obj.spec.tier)
        )
        sketch = b.ttft if obj.spec.kind == "ttft" else b.tpot
        if sketch is None or not sketch.count:
            return 0.0
        return float(sketch.get_quantile_value(obj.spec.objective))

    @rpc_boundary
    async def GetSlos(self, request: mpb.GetSlosRequest, context) -> mpb.GetSlosResponse:
        return mpb.GetSlosResponse(slos=self.slo.status(request.model, measured=self.measured_ms))

    @rpc_boundary
    async def WatchAlerts(self, request: mpb.WatchAlertsRequest, context):
        queue: asyncio.Queue = asyncio.Queue(WATCH_QUEUE)

        def listener(alerts: list[mpb.Alert]) -> None:
            chosen = [a for a in alerts if not request.model or a.model == request.model]
            if not chosen:
                return
            try:
                queue.put_nowait(chosen)
            except asyncio.QueueFull:
                self.slo.listeners.remove(listener)
                queue.get_nowait()
                queue.put_nowait(_OVERFLOW)

        self.slo.listeners.append(listener)
        self._watchers.add(queue)
        try:
            yield mpb.WatchAlertsResponse(snapshot=True, alerts=self.slo.firing(request.model))
            while True:
                alerts = await queue.get()
                if alerts is _END:
                    return
                if alerts is _OVERFLOW:
                    raise ResourceExhausted(
                        "alert watcher fell behind; watch again for a fresh snapshot",
                        reason="WATCHER_TOO_SLOW",
                        retry_after_s=0.0,
                    )
                yield mpb.WatchAlertsResponse(alerts=alerts)
        finally:
            self._watchers.discard(queue)
            if listener in self.slo.listeners:
                self.slo.listeners.remove(listener)

    @rpc_boundary
    async def QueryArms(self, request: mpb.QueryArmsRequest, context) -> mpb.QueryArmsResponse:
        if not request.experiment:
            raise InvalidArgument("experiment is required", field_violations=[("experiment", "required")])
        return mpb.QueryArmsResponse(arms=self.arms.query(request.experiment, request.limit))

    @rpc_boundary
    async def GetCost(self, request: mpb.GetCostRequest, context) -> mpb.GetCostResponse:
        start, end = self.window_of(request.window_s, request.start_unix, request.end_unix)
        unknown = [d for d in request.group_by if d not in mpb.CostDimension.values() or d == 0]
        if unknown:
            raise InvalidArgument(
                f"unknown cost dimensions {unknown}",
                field_violations=[("group_by", f"unknown values {unknown}")],
            )
        return self.cost.report(start, end, request.group_by)

    def window_of(self, window_s: float, start_unix: float, end_unix: float) -> tuple[float, float]:
        """[start, end] of a request's window: explicit times, else the last window_s seconds, else all kept."""
        check_window(window_s)
        bad = [
            (f, "must be >= 0") for f, v in (("start_unix", start_unix), ("end_unix", end_unix)) if not v >= 0
        ]
        if bad:
            raise InvalidArgument("window times must not be negative", field_violations=bad)
        end = end_unix or self._clock()
        if start_unix:
            start = start_unix
        elif window_s:
            start = end - window_s
        else:
            start = end - self.cost.retention_s
        if start >= end:
            raise InvalidArgument(
                "the window is empty", field_violations=[("start_unix", "must be before end_unix (or now)")]
            )
        return start, end

    @rpc_boundary
    async def GetQuality(self, request: mpb.GetQualityRequest, context) -> mpb.GetQualityResponse:
        require_model(request.model)
        start, end = self.window_of(request.window_s, request.start_unix, request.end_unix)
        costs = self._version_costs(start, end)
        return mpb.GetQualityResponse(
            versions=[
                self._signals(request.model, v, start, end, costs)[0]
                for v in self.quality.versions(request.model)
            ]
        )

    @rpc_boundary
    async def CompareVersions(
        self, request: mpb.CompareVersionsRequest, context
    ) -> mpb.CompareVersionsResponse:
        require_model(request.model)
        if not 0.0 <= request.alpha < 1.0:
            raise InvalidArgument(
                "alpha must be in [0, 1)", field_violations=[("alpha", "in [0, 1); 0 = 0.01")]
            )
        start, end = self.window_of(request.window_s, request.start_unix, request.end_unix)
        costs = self._version_costs(start, end)
        base, (b0, l0) = self._signals(request.model, request.baseline_version, start, end, costs)
        cand, (b1, l1) = self._signals(request.model, request.candidate_version, start, end, costs)
        tests = shift_tests(
            b0, l0, b1, l1, request.alpha or DEFAULT_ALPHA, request.min_samples or DEFAULT_MIN_SAMPLES
        )
        return mpb.CompareVersionsResponse(
            baseline=base, candidate=cand, tests=tests, shifted=any(t.shifted for t in tests)
        )

    def _version_costs(self, start: float, end: float) -> dict[str, mpb.CostLine]:
        report = self.cost.report(start, end, [mpb.COST_DIMENSION_VERSION])
        return {line.key: line for line in report.breakdowns[0].lines}

    def _signals(self, model: str, version: str, start: float, end: float, costs: dict[str, mpb.CostLine]):
        """A version's QualitySignals with latency (sketches) and cost, and the raw window for the tests."""
        b, lengths = self.quality.window(model, version, start, end)
        sig = signals(model, version, b, lengths)
        lat = self.stats.window(end - start, end, lambda k: k[0] == model and k[1] == version, overlap=True)
        sig.ttft_ms.CopyFrom(summarize(lat.ttft))
        sig.tpot_ms.CopyFrom(summarize(lat.tpot))
        line = costs.get(f"{model}@{version}" if version else model)
        if line is not None:
            sig.cost_usd = line.cost_usd
            sig.cost_per_1k_output_tokens = (
                line.cost_usd / line.output_tokens * 1000 if line.output_tokens else 0.0
            )
        return sig, (b, lengths)

    def close_watches(self) -> None:
        """End every WatchAlerts stream (shutdown: they would otherwise hold the drain for its whole grace)."""
        for q in self._watchers:
            while not q.empty():
                q.get_nowait()
            q.put_nowait(_END)
