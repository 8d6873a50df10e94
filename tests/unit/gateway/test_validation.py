"""Validation of public GenerateRequests into GenerationSpecs, with field violations for bad input."""

from __future__ import annotations

import math

import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from hypothesis import given
from hypothesis import strategies as st

from services.gateway import validation
from services.gateway.validation import check_prompt_tokens, to_spec
from shared.errors import InvalidArgument

LIMITS = dict(default_max_tokens=256, max_tokens_limit=8192)


def violations(req: pb.GenerateRequest) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as exc:
        to_spec(req, **LIMITS)
    return dict(exc.value.field_violations)


def test_valid_prompt_request_becomes_a_spec():
    """Every field a client sets reaches the spec; max_tokens 0 becomes the default."""
    spec = to_spec(
        pb.GenerateRequest(
            model="m", prompt="hi", temperature=0.7, top_p=0.9, stop=["\n"], seed=5, ignore_eos=True
        ),
        **LIMITS,
    )
    assert spec.model == "m" and spec.prompt == "hi"
    assert spec.sampling.max_tokens == 256
    assert spec.sampling.seed == 5 and spec.sampling.HasField("seed")
    assert list(spec.sampling.stop) == ["\n"] and spec.sampling.ignore_eos
    assert math.isclose(spec.sampling.temperature, 0.7, rel_tol=1e-6)


@given(
    prompt=st.text(max_size=5),
    chat=st.lists(st.sampled_from(["system", "user", "assistant"]), max_size=3),
    max_tokens=st.integers(0, 300),
    temperature=st.sampled_from([0.0, -0.0, 0.3, 2.0]),
    top_p=st.sampled_from([0.0, 0.5, 1.0]),
    stop=st.lists(st.text(min_size=1, max_size=3), max_size=3),
    seed=st.one_of(st.none(), st.integers(0, 2**31)),
    ignore_eos=st.booleans(),
    version=st.sampled_from(["", "v2"]),
    resume=st.lists(st.integers(0, 1000), max_size=3),
)
def test_the_spec_carries_exactly_the_fields_of_the_request(
    prompt, chat, max_tokens, temperature, top_p, stop, seed, ignore_eos, version, resume
):
    """The spec (filled in place, repeated fields only when set) equals one built from every field at once."""
    messages = [common_pb2.ChatMessage(role=r, content="c") for r in chat] if not prompt else []
    req = pb.GenerateRequest(
        model="m", prompt=prompt, messages=messages, max_tokens=max_tokens, temperature=temperature,
        top_p=top_p, stop=stop, seed=seed, ignore_eos=ignore_eos, model_version=version, resume_token_ids=resume,
    )  # fmt: skip
    try:
        spec = to_spec(req, **LIMITS)
    except InvalidArgument:
        return
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens or 256, temperature=temperature, top_p=top_p, stop=stop, ignore_eos=ignore_eos
    )
    if seed is not None:
        sampling.seed = seed
    expected = common_pb2.GenerationSpec(
        model="m", prompt=prompt, messages=messages, sampling=sampling, model_version=version,
        resume_token_ids=resume,
    )  # fmt: skip
    assert spec == expected
    assert spec.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)


def test_unset_seed_stays_unset():
    """A request without a seed leaves the engine to pick one."""
    assert not to_spec(pb.GenerateRequest(model="m", prompt="x"), **LIMITS).sampling.HasField("seed")


def test_chat_messages_pass_through():
    """Chat messages with known roles are accepted as they are."""
    msgs = [
        common_pb2.ChatMessage(role="system", content="be brief"),
        common_pb2.ChatMessage(role="user", content="hi"),
    ]
    spec = to_spec(pb.GenerateRequest(model="m", messages=msgs, max_tokens=3), **LIMITS)
    assert [m.role for m in spec.messages] == ["system", "user"] and spec.sampling.max_tokens == 3


def test_missing_model_and_prompt_are_both_reported():
    """All problems come back at once, each naming its field."""
    v = violations(pb.GenerateRequest())
    assert set(v) == {"model", "prompt"}


def test_prompt_and_messages_together_are_rejected():
    """Exactly one of prompt and messages."""
    v = violations(
        pb.GenerateRequest(model="m", prompt="a", messages=[common_pb2.ChatMessage(role="user", content="b")])
    )
    assert set(v) == {"messages"}


def test_bad_messages_name_the_index():
    """An unknown role or an empty content points at the message."""
    v = violations(
        pb.GenerateRequest(
            model="m",
            messages=[
                common_pb2.ChatMessage(role="user", content="ok"),
                common_pb2.ChatMessage(role="robot", content=""),
            ],
        )
    )
    assert set(v) == {"messages[1].role", "messages[1].content"}


