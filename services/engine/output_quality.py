"""Quality signals of one output, computed once when it ends (never per token): empty, repetitive (share of
repeated 4-grams of token ids), opening like a refusal. Reported as engine.Generate span attributes, which the
metrics service turns into per-version quality rates."""

from __future__ import annotations

import re

# Enough of an output to judge it: the repetition measure reads at most this many token ids, the refusal
# check the opening characters.
MAX_IDS = 2048
PREFIX_CHARS = 160
NGRAM = 4
# How refusals open (English; a production fleet would plug its own classifier in here).
REFUSAL = re.compile(
    r"^\s*(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:'|no)?t (?:help|assist|do|provide|comply)|"
    r"i cannot|i'?m (?:not able|unable) to|i am (?:not able|unable) to|as an ai\b|sorry, but i)",
    re.IGNORECASE,
)


def repetition(ids: list[int], n: int = NGRAM) -> float:
    """Share of the n-grams of ids that repeat an earlier one: 0 for all distinct, near 1 for a loop."""
    total = len(ids) - n + 1
    if total <= 1:
        return 0.0
    # zip of shifted views builds the n-grams in C, several times faster than slicing a tuple per position.
    seen = set(zip(*(ids[i:] for i in range(n)), strict=False))  # views of unequal length, on purpose
    return 1.0 - len(seen) / total


def is_refusal(text: str) -> bool:
    return REFUSAL.match(text) is not None


class OutputSample:
    """The start of one output as it streams: feed() is called once per engine step (a list extend and a short
    string append until the caps are reached), attributes() once at the end."""

    __slots__ = ("ids", "text")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.text = ""

    def feed(self, token_ids: list[int], text: str) -> None:
        if len(self.ids) < MAX_IDS:
            self.ids.extend(token_ids)
        if len(self.text) < PREFIX_CHARS and text:
            self.text += text

    def attributes(self, generated: int, opening_seen: bool = True) -> dict[str, bool | float]:
        """Span attributes of the output (generated: its token count, resumed tokens left out). Without its
        opening (a resumed attempt sees only the continuation) there is no refusal check: a refusal opens the
        answer, and the attempt that streamed the opening is the one whose span can say."""
        # Whitespace-only text counts as empty when the whole text was seen (under the cap); without text (a
        # backend that streams ids only) only a zero-token output does.
        blank = self.text != "" and not self.text.strip() and len(self.text) < PREFIX_CHARS
        out: dict[str, bool | float] = {
            "fleetserve.output_empty": generated == 0 or blank,
            "fleetserve.output_repetition": round(repetition(self.ids[:MAX_IDS]), 4),
        }
        if opening_seen:
            out["fleetserve.output_refusal"] = is_refusal(self.text)
        return out
