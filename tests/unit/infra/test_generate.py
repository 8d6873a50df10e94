"""The model-directory generator writes what vLLM reads, consistent with the bundled tokenizer."""

from __future__ import annotations

import json

import pytest

from infra.models.generate import generate
from infra.models.spec import SHAPES, VOCAB_SIZE
from shared import tokenizer


@pytest.mark.parametrize("size", sorted(SHAPES))
def test_model_dir_is_llama_shaped_with_the_tokenizers_vocab(tmp_path, size):
    """config.json is a Llama config whose vocab equals the tokenizer's; eos ids are the tokenizer's."""
    out = generate(tmp_path / size, size)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == VOCAB_SIZE
    tok = tokenizer.load(str(out))
    assert tok.vocab_size == VOCAB_SIZE
    assert set(config["eos_token_id"]) == set(tok.eos_ids)
    assert config["bos_token_id"] == tok.bos_id
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())


def test_generated_tokenizer_encodes_like_the_bundled_one(tmp_path):
    """The model directory's tokenizer.json is the bundled tokenizer, so hashes agree across the fleet."""
    out = generate(tmp_path / "m", "tiny", max_model_len=2048)
    text = "The same prompt, the same tokens."
    assert tokenizer.load(str(out)).encode(text) == tokenizer.load().encode(text)
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 2048


def test_unknown_size_is_refused(tmp_path):
    """An unknown size names the available ones."""
    with pytest.raises(ValueError, match="available"):
        generate(tmp_path / "x", "70b")
