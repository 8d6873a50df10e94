"""Quality signals per model and version — feedback ratings, refusals, empty and repetitive outputs, safety-filter
hits, output length, errors — from engine spans, gateway root spans and feedback events, with a shift detector
that tests a candidate version against its baseline (scipy: Mann-Whitney U, chi-squared, Fisher's exact)."""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.metrics.otlp import attributes_of
from services.metrics.records import RequestRecord
from services.metrics.sketches import TieredBuckets


def _stats() -> Any:
    """scipy.stats, imported on first use: its ~1.2 s of imports would delay every metrics service's start (the
    first process of every fleet); warm_up() loads it in a thread once the service is up."""
    from scipy import stats

    return stats


def warm_up() -> None:
    """Import scipy.stats now (in a worker thread), so that the first comparison does not wait for it."""
    _stats()


log = structlog.get_logger(__name__)

ENGINE_SPAN = "engine.Generate"
FEEDBACK_SPAN = "gateway.Feedback"
FEEDBACK_EVENT = "fleetserve.feedback"
# An output whose repeated-4-gram share reaches this counts as repetitive (a loop, not a list of similar items).
REPETITIVE = 0.5
DEFAULT_TIERS = ((60.0, 3600.0), (900.0, 7 * 86_400.0))
# Output lengths kept per version for the length test (the newest; older ones drop out).
LENGTH_SAMPLES = 5000
# Request id -> (model, version) of recent requests, to label feedback that arrives without a version.
RECENT_REQUESTS = 100_000
MAX_VERSIONS = 1024
DEFAULT_ALPHA = 0.01
DEFAULT_MIN_SAMPLES = 30


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


@dataclass(slots=True)
class QualityBucket:
    """Counts of one version in one time bucket."""

    generations: int = 0
    empty: int = 0
    repetitive: int = 0
    refusals: int = 0
    output_tokens: int = 0
    requests: int = 0
    errors: int = 0
    safety_blocked: int = 0
    ratings: list[int] = field(default_factory=lambda: [0] * 5)

    def merge(self, o: QualityBucket) -> None:
        self.generations += o.generations
        self.empty += o.empty
        self.repetitive += o.repetitive
        self.refusals += o.refusals
        self.output_tokens += o.output_tokens
        self.requests += o.requests
        self.errors += o.errors
        self.safety_blocked += o.safety_blocked
        self.ratings = [a + b for a, b in zip(self.ratings, o.ratings, strict=True)]


@dataclass
class VersionSeries:
    """One model version: counts in time buckets, and its latest output lengths with their times."""

    buckets: TieredBuckets[QualityBucket]
    lengths: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=LENGTH_SAMPLES))