@pytest.mark.parametrize(
    ("field", "kwargs"),
    [
        ("max_tokens", dict(max_tokens=8193)),
        ("temperature", dict(temperature=2.5)),
        ("temperature", dict(temperature=-0.1)),
        ("temperature", dict(temperature=float("nan"))),
        ("top_p", dict(top_p=1.5)),
        ("top_p", dict(top_p=-1)),
        ("stop", dict(stop=[str(i) for i in range(9)])),
        ("priority", dict(priority=42)),
    ],
)
def test_out_of_range_sampling_is_rejected(field, kwargs):
    """Sampling values outside their ranges are field violations."""
    assert set(violations(pb.GenerateRequest(model="m", prompt="p", **kwargs))) == {field}


@given(
    max_tokens=st.integers(min_value=0, max_value=8192),
    temperature=st.floats(min_value=0, max_value=2, width=32),
    top_p=st.floats(min_value=0, max_value=1, width=32),
    stop=st.lists(st.text(min_size=1, max_size=5), max_size=8),
)
def test_any_in_range_request_is_accepted(max_tokens, temperature, top_p, stop):
    """Values within the documented ranges always validate, and max_tokens ends up in [1, limit]."""
    spec = to_spec(
        pb.GenerateRequest(
            model="m", prompt="p", max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=stop
        ),
        **LIMITS,
    )
    assert 1 <= spec.sampling.max_tokens <= 8192


@given(temperature=st.floats(width=32).filter(lambda t: not 0 <= t <= 2))
def test_any_out_of_range_temperature_is_rejected(temperature):
    """Any temperature outside [0, 2] (NaN and infinities included) is rejected."""
    assert "temperature" in violations(pb.GenerateRequest(model="m", prompt="p", temperature=temperature))


def _spec(prompt: str = "", messages=()) -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(model="m", prompt=prompt, messages=messages)


@pytest.mark.asyncio
async def test_prompt_tokens_are_counted_like_the_engine_when_asked():
    """With count set, the prompt's tokens are the fleet tokenizer's (BOS included); chats use the template."""
    from shared import tokenizer

    tok = tokenizer.load()
    assert await check_prompt_tokens(_spec("hello there"), None, count=True) == len(tok.encode("hello there"))
    chat = [common_pb2.ChatMessage(role="user", content="hi")]
    assert await check_prompt_tokens(_spec(messages=chat), 4096, count=True) == len(tok.encode_chat(chat))


@pytest.mark.asyncio
async def test_short_prompts_are_not_tokenized_unless_a_limit_needs_it(monkeypatch):
    """A prompt whose bytes cannot reach the context is passed without tokenizing (count 0)."""
    monkeypatch.setattr(validation, "count_prompt_tokens", _fail)
    assert await check_prompt_tokens(_spec("short prompt"), 4096, count=False) == 0


@pytest.mark.asyncio
async def test_a_prompt_over_the_context_is_a_prompt_field_violation():
    """A prompt of at least the context's tokens is INVALID_ARGUMENT on prompt, with the numbers."""
    with pytest.raises(InvalidArgument) as exc:
        await check_prompt_tokens(_spec("word " * 100), 32, count=False)
    ((field, text),) = exc.value.field_violations
    assert field == "prompt" and "context is 32 tokens" in text


@pytest.mark.asyncio
async def test_a_huge_prompt_is_refused_by_its_size_without_tokenizing(monkeypatch):
    """Bytes / the longest token's bytes is a lower bound on tokens: a huge prompt is refused untokenized."""
    monkeypatch.setattr(validation, "count_prompt_tokens", _fail)
    with pytest.raises(InvalidArgument) as exc:
        await check_prompt_tokens(_spec("x" * (64 * validation.max_token_bytes())), 64, count=True)
    assert "at least" in exc.value.field_violations[0][1]


@pytest.mark.asyncio
async def test_long_prompts_are_counted_in_a_thread_with_the_same_result():
    """Prompts over the inline size are tokenized off the event loop, with the same count."""
    from shared import tokenizer

    text = "many words here " * 1000
    assert await check_prompt_tokens(_spec(text), None, count=True) == len(tokenizer.load().encode(text))


def _fail(*_):
    raise AssertionError("tokenized")


def test_feature_tag_is_a_short_safe_label():
    """The request-type tag is optional; when set, at most 64 letters, digits and ._:/- (it becomes a label)."""
    ok = pb.GenerateRequest(model="m", prompt="hi", feature="code-review/v2:fast_path.1")
    to_spec(ok, **LIMITS)
    for bad in ("x" * 65, "has space", "émoji", "a\nb"):
        assert "feature" in violations(pb.GenerateRequest(model="m", prompt="hi", feature=bad)), bad
