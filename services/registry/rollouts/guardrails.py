"""Guardrails of a rollout: the metrics that exist, and how a candidate's numbers over a window are judged against
an absolute limit or against the baseline's numbers over the same window: rates (error_rate, refusal_rate) by an
always-valid confidence sequence (sequential.py), the others on their point value."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.registry.rollouts import sequential
from services.registry.rollouts.sequential import BREACH, DEFAULT_CONFIDENCE, OK, UNDECIDED

DEFAULT_MIN_SAMPLES = 20
INSUFFICIENT = "insufficient_data"
__all__ = ["BREACH", "DEFAULT_CONFIDENCE", "INSUFFICIENT", "OK", "UNDECIDED"]


@dataclass(frozen=True, slots=True)
class VersionStats:
    """One version's requests in a window, as the metrics service reports them."""

    requests: int = 0
    errors: int = 0
    ttft_p99_ms: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_count: int = 0
    tpot_p99_ms: float = 0.0
    tpot_p50_ms: float = 0.0
    tpot_count: int = 0
    refusals: int = 0
    # Requests whose refusal was checked (the denominator of the refusal rate).
    refusal_checked: int = 0
    feedback_count: int = 0
    feedback_mean: float = 0.0
    cost_usd: float = 0.0
    output_tokens: int = 0


@dataclass(frozen=True, slots=True)
class Metric:
    """A guardrail metric: its value and sample count in a VersionStats, and which direction is worse."""

    name: str
    value: Callable[[VersionStats], float]
    samples: Callable[[VersionStats], int]
    higher_is_better: bool = False
    unit: str = ""
    # Rates: the count of bad outcomes among samples(), which makes the metric judged by the confidence sequence.
    # feedback_rating is a mean of 1-5 ratings, not a proportion, and the latency and cost metrics are not rates:
    # they stay on their point value.
    bad: Callable[[VersionStats], int] | None = None


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric(
            "error_rate", lambda s: _ratio(s.errors, s.requests), lambda s: s.requests, bad=lambda s: s.errors
        ),
        Metric("ttft_p99_ms", lambda s: s.ttft_p99_ms, lambda s: s.ttft_count, unit=" ms"),
        Metric("tpot_p99_ms", lambda s: s.tpot_p99_ms, lambda s: s.tpot_count, unit=" ms"),
        # Medians: a version slower across the board shows in them even where the tail over a few dozen requests
        # is the machine's scheduling noise (a busy host's p99 hides a 2x TPOT; its p50 does not).
        Metric("ttft_p50_ms", lambda s: s.ttft_p50_ms, lambda s: s.ttft_count, unit=" ms"),
        Metric("tpot_p50_ms", lambda s: s.tpot_p50_ms, lambda s: s.tpot_count, unit=" ms"),
        Metric(
            "refusal_rate",
            lambda s: _ratio(s.refusals, s.refusal_checked),
            lambda s: s.refusal_checked,
            bad=lambda s: s.refusals,
        ),
        Metric(
            "feedback_rating", lambda s: s.feedback_mean, lambda s: s.feedback_count, higher_is_better=True
        ),
        Metric(
            "cost_per_1k_tokens",
            lambda s: _ratio(s.cost_usd * 1000.0, s.output_tokens),
            lambda s: s.requests,
            unit=" USD",
        ),
    )
}


def min_samples(g: pb.Guardrail) -> int:
    return g.min_samples or DEFAULT_MIN_SAMPLES


def relative(g: pb.Guardrail) -> bool:
    return g.mode == pb.GUARDRAIL_MODE_RELATIVE


def judge(
    g: pb.Guardrail,
    candidate: VersionStats,
    baseline: VersionStats | None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> pb.GuardrailCheck:
    """The verdict on one guardrail: insufficient_data until the candidate (and, relative, the baseline) has
    min_samples in the window; then a rate's confidence sequence says breach, ok or undecided, and any other metric
    is breach or ok on its point value."""
    metric = METRICS[g.metric]
    value = metric.value(candidate)
    samples = metric.samples(candidate)
    check = pb.GuardrailCheck(guardrail=g, candidate_value=value, samples=samples, verdict=INSUFFICIENT)
    need = min_samples(g)
    if samples < need:
        return check
    if relative(g):
        if baseline is None or metric.samples(baseline) < need:
            return check
        base = metric.value(baseline)
        check.baseline_value = base
        bound = g.limit * base
        # Worse than FACTOR x the baseline and by more than the gap: beyond whichever is further.
        limit = min(bound, base - g.min_gap) if metric.higher_is_better else max(bound, base + g.min_gap)
    else:
        limit = g.limit
    check.effective_limit = limit
    if metric.bad is not None:
        # A relative limit moves with the baseline's point value; the baseline usually has many times the
        # candidate's samples, and its own noise is not part of the bounds.
        d = sequential.decide(samples, metric.bad(candidate), limit, confidence)
        check.verdict = d.verdict
        check.confidence = confidence
        check.lower_bound, check.upper_bound, check.samples_needed = d.lower, d.upper, d.samples_needed
        return check
    beyond = value < limit if metric.higher_is_better else value > limit
    check.verdict = BREACH if beyond else OK
    return check


def describe(check: pb.GuardrailCheck) -> str:
    """A check in words with its numbers, e.g. 'tpot_p99_ms 41.2 ms > 1.5 x baseline 19.9 ms = 29.8 ms (57
    samples)', 'error_rate 0.05 (95% lower bound 0.031) > limit 0.02 (400 samples)'."""
    g = check.guardrail
    metric = METRICS.get(g.metric)
    unit = metric.unit if metric else ""
    worse = "<" if metric is not None and metric.higher_is_better else ">"
    better = ">=" if worse == "<" else "<="
    op = worse if check.verdict == BREACH else better
    value = f"{g.metric} {check.candidate_value:.4g}{unit}"
    if check.verdict == INSUFFICIENT:
        return f"{g.metric}: {check.samples}/{min_samples(g)} samples, not judged yet"
    if relative(g):
        bound = g.limit * check.baseline_value
        limit = f"{g.limit:g} x baseline {check.baseline_value:.4g}{unit} = {bound:.4g}{unit}"
        if g.min_gap:
            limit += f" (gap {g.min_gap:g})"
    else:
        limit = f"limit {g.limit:.4g}{unit}"
    samples = f"{check.samples} samples"
    if check.confidence:
        level = f"{check.confidence * 100:.4g}%"
        if check.verdict == BREACH:
            value += f" ({level} lower bound {check.lower_bound:.3g})"
        elif check.verdict == OK:
            value += f" ({level} upper bound {check.upper_bound:.3g})"
        else:
            value += f" ({level} bounds {check.lower_bound:.3g}-{check.upper_bound:.3g})"
            op = "undecided vs"
            more = (
                f"~{check.samples_needed} more at this rate"
                if check.samples_needed
                else "at the limit: no end"
            )
            samples += f"; {more}"
    return f"{value} {op} {limit} ({samples})"


def describe_all(checks: Iterable[pb.GuardrailCheck]) -> str:
    """Every check's describe(), one after another."""
    return "; ".join(map(describe, checks))