class QualityStore:
    """Per (model, version) quality counts; GetQuality and CompareVersions read windows of them."""

    def __init__(
        self, clock: Callable[[], float] = time.time, tiers=DEFAULT_TIERS, recent: int = RECENT_REQUESTS
    ) -> None:
        self._clock = clock
        self.tiers = tiers
        self.max_recent = recent  # request ids remembered for feedback (--quality-recent-requests)
        self._versions: dict[tuple[str, str], VersionSeries] = {}
        self._recent: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # Called with (model, version, rating, t) for every valid rating, once resolved here: the per-version
        # Query's feedback (RequestStats.add_rating) reads ratings through this one parser.
        self.rating_sinks: list[Callable[[str, str, float, float], None]] = []

    def _bucket(self, model: str, version: str, t: float) -> QualityBucket | None:
        key = (model, version)
        series = self._versions.get(key)
        if series is None:
            if len(self._versions) >= MAX_VERSIONS:
                return None
            series = self._versions[key] = VersionSeries(TieredBuckets(QualityBucket, self.tiers))
        now = self._clock()
        return series.buckets.bucket(min(t, now), now)

    def add_record(self, r: RequestRecord) -> None:
        """A gateway request: requests, errors, safety-filter hits; remembered for the feedback that may follow."""
        b = self._bucket(r.model, r.version, r.end_unix_s)
        if b is None:
            return
        b.requests += 1
        b.errors += r.fleet_error
        b.safety_blocked += bool(r.safety_blocked)
        if r.request_id:
            self._recent[r.request_id] = (r.model, r.version)
            if len(self._recent) > self.max_recent:
                self._recent.popitem(last=False)

    def add_engine_span(self, span, attrs: Mapping[str, Any], trace_id: str) -> None:
        """A finished generation (engine.Generate with the output-quality attributes the engine sets at the end;
        attempts cut short carry none and are left out)."""
        repetition = _num(attrs.get("fleetserve.output_repetition"))
        model = attrs.get("fleetserve.model")
        if repetition is None or not isinstance(model, str) or not model:
            return
        version = attrs.get("fleetserve.model_version")
        version = version if isinstance(version, str) else ""
        t = span.end_time_unix_nano / 1e9
        b = self._bucket(model, version, t)
        if b is None:
            return
        tokens = int(_num(attrs.get("fleetserve.output_tokens")) or 0)
        b.generations += 1
        b.output_tokens += tokens
        b.empty += attrs.get("fleetserve.output_empty") is True
        b.refusals += attrs.get("fleetserve.output_refusal") is True
        b.repetitive += repetition >= REPETITIVE
        self._versions[(model, version)].lengths.append((t, tokens))

    def add_feedback_span(self, span, attrs: Mapping[str, Any], trace_id: str) -> None:
        """The rating events of a gateway.Feedback span."""
        for event in span.events:
            if event.name != FEEDBACK_EVENT:
                continue
            ev = attributes_of(event.attributes)
            rating = _num(ev.get("fleetserve.feedback.rating"))
            if rating is None or not 1 <= rating <= 5:
                continue
            known = self._recent.get(str(ev.get("fleetserve.request_id", "")))
            model = ev.get("fleetserve.model") or (known[0] if known else "")
            version = ev.get("fleetserve.model_version")
            if not isinstance(version, str):
                version = known[1] if known else ""
            if not model:
                continue
            t = event.time_unix_nano / 1e9 or span.end_time_unix_nano / 1e9
            for sink in self.rating_sinks:
                sink(str(model), version, rating, t)
            b = self._bucket(str(model), version, t)
            if b is not None:
                b.ratings[int(rating) - 1] += 1

    def versions(self, model: str) -> list[str]:
        return sorted(v for m, v in self._versions if m == model)

    def window(self, model: str, version: str, start: float, end: float) -> tuple[QualityBucket, np.ndarray]:
        """A version's counts over [start, end] and its output lengths in it."""
        out = QualityBucket()
        series = self._versions.get((model, version))
        if series is None:
            return out, np.zeros(0)
        for _, _, b in series.buckets.select(start, end, self._clock(), overlap=True):
            out.merge(b)
        lengths = np.fromiter((n for t, n in series.lengths if start <= t <= end), dtype=np.float64)
        return out, lengths


def mean_rating(ratings: list[int]) -> float:
    """Mean of ratings given as counts of 1s .. 5s; 0 without any."""
    n = sum(ratings)
    return sum((i + 1) * c for i, c in enumerate(ratings)) / n if n else 0.0


def signals(model: str, version: str, b: QualityBucket, lengths: np.ndarray) -> mpb.QualitySignals:
    """The QualitySignals message of a window's counts (latency and cost are filled in by the caller)."""
    n_fb = sum(b.ratings)
    gen = b.generations
    return mpb.QualitySignals(
        model=model,
        version=version,
        generations=gen,
        feedback_count=n_fb,
        feedback_mean=mean_rating(b.ratings),
        ratings=b.ratings,
        refusals=b.refusals,
        refusal_rate=b.refusals / gen if gen else 0.0,
        empty=b.empty,
        empty_rate=b.empty / gen if gen else 0.0,
        repetitive=b.repetitive,
        repetitive_rate=b.repetitive / gen if gen else 0.0,
        safety_blocked=b.safety_blocked,
        safety_rate=b.safety_blocked / b.requests if b.requests else 0.0,
        output_tokens_median=float(np.median(lengths)) if lengths.size else 0.0,
        output_tokens_mean=b.output_tokens / gen if gen else 0.0,
        requests=b.requests,
        errors=b.errors,
        error_rate=b.errors / b.requests if b.requests else 0.0,
    )


