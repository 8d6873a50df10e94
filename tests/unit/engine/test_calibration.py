"""The virtual-clock harness: the h100-llama-1b profile, run through the real scheduler and front-end queue as
gpu_bench loads an engine, reproduces our vLLM measurements in docs/benchmarks/ (modelled time, not speed)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.engine.calibration import (
    METRICS,
    VirtualEngine,
    client_loop,
    measured_points,
    model_points,
    prefix_ttft,
    workload_prompts,
)
from services.engine.profile import load_profile

PROFILE = load_profile("h100-llama-1b")
COST = PROFILE.cost
POINTS = measured_points()
# The points the profile misses (docs/benchmarks/sim_calibration.md says why), metric by metric, with the error
# it was published with (+3 points): the test pins the rest to the fidelity targets and these from getting worse.
KNOWN_MISSES: dict[tuple[str, str, int, str], float] = {
    ("gpu_mesh_overhead.json", "random128", 32, "ttft_p50_ms"): 0.46,  # -42.7%
    ("gpu_mesh_overhead.json", "random128", 128, "ttft_p50_ms"): 0.61,  # -57.4%
    ("gpu_mesh_overhead.json", "random128", 128, "output_tokens_per_s"): 0.17,  # +13.4%
    ("gpu_mesh_overhead.json", "random128", 256, "ttft_p50_ms"): 0.57,  # +53.2%
    ("gpu_mesh_overhead_repeat.json", "random128", 256, "ttft_p50_ms"): 0.42,  # +38.8%
    ("gpu_mesh_overhead_repeat.json", "random128", 256, "tpot_p50_ms"): 0.3,  # -26.3%
    ("gpu_mesh_overhead_repeat.json", "random128", 256, "output_tokens_per_s"): 0.24,  # +20.6%
    ("sim_fidelity.json", "mixed", 1, "ttft_p50_ms"): 0.47,  # -43.9%
    ("sim_fidelity.json", "mixed", 1, "tpot_p50_ms"): 0.26,  # -22.2%
    ("sim_fidelity.json", "mixed", 1, "output_tokens_per_s"): 0.48,  # +45.0%
    ("sim_fidelity.json", "mixed", 32, "output_tokens_per_s"): 0.16,  # +12.6%
    ("sim_fidelity.json", "mixed", 128, "ttft_p50_ms"): 0.59,  # -55.8%
    ("sim_fidelity.json", "mixed", 256, "ttft_p50_ms"): 0.67,  # -63.9%
    ("sim_fidelity.json", "shared_prefix", 32, "ttft_p50_ms"): 0.48,  # -44.3%
}


@pytest.fixture(scope="module")
def rows():
    return model_points(COST, POINTS, num_kv_blocks=PROFILE.num_kv_blocks)


def test_the_measurements_are_there():
    """The calibration reads the measured vLLM records: three workloads, c = 1 to 256."""
    assert {p["workload"] for p in POINTS} == {"random128", "mixed", "shared_prefix"}
    assert {p["concurrency"] for p in POINTS} == {1, 32, 128, 256}


@pytest.mark.parametrize("metric", METRICS)
def test_the_profile_reproduces_the_measured_points(rows, metric):
    """Each measured point's TTFT/TPOT p50 within 15% and tok/s within 10%, or within its stated known miss."""
    tol = {"ttft_p50_ms": 0.15, "tpot_p50_ms": 0.15, "output_tokens_per_s": 0.10}[metric]
    bad = []
    for r in rows:
        allowed = KNOWN_MISSES.get((r["source"], r["workload"], r["concurrency"], metric), tol)
        if abs(r[f"{metric}_rel_err"]) > allowed + 1e-9:
            bad.append((r["source"], r["workload"], r["concurrency"], r[f"{metric}_rel_err"]))
    assert not bad


def test_the_front_end_queue_delays_a_burst():
    """A burst of 256 requests waits in the serial front end: the last is admitted after the first by about
    255 times one request's front-end work."""
    eng = VirtualEngine(COST)
    firsts = [eng.frontend.admit(0.0, 160) for _ in range(256)]
    work = COST.frontend_work_ms(160)
    assert firsts[-1] - firsts[0] == pytest.approx(255 * work)
    assert firsts[0] == pytest.approx(work + COST.request_overhead_ms)


def test_per_token_front_end_work_raises_ttft_under_load():
    """With per-output-token work the front end is busier at c=256, so TTFT p50 is higher than without it."""
    prompts = workload_prompts("random128", 256)
    with_fe = client_loop(VirtualEngine(COST), 256, prompts)
    without = client_loop(VirtualEngine(replace(COST, per_output_token_overhead_ms=0.0)), 256, prompts)
    assert with_fe["ttft_p50_ms"] > 1.5 * without["ttft_p50_ms"]


def test_longer_contexts_decode_slower():
    """The same closed loop with ~1,300-token prompts has a higher TPOT than with ~160-token prompts at c=1."""
    short = client_loop(VirtualEngine(COST), 1, workload_prompts("random128", 1))
    long_ = client_loop(VirtualEngine(COST), 1, workload_prompts("shared_prefix", 1))
    assert long_["tpot_p50_ms"] > short["tpot_p50_ms"] * 1.1


def test_a_cached_prefix_cuts_ttft():
    """A ~1,700-token prompt sent twice on an idle engine: the warm one skips all but its last partial block."""
    r = prefix_ttft(COST, 1700)
    assert r["warm_ttft_ms"] < r["cold_ttft_ms"] - 1000 * COST.per_prefill_token_ms
    assert r["cold_cached_tokens"] == 0 and r["warm_cached_tokens"] == 1696
