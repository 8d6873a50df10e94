"""The sim engine's text <-> tokens: the fleet's real tokenizer (shared/tokenizer.py) for prompts, and a
deterministic choice of output tokens from its vocabulary."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from fleetserve.common.v1 import common_pb2

from services.engine.sim_behaviour import REFUSAL_TEXT
from shared import tokenizer

TOKENIZER = tokenizer.load()
VOCAB_SIZE = TOKENIZER.vocab_size
# The text of every token id on its own (special tokens are ""), decoded once at import (~40 ms).
TOKEN_TEXT: tuple[str, ...] = tuple(
    TOKENIZER.raw.decode_batch([[i] for i in range(VOCAB_SIZE)], skip_special_tokens=True)
)
# Output tokens are drawn from ids whose text stands alone: not special (so no EOS: the sim ends by length or
# stop string, as with ignore_eos) and not a fragment of a UTF-8 character. For these the byte-level decoder
# makes decode(ids) == "".join(TOKEN_TEXT[i] for i in ids) (a unit test holds it), so streaming text is a
# table lookup per token instead of a DecodeStream step: the same text at a fraction of the cost.
OUTPUT_IDS: tuple[int, ...] = tuple(i for i, s in enumerate(TOKEN_TEXT) if s and "\ufffd" not in s)
_NUM_OUTPUT = len(OUTPUT_IDS)
# What a version planted to refuse answers (sim_behaviour.py).
REFUSAL_IDS: tuple[int, ...] = tuple(TOKENIZER.encode(REFUSAL_TEXT, add_bos=False))
_M64 = (1 << 64) - 1


def prompt_token_ids(spec: common_pb2.GenerationSpec) -> list[int]:
    """Token ids of a spec's prompt (BOS first), or of its chat messages rendered with the chat template."""
    return TOKENIZER.encode_spec(spec)


def prompt_digest(seed: int, prompt_ids: Sequence[int]) -> int:
    """A 64-bit digest of (seed, prompt tokens): with the position, all that an output token depends on."""
    h = hashlib.blake2b(struct.pack("<Q", seed & _M64), digest_size=8)
    h.update(struct.pack(f"<{len(prompt_ids)}I", *prompt_ids))
    return int.from_bytes(h.digest(), "little")


def token_at(digest: int, position: int) -> int:
    """The output token at position (0 = the first generated token) for a prompt digest (splitmix64): the same
    whatever the batch, the timing or the replica, so a resumed generation continues with the same text."""
    z = (digest + (position + 1) * 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return OUTPUT_IDS[(z ^ (z >> 31)) % _NUM_OUTPUT]


def detokenize(ids: Sequence[int]) -> str:
    """The text of token ids, as the tokenizer decodes them."""
    return TOKENIZER.decode(ids)
