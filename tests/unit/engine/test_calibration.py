"""The virtual-clock harness: the h100-llama-1b profile, run through the real scheduler, reproduces the H100
table in DESIGN.md (modelled time, not wall-clock speed)."""

from __future__ import annotations

import pytest

from services.engine.calibration import H100_PREFIX, H100_TABLE, closed_loop, prefix_ttft
from services.engine.cost_model import CostModel
from services.engine.profile import load_profile

COST = load_profile("h100-llama-1b").cost


@pytest.mark.parametrize("concurrency", [1, 32, 128, 256])
def test_closed_loop_throughput_is_within_5_percent_of_the_table(concurrency):
    """Output tokens/s of the closed loop (128-token prompts, 256 outputs) is within 5% of measured vLLM."""
    r = closed_loop(COST, concurrency)
    assert r.output_tokens_per_s == pytest.approx(H100_TABLE[concurrency][0], rel=0.05)
    assert r.preemptions == 0


def test_single_stream_ttft_and_tpot():
    """At c=1 TTFT is ~10 ms and TPOT ~2.3 ms (430 tok/s over 256 tokens)."""
    r = closed_loop(COST, 1)
    assert r.ttft_p50_ms == pytest.approx(H100_TABLE[1][1], rel=0.1)
    assert r.tpot_p50_ms == pytest.approx(2.32, rel=0.05)


def test_a_cached_prefix_cuts_ttft_as_measured():
    """A ~1,700-token prompt: cold TTFT ~37 ms, warm ~21 ms with all but its last partial block cached."""
    r = prefix_ttft(COST, H100_PREFIX["prompt_tokens"])
    assert r["cold_ttft_ms"] == pytest.approx(H100_PREFIX["cold_ttft_ms"], rel=0.1)
    assert r["warm_ttft_ms"] == pytest.approx(H100_PREFIX["warm_ttft_ms"], rel=0.1)
    assert r["cold_cached_tokens"] == 0 and r["warm_cached_tokens"] == 1696


def test_the_harness_responds_to_the_cost_terms():
    """Doubling the per-sequence term lowers high-concurrency throughput (the harness is not a constant)."""
    slower = CostModel(per_decode_seq_ms=COST.per_decode_seq_ms * 2)
    assert closed_loop(slower, 128).output_tokens_per_s < 0.8 * closed_loop(COST, 128).output_tokens_per_s
