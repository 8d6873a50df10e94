"""The toy tokenizer, chat template and deterministic output tokens of the sim engine."""

from __future__ import annotations

from fleetserve.common.v1 import common_pb2
from hypothesis import given
from hypothesis import strategies as st

from services.engine import sim_tokens as t


def test_vocabulary_is_a_few_hundred_plain_words():
    """The vocabulary holds a few hundred distinct lowercase words; each token's text is " word"."""
    assert 200 <= t.NUM_WORDS <= 1000
    assert len(set(t.WORDS)) == t.NUM_WORDS
    assert all(w.isalpha() and w.islower() for w in t.WORDS)
    assert t.TOKEN_TEXT[t.FIRST_WORD_ID] == " " + t.WORDS[0]


def test_tokenize_splits_words_and_punctuation_after_bos():
    """BOS, then one token per word or punctuation mark; the same text always gives the same ids."""
    ids = t.tokenize("Hello, world!")
    assert len(ids) == 1 + 4 and ids[0] == t.BOS_ID
    assert t.tokenize("Hello, world!") == ids
    assert t.tokenize("Hello, there!") != ids


def test_chat_template_renders_roles_and_the_assistant_turn():
    """Messages render as <|role|> blocks ending with the assistant marker; markers are single tokens."""
    msgs = [
        common_pb2.ChatMessage(role="system", content="Be brief."),
        common_pb2.ChatMessage(role="user", content="Hi"),
    ]
    text = t.render_chat(msgs)
    assert text == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert len(t.tokenize(text)) == 1 + 1 + 3 + 1 + 1 + 1
    spec = common_pb2.GenerationSpec(messages=msgs)
    assert t.prompt_token_ids(spec) == t.tokenize(text)


@given(seed=st.integers(0, 2**64 - 1), position=st.integers(0, 10**6))
def test_output_tokens_are_words_and_depend_only_on_digest_and_position(seed, position):
    """token_at is a pure function of (digest, position) and always names a word."""
    d = t.prompt_digest(seed, [0, 5, 7])
    tok = t.token_at(d, position)
    assert t.FIRST_WORD_ID <= tok < t.VOCAB_SIZE
    assert tok == t.token_at(t.prompt_digest(seed, [0, 5, 7]), position)


def test_seed_and_prompt_change_the_output():
    """A different seed or prompt gives a different sequence of tokens."""
    base = [t.token_at(t.prompt_digest(0, [0, 1, 2]), i) for i in range(20)]
    assert base != [t.token_at(t.prompt_digest(1, [0, 1, 2]), i) for i in range(20)]
    assert base != [t.token_at(t.prompt_digest(0, [0, 1, 3]), i) for i in range(20)]
