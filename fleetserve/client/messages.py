"""Requests from plain Python values, and what a stream of chunks adds up to (text, usage, who served it)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb

FINISH_REASONS = {
    v.number: v.name.removeprefix("FINISH_REASON_").lower() for v in common_pb2.FinishReason.DESCRIPTOR.values
}
PRIORITIES = {
    v.name.removeprefix("PRIORITY_").lower(): v.number for v in common_pb2.Priority.DESCRIPTOR.values
}

Message = common_pb2.ChatMessage | Mapping[str, str] | tuple[str, str]


def chat_messages(messages: Iterable[Message]) -> list[common_pb2.ChatMessage]:
    """ChatMessages from {"role": ..., "content": ...} dicts, (role, content) pairs or ChatMessages."""
    out = []
    for m in messages:
        if isinstance(m, common_pb2.ChatMessage):
            out.append(m)
        elif isinstance(m, Mapping):
            out.append(common_pb2.ChatMessage(role=m["role"], content=m["content"]))
        else:
            role, content = m
            out.append(common_pb2.ChatMessage(role=role, content=content))
    return out


def generation_request(
    model: str, prompt: str | None, messages: Iterable[Message] | None, fields: dict
) -> pb.GenerateRequest | pb.ChatRequest:
    """A GenerateRequest (prompt) or ChatRequest (messages); `fields` are the request's other fields by name
    (max_tokens, temperature, seed, stop, priority as "interactive"/"standard"/"batch" or the enum, ...)."""
    if (prompt is None) == (messages is None):
        raise ValueError("give a prompt or messages (not both)")
    fields = dict(fields)
    if isinstance(fields.get("priority"), str):
        name = fields["priority"].lower()
        if name not in PRIORITIES:
            raise ValueError(f"priority {fields['priority']!r}: one of {', '.join(sorted(PRIORITIES))}")
        fields["priority"] = PRIORITIES[name]
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    fields = {k: v for k, v in fields.items() if v is not None}
    if messages is not None:
        return pb.ChatRequest(model=model, messages=chat_messages(messages), **fields)
    return pb.GenerateRequest(model=model, prompt=prompt, **fields)


def batch_item(item: pb.BatchItem | Mapping) -> pb.BatchItem:
    """A BatchItem from a dict with custom_id and a prompt or messages (messages as chat_messages takes them)."""
    if isinstance(item, pb.BatchItem):
        return item
    item = dict(item)
    if "messages" in item:
        item["messages"] = chat_messages(item["messages"])
    return pb.BatchItem(**item)


@dataclass
class Completion:
    """A whole generation: the text, why it ended, token usage, who served it, and when the first token came."""

    text: str
    finish_reason: str
    usage: common_pb2.Usage
    served_by: common_pb2.ServedBy
    request_id: str
    ttft_s: float | None
    chunks: int


@dataclass
class StreamState:
    """What the chunks of one stream have said so far (kept across the client's retries of that stream)."""

    started: float = field(default_factory=time.perf_counter)
    request_id: str = ""
    ttft_s: float | None = None
    served_by: common_pb2.ServedBy = field(default_factory=common_pb2.ServedBy)
    usage: common_pb2.Usage = field(default_factory=common_pb2.Usage)
    finish_reason: str = ""
    chunks: int = 0
    # Every token id received, across attempts (what a resumed attempt continues after).
    token_ids: list[int] = field(default_factory=list)
    # Attempts that continued a stream broken mid-way (resume_token_ids).
    resumes: int = 0
    _text: list[str] = field(default_factory=list)

    def observe(self, chunk: common_pb2.GenerateChunk) -> None:
        self.chunks += 1
        if self.ttft_s is None and (chunk.text or chunk.token_ids):
            self.ttft_s = time.perf_counter() - self.started
        if chunk.HasField("served_by"):
            self.served_by = chunk.served_by
        if chunk.text:
            self._text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        if chunk.finish_reason:
            self.finish_reason = FINISH_REASONS.get(chunk.finish_reason, str(chunk.finish_reason))
            self.usage = chunk.usage

    @property
    def text(self) -> str:
        return "".join(self._text)

    def completion(self) -> Completion:
        return Completion(
            self.text,
            self.finish_reason,
            self.usage,
            self.served_by,
            self.request_id,
            self.ttft_s,
            self.chunks,
        )
