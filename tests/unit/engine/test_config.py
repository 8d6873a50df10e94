"""Engine settings: flags and env vars, defaults, and loud failure on bad values."""

from __future__ import annotations

import re

import pytest

from services.engine.config import EngineSettings
from services.engine.cost_model import CostModel
from services.engine.profile import load_profile
from shared.settings import load_settings


def test_defaults_match_the_design():
    """Defaults: sim backend, model sim-1b, 256 seqs, 2048-token steps, the H100 1B profile, real-time speed."""
    s = EngineSettings()
    assert (s.backend, s.model, s.speed_factor, s.seed) == ("sim", "sim-1b", 1.0, 0)
    assert (s.max_num_seqs, s.max_num_batched_tokens) == (256, 2048)
    assert s.profile == "h100-llama-1b" and s.num_kv_blocks is None and s.enable_prefix_caching
    assert re.fullmatch(r"engine-[0-9a-f]{6}", s.replica_id)
    assert s.registry_address == ""
    assert s.cost_model == load_profile("h100-llama-1b").cost


def test_vllm_kv_events_are_off_unless_asked_for(monkeypatch):
    """vLLM's KV-event publisher costs the engine core throughput and only kv_aware reads it: off by default,
    on with --vllm-kv-events or FLEETSERVE_ENGINE_VLLM_KV_EVENTS, and --no-vllm-kv-events still parses."""
    vllm = ["--backend", "vllm", "--vllm-args", "--model /m"]
    assert load_settings(EngineSettings, vllm).vllm_kv_events is False
    assert load_settings(EngineSettings, [*vllm, "--vllm-kv-events"]).vllm_kv_events is True
    assert load_settings(EngineSettings, [*vllm, "--no-vllm-kv-events"]).vllm_kv_events is False
    monkeypatch.setenv("FLEETSERVE_ENGINE_VLLM_KV_EVENTS", "true")
    assert load_settings(EngineSettings, vllm).vllm_kv_events is True


def test_step_flags_override_the_profile_terms():
    """--step-* flags replace single terms of the profile's cost model and leave the others."""
    s = load_settings(EngineSettings, ["--profile", "l4-llama-1b", "--step-base-ms", "1.5"])
    profile = load_profile("l4-llama-1b").cost
    assert s.cost_model.base_ms == 1.5
    assert s.cost_model.per_decode_seq_ms == profile.per_decode_seq_ms != CostModel().per_decode_seq_ms


def test_flags_override_env_vars(monkeypatch):
    """--kebab-case flags win over FLEETSERVE_ENGINE_* env vars, which win over defaults."""
    monkeypatch.setenv("FLEETSERVE_ENGINE_SPEED_FACTOR", "5")
    monkeypatch.setenv("FLEETSERVE_ENGINE_MODEL", "env-model")
    s = load_settings(
        EngineSettings, ["--model", "flag-model", "--replica-id", "engine-7", "--max-num-seqs", "8"]
    )
    assert (s.model, s.speed_factor, s.replica_id, s.max_num_seqs) == ("flag-model", 5.0, "engine-7", 8)


@pytest.mark.parametrize(
    "argv",
    [
        ["--speed-factor", "0"],
        ["--backend", "vllm"],
        ["--max-num-seqs", "512", "--max-num-batched-tokens", "256"],
        ["--num-kv-blocks", "0"],
        ["--profile", "no-such-gpu"],
        # A replica is one process (recycled, never split), and only the sim's is recycled.
        ["--workers", "2"],
        ["--backend", "vllm", "--vllm-args", "--model /m", "--max-requests-per-worker", "100"],
    ],
)
def test_bad_values_exit_with_a_message(argv, capsys):
    """Invalid settings stop the process with exit code 2 and say what is wrong."""
    with pytest.raises(SystemExit) as exc:
        load_settings(EngineSettings, argv)
    assert exc.value.code == 2
    assert "EngineSettings" in capsys.readouterr().err


def test_advertised_address():
    """The registered address is advertise-host (else host, else the hostname for a wildcard) plus the port."""
    assert EngineSettings(host="127.0.0.1").advertised_address(5) == "127.0.0.1:5"
    assert (
        EngineSettings(host="0.0.0.0", advertise_host="engine-3.local").advertised_address(5)
        == "engine-3.local:5"
    )
    assert not EngineSettings(host="0.0.0.0").advertised_address(5).startswith("0.0.0.0")
    assert EngineSettings(host="::1").advertised_address(5) == "[::1]:5"


def test_startup_defaults_to_the_profile_and_scales_with_speed(monkeypatch):
    """The sim's cold start is the GPU profile's startup_s unless --startup-s is given, divided by the speed
    factor."""
    monkeypatch.delenv("FLEETSERVE_ENGINE_STARTUP_S", raising=False)
    assert load_profile("h100-llama-1b").startup_s == 48.0
    assert load_profile("h100-llama-8b").startup_s >= 120.0
    s = load_settings(EngineSettings, ["--speed-factor", "4"])
    assert s.startup_delay_s == 12.0
    assert load_settings(EngineSettings, ["--startup-s", "2"]).startup_delay_s == 2.0
    with pytest.raises(SystemExit):
        load_settings(EngineSettings, ["--startup-s", "-1"])
