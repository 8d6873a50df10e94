"""A pluggable safety filter on the gateway's input and output, with a default rule set of deny patterns.

Output is checked on the relayed stream with a sliding window: each chunk's text is checked together with the
tail of what came before (so a phrase split across chunks is caught) before the chunk is sent on. That costs
parsing every chunk, so it runs only while the filter has output rules; with none, the gateway relays bytes
untouched. Checking only at the end would be cheaper still but would let blocked text reach the client."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from fleetserve.common.v1 import common_pb2

from shared.errors import InvalidArgument

INPUT_BLOCKED = "SAFETY_INPUT_BLOCKED"
OUTPUT_BLOCKED = "SAFETY_OUTPUT_BLOCKED"


class SafetyRefusal(InvalidArgument):
    """Refused by the safety filter: the same request will be refused again. reason says input or output."""

    reason = INPUT_BLOCKED


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why text was blocked: the rule's name (never the matched text, which may be what must not leak)."""

    rule: str


class SafetyFilter(Protocol):
    """What the gateway asks of a safety filter. Implementations must be cheap: output checks run per chunk."""

    def check_input(self, texts: Sequence[str]) -> Verdict | None:
        """A verdict when the prompt (or any chat message) must not be served."""
        ...

    def output_checker(self) -> OutputChecker | None:
        """A fresh per-stream checker, or None when the output is not checked (the byte relay stays)."""
        ...


class OutputChecker(Protocol):
    def feed(self, text: str) -> Verdict | None:
        """Check the next text delta; a verdict stops the stream before the delta is sent."""
        ...


class DenyPatterns:
    """The default rule set: case-insensitive regular expressions, named by their index in the config, applied
    to the input and (separately configured) to the output over a window of the last window_chars."""

    def __init__(
        self, input_patterns: Sequence[str] = (), output_patterns: Sequence[str] = (), window_chars: int = 256
    ) -> None:
        self._input = [(f"input[{i}]", re.compile(p, re.IGNORECASE)) for i, p in enumerate(input_patterns)]
        self._output = [(f"output[{i}]", re.compile(p, re.IGNORECASE)) for i, p in enumerate(output_patterns)]
        self.window_chars = window_chars

    def check_input(self, texts: Sequence[str]) -> Verdict | None:
        for name, rx in self._input:
            if any(rx.search(t) for t in texts):
                return Verdict(name)
        return None

    def output_checker(self) -> _WindowChecker | None:
        return _WindowChecker(self._output, self.window_chars) if self._output else None


class _WindowChecker:
    def __init__(self, rules: list[tuple[str, re.Pattern[str]]], window_chars: int) -> None:
        self._rules = rules
        self._window_chars = window_chars
        self._tail = ""

    def feed(self, text: str) -> Verdict | None:
        if not text:
            return None
        window = self._tail + text
        for name, rx in self._rules:
            if rx.search(window):
                return Verdict(name)
        self._tail = window[-self._window_chars :]
        return None


def input_texts(spec: common_pb2.GenerationSpec) -> list[str]:
    """The texts of a request the input filter sees."""
    return [m.content for m in spec.messages] if spec.messages else [spec.prompt]
