"""OpenAI request bodies -> GenerateRequest, and router chunks -> OpenAI responses and SSE events."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb

from shared.errors import InvalidArgument

CHAT = "chat"
COMPLETION = "completion"

# OpenAI's default temperature is 1 (ours, on gRPC, is 0 = greedy): a client that sends none expects sampling.
OPENAI_DEFAULT_TEMPERATURE = 1.0

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    # vLLM's OpenAI server says "abort" too: the generation was cut short (shutdown, cancel).
    common_pb2.FINISH_REASON_ABORT: "abort",
}

# service_tier -> our priority ("flex" is OpenAI's cheaper, slower tier).
SERVICE_TIERS = {
    "auto": common_pb2.PRIORITY_STANDARD,
    "default": common_pb2.PRIORITY_STANDARD,
    "flex": common_pb2.PRIORITY_BATCH,
    "priority": common_pb2.PRIORITY_INTERACTIVE,
}

# Parameters we do not implement: refused when set to anything but their "off" value, so that a client never
# silently gets something other than what it asked for.
_UNSUPPORTED_UNLESS = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none"),
    "logit_bias": (None, {}),
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
}


@dataclass(frozen=True)
class Options:
    """What the HTTP layer needs besides the GenerateRequest."""

    kind: str
    stream: bool
    include_usage: bool


class _Violations:
    """Collects every field violation of a body, so a client fixes all in one round trip."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str]] = []

    def add(self, field: str, description: str) -> None:
        self.items.append((field, description))

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(
                f"invalid request: {', '.join(f for f, _ in self.items)}", field_violations=self.items
            )


def _number(body: dict, name: str, v: _Violations, integer: bool = False) -> Any:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if not ok or isinstance(value, bool):
        v.add(name, f"must be {'an integer' if integer else 'a number'}; got {_shown(value)}")
        return None
    if not integer:
        try:
            finite = math.isfinite(float(value))  # an integer past 1e308 overflows; JSON may say NaN, 1e999
        except OverflowError:
            finite = False
        if not finite:
            v.add(name, f"must be a finite number; got {_shown(value)}")
            return None
    return value


def _shown(value: Any) -> str:
    """A short, safe rendering of a client's value for an error message."""
    try:
        return json.dumps(value)[:40]
    except (ValueError, TypeError, RecursionError):
        return type(value).__name__


def _is_text(value: Any) -> bool:
    """A str that can be encoded as UTF-8 (JSON's \\ud800 escape decodes to a lone surrogate, which cannot)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any, field: str, v: _Violations, what: str = "a string") -> str | None:
    """value when it is text; else a violation (wrong type, or a lone surrogate) and None."""
    if _is_text(value):
        return value
    if isinstance(value, str):
        v.add(field, "must be valid Unicode text (it holds a lone surrogate such as \\ud800)")
    else:
        v.add(field, f"must be {what}")
    return None


def _text_content(content: Any, field: str, v: _Violations) -> str:
    """A message's content: a string, or a list of {"type": "text", "text": ...} parts (joined)."""
    if isinstance(content, str):
        return _text(content, field, v) or ""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                v.add(f"{field}[{j}]", 'only {"type": "text", "text": ...} parts are supported')
                continue
            texts.append(_text(part["text"], f"{field}[{j}].text", v) or "")
        return "".join(texts)
    v.add(field, "must be a string or a list of text parts")
    return ""


def parse_request(body: Any, kind: str) -> tuple[pb.GenerateRequest, Options]:
    """The GenerateRequest and options for a /v1/chat/completions (CHAT) or /v1/completions (COMPLETION) body;
    InvalidArgument with every field violation. Ranges (max_tokens, temperature, ...) are checked by the pipeline,
    the same as for gRPC."""
    if not isinstance(body, dict):
        raise InvalidArgument("the request body must be a JSON object", reason="INVALID_JSON")
    v = _Violations()
    req = pb.GenerateRequest()
    model = body.get("model")
    if not isinstance(model, str) or not model:
        v.add("model", "required: the name of a model (see GET /v1/models)")
    elif _text(model, "model", v) is not None:
        req.model = model

    if kind == CHAT:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            v.add("messages", "required: a non-empty list of {role, content}")
        else:
            for i, m in enumerate(messages):
                if not isinstance(m, dict):
                    v.add(f"messages[{i}]", "must be an object {role, content}")
                    continue
                role = m.get("role")
                # "developer" is OpenAI's newer name for the system role.
                role = "system" if role == "developer" else role
                if isinstance(role, str):
                    role = _text(role, f"messages[{i}].role", v) or ""
                content = _text_content(m.get("content"), f"messages[{i}].content", v)
                req.messages.add(role=role if isinstance(role, str) else "", content=content)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        prompt = _text(prompt, "prompt", v, "a string (or a list of one string)")
        if prompt is not None:
            req.prompt = prompt

    max_tokens = _number(body, "max_completion_tokens", v, integer=True)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", v, integer=True)
    if max_tokens is not None:
        if max_tokens < 1:
            v.add("max_tokens", f"must be at least 1; got {max_tokens}")
        else:
            req.max_tokens = min(max_tokens, 2**32 - 1)
    temperature = _number(body, "temperature", v)
    req.temperature = OPENAI_DEFAULT_TEMPERATURE if temperature is None else temperature
    top_p = _number(body, "top_p", v)
    if top_p is not None:
        req.top_p = top_p
    seed = _number(body, "seed", v, integer=True)
    if seed is not None:
        if seed < 0:
            v.add("seed", "must be >= 0")
        else:
            req.seed = seed % 2**64

    stop = body.get("stop")
    stops = [stop] if isinstance(stop, str) else stop
    if isinstance(stops, list) and all(isinstance(s, str) for s in stops):
        if all(_is_text(s) for s in stops):
            req.stop.extend(stops)
        else:
            v.add("stop", "must be valid Unicode text (it holds a lone surrogate such as \\ud800)")
    elif stop is not None:
        v.add("stop", "must be a string or a list of strings")

    user = body.get("user")
    if isinstance(user, str) and _text(user, "user", v) is not None:
        req.user_id = user
    metadata = body.get("metadata")
    if metadata is not None:
        # OpenAI's metadata: string keys and values; "feature" is the fleet's request-type tag.
        if not isinstance(metadata, dict) or not all(isinstance(x, str) for x in metadata.values()):
            v.add("metadata", "must be an object of string values")
        elif "feature" in metadata and _text(metadata["feature"], "metadata.feature", v) is not None:
            req.feature = metadata["feature"]
    tier = body.get("service_tier")
    if tier is not None:
        if not isinstance(tier, str) or tier not in SERVICE_TIERS:
            v.add("service_tier", f"must be one of {', '.join(SERVICE_TIERS)}")
        else:
            req.priority = SERVICE_TIERS[tier]
    if body.get("ignore_eos") is True:  # vLLM's extension, for benchmarks
        req.ignore_eos = True

    for name, allowed in _UNSUPPORTED_UNLESS.items():
        if name in body and body[name] not in allowed:
            v.add(name, "not supported by this server")

    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        v.add("stream", "must be a boolean")
    stream_options = body.get("stream_options")
    include_usage = False
    if stream_options is not None:
        if not isinstance(stream_options, dict):
            v.add("stream_options", "must be an object")
        elif not stream:
            v.add("stream_options", "only allowed when stream is true")
        else:
            include_usage = bool(stream_options.get("include_usage"))
    v.raise_if_any()
    return req, Options(kind=kind, stream=bool(stream), include_usage=include_usage)


