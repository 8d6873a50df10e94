"""The sim's tokens: prompts through the fleet tokenizer, deterministic output tokens from its vocabulary."""

from __future__ import annotations

import random

from fleetserve.common.v1 import common_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.engine import sim_tokens as t
from shared import tokenizer


def test_prompts_are_encoded_by_the_fleet_tokenizer_with_bos():
    """A prompt's ids are exactly what shared/tokenizer gives (BOS first), so hashes match router and vLLM."""
    spec = common_pb2.GenerationSpec(prompt="Hello, world!")
    ids = t.prompt_token_ids(spec)
    assert ids == tokenizer.load().encode("Hello, world!") and ids[0] == tokenizer.load().bos_id


def test_chat_messages_use_the_chat_template():
    """Chat messages are rendered with the model's chat template and encoded without a second BOS."""
    msgs = [common_pb2.ChatMessage(role="user", content="Hi there")]
    ids = t.prompt_token_ids(common_pb2.GenerationSpec(messages=msgs))
    tok = tokenizer.load()
    assert ids == tok.encode_chat(msgs) and ids.count(tok.bos_id) == 1
    assert t.detokenize(ids).endswith("assistant\n\n")


@given(seed=st.integers(0, 2**64 - 1), position=st.integers(0, 100_000))
def test_output_tokens_are_plain_and_depend_only_on_digest_and_position(seed, position):
    """token_at is a pure function of (digest, position) and never names a special token (no EOS)."""
    d = t.prompt_digest(seed, [0, 5, 7])
    tok = t.token_at(d, position)
    assert 0 <= tok < t.VOCAB_SIZE and tok not in tokenizer.load().eos_ids and t.TOKEN_TEXT[tok]
    assert tok == t.token_at(t.prompt_digest(seed, [0, 5, 7]), position)


def test_seed_and_prompt_both_change_the_output():
    """A different seed or a different prompt gives a different sequence."""
    base = [t.token_at(t.prompt_digest(0, [0, 1, 2]), i) for i in range(20)]
    assert base != [t.token_at(t.prompt_digest(1, [0, 1, 2]), i) for i in range(20)]
    assert base != [t.token_at(t.prompt_digest(0, [0, 1, 3]), i) for i in range(20)]


def test_streamed_text_equals_the_tokenizers_decode():
    """Joining the per-token texts of generated ids gives exactly tokenizer.decode of them (what vLLM's
    incremental detokenizer would stream), for many random sequences."""
    rng = random.Random(3)
    for _ in range(200):
        d = rng.getrandbits(64)
        ids = [t.token_at(d, i) for i in range(64)]
        assert "".join(t.TOKEN_TEXT[i] for i in ids) == t.detokenize(ids)
