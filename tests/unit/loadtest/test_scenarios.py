"""Load-test scenarios without Locust: selection, multi-turn history, bursty arrivals, SSE measurement, and the
LLM stats a distributed run merges."""

from __future__ import annotations

import json
import random

import pytest

from loadtest.llm_stats import LlmStats
from loadtest.scenarios import Conversation, SseMeter, burst_wait, selected
from loadtest.summary import INCOMPLETE, RequestResult


def test_selection_is_the_product_of_protocols_and_scenarios_and_refuses_unknown_names():
    """FLEETSERVE_PROTOCOLS x FLEETSERVE_SCENARIOS, defaulting to gRPC chat; a typo names the variable."""
    assert selected({}) == [("grpc", "chat")]
    env = {"FLEETSERVE_PROTOCOLS": "grpc,http", "FLEETSERVE_SCENARIOS": "chat,batch"}
    assert selected(env) == [("grpc", "chat"), ("grpc", "batch"), ("http", "chat"), ("http", "batch")]
    with pytest.raises(ValueError, match="FLEETSERVE_SCENARIOS"):
        selected({"FLEETSERVE_SCENARIOS": "chat,chatty"})


def test_a_conversation_sends_its_whole_history_each_turn():
    """Each turn sends the system prompt, every earlier turn and reply, and one new user message."""
    conv = Conversation.start(random.Random(1), turns=(3, 3))
    first = conv.next_turn()
    assert [m["role"] for m in first] == ["system", "user"]
    conv.reply("an answer")
    second = conv.next_turn()
    assert second[:2] == first and [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    conv.reply("another")
    conv.next_turn()
    assert conv.done
    # Conversations of one tenant share the system prompt (what prefix caching can reuse).
    same = [Conversation.start(random.Random(s), tenants=1).system for s in range(3)]
    assert len(set(same)) == 1


def test_bursty_users_send_during_the_first_second_of_every_four():
    """No wait inside a burst; outside it, the wait ends exactly at the next burst."""
    assert burst_wait(8.0) == 0.0 and burst_wait(8.99) == 0.0
    assert burst_wait(9.5) == pytest.approx(2.5) and burst_wait(11.9) == pytest.approx(0.1)


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode()


def test_sse_meter_times_the_first_content_and_reads_usage():
    """TTFT at the first delta with content (not the role-only one); tokens from the usage chunk; ok after
    [DONE]; an error event or a missing [DONE] is a failure."""
    m = SseMeter(10.0)
    m.on_line(_sse({"choices": [{"delta": {"role": "assistant"}}]}), 10.1)
    m.on_line(_sse({"choices": [{"delta": {"content": "hi"}}]}), 10.25)
    m.on_line(_sse({"choices": [{"delta": {}, "finish_reason": "length"}]}), 10.3)
    m.on_line(_sse({"choices": [], "usage": {"completion_tokens": 3}}), 10.31)
    m.on_line(b"data: [DONE]", 10.32)
    r = m.result(10.4)
    assert r.ok and r.ttft_s == pytest.approx(0.25) and r.output_tokens == 3 and m.text == "hi"
    cut = SseMeter(0.0)
    cut.on_line(_sse({"choices": [{"delta": {"content": "x"}}]}), 0.1)
    assert cut.result(0.2).error == INCOMPLETE
    err = SseMeter(0.0)
    err.on_line(_sse({"error": {"type": "rate_limit_error", "code": "rate_limited", "message": "slow"}}), 0.1)
    assert (err.result(0.2).error, err.result(0.2).reason) == ("rate_limit_error", "rate_limited")


def test_worker_values_merged_on_the_master_equal_one_process_recording_them_all():
    """Two workers' reports merged give the same counts, tokens and percentiles as one process that recorded
    every request; failures add nothing."""
    rng = random.Random(3)
    results = [
        RequestResult(rng.uniform(0.01, 0.5), rng.uniform(0.6, 2.0), rng.randint(2, 64)) for _ in range(200)
    ]
    single = LlmStats()
    workers = [LlmStats(worker=True), LlmStats(worker=True)]
    master = LlmStats()
    for i, r in enumerate(results):
        single.record("grpc", "chat", r)
        workers[i % 2].record("grpc", "chat", r)
        if i % 50 == 0:  # reports arrive every few seconds, each carrying what came since the last
            for w in workers:
                master.merge(w.serialize_and_reset())
    workers[0].record("grpc", "chat", RequestResult(None, 1.0, 0, error="UNAVAILABLE"))
    for w in workers:
        master.merge(w.serialize_and_reset())
    assert master.rows(10.0) == single.rows(10.0)
    agg = single.rows(10.0)[-1]
    assert agg["Requests OK"] == 200 and agg["Output tokens"] == sum(r.output_tokens for r in results)