def usage_dict(usage: common_pb2.Usage) -> dict:
    """OpenAI's usage object."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


class Shaper:
    """Turns one request's chunks into OpenAI's shapes. The SSE events are a prefix and a suffix built once per
    request around json.dumps of the text delta: no dict is built or serialized per token."""

    def __init__(self, kind: str, request_id: str, model: str, include_usage: bool = False) -> None:
        self.kind = kind
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        if kind == CHAT:
            self.id, self.object = f"chatcmpl-{request_id}", "chat.completion"
        else:
            self.id, self.object = f"cmpl-{request_id}", "text_completion"
        chunk_object = "chat.completion.chunk" if kind == CHAT else "text_completion"
        self._head = (
            f'data: {{"id":{json.dumps(self.id)},"object":"{chunk_object}","created":{self.created},'
            f'"model":{json.dumps(model)},"choices":[{{"index":0,'
        )
        usage_null = ',"usage":null' if include_usage else ""
        if kind == CHAT:
            self._first_pre = (self._head + '"delta":{"role":"assistant","content":').encode()
            self._pre = (self._head + '"delta":{"content":').encode()
            self._post = ('},"logprobs":null,"finish_reason":null}]' + usage_null + "}\n\n").encode()
        else:
            self._first_pre = self._pre = (self._head + '"text":').encode()
            self._post = (',"logprobs":null,"finish_reason":null}]' + usage_null + "}\n\n").encode()

    def delta(self, text: str, first: bool = False) -> bytes:
        """The SSE event carrying a text delta (the chat role on the first)."""
        return (self._first_pre if first else self._pre) + json.dumps(text).encode() + self._post

    def final(self, finish_reason: int, usage: common_pb2.Usage | None) -> bytes:
        """The events after the last delta: the finish reason, then (when asked) usage, then [DONE]."""
        reason = json.dumps(FINISH_REASONS.get(finish_reason))
        usage_null = ',"usage":null' if self.include_usage else ""
        if self.kind == CHAT:
            choice = '"delta":{},"logprobs":null,"finish_reason":' + reason + "}]"
        else:
            choice = '"text":"","logprobs":null,"finish_reason":' + reason + "}]"
        out = self._head + choice + usage_null + "}\n\n"
        if self.include_usage and usage is not None:
            out += "data: " + json.dumps(self._envelope([], usage_dict(usage), chunk=True)) + "\n\n"
        return (out + "data: [DONE]\n\n").encode()

    def _envelope(self, choices: list, usage: dict | None, chunk: bool = False) -> dict:
        obj = "chat.completion.chunk" if chunk and self.kind == CHAT else self.object
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
        }

    def body(self, text: str, finish_reason: int, usage: common_pb2.Usage | None, served_by: str) -> dict:
        """The whole (non-streamed) response."""
        reason = FINISH_REASONS.get(finish_reason)
        if self.kind == CHAT:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        out = self._envelope([choice], usage_dict(usage) if usage is not None else None)
        if served_by:
            out["system_fingerprint"] = served_by
        return out

    @staticmethod
    def error_event(body: dict) -> bytes:
        """An error after the stream started: the openai client raises APIError on an event with "error"."""
        return b"data: " + json.dumps(body).encode() + b"\n\n"


def models_body(models: pb.ListModelsResponse) -> dict:
    """GET /v1/models."""
    return {"object": "list", "data": [model_dict(m.name) for m in models.models]}


def model_dict(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "fleetserve"}
