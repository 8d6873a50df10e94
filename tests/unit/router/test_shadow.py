"""Shadow comparisons: refusals recognised, text similarity, and a report that names the differences."""

from __future__ import annotations

import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

from services.router.shadow import Answer, ShadowStats, is_refusal, read_answer, similarity
from services.router.traffic import Shadow
from shared.relay import merge

OK = grpc.StatusCode.OK


def test_refusals_and_similarity():
    """Common refusal openings are recognised (the sim's planted one too); similarity is 1 for equal texts."""
    assert is_refusal("I'm sorry, but I can't help with that.") and is_refusal("  I cannot do that")
    assert not is_refusal("Sure, here it is")
    assert similarity("abc def", "abc def") == 1.0
    assert 0.4 < similarity("the quick brown fox", "the quick brown") < 1.0


def test_the_report_lists_what_was_planted():
    """A candidate twice as slow per token, half as long, refusing 20%: each shows up in the differences."""
    stats = ShadowStats(Shadow("ro-1", "v1", "v2", 8), "m")
    for i in range(50):
        live = Answer(OK, ttft_ms=10.0, e2e_ms=10.0 + 2.0 * 31, text="x" * 100, tokens=32)
        refused = i % 5 == 0
        text = "I'm sorry, but I can't help with that." if refused else "x" * 50
        shadow = Answer(OK, ttft_ms=12.0, e2e_ms=12.0 + 4.0 * 15, text=text, tokens=16)
        stats.add(live, shadow)
    stats.skipped = 3
    report = stats.report()
    assert report.pairs == 50 and report.shadow_refusal_rate == 0.2
    text = "\n".join(report.differences)
    assert "shadow TPOT 2.00x live" in text
    assert "shadow output length 0.50x live" in text
    assert "shadow refuses 20.0% of answers (live 0.0%)" in text
    assert "answers differ" in text and "3 copies skipped" in text
    assert "TTFT" not in text  # 1.2x: within what is not worth saying


def test_an_identical_candidate_has_no_differences_and_errors_count():
    """Same answers: nothing listed; failed copies are counted and listed."""
    stats = ShadowStats(Shadow("ro-1", "v1", "v2", 8), "m")
    for _ in range(20):
        a = Answer(OK, ttft_ms=10.0, e2e_ms=40.0, text="same", tokens=8)
        stats.add(a, Answer(OK, ttft_ms=10.5, e2e_ms=41.0, text="same", tokens=8))
    assert list(stats.report().differences) == []
    stats.add(Answer(OK, 10.0, 40.0, "same", 8), Answer(grpc.StatusCode.INTERNAL))
    report = stats.report()
    assert report.shadow_errors == 1 and report.pairs == 20
    assert any("shadow failed 1 of 21 copies" in d for d in report.differences)


def test_a_summarized_copy_gives_its_text_tokens_and_the_engines_tpot():
    """A summarized stream (first chunk, an empty progress message, the summary): the whole text, the token count
    from the usage, and TPOT from the engine's token times, not from when the router read it."""
    first = engine_pb.GenerateResponse(chunk=common_pb2.GenerateChunk(text="Hello", token_ids=[1]))
    last = engine_pb.GenerateResponse(
        chunk=common_pb2.GenerateChunk(text=" world, again", usage=common_pb2.Usage(completion_tokens=11)),
        summary=engine_pb.StreamSummary(first_token_ms=20.0, last_token_ms=70.0, outputs=11),
    )
    answer = Answer(OK, ttft_ms=25.0, e2e_ms=900.0)
    read_answer([first.SerializeToString(), b"", last.SerializeToString()], answer)
    assert (answer.text, answer.tokens, answer.messages) == ("Hello world, again", 11, 3)
    assert answer.tpot_ms == 5.0  # (70 - 20) / 10; the router's clock would say (900 - 25) / 10


def _live(times: engine_pb.StreamSummary | None) -> list[bytes]:
    """A relayed live stream of 11 tokens, one chunk each, the last with usage (and the engine's times)."""
    chunks = [
        engine_pb.GenerateResponse(chunk=common_pb2.GenerateChunk(text="t", token_ids=[i])) for i in range(11)
    ]
    last = chunks[-1].chunk
    last.finish_reason = common_pb2.FINISH_REASON_LENGTH
    last.usage.completion_tokens = 11
    if times is not None:
        chunks[-1].summary.CopyFrom(times)
    data = [c.SerializeToString() for c in chunks]
    # The router's relay hands a lagging writer pending chunks merged (shared/relay.py): the times survive it.
    return data[:8] + [merge(data[8:])]


def test_a_live_answers_tpot_is_the_engines_when_its_last_chunk_carries_the_token_times():
    """A live stream whose last chunk carries the engine's token times (read as the engine's message, after the
    fact): TPOT on the engine's clock, whatever the router's receive times said; without them (an older engine),
    from the first chunk to the engine's last as the router received them."""
    timed = Answer(OK, ttft_ms=10.0, e2e_ms=400.0, engine_end_ms=210.0)
    read_answer(_live(engine_pb.StreamSummary(first_token_ms=8.0, last_token_ms=58.0)), timed)
    assert (timed.text, timed.tokens, timed.messages) == ("t" * 11, 11, 9)
    assert timed.engine_tpot_ms == 5.0 and timed.tpot_ms == 5.0  # (58 - 8) / 10, not (210 - 10) / 10
    untimed = Answer(OK, ttft_ms=10.0, e2e_ms=400.0, engine_end_ms=210.0)
    read_answer(_live(None), untimed)
    assert (untimed.text, untimed.tokens) == ("t" * 11, 11)
    assert untimed.engine_tpot_ms is None and untimed.tpot_ms == 20.0


def test_a_live_answers_tpot_ends_when_the_engine_sent_its_last_chunk():
    """Without the engine's token times, the live TPOT runs to the engine's last chunk when the router saw it,
    not to the end of a slow relay downstream; without that time, to the end."""
    a = Answer(OK, ttft_ms=10.0, e2e_ms=400.0, text="x", tokens=11, engine_end_ms=110.0)
    assert a.tpot_ms == 10.0
    assert Answer(OK, ttft_ms=10.0, e2e_ms=400.0, text="x", tokens=11).tpot_ms == 39.0
