"""The fleet's model shapes and tokenizer constants, shared by the generator, the tokenizer and the sim."""

from __future__ import annotations

from pathlib import Path

# A byte-level BPE of 32,000 entries (Llama-2 sized), so config.json's vocab_size equals the tokenizer's and
# random (dummy) weights never sample an id the tokenizer cannot decode.
VOCAB_SIZE = 32000
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
EOT = "<|eot_id|>"
START_HEADER = "<|start_header_id|>"
END_HEADER = "<|end_header_id|>"
SPECIAL_TOKENS = (BOS, EOS, EOT, START_HEADER, END_HEADER)

BUNDLED_TOKENIZER = Path(__file__).with_name("tokenizer.json.gz")

# Llama-shaped models. "1b" is TinyLlama-1.1B's shape; "3b" and "8b" are Llama 3.2 3B's and Llama 3 8B's
# with this vocabulary. "tiny" is for quick CPU smoke tests of the vLLM backend.
SHAPES: dict[str, dict[str, int | float]] = {
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rope_theta=10000.0,
    ),
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500000.0,
    ),
}

# The chat template, as Jinja for tokenizer_config.json (vLLM and transformers render it); shared.tokenizer
# renders the same text in Python, and a unit test holds the two equal.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