def proportion_test(
    signal: str, bad: tuple[int, int], total: tuple[int, int], min_samples: int
) -> mpb.ShiftTest:
    """Whether two rates differ: chi-squared on the 2x2 table, Fisher's exact when an expected count is < 5."""
    (b0, b1), (n0, n1) = bad, total
    test = mpb.ShiftTest(signal=signal, baseline=b0 / n0 if n0 else 0.0, candidate=b1 / n1 if n1 else 0.0)
    if min(n0, n1) < min_samples:
        test.insufficient_data, test.p_value, test.test = True, 1.0, "chi-squared"
        return test
    table = np.array([[b0, n0 - b0], [b1, n1 - b1]])
    if table[:, 0].sum() == 0 or table[:, 1].sum() == 0:
        test.p_value, test.test = 1.0, "chi-squared"  # all good or all bad on both sides: nothing differs
        return test
    expected = _stats().contingency.expected_freq(table)
    if expected.min() < 5:
        res = _stats().fisher_exact(table)
        test.test, test.statistic, test.p_value = "fisher-exact", float(res.statistic), float(res.pvalue)
    else:
        res = _stats().chi2_contingency(table)
        test.test, test.statistic, test.p_value = "chi-squared", float(res.statistic), float(res.pvalue)
    return test


def ratings_test(r0: list[int], r1: list[int], min_samples: int) -> mpb.ShiftTest:
    """Whether the rating distributions differ: chi-squared on the 2x5 table (unused ratings left out)."""
    n0, n1 = sum(r0), sum(r1)
    test = mpb.ShiftTest(
        signal="feedback_rating", test="chi-squared", baseline=mean_rating(r0), candidate=mean_rating(r1)
    )
    cols = [i for i in range(5) if r0[i] + r1[i] > 0]
    if min(n0, n1) < min_samples:
        test.insufficient_data, test.p_value = True, 1.0
        return test
    if len(cols) < 2:
        test.p_value = 1.0
        return test
    res = _stats().chi2_contingency(np.array([[r0[i] for i in cols], [r1[i] for i in cols]]))
    test.statistic, test.p_value = float(res.statistic), float(res.pvalue)
    return test


def length_test(l0: np.ndarray, l1: np.ndarray, min_samples: int) -> mpb.ShiftTest:
    """Whether output lengths drifted: two-sided Mann-Whitney U (no assumption on the distribution's shape)."""
    test = mpb.ShiftTest(
        signal="output_tokens",
        test="mann-whitney-u",
        baseline=float(np.median(l0)) if l0.size else 0.0,
        candidate=float(np.median(l1)) if l1.size else 0.0,
    )
    if min(l0.size, l1.size) < min_samples:
        test.insufficient_data, test.p_value = True, 1.0
        return test
    if np.all(l0 == l0[0]) and np.all(l1 == l0[0]):
        test.p_value = 1.0  # identical constants: no shift (the test statistic is undefined)
        return test
    res = _stats().mannwhitneyu(l0, l1, alternative="two-sided")
    test.statistic, test.p_value = float(res.statistic), float(res.pvalue)
    return test


def shift_tests(
    b0: QualityBucket, l0: np.ndarray, b1: QualityBucket, l1: np.ndarray, alpha: float, min_samples: int
) -> list[mpb.ShiftTest]:
    """One test per signal, candidate (b1) against baseline (b0); shifted where p < alpha."""
    gens, reqs = (b0.generations, b1.generations), (b0.requests, b1.requests)
    tests = [
        length_test(l0, l1, min_samples),
        ratings_test(b0.ratings, b1.ratings, min_samples),
        proportion_test("refusal_rate", (b0.refusals, b1.refusals), gens, min_samples),
        proportion_test("empty_rate", (b0.empty, b1.empty), gens, min_samples),
        proportion_test("repetitive_rate", (b0.repetitive, b1.repetitive), gens, min_samples),
        proportion_test("safety_rate", (b0.safety_blocked, b1.safety_blocked), reqs, min_samples),
        proportion_test("error_rate", (b0.errors, b1.errors), reqs, min_samples),
    ]
    for t in tests:
        t.shifted = not t.insufficient_data and t.p_value < alpha
    return tests
