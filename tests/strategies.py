"""Hypothesis strategies for fuzzing the public edge: protobuf messages of any type built from their descriptors
(biased toward values that pass validation, so the fuzz reaches deep), raw bytes, and OpenAI HTTP requests."""

from __future__ import annotations

import json

from google.protobuf import descriptor as _d
from google.protobuf import message_factory
from hypothesis import strategies as st

_INT_BOUNDS = {
    _d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    _d.FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}

# Any text protobuf can carry: every code point but surrogates (a str holding one cannot be encoded).
any_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)


def _small_or_any(lo: int, hi: int) -> st.SearchStrategy[int]:
    return st.one_of(st.integers(max(lo, 0), min(hi, 64)), st.integers(lo, hi), st.sampled_from([lo, hi]))


def _scalar(field: _d.FieldDescriptor, overrides: dict) -> st.SearchStrategy:
    if field.name in overrides:
        return overrides[field.name]
    t = field.type
    if t in _INT_BOUNDS:
        return _small_or_any(*_INT_BOUNDS[t])
    if t == field.TYPE_FLOAT:
        return st.one_of(st.floats(0, 2, width=32), st.floats(width=32))
    if t == field.TYPE_DOUBLE:
        return st.one_of(st.floats(0, 2), st.floats())
    if t == field.TYPE_BOOL:
        return st.booleans()
    if t == field.TYPE_STRING:
        return any_text
    if t == field.TYPE_BYTES:
        return st.binary(max_size=40)
    if t == field.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        # proto3 enums are open: unknown numbers arrive as they are.
        return st.one_of(st.sampled_from(known), st.integers(-(2**31), 2**31 - 1))
    raise AssertionError(f"no strategy for {field.full_name}")


def message_dicts(
    desc: _d.Descriptor, overrides: dict, depth: int = 3, required: frozenset[str] = frozenset()
) -> st.SearchStrategy[dict]:
    """{field name: value} for desc, each field present or not (those named in `required` always, at the top
    level); nested messages to `depth`."""
    fields = {}
    for f in desc.fields:
        if f.type == f.TYPE_MESSAGE:
            if f.message_type.GetOptions().map_entry:
                value = st.dictionaries(any_text, any_text, max_size=3)
            elif depth <= 0 or f.message_type.full_name.startswith("google.protobuf."):
                continue
            else:
                value = message_dicts(f.message_type, overrides, depth - 1)
        else:
            value = _scalar(f, overrides)
        if f.is_repeated and not (f.type == f.TYPE_MESSAGE and f.message_type.GetOptions().map_entry):
            value = st.lists(value, max_size=3)
        fields[f.name] = value
    always = {name: fields.pop(name) for name in required if name in fields}
    return st.fixed_dictionaries(always, optional=fields)


def _fill(msg, values: dict) -> None:
    for name, value in values.items():
        field = msg.DESCRIPTOR.fields_by_name[name]
        target = getattr(msg, name)
        if field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            target.update(value)
        elif field.type == field.TYPE_MESSAGE and field.is_repeated:
            for v in value:
                _fill(target.add(), v)
        elif field.type == field.TYPE_MESSAGE:
            _fill(target, value)
        elif field.is_repeated:
            target.extend(value)
        else:
            setattr(msg, name, value)


def messages(
    desc: _d.Descriptor, overrides: dict | None = None, required: frozenset[str] = frozenset()
) -> st.SearchStrategy[bytes]:
    """Serialized messages of type desc."""
    cls = message_factory.GetMessageClass(desc)

    def build(values: dict) -> bytes:
        msg = cls()
        _fill(msg, values)
        return msg.SerializeToString()

    return message_dicts(desc, overrides or {}, required=required).map(build)


def request_bytes(
    desc: _d.Descriptor, overrides: dict | None = None, required: frozenset[str] = frozenset()
) -> st.SearchStrategy[bytes]:
    """Mostly well-formed messages of type desc; some raw bytes, some messages with bytes appended."""
    good = messages(desc, overrides, required)
    return st.one_of(
        *[good] * 6,
        st.binary(max_size=64),
        st.tuples(good, st.binary(min_size=1, max_size=16)).map(lambda t: t[0] + t[1]),
    )


# -- OpenAI HTTP -------------------------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(),
    st.text(max_size=30),  # surrogates included: JSON's \ud800 escape carries them
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def openai_bodies(model: str) -> st.SearchStrategy[dict]:
    """Chat or completion bodies: each known parameter absent, plausible, or any JSON value; extra keys too."""

    def param(plausible: st.SearchStrategy) -> st.SearchStrategy:
        return st.one_of(plausible, plausible, json_values)

    content = st.one_of(
        st.text(max_size=30),
        st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}), max_size=2),
    )
    message = st.fixed_dictionaries(
        {},
        optional={
            "role": param(st.sampled_from(["user", "system", "assistant", "developer"])),
            "content": param(content),
        },
    )
    known = {
        "model": param(st.one_of(st.just(model), st.text(max_size=12))),
        "messages": param(st.lists(param(message), min_size=1, max_size=3)),
        "prompt": param(st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=2))),
        "max_tokens": param(st.integers(-2, 8)),
        "max_completion_tokens": param(st.integers(-2, 8)),
        "temperature": param(st.floats(0, 2)),
        "top_p": param(st.floats(0, 1)),
        "seed": param(st.integers(-5, 2**70)),
        "stop": param(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3))),
        "user": param(st.text(max_size=10)),
        "service_tier": param(st.sampled_from(["auto", "default", "flex", "priority"])),
        "stream": param(st.booleans()),
        "stream_options": param(st.fixed_dictionaries({"include_usage": st.booleans()})),
        "n": param(st.integers(0, 3)),
        "logprobs": json_values,
        "ignore_eos": param(st.booleans()),
    }
    return st.fixed_dictionaries({}, optional={**known, "x_extra": json_values})


def json_bytes(value: object) -> bytes:
    """JSON text as a client would send it (a lone surrogate as its \\u escape)."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()
