"""The fleet tokenizer: round trips, chat rendering equal to the Jinja template vLLM renders, streaming decode."""

from __future__ import annotations

import jinja2
from fleetserve.common.v1 import common_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.models.spec import BOS, CHAT_TEMPLATE, VOCAB_SIZE
from shared import tokenizer


def test_bundled_tokenizer_has_the_model_vocab_and_bos_first():
    """The bundled tokenizer has config.json's vocab size and starts every encoding with BOS."""
    tok = tokenizer.load()
    assert tok.vocab_size == VOCAB_SIZE
    ids = tok.encode("Hello, world")
    assert ids[0] == tok.bos_id and len(ids) > 2
    assert tok.encode("Hello", add_bos=False)[0] != tok.bos_id


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=200).filter(lambda t: "<|" not in t))
def test_decode_inverts_encode(text):
    """Any text without a special-token marker survives encode then decode unchanged (byte-level BPE)."""
    tok = tokenizer.load()
    assert tok.decode(tok.encode(text)) == text


def test_a_special_token_written_in_text_is_that_token_and_decodes_to_nothing():
    """As with Hugging Face tokenizers (and so vLLM), a special token's literal text in a prompt encodes as the
    special token itself, which decode drops: the one exception to the round trip above (hypothesis found it)."""
    tok = tokenizer.load()
    ids = tok.encode("a<|end_of_text|>b", add_bos=False)
    assert tok.decode(ids) == "ab"
    assert len(ids) == len(tok.encode("a", add_bos=False)) + 1 + len(tok.encode("b", add_bos=False))


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user", "assistant"]), "content": st.text()}
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
)
def test_chat_rendering_matches_the_jinja_template(messages, add_generation_prompt):
    """render_chat gives exactly what the chat template in tokenizer_config.json gives."""
    expected = (
        jinja2.Environment()
        .from_string(CHAT_TEMPLATE)
        .render(messages=messages, bos_token=BOS, add_generation_prompt=add_generation_prompt)
    )
    assert (
        tokenizer.FleetTokenizer.render_chat(messages, add_generation_prompt=add_generation_prompt)
        == expected
    )


def test_streaming_decode_concatenates_to_the_full_text():
    """Incremental decoding token by token yields the same text as decoding all at once, multi-byte included."""
    tok = tokenizer.load()
    text = "naïve café — 東京 🚀 done"
    ids = tok.encode(text, add_bos=False)
    stream = tok.decode_stream()
    pieces = [stream.step(tok.raw, i) for i in ids]
    assert "".join(p for p in pieces if p) == text


def test_encode_spec_takes_the_prompt_else_the_chat():
    """A spec's prompt is encoded with BOS; a spec with messages only gets the chat template's ids."""
    tok = tokenizer.load()
    msgs = [common_pb2.ChatMessage(role="user", content="hi there")]
    assert tok.encode_spec(common_pb2.GenerationSpec(prompt="hi there")) == tok.encode("hi there")
    assert tok.encode_spec(common_pb2.GenerationSpec(messages=msgs)) == tok.encode_chat(msgs)
    assert tok.encode("hi there") != tok.encode_chat(msgs)
