"""The load-test scenarios (chat, multi-turn, batch, bursty) over gRPC and OpenAI HTTP, without Locust: which ones
a run selects, the requests they send, their arrival pattern, and how an HTTP SSE stream is measured."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from loadtest.summary import INCOMPLETE, RequestResult
from loadtest.workload import _WORDS

SCENARIOS = ("chat", "multiturn", "batch", "bursty")
PROTOCOLS = ("grpc", "http")


def selected(env: Mapping[str, str]) -> list[tuple[str, str]]:
    """(protocol, scenario) pairs from FLEETSERVE_PROTOCOLS and FLEETSERVE_SCENARIOS (comma-separated; default
    grpc and chat); ValueError naming an unknown one."""

    def pick(var: str, default: str, known: tuple[str, ...]) -> list[str]:
        names = [n.strip() for n in env.get(var, default).split(",") if n.strip()]
        bad = [n for n in names if n not in known]
        if bad or not names:
            raise ValueError(f"{var}={env.get(var)!r}: choose from {', '.join(known)}")
        return names

    protocols = pick("FLEETSERVE_PROTOCOLS", "grpc", PROTOCOLS)
    scenarios = pick("FLEETSERVE_SCENARIOS", "chat", SCENARIOS)
    return [(p, s) for p in protocols for s in scenarios]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def chat_messages(rng: random.Random, prompt_tokens: int) -> list[dict[str, str]]:
    """A one-turn chat: a short system prompt and a user message of about prompt_tokens words."""
    return [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": words(rng, prompt_tokens)},
    ]


@dataclass
class Conversation:
    """One user's multi-turn chat: a system prompt shared by every conversation of its tenant (so prefix caching
    has something to find), turns that each send the whole history, replies appended as they come back."""

    rng: random.Random
    system: str
    turns_left: int
    user_words: tuple[int, int] = (40, 120)
    messages: list[dict[str, str]] = field(default_factory=list)

    @classmethod
    def start(cls, rng: random.Random, tenants: int = 4, turns: tuple[int, int] = (3, 8)) -> Conversation:
        tenant = rng.randrange(tenants)
        system = f"tenant {tenant} policy: " + words(random.Random(f"system:{tenant}"), 200)
        return cls(rng, system, rng.randint(*turns), messages=[{"role": "system", "content": system}])

    def next_turn(self) -> list[dict[str, str]]:
        """The history to send, with a new user message at its end."""
        self.messages.append({"role": "user", "content": words(self.rng, self.rng.randint(*self.user_words))})
        self.turns_left -= 1
        return list(self.messages)

    def reply(self, text: str) -> None:
        self.messages.append({"role": "assistant", "content": text})

    @property
    def done(self) -> bool:
        return self.turns_left <= 0


def burst_wait(now_s: float, period_s: float = 4.0, burst_s: float = 1.0) -> float:
    """Bursty arrivals: back to back during the first burst_s of every period_s (on the wall clock, so every
    user of every worker bursts together), otherwise wait for the next burst."""
    into = now_s % period_s
    return 0.0 if into < burst_s else period_s - into


def http_chat_body(
    model: str,
    messages: Iterable[Mapping[str, str]],
    max_tokens: int,
    *,
    stream: bool,
    service_tier: str = "",
) -> dict:
    body = {"model": model, "messages": list(messages), "max_tokens": max_tokens, "ignore_eos": True}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    if service_tier:
        body["service_tier"] = service_tier
    return body


class SseMeter:
    """Measures one OpenAI-style SSE stream line by line: TTFT at the first content delta, the reply's text,
    completion tokens from the usage chunk, an error event, and whether [DONE] arrived."""

    __slots__ = ("start", "ttft_s", "tokens", "finish_reason", "error", "done", "_text")

    def __init__(self, start: float) -> None:
        self.start = start
        self.ttft_s: float | None = None
        self.tokens: int | None = None
        self.finish_reason: str | None = None
        self.error: dict | None = None
        self.done = False
        self._text: list[str] = []

    def on_line(self, line: bytes | str, now: float) -> None:
        if isinstance(line, bytes):
            line = line.decode()
        if not line.startswith("data:"):
            return
        data = line[5:].strip()
        if data == "[DONE]":
            self.done = True
            return
        event = json.loads(data)
        if "error" in event:
            self.error = event["error"]
            return
        for choice in event.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                if self.ttft_s is None:
                    self.ttft_s = now - self.start
                self._text.append(content)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        if event.get("usage"):
            self.tokens = event["usage"].get("completion_tokens")

    @property
    def text(self) -> str:
        return "".join(self._text)

    def result(self, now: float) -> RequestResult:
        e2e = now - self.start
        tokens = self.tokens or 0
        if self.error is not None:
            return RequestResult(
                self.ttft_s,
                e2e,
                tokens,
                error=str(self.error.get("type") or "error"),
                reason=str(self.error.get("code") or ""),
                message=str(self.error.get("message") or ""),
            )
        if not self.done or self.finish_reason is None:
            return RequestResult(
                self.ttft_s, e2e, tokens, error=INCOMPLETE, message="stream ended without [DONE]"
            )
        return RequestResult(self.ttft_s, e2e, tokens)
