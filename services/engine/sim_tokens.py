"""The sim engine's toy tokenizer, chat template and vocabulary, and its deterministic choice of output tokens."""

from __future__ import annotations

import hashlib
import re
import struct
import zlib
from collections.abc import Sequence

from fleetserve.common.v1 import common_pb2

# Plain English words: generated text reads as words and every token's text is " word", so a token's text
# never depends on its neighbours (detokenization is a table lookup, as cheap as it can be).
_WORDS = """
the of and to in is was for on that with as by at from his her it an were are which this be or
has had not but have they their one you all been we there who would more will when can new also
other its into some time two out first after than them only may over most these years could such
through where made many before like between state being then both world under while city since during
well back three people year about those life later much what work each part same water high small
large long old great good right left place found second home early around house name day land way
local last used along public best family group power end game light river known still form war own
school called often however following several music among near set north against south within four
area number late point line away even until field young hand side make just book times west final
next five women open air best east story head road often team near full move down party night body
little king half close real strong form free body love field black white red blue green gold stone
fire wind rain snow sun moon star sea lake hill tree leaf root seed flower grass bird fish horse
dog cat bear wolf fox deer lion eagle river bridge tower wall gate door window room floor table chair
bed cup bowl plate bread milk salt sugar tea coffee wine apple orange grape lemon paper letter word
page story song poem voice sound music dance play show film art color shape line circle square point
edge corner center middle top bottom front rear inside outside above below near far early late soon
quick slow fast easy hard soft warm cold hot cool dry wet clean dark bright quiet loud deep wide thin
thick heavy light rich poor happy calm brave kind wise proud gentle honest simple plain clear true
ready able eager fresh sharp smooth rough sweet bitter sudden steady silent distant ancient modern
"""
# Duplicates removed, order kept, so a word's id is stable across runs and platforms.
WORDS: tuple[str, ...] = tuple(dict.fromkeys(_WORDS.split()))

BOS_ID = 0
FIRST_WORD_ID = 1
NUM_WORDS = len(WORDS)
VOCAB_SIZE = FIRST_WORD_ID + NUM_WORDS
# Text of each token id, looked up once per generated token.
TOKEN_TEXT: tuple[str, ...] = ("",) + tuple(" " + w for w in WORDS)

# Chat-template markers are one token each, as special tokens are in real tokenizers.
_PIECES = re.compile(r"<\|\w+\|>|\w+|[^\w\s]")
_M64 = (1 << 64) - 1


def render_chat(messages: Sequence[common_pb2.ChatMessage]) -> str:
    """Chat messages as one prompt text: "<|role|>\\ncontent\\n" per message, then "<|assistant|>\\n"."""
    parts = [f"<|{m.role}|>\n{m.content}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)


def tokenize(text: str) -> list[int]:
    """Token ids of text: BOS, then one id per word, punctuation mark or chat marker (a stable hash of it)."""
    ids = [BOS_ID]
    ids.extend(FIRST_WORD_ID + zlib.crc32(p.encode()) % NUM_WORDS for p in _PIECES.findall(text))
    return ids


def prompt_token_ids(spec: common_pb2.GenerationSpec) -> list[int]:
    """Token ids of a spec's prompt, or of its chat messages rendered with the template."""
    return tokenize(spec.prompt if spec.prompt else render_chat(spec.messages))


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
    return FIRST_WORD_ID + (z ^ (z >> 31)) % NUM_WORDS


def detokenize(ids: Sequence[int]) -> str:
    """The text of output token ids."""
    return "".join(TOKEN_TEXT[i] for i in ids)
