"""Benchmark arithmetic: percentiles, TTFT/TPOT from chunk streams, error accounting and mesh/direct ratios."""

from __future__ import annotations

import numpy as np
import pytest
from fleetserve.common.v1 import common_pb2

from loadtest.summary import INCOMPLETE, RequestResult, StreamMeter, compare, percentiles, summarize

LENGTH = common_pb2.FINISH_REASON_LENGTH


def chunk(tokens: int = 1, finish: int = 0, usage: int | None = None, served_by: bool = False):
    c = common_pb2.GenerateChunk(text=" w" * tokens, token_ids=list(range(tokens)), finish_reason=finish)
    if usage is not None:
        c.usage.completion_tokens = usage
    if served_by:
        c.served_by.model = "sim-1b"
    return c


def test_percentiles_match_numpy_in_ms():
    """p50/p95/p99 are numpy's (linear) percentiles of the values, converted to milliseconds, with the mean."""
    values = [0.001 * i for i in range(1, 101)]
    got = percentiles(values)
    want = np.percentile(np.array(values) * 1000, [50, 95, 99])
    assert list(got) == ["p50", "p95", "p99", "mean"]
    assert [got["p50"], got["p95"], got["p99"]] == pytest.approx(list(want), abs=1e-3)
    assert got["mean"] == pytest.approx(50.5)


def test_percentiles_of_nothing_are_null():
    """With no values (every request failed) each percentile is None, which is JSON null."""
    assert percentiles([]) == {"p50": None, "p95": None, "p99": None, "mean": None}


def test_tpot_is_time_after_first_token_over_remaining_tokens():
    """TPOT = (e2e - ttft) / (tokens - 1); undefined for one token or no first token."""
    assert RequestResult(ttft_s=0.1, e2e_s=1.1, output_tokens=101).tpot_s == pytest.approx(0.01)
    assert RequestResult(ttft_s=0.1, e2e_s=0.1, output_tokens=1).tpot_s is None
    assert RequestResult(ttft_s=None, e2e_s=0.5, output_tokens=0, error="UNAVAILABLE").tpot_s is None


def test_meter_ttft_is_first_chunk_with_tokens():
    """A leading chunk with only served_by does not count as the first token; the first with tokens does."""
    m = StreamMeter(start=10.0)
    m.on_chunk(common_pb2.GenerateChunk(served_by=common_pb2.ServedBy(model="sim-1b")), now=10.01)
    m.on_chunk(chunk(2), now=10.05)
    m.on_chunk(chunk(1), now=10.07)
    m.on_chunk(chunk(1, finish=LENGTH, usage=4), now=10.09)
    r = m.result(now=10.1)
    assert r.ok
    assert r.ttft_s == pytest.approx(0.05)
    assert r.e2e_s == pytest.approx(0.1)
    assert r.output_tokens == 4
    assert r.tpot_s == pytest.approx(0.05 / 3)


def test_meter_counts_usage_over_token_ids():
    """The last chunk's usage is the token count even when chunks carry no token ids (ids are optional)."""
    m = StreamMeter(start=0.0)
    m.on_chunk(common_pb2.GenerateChunk(text="hello there"), now=0.01)
    m.on_chunk(
        common_pb2.GenerateChunk(
            text=" you", finish_reason=LENGTH, usage=common_pb2.Usage(completion_tokens=3)
        ),
        now=0.02,
    )
    r = m.result(now=0.02)
    assert r.ok and r.output_tokens == 3 and r.ttft_s == pytest.approx(0.01)


def test_stream_without_normal_finish_is_an_error():
    """A stream that closes OK but never finished (or finished ABORT) is counted as INCOMPLETE, not success."""
    cut = StreamMeter(start=0.0)
    cut.on_chunk(chunk(3), now=0.01)
    assert cut.result(now=0.02).error == INCOMPLETE
    aborted = StreamMeter(start=0.0)
    aborted.on_chunk(chunk(1, finish=common_pb2.FINISH_REASON_ABORT, usage=1), now=0.01)
    assert aborted.result(now=0.02).error == INCOMPLETE


def test_meter_failed_keeps_code_reason_and_partial_timing():
    """An RPC error mid-stream records its code, reason, message and the time it took."""
    m = StreamMeter(start=1.0)
    m.on_chunk(chunk(2), now=1.2)
    r = m.failed(now=1.5, code="UNAVAILABLE", reason="NO_HEALTHY_REPLICA", message="none left")
    assert (r.error, r.reason, r.message) == ("UNAVAILABLE", "NO_HEALTHY_REPLICA", "none left")
    assert r.e2e_s == pytest.approx(0.5) and r.output_tokens == 2 and not r.ok


