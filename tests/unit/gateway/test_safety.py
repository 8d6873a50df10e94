"""The default safety rules: input deny patterns, and the output window that catches text split across chunks."""

from __future__ import annotations

from fleetserve.common.v1 import common_pb2

from services.gateway.safety import DenyPatterns, input_texts


def test_input_patterns_match_prompt_or_any_message_case_insensitively():
    """A deny pattern in the prompt or in any chat message blocks it, named by rule, not by the text."""
    f = DenyPatterns(input_patterns=["forbidden", r"secret\s+plan"])
    spec = common_pb2.GenerationSpec(
        messages=[
            common_pb2.ChatMessage(role="user", content="hi"),
            common_pb2.ChatMessage(role="user", content="the SECRET  plan"),
        ]
    )
    assert f.check_input(input_texts(spec)).rule == "input[1]"
    assert f.check_input(["all fine"]) is None


def test_no_output_patterns_means_no_output_checker():
    """Without output rules the gateway keeps its byte relay (no checker)."""
    assert DenyPatterns(input_patterns=["x"]).output_checker() is None


def test_output_window_catches_a_phrase_split_across_chunks():
    """A phrase split over two deltas is caught on the delta that completes it."""
    checker = DenyPatterns(output_patterns=["launch code"]).output_checker()
    assert checker.feed("the laun") is None
    assert checker.feed("ch") is None
    assert checker.feed(" code is").rule == "output[0]"


def test_output_window_forgets_text_older_than_the_window():
    """Only the last window_chars are kept, so the cost per chunk stays bounded."""
    checker = DenyPatterns(output_patterns=["ab"], window_chars=4).output_checker()
    assert checker.feed("a" + "x" * 10) is None
    assert checker.feed("b") is None
