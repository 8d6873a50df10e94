"""The fleet's tokenizer: text <-> token ids and chat rendering, identical in the sim, the router and vLLM."""

from __future__ import annotations

import functools
import gzip
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from infra.models.spec import BOS, BUNDLED_TOKENIZER, END_HEADER, EOS, EOT, START_HEADER


class FleetTokenizer:
    """A `tokenizers` tokenizer plus the chat template of infra/models/spec.py rendered in Python (a unit test
    holds it equal to the Jinja that vLLM renders). Encoding runs in Rust; share one instance per model."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        self.bos_id = tokenizer.token_to_id(BOS)
        # Generation ends at either; vLLM reads the same pair from generation_config.json.
        self.eos_ids = frozenset(
            i for i in (tokenizer.token_to_id(EOT), tokenizer.token_to_id(EOS)) if i is not None
        )

    def encode(self, text: str, *, add_bos: bool = True) -> list[int]:
        """Token ids of text, with the BOS token first unless add_bos is False."""
        return self._tok.encode(text, add_special_tokens=add_bos).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids, special tokens dropped."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def decode_stream(self) -> DecodeStream:
        """An incremental detokenizer: step(tokenizer, id) returns the new text or None (mid-character)."""
        return DecodeStream(skip_special_tokens=True)

    @property
    def raw(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer` (for DecodeStream.step)."""
        return self._tok

    @staticmethod
    def render_chat(messages: Sequence[Any], *, add_generation_prompt: bool = True) -> str:
        """The prompt text of a chat (objects with .role and .content, or dicts), BOS included."""
        parts = [BOS]
        for m in messages:
            role, content = (m["role"], m["content"]) if isinstance(m, dict) else (m.role, m.content)
            parts.append(f"{START_HEADER}{role}{END_HEADER}\n\n{content}{EOT}")
        if add_generation_prompt:
            parts.append(f"{START_HEADER}assistant{END_HEADER}\n\n")
        return "".join(parts)

    def encode_chat(self, messages: Sequence[Any]) -> list[int]:
        """Token ids of a chat prompt (the rendered text already starts with BOS)."""
        return self.encode(self.render_chat(messages), add_bos=False)

    def encode_spec(self, spec: Any) -> list[int]:
        """Token ids of a GenerationSpec's prompt: spec.prompt (BOS first), else spec.messages rendered."""
        return self.encode(spec.prompt) if spec.prompt else self.encode_chat(spec.messages)


@functools.cache
def load(model_dir: str | None = None) -> FleetTokenizer:
    """The tokenizer in model_dir/tokenizer.json, or the bundled one when model_dir is None. Cached."""
    if model_dir is None:
        return FleetTokenizer(Tokenizer.from_str(gzip.decompress(BUNDLED_TOKENIZER.read_bytes()).decode()))
    return FleetTokenizer(Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")))
