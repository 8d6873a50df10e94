"""OpenAI request parsing, response shaping and the gRPC -> HTTP error mapping, without a network."""

from __future__ import annotations

import json

import grpc
import pytest
from fleetserve.common.v1 import common_pb2

from services.gateway.http.errors import details_of_exception, http_error
from services.gateway.http.openai_api import CHAT, COMPLETION, Shaper, parse_request
from shared.errors import (
    FleetError,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)


class PermissionDenied(FleetError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "MODEL_NOT_ALLOWED"


def test_chat_body_becomes_a_generate_request():
    """Model, messages (text parts joined, developer -> system), sampling, stop, seed, user and service_tier map
    onto GenerateRequest; stream options come back separately."""
    req, opts = parse_request(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_completion_tokens": 7,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": "END",
            "seed": 11,
            "user": "u1",
            "service_tier": "flex",
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        CHAT,
    )
    assert [(m.role, m.content) for m in req.messages] == [("system", "be brief"), ("user", "ab")]
    assert (req.model, req.max_tokens, req.seed, list(req.stop), req.user_id) == ("m", 7, 11, ["END"], "u1")
    assert req.temperature == pytest.approx(0.5) and req.top_p == pytest.approx(0.9)
    assert req.priority == common_pb2.PRIORITY_BATCH
    assert (opts.stream, opts.include_usage) == (True, True)


def test_openai_default_temperature_is_one():
    """A body without temperature samples at 1.0, OpenAI's default (gRPC's default is greedy)."""
    req, opts = parse_request({"model": "m", "prompt": ["hello"]}, COMPLETION)
    assert req.temperature == 1.0 and req.prompt == "hello" and not opts.stream


def test_every_bad_field_is_reported_at_once():
    """Type errors and unsupported options are one InvalidArgument listing each field."""
    with pytest.raises(InvalidArgument) as exc:
        parse_request({"messages": "hi", "max_tokens": "ten", "n": 3, "stop": 5, "stream_options": {}}, CHAT)
    fields = [f for f, _ in exc.value.field_violations]
    assert fields == ["model", "messages", "max_tokens", "stop", "n", "stream_options"]


def test_non_object_body_is_invalid_json():
    """A JSON array body is refused with reason INVALID_JSON."""
    with pytest.raises(InvalidArgument) as exc:
        parse_request([1, 2], CHAT)
    assert exc.value.reason == "INVALID_JSON"


def test_sse_events_are_valid_openai_chunks():
    """The pre-built SSE events parse as JSON chunks: role on the first, content deltas (escaped), the finish
    reason, the usage chunk with empty choices, then [DONE]."""
    shaper = Shaper(CHAT, "abc", 'we"ird', include_usage=True)
    first = json.loads(shaper.delta('he said "hi"\n', first=True).decode().removeprefix("data: "))
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": 'he said "hi"\n'}
    assert first["id"] == "chatcmpl-abc" and first["model"] == 'we"ird' and first["usage"] is None
    tail = shaper.final(common_pb2.FINISH_REASON_STOP, common_pb2.Usage(prompt_tokens=3, completion_tokens=2))
    events = tail.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    finish, usage = (json.loads(e.removeprefix("data: ")) for e in events[:2])
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["choices"][0]["delta"] == {}
    assert usage["choices"] == [] and usage["usage"]["total_tokens"] == 5


def test_completion_events_carry_text():
    """Completion chunks put the delta in choices[0].text and send no usage key unless asked."""
    shaper = Shaper(COMPLETION, "x", "m")
    chunk = json.loads(shaper.delta("tok").decode().removeprefix("data: "))
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "tok"
    assert "usage" not in chunk


@pytest.mark.parametrize(
    ("error", "status", "kind"),
    [
        (InvalidArgument("bad", field_violations=[("top_p", "too big")]), 400, "invalid_request_error"),
        (Unauthenticated("no key"), 401, "authentication_error"),
        (PermissionDenied("not yours"), 403, "permission_error"),
        (NotFound("no model", reason="MODEL_NOT_FOUND"), 404, "not_found_error"),
        (ResourceExhausted("slow down", retry_after_s=2.2), 429, "rate_limit_error"),
        (Unavailable("later", retry_after_s=0.2), 503, "service_unavailable_error"),
        (RuntimeError("boom"), 500, "server_error"),
    ],
)
def test_errors_map_to_openai_statuses(error, status, kind):
    """Each gRPC code has one HTTP status and OpenAI error type; the reason is the lower-cased code."""
    got_status, body, headers = http_error(details_of_exception(error))
    assert got_status == status and body["error"]["type"] == kind
    assert body["error"]["code"] == details_of_exception(error).reason.lower()


def test_retry_after_is_whole_seconds_rounded_up_and_param_names_the_field():
    """Retry-After rounds up to whole seconds (at least 1), retry-after-ms keeps precision; a single field
    violation becomes param and is spelled out in the message."""
    _, _, headers = http_error(details_of_exception(ResourceExhausted("x", retry_after_s=2.2)))
    assert headers == {"Retry-After": "3", "retry-after-ms": "2200"}
    _, _, headers = http_error(details_of_exception(Unavailable("x", retry_after_s=0.05)))
    assert headers["Retry-After"] == "1"
    _, body, _ = http_error(
        details_of_exception(InvalidArgument("bad", field_violations=[("top_p", "too big")]))
    )
    assert body["error"]["param"] == "top_p" and body["error"]["message"] == "bad: too big"


def test_metadata_feature_becomes_the_request_type_tag():
    """OpenAI's metadata object carries the fleet's request-type tag as metadata.feature; other keys are
    accepted and ignored, non-string values refused naming metadata."""
    req, _ = parse_request(
        {"model": "m", "prompt": "hi", "metadata": {"feature": "summarize", "team": "search"}}, COMPLETION
    )
    assert req.feature == "summarize"
    with pytest.raises(InvalidArgument) as exc:
        parse_request({"model": "m", "prompt": "hi", "metadata": {"feature": 3}}, COMPLETION)
    assert [f for f, _ in exc.value.field_violations] == ["metadata"]
