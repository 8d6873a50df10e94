"""The capstone demo without a fleet: the day's shape, the traffic it draws, the verdicts and the report page."""

from __future__ import annotations

import math
import random

import pytest

from loadtest.demo import report
from loadtest.demo.run import QUICK, Run, verdicts
from loadtest.demo.workload import DayShape, Traffic


def test_the_day_is_low_at_night_high_in_the_afternoon_with_a_spike():
    """02:00 is the trough, 14:00 the crest, and 15:00-16:00 is spike_factor times the curve."""
    d = DayShape(day_s=24.0, lo=1.0, hi=5.0, spike_factor=2.0)
    assert d.rate(2.0) == pytest.approx(1.0) and d.rate(14.0) == pytest.approx(5.0)
    assert d.in_spike(15.5) and not d.in_spike(14.9)
    curve = 1 + 4 * (0.5 - 0.5 * math.cos(2 * math.pi * 13.5 / 24))
    assert d.rate(15.5) == pytest.approx(2.0 * curve)
    assert d.rate(26.0) == pytest.approx(d.rate(2.0))  # the next day repeats
    times = d.arrivals(48.0, random.Random(1))
    night = sum(1 for t in times if (t % 24) < 6)
    afternoon = sum(1 for t in times if 12 <= (t % 24) < 18)
    assert afternoon > 2 * night and times == sorted(times) and times[-1] < 48.0


def test_traffic_mixes_chats_that_keep_their_history_with_easy_and_hard_questions():
    """About 60% chat turns (a conversation's history grows by each reply), the rest questions, 1 in 4 hard;
    a failed turn is dropped from the history."""
    traffic = Traffic(random.Random(3))
    reqs = [traffic.next() for _ in range(400)]
    kinds = {k: sum(r.kind == k for r in reqs) for k in ("chat", "easy", "hard")}
    assert 0.5 < kinds["chat"] / 400 < 0.7 and kinds["hard"] < kinds["easy"]
    for r in reqs:
        traffic.done(r, "a reply" if r.kind == "chat" else None)
    chat = next(r for r in (traffic.next() for _ in range(50)) if r.kind == "chat" and len(r.messages) > 2)
    assert chat.messages[0]["role"] == "system" and chat.messages[-1]["role"] == "user"
    assert chat.messages[-2] == {"role": "assistant", "content": "a reply"}
    n = len(chat.chat.messages)
    traffic.done(chat, None)
    assert len(chat.chat.messages) == n - 1


def _record() -> dict:
    run = Run(QUICK)
    run.requests = [
        {
            "t_s": 1.0,
            "tenant": "acme",
            "kind": "chat",
            "status": "ok",
            "model": "sim-1b",
            "ttft_ms": 20.0,
            "tpot_ms": 3.0,
            "prompt_tokens": 400,
            "cached_tokens": 320,
            "output_tokens": 48,
            "e2e_ms": 160.0,
        },
        {
            "t_s": 2.0,
            "tenant": "initech",
            "kind": "hard",
            "status": "ok",
            "model": "sim-8b",
            "ttft_ms": 40.0,
            "tpot_ms": 7.0,
            "prompt_tokens": 80,
            "cached_tokens": 0,
            "output_tokens": 96,
            "e2e_ms": 700.0,
        },
        {
            "t_s": 9.0,
            "tenant": "initech",
            "kind": "easy",
            "status": "limited",
            "code": "RESOURCE_EXHAUSTED",
            "e2e_ms": 3000.0,
        },
    ]
    run.events = [{"t_s": 8.0, "what": "SIGKILL x", "kind": "kill"}, {"t_s": 10.0, "what": "day 1: spike"}]
    run.samples = [
        {
            "t_s": float(t),
            "rate": 1.0,
            "in_flight": 1,
            "desired": 2,
            "serving": 2,
            "starting": 0,
            "routable": {"sim-1b": 2, "sim-8b": 1},
        }
        for t in range(16)
    ]
    run.sections = {
        "slos": {
            "slos": [
                {
                    "slo": {
                        "name": "sim-1b-availability",
                        "kind": "SLO_KIND_AVAILABILITY",
                        "objective": 0.999,
                    },
                    "events": 2,
                    "bad_events": 0,
                    "sli": 1.0,
                }
            ]
        },
        "resilience": {"router_resumes": 2, "router_retries": 1, "client_retries": {"initech": 4}},
        "cost_series": {"series": [{"t_s": 4.0, "cost_per_1k_tokens_usd": 0.001}]},
        "rollout": {
            "planted": {"v3": "slowdown=4"},
            "rollouts": [
                {
                    "rollout_id": "r1",
                    "baseline": "v1",
                    "candidate": "v2",
                    "percent": 30.0,
                    "guardrails": ["tpot_p50_ms<=2x+5@15"],
                    "state": "promoted",
                    "automatic": False,
                    "reason": "passed every step",
                    "started_s": 2.0,
                    "decided_s": 6.0,
                },
                {
                    "rollout_id": "r2",
                    "baseline": "v2",
                    "candidate": "v3",
                    "percent": 30.0,
                    "guardrails": ["tpot_p50_ms<=2x+5@15"],
                    "state": "rolled_back",
                    "automatic": True,
                    "reason": "guardrail breached: tpot_p50_ms 40 ms > 2 x baseline 10 ms = 20 ms (16 samples)",
                    "started_s": 7.0,
                    "decided_s": 12.0,
                },
            ],
        },
        "cost": {"total_usd": 0.0123, "cost_per_1k_tokens": 0.0004, "tokens": 30000, "requests": 2},
    }
    run.requests[0]["version"] = "v2"
    run.rollout_samples = [
        {
            "t_s": float(t),
            "rollout_id": "r1" if t < 7 else "r2",
            "candidate": "v2" if t < 7 else "v3",
            "state": "running",
            "candidate_percent": 30.0,
            "candidate_replicas": 1,
            "checks": [
                {
                    "metric": "tpot_p50_ms",
                    "verdict": "ok",
                    "candidate": 10.0 if t < 7 else 40.0,
                    "baseline": 10.0,
                    "limit": 2.0,
                    "relative": True,
                    "samples": 16,
                }
            ],
        }
        for t in range(2, 13)
    ]
    return {
        "settings": vars(QUICK) | {},
        "verdicts": verdicts(run),
        "events": run.events,
        "samples": run.samples,
        "rollout_samples": run.rollout_samples,
        "requests": run.requests,
        "sections": run.sections,
    }


