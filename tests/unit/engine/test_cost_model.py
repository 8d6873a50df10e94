"""The step cost model: its linear terms, the front-end delay, and the profile files that set them."""

from __future__ import annotations

import pytest

from services.engine.cost_model import CostModel, FrontEnd
from services.engine.profile import available_profiles, load_profile


def test_step_time_is_base_plus_decode_and_prefill_terms():
    """A step costs base + per decoding sequence + per prefill token."""
    m = CostModel(base_ms=2.0, per_decode_seq_ms=0.1, per_prefill_token_ms=0.01)
    assert m.step_ms(0, 0) == 2.0
    assert m.step_ms(10, 100) == pytest.approx(2.0 + 1.0 + 1.0)
    assert m.decode_tokens_per_s(10) == pytest.approx(10 * 1000 / 3.0)


def test_context_terms_charge_the_decoding_sequences_kv():
    """Decode steps cost more per context token in all and per token of the longest context."""
    m = CostModel(
        base_ms=2.0, per_decode_seq_ms=0.0, per_context_token_ms=0.001, per_max_context_token_ms=0.01
    )
    assert m.step_ms(2, 0, context_tokens=300, max_context=200) == pytest.approx(2.0 + 0.3 + 2.0)
    assert m.decode_tokens_per_s(4, context_per_seq=100) == pytest.approx(4 * 1000 / (2.0 + 0.4 + 1.0))


def test_frontend_delay_grows_with_the_prompt():
    """The front end costs a latency, a fixed part of work plus a part per prompt token."""
    m = CostModel(request_overhead_ms=5.0, frontend_request_ms=1.0, per_prompt_token_overhead_ms=0.01)
    assert m.frontend_ms(0) == 6.0 and m.frontend_ms(1000) == pytest.approx(16.0)
    assert m.frontend_work_ms(1000) == pytest.approx(11.0)


def test_the_front_end_is_one_serial_server():
    """Requests queue behind each other and behind output-token work; the latency part does not queue."""
    fe = FrontEnd(
        CostModel(
            request_overhead_ms=5.0,
            frontend_request_ms=1.0,
            per_prompt_token_overhead_ms=0.0,
            per_output_token_overhead_ms=0.1,
        )
    )
    assert fe.admit(0.0, 10) == 6.0
    assert fe.admit(0.0, 10) == 7.0  # behind the first request's work
    fe.outputs(2.0, 30)  # 3 ms of streaming work, queued at 2.0
    assert fe.admit(2.0, 10) == pytest.approx(2.0 + 3.0 + 1.0 + 5.0)
    assert fe.admit(100.0, 10) == 106.0  # idle again: no wait
    assert fe.busy_ms == pytest.approx(4 * 1.0 + 3.0)


def test_the_default_cost_model_is_the_h100_profile():
    """CostModel() and infra/profiles/h100-llama-1b.toml hold the same calibrated terms."""
    p = load_profile("h100-llama-1b")
    assert p.cost == CostModel() and p.calibrated and p.max_model_len == 4096


@pytest.mark.parametrize("name", available_profiles())
def test_every_profile_loads(name):
    """Each bundled profile parses, with positive block count and context length."""
    p = load_profile(name)
    assert p.name == name and p.num_kv_blocks > 0 and p.max_model_len > 0 and p.cost.base_ms > 0


def test_a_bad_profile_fails_loudly(tmp_path):
    """A missing file, a missing section or an unknown cost key is a ValueError naming the file."""
    with pytest.raises(ValueError, match="not found"):
        load_profile("no-such-profile")
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\nnum_kv_blocks = 10\nmax_model_len = 10\n[cost]\nstep_bsae_ms = 1\n")
    with pytest.raises(ValueError, match="step_bsae_ms"):
        load_profile(str(bad))
    bad.write_text("[cost]\n")
    with pytest.raises(ValueError, match="bad.toml"):
        load_profile(str(bad))
