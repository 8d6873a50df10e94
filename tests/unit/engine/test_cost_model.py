"""The step cost model reproduces the H100 calibration table."""

from __future__ import annotations

import pytest

from services.engine.cost_model import CostModel

# DESIGN.md, AsyncLLM in one process: output tokens/s with c requests in flight.
MEASURED = {1: 430, 32: 8_896, 128: 17_174, 256: 19_225}


@pytest.mark.parametrize("batch", [1, 256])
def test_decode_throughput_matches_the_calibration_ends(batch):
    """At batch 1 and 256 the default model's decode throughput is within 5% of the measured tokens/s."""
    got = CostModel().decode_tokens_per_s(batch)
    assert got == pytest.approx(MEASURED[batch], rel=0.05)


@pytest.mark.parametrize("batch", [32, 128])
def test_decode_throughput_in_between_is_close(batch):
    """The two-point linear fit lands within 5% of the measurements in between as well."""
    assert CostModel().decode_tokens_per_s(batch) == pytest.approx(MEASURED[batch], rel=0.05)


def test_single_stream_step_is_the_measured_tpot():
    """One decoding sequence takes about the measured 2.4 ms TPOT per step."""
    assert CostModel().step_ms(1, 0) == pytest.approx(2.4, rel=0.05)


def test_prefill_tokens_cost_time():
    """Prefill tokens add their per-token cost: a 1,700-token prefill costs ~16 ms over the base."""
    m = CostModel()
    assert m.step_ms(0, 1700) - m.step_ms(0, 0) == pytest.approx(16.0, rel=0.05)
