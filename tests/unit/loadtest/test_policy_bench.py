"""The routing-policy benchmark's flags, workloads and records (no fleet: the runs themselves are benchmarks)."""

from __future__ import annotations

import pytest

from loadtest import bench
from loadtest.policy_bench import _Outcome, record
from loadtest.summary import RequestResult
from loadtest.workload import policy_workload


def test_compare_policies_flags_parse_and_check_names():
    """--compare-policies takes known policy names; an unknown one is a usage error."""
    args = bench.parse_args(
        [
            "--compare-policies",
            "round_robin, kv_aware",
            "--workload",
            "mixed",
            "--replicas",
            "3",
            "--requests",
            "9",
        ]
    )
    assert args.compare_policies == ["round_robin", "kv_aware"]
    assert (args.workload, args.replicas, args.requests) == ("mixed", 3, 9)
    with pytest.raises(SystemExit):
        bench.parse_args(["--compare-policies", "round_robin,nope"])


@pytest.mark.parametrize("name", ["multiturn", "mixed", "bursty"])
def test_workloads_are_reproducible_and_sized(name):
    """Same seed, same requests; the asked number of requests; several tenants."""
    a, b = policy_workload(name, 60, seed=5), policy_workload(name, 60, seed=5)
    assert a == b and a.requests == 60
    assert len({c.tenant for c in a.conversations}) > 1
    assert policy_workload(name, 60, seed=6) != a


def test_multiturn_shares_system_prompts_per_tenant_and_runs_closed_loop():
    """Conversations of one tenant share its system prompt; each has several turns; slots bound concurrency."""
    w = policy_workload("multiturn", 200, seed=1)
    assert w.concurrency and all(c.start_s is None for c in w.conversations)
    by_tenant: dict[str, set[str]] = {}
    for c in w.conversations:
        by_tenant.setdefault(c.tenant, set()).add(c.system)
    assert all(len(s) == 1 for s in by_tenant.values())
    assert max(len(c.turns) for c in w.conversations) >= 6


def test_bursty_arrivals_cluster_more_than_mixed():
    """Bursty inter-arrival gaps vary more than the Poisson ones of mixed at the same mean rate."""

    def cv(w) -> float:
        starts = [c.start_s for c in w.conversations]
        gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
        mean = sum(gaps) / len(gaps)
        return (sum((g - mean) ** 2 for g in gaps) / len(gaps)) ** 0.5 / mean

    assert cv(policy_workload("bursty", 400, seed=2)) > cv(policy_workload("mixed", 400, seed=2))


def test_record_has_the_issue_fields_and_the_hit_rate_of_successful_requests():
    """One record: policy, workload, TTFT p50/p95/p99, TPOT p99, tokens/s, cached/prompt tokens of OK ones."""
    w = policy_workload("mixed", 3, seed=0)
    outs = [
        _Outcome(RequestResult(0.1, 1.0, 10), "", 100, 50),
        _Outcome(RequestResult(0.2, 2.0, 10), "", 100, 0),
        _Outcome(RequestResult(None, 0.5, 0, error="UNAVAILABLE"), "", 0, 0),
    ]
    rec = record("least_load", w, outs, 2.0)
    for key in ("ttft_p50_ms", "ttft_p95_ms", "ttft_p99_ms", "tpot_p99_ms", "output_tokens_per_s"):
        assert rec[key] is not None
    assert (rec["policy"], rec["workload"], rec["errors"]) == ("least_load", "mixed", 1)
    assert rec["prefix_cache_hit_rate"] == 0.25
    assert rec["output_tokens_per_s"] == 10.0
