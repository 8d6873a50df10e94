"""Prefix block hashes: chained, full blocks only, salted per tenant."""

from __future__ import annotations

from shared.prefix_hash import BLOCK_SIZE, block_hashes, hash_block


def test_only_full_blocks_are_hashed():
    """A trailing partial block has no hash; limit caps the count."""
    assert len(block_hashes(list(range(BLOCK_SIZE * 3 + 5)))) == 3
    assert block_hashes(list(range(BLOCK_SIZE - 1))) == []
    assert len(block_hashes(list(range(BLOCK_SIZE * 3)), limit=2)) == 2


def test_hashes_chain_so_equal_blocks_after_different_prefixes_differ():
    """A block's hash covers its parent: the same tokens after a different first block hash differently."""
    a = block_hashes([1] * BLOCK_SIZE + [7] * BLOCK_SIZE)
    b = block_hashes([2] * BLOCK_SIZE + [7] * BLOCK_SIZE)
    assert a[1] != b[1]
    assert a[1] == hash_block(a[0], [7] * BLOCK_SIZE)


def test_shared_prefix_shares_leading_hashes():
    """Two prompts with a common prefix of k full blocks share exactly their first k hashes."""
    common = list(range(BLOCK_SIZE * 2))
    a = block_hashes(common + [5] * BLOCK_SIZE)
    b = block_hashes(common + [6] * BLOCK_SIZE)
    assert a[:2] == b[:2] and a[2] != b[2]


def test_salt_separates_tenants_all_along_the_chain():
    """Different cache salts give different hashes for every block, not only the first."""
    toks = list(range(BLOCK_SIZE * 4))
    a, b = block_hashes(toks, "tenant-a"), block_hashes(toks, "tenant-b")
    assert all(x != y for x, y in zip(a, b, strict=True))
    assert block_hashes(toks, "tenant-a") == a
