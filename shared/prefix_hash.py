"""Hash-chained prefix-cache block hashes, computed the same way by the sim engine, the router and the vLLM
backend's KV-event translation, so a router can score replicas by blocks the engines report."""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

BLOCK_SIZE = 16
_MASK = (1 << 64) - 1


def hash_block(parent: int | None, tokens: Sequence[int], salt: str = "") -> int:
    """The 64-bit hash of one full block: it covers its parent's hash (None for the first block), its token
    ids and, on the first block only, the tenant's cache salt (as vLLM salts only the first block; the chain
    carries it to the rest)."""
    h = blake2b(digest_size=8)
    if parent is None:
        h.update(b"\x00" + salt.encode())
    else:
        h.update(b"\x01" + (parent & _MASK).to_bytes(8, "little"))
    h.update(array("I", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def block_hashes(
    token_ids: Sequence[int], salt: str = "", *, block_size: int = BLOCK_SIZE, limit: int | None = None
) -> list[int]:
    """Hashes of the full blocks of token_ids (a trailing partial block has none), at most limit of them."""
    n = len(token_ids) // block_size
    if limit is not None:
        n = min(n, limit)
    out: list[int] = []
    parent: int | None = None
    for i in range(n):
        parent = hash_block(parent, token_ids[i * block_size : (i + 1) * block_size], salt)
        out.append(parent)
    return out
