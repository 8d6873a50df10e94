"""Benchmark arithmetic: per-request measurements, their percentiles and summaries, and mesh/direct ratios."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PERCENTILES = (50, 95, 99)

# Finish reasons (fleetserve.common.v1.FinishReason) that mean the generation ran to its end.
_FINISH_STOP, _FINISH_LENGTH = 1, 2

# Pseudo status for a stream that closed OK but without a normal finish (aborted or cut short): the run must
# not count a truncated generation as a success.
INCOMPLETE = "INCOMPLETE"


@dataclass(frozen=True)
class RequestResult:
    """What one request measured: start-relative times in seconds; error is a status code name or None."""

    ttft_s: float | None
    e2e_s: float
    output_tokens: int
    error: str | None = None
    reason: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first: (e2e - ttft) / (tokens - 1)."""
        if self.ttft_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)


class StreamMeter:
    """Measures one streamed generation chunk by chunk (cheap per chunk: the client must not be the bottleneck).

    TTFT is the arrival of the first chunk that carries tokens (the first chunk may carry only served_by)."""

    __slots__ = ("start", "ttft_s", "tokens", "usage_tokens", "finish_reason")

    def __init__(self, start: float) -> None:
        self.start = start
        self.ttft_s: float | None = None
        self.tokens = 0
        self.usage_tokens: int | None = None
        self.finish_reason = 0

    def on_chunk(self, chunk, now: float) -> None:
        """Account one fleetserve.common.v1.GenerateChunk that arrived at `now` (perf_counter seconds)."""
        n = len(chunk.token_ids)
        if self.ttft_s is None and (n or chunk.text):
            self.ttft_s = now - self.start
        self.tokens += n
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason
            self.usage_tokens = chunk.usage.completion_tokens

    def result(self, now: float) -> RequestResult:
        """The result of a stream that ended without an RPC error at `now`."""
        # Usage on the last chunk is authoritative; token ids are optional on the wire.
        tokens = self.usage_tokens if self.usage_tokens is not None else self.tokens
        e2e = now - self.start
        if self.finish_reason not in (_FINISH_STOP, _FINISH_LENGTH):
            return RequestResult(
                self.ttft_s,
                e2e,
                tokens,
                error=INCOMPLETE,
                message=f"stream ended with finish_reason={self.finish_reason}",
            )
        return RequestResult(self.ttft_s, e2e, tokens)

    def failed(self, now: float, code: str, reason: str = "", message: str = "") -> RequestResult:
        """The result of a stream that ended with an RPC error at `now`."""
        return RequestResult(
            self.ttft_s, now - self.start, self.tokens, error=code, reason=reason, message=message
        )


def percentiles(values_s: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99 in milliseconds (numpy's linear interpolation) and the mean beside them (the mean hides the
    tail: reports draw both); None for each when there are no values."""
    if not values_s:
        return {**{f"p{p}": None for p in PERCENTILES}, "mean": None}
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    pct = np.percentile(ms, PERCENTILES)
    return {
        **{f"p{p}": round(float(v), 3) for p, v in zip(PERCENTILES, pct, strict=True)},
        "mean": round(float(ms.mean()), 3),
    }


def summarize(
    results: Sequence[RequestResult], duration_s: float, *, mode: str, concurrency: int, **extra
) -> dict:
    """The run's JSON record. Latencies and output tokens count successful requests only (a failed stream's
    partial output is not throughput); every failure is counted by status code name (and by reason)."""
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    output_tokens = sum(r.output_tokens for r in ok)
    first_error = None
    if failed:
        f = failed[0]
        first_error = " ".join(x for x in (f.error, f.reason and f"({f.reason})", f.message) if x)
    record = {
        "mode": mode,
        "concurrency": concurrency,
        "requests": len(results),
        "errors": len(failed),
        "error_codes": dict(Counter(r.error for r in failed)),
        "error_reasons": dict(Counter(r.reason for r in failed if r.reason)),
        "first_error": first_error,
        "duration_s": round(duration_s, 3),
        "output_tokens": output_tokens,
        "output_tokens_per_s": round(output_tokens / duration_s, 1) if duration_s > 0 else 0.0,
        "requests_per_s": round(len(ok) / duration_s, 2) if duration_s > 0 else 0.0,
        "ttft_ms": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": percentiles([t for r in ok if (t := r.tpot_s) is not None]),
        "e2e_ms": percentiles([r.e2e_s for r in ok]),
    }
    record.update(extra)
    return record


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 3)


def compare(direct: dict, mesh: dict) -> dict:
    """Both records and what the mesh costs: throughput ratio (mesh / direct) and latency added (mesh - direct)."""
    d_tps, m_tps = direct["output_tokens_per_s"], mesh["output_tokens_per_s"]
    ratio = {"output_tokens_per_s": round(m_tps / d_tps, 4) if d_tps else None}
    for metric in ("ttft", "tpot", "e2e"):
        for p in ("p50", "p99"):
            ratio[f"{metric}_{p}_ms_added"] = _sub(mesh[f"{metric}_ms"][p], direct[f"{metric}_ms"][p])
    return {"direct": direct, "mesh": mesh, "ratio": ratio}
