"""Per-arm outcome samples of A/B experiments, from the gateway's root spans (and feedback events) that name an
experiment and arm, kept in arrival order so that a fixed-horizon analysis reads exactly the first N samples."""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import numpy as np
import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.otlp import attributes_of
from services.metrics.records import ROOT_SPANS, is_fleet_error, tpot_ms

log = structlog.get_logger(__name__)

FEEDBACK_SPAN = "gateway.Feedback"
FEEDBACK_EVENT = "fleetserve.feedback"
ATTR_EXPERIMENT = "fleetserve.experiment"
ATTR_ARM = "fleetserve.arm"
ATTR_STATUS = "rpc.grpc.status_code"
ATTR_TTFT_MS = "fleetserve.ttft_ms"
ATTR_OUTPUT_TOKENS = "fleetserve.output_tokens"
ATTR_COST = "fleetserve.cost_usd"
ATTR_REFUSAL = "fleetserve.output_refusal"
ATTR_RATING = "fleetserve.feedback.rating"
ATTR_SUCCESS = "fleetserve.feedback.success"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


class ArmSeries:
    """One arm's samples: a value series per metric (0/1 for rates), each capped at max_samples."""

    __slots__ = ("requests", "series", "max_samples")

    def __init__(self, max_samples: int) -> None:
        self.requests = 0
        self.series: dict[str, array] = {}
        self.max_samples = max_samples

    def add(self, metric: str, value: float) -> None:
        s = self.series.get(metric)
        if s is None:
            s = self.series[metric] = array("d")
        if len(s) < self.max_samples:  # the first samples are the ones a fixed horizon reads
            s.append(value)

    def summaries(self, limit: int) -> list[mpb.SampleSummary]:
        out = []
        for metric in sorted(self.series):
            values = np.frombuffer(self.series[metric], dtype=np.float64)
            if limit:
                values = values[:limit]
            if values.size:
                std = float(values.std(ddof=1)) if values.size > 1 else 0.0
                out.append(
                    mpb.SampleSummary(metric=metric, count=values.size, mean=float(values.mean()), std=std)
                )
        return out


class ArmStore:
    """Samples per (experiment, arm); at most max_experiments experiments (the least recently fed is dropped)."""

    def __init__(self, max_samples: int = 200_000, max_experiments: int = 256) -> None:
        self.max_samples = max_samples
        self.max_experiments = max_experiments
        self._arms: OrderedDict[str, dict[str, ArmSeries]] = OrderedDict()

    def _arm(self, attrs: Mapping[str, Any]) -> ArmSeries | None:
        experiment, arm = attrs.get(ATTR_EXPERIMENT), attrs.get(ATTR_ARM)
        if not (experiment and arm and isinstance(experiment, str) and isinstance(arm, str)):
            return None
        arms = self._arms.get(experiment)
        if arms is None:
            if len(self._arms) >= self.max_experiments:
                dropped, _ = self._arms.popitem(last=False)
                log.warning(
                    "metrics.experiment_dropped", experiment=dropped, max_experiments=self.max_experiments
                )
            arms = self._arms[experiment] = {}
        else:
            self._arms.move_to_end(experiment)
        series = arms.get(arm)
        if series is None:
            series = arms[arm] = ArmSeries(self.max_samples)
        return series

    def add_request(self, start_unix_nano: int, end_unix_nano: int, attrs: Mapping[str, Any]) -> bool:
        """Record one request's outcomes if its root span names an experiment arm."""
        arm = self._arm(attrs)
        if arm is None:
            return False
        arm.requests += 1
        status = attrs.get(ATTR_STATUS)
        status = int(status) if isinstance(status, int) and not isinstance(status, bool) else 0
        arm.add("error_rate", 1.0 if is_fleet_error(status) else 0.0)
        ttft = _number(attrs.get(ATTR_TTFT_MS))
        if ttft is not None:
            arm.add("ttft_ms", ttft)
        if status != 0:
            return True
        e2e = max(0, end_unix_nano - start_unix_nano) / 1e6
        tokens = int(_number(attrs.get(ATTR_OUTPUT_TOKENS)) or 0)
        arm.add("e2e_ms", e2e)
        arm.add("output_tokens", float(tokens))
        tpot = tpot_ms(e2e, ttft, tokens)
        if tpot is not None:
            arm.add("tpot_ms", tpot)
        cost = _number(attrs.get(ATTR_COST))
        if cost is not None:
            arm.add("cost_usd", cost)
        refusal = attrs.get(ATTR_REFUSAL)
        if isinstance(refusal, bool):
            arm.add("refusal_rate", 1.0 if refusal else 0.0)
        return True

    def add_feedback(self, attrs: Mapping[str, Any]) -> bool:
        """Record a feedback event's rating and success signal if it names an experiment arm."""
        arm = self._arm(attrs)
        if arm is None:
            return False
        rating = _number(attrs.get(ATTR_RATING))
        if rating is not None:
            arm.add("feedback_rating", rating)
        success = attrs.get(ATTR_SUCCESS)
        if isinstance(success, bool):
            arm.add("success_rate", 1.0 if success else 0.0)
        return True

    def on_root_span(self, span, attrs: Mapping[str, Any], trace_id: str) -> None:
        """SpanIntake sink for the gateway's root spans."""
        self.add_request(span.start_time_unix_nano, span.end_time_unix_nano, attrs)

    def on_feedback_span(self, span, attrs: Mapping[str, Any], trace_id: str) -> None:
        """SpanIntake sink for gateway.Feedback spans: their fleetserve.feedback events."""
        for event in span.events:
            if event.name == FEEDBACK_EVENT:
                self.add_feedback(attributes_of(event.attributes))

    def attach(self, intake) -> None:
        """Take the root spans and feedback spans of a SpanIntake."""
        for name in ROOT_SPANS:
            intake.on_span(name, self.on_root_span)
        intake.on_span(FEEDBACK_SPAN, self.on_feedback_span)

    def query(self, experiment: str, limit: int = 0) -> list[mpb.ArmSamples]:
        arms = self._arms.get(experiment, {})
        return [
            mpb.ArmSamples(arm=name, requests=arms[name].requests, metrics=arms[name].summaries(limit))
            for name in sorted(arms)
        ]