def test_verdicts_count_failures_apart_from_limits_and_judge_each_slo():
    """A tenant held to its limit is 'limited', not a failure; each SLO is met when its SLI reaches the
    objective over at least one event."""
    v = _record()["verdicts"]
    assert (v["ok"], v["limited"], v["failed"], v["zero_failed_requests"]) == (2, 1, 0, True)
    assert v["slos"][0]["met"] and v["all_slos_met"]
    assert v["cost"] == {
        "total_usd": 0.0123,
        "cost_per_1k_tokens_usd": 0.0004,
        "tokens": 30000,
        "requests": 2,
    }


def test_the_rollout_verdict_wants_the_good_canary_promoted_and_the_planted_one_rolled_back_by_a_guardrail():
    """Promoted v2 + v3 rolled back on a breach: ok; a manual rollback of v3 (not its guardrail) is not."""
    from loadtest.demo.run import rollout_verdict

    section = _record()["sections"]["rollout"]
    assert rollout_verdict(section)["ok"]
    section["rollouts"][1]["automatic"] = False
    assert not rollout_verdict(section)["ok"]
    assert rollout_verdict({"skipped": "--quick"}) == {"skipped": "--quick"}


def test_the_report_page_has_every_section_and_says_what_was_skipped(tmp_path):
    """The HTML inlines the plots, lists the SLO verdicts, the tenants, routing, the kill, the canaries and the
    cost, and names the sections it skipped."""
    page = report.write(_record(), tmp_path).read_text()
    for text in (
        "Replicas desired vs actual",
        "p50 and p99 beside the mean",
        "sim-1b-availability",
        "limited (after honouring RetryInfo)",
        "resumed 2 streams",
        "canary v2 promoted",
        "planted-bad v3 rolled back by its guardrail",
        "guardrail breached: tpot_p50_ms 40 ms",
        "cost $0.0123",
    ):
        assert text in page, text
    assert page.count("data:image/png;base64,") == 5
    assert (tmp_path / "rollout.png").stat().st_size > 5000
    quick = _record()
    quick["sections"]["rollout"] = {"skipped": "--quick: one short day has no time for two canaries"}
    quick["rollout_samples"] = []
    (tmp_path / "quick").mkdir()
    page = report.write(quick, tmp_path / "quick").read_text()
    assert "skipped: --quick: one short day" in page and "rollout: skipped" in page
    assert (tmp_path / "report.json").exists() and (tmp_path / "replicas.png").stat().st_size > 5000
