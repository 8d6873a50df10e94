"""Output quality signals computed once per output: repetition of token 4-grams, empty and refusal outputs."""

from __future__ import annotations

from services.engine.output_quality import MAX_IDS, OutputSample, is_refusal, repetition


def test_repetition_of_a_loop_is_near_one_and_of_distinct_tokens_zero():
    """A model stuck in a loop repeats almost every 4-gram; a varied output repeats none."""
    assert repetition(list(range(100))) == 0.0
    assert repetition([1, 2, 3] * 50) > 0.95
    assert repetition([1, 2, 3]) == 0.0, "too short to have a repeated 4-gram"


def test_refusal_openings():
    """Typical refusals are recognised at the start of the output, not in the middle of an answer."""
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("  As an AI language model, I cannot")
    assert is_refusal("I can't help with that request")
    assert not is_refusal("Sure! Here is the summary. I'm sorry it is long.")
    assert not is_refusal("")


def test_sample_attributes():
    """Empty: no tokens, or only whitespace text; the sample is capped so a long output costs bounded work."""
    s = OutputSample()
    for _ in range(1000):
        s.feed([7, 8, 9, 10], "abcd")
    assert len(s.ids) <= MAX_IDS + 4 and len(s.text) < 200
    a = s.attributes(4000)
    assert a["fleetserve.output_repetition"] > 0.9 and not a["fleetserve.output_empty"]
    blank = OutputSample()
    blank.feed([5, 6], "  \n")
    assert blank.attributes(2)["fleetserve.output_empty"]
    assert OutputSample().attributes(0)["fleetserve.output_empty"]
    ids_only = OutputSample()
    ids_only.feed([1, 2, 3], "")
    assert not ids_only.attributes(3)["fleetserve.output_empty"], "no text streamed: only 0 tokens is empty"


def test_a_resumed_attempt_has_no_refusal_check():
    s = OutputSample()
    s.feed([1, 2], "I'm sorry, but I can't help with that.")
    assert s.attributes(2)["fleetserve.output_refusal"] is True
    # The same text as a continuation: the answer's opening was another attempt's, so nothing is said.
    assert "fleetserve.output_refusal" not in s.attributes(2, opening_seen=False)