def test_summary_counts_errors_by_code_and_excludes_them_from_latency_and_throughput():
    """Failed requests are counted per code and reason; only successes feed tokens and percentiles."""
    ok = [RequestResult(ttft_s=0.01 * (i + 1), e2e_s=1.0, output_tokens=100) for i in range(8)]
    bad = [
        RequestResult(
            ttft_s=0.5, e2e_s=9.0, output_tokens=40, error="UNAVAILABLE", reason="NO_HEALTHY_REPLICA"
        ),
        RequestResult(
            ttft_s=None,
            e2e_s=0.01,
            output_tokens=0,
            error="UNAUTHENTICATED",
            reason="INVALID_API_KEY",
            message="bad key",
        ),
        RequestResult(ttft_s=None, e2e_s=0.02, output_tokens=0, error="UNAVAILABLE"),
    ]
    s = summarize(ok + bad, duration_s=2.0, mode="mesh", concurrency=4)
    assert s["mode"] == "mesh" and s["concurrency"] == 4
    assert s["requests"] == 11 and s["errors"] == 3
    assert s["error_codes"] == {"UNAVAILABLE": 2, "UNAUTHENTICATED": 1}
    assert s["error_reasons"] == {"NO_HEALTHY_REPLICA": 1, "INVALID_API_KEY": 1}
    assert s["first_error"] == "UNAVAILABLE (NO_HEALTHY_REPLICA)"
    assert s["output_tokens"] == 800
    assert s["output_tokens_per_s"] == 400.0
    assert s["e2e_ms"] == {"p50": 1000.0, "p95": 1000.0, "p99": 1000.0, "mean": 1000.0}
    assert s["ttft_ms"]["p99"] < 100  # the failed request's 500 ms TTFT is not in it
    assert s["tpot_ms"]["p50"] == pytest.approx((1.0 - 0.045) / 99 * 1000, abs=1e-3)


def test_summary_of_all_failures_is_well_formed():
    """A run where every request failed still gives every key, with null latencies and zero throughput."""
    s = summarize(
        [RequestResult(None, 0.01, 0, error="UNAVAILABLE")] * 3,
        0.05,
        mode="direct",
        concurrency=2,
        target="127.0.0.1:1",
    )
    assert s["errors"] == 3 and s["output_tokens"] == 0 and s["output_tokens_per_s"] == 0.0
    assert s["ttft_ms"]["p50"] is None and s["target"] == "127.0.0.1:1"


def test_compare_reports_throughput_ratio_and_latency_added():
    """ratio = mesh/direct throughput; *_added = mesh - direct latency at p50 and p99."""

    def rec(tps, ttft50, ttft99):
        lat = {"p50": 1.0, "p95": 1.0, "p99": 1.0}
        return {
            "output_tokens_per_s": tps,
            "ttft_ms": {"p50": ttft50, "p95": 0, "p99": ttft99},
            "tpot_ms": lat,
            "e2e_ms": lat,
        }

    out = compare(rec(1000.0, 10.0, 20.0), rec(900.0, 12.5, 26.0))
    assert out["direct"]["output_tokens_per_s"] == 1000.0 and out["mesh"]["output_tokens_per_s"] == 900.0
    assert out["ratio"]["output_tokens_per_s"] == pytest.approx(0.9)
    assert out["ratio"]["ttft_p50_ms_added"] == pytest.approx(2.5)
    assert out["ratio"]["ttft_p99_ms_added"] == pytest.approx(6.0)
    assert out["ratio"]["e2e_p50_ms_added"] == 0.0


def test_compare_with_a_dead_direct_run_has_null_ratios():
    """No direct throughput or latencies: the ratios are null rather than a division error."""
    dead = {
        "output_tokens_per_s": 0.0,
        "ttft_ms": percentiles([]),
        "tpot_ms": percentiles([]),
        "e2e_ms": percentiles([]),
    }
    live = {
        "output_tokens_per_s": 5.0,
        "ttft_ms": percentiles([0.01]),
        "tpot_ms": percentiles([0.01]),
        "e2e_ms": percentiles([0.1]),
    }
    ratio = compare(dead, live)["ratio"]
    assert ratio["output_tokens_per_s"] is None and ratio["ttft_p50_ms_added"] is None
