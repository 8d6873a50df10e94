"""The sim's KV block pool: reference counts, LRU free queue, eviction of cached blocks, and its events."""

from __future__ import annotations

import pytest

from services.engine.block_pool import BlockPool
from shared.prefix_hash import block_hashes


def cache_chain(pool: BlockPool, tokens: list[int], salt: str = ""):
    """Allocate blocks for tokens, cache their full blocks, return (blocks, hashes)."""
    hashes = block_hashes(tokens, salt)
    blocks = pool.get_new_blocks(len(hashes))
    pool.cache_full_blocks(blocks, hashes, 0, len(hashes), tokens)
    return blocks, hashes


def test_fresh_blocks_come_first_in_id_order_and_counts_add_up():
    """New blocks are handed out in id order; used + free == total; asking for more than free fails."""
    pool = BlockPool(8)
    assert [b.block_id for b in pool.get_new_blocks(3)] == [0, 1, 2]
    assert (pool.num_used, pool.num_free) == (3, 5)
    with pytest.raises(ValueError):
        pool.get_new_blocks(6)


def test_cached_blocks_stay_hittable_after_free_until_evicted():
    """Freed cached blocks keep their hashes (a later request can hit them) until allocation takes them."""
    pool = BlockPool(2)
    blocks, hashes = cache_chain(pool, list(range(32)))
    pool.free_blocks(blocks)
    assert pool.num_free == 2 and all(pool.get_cached_block(h) for h in hashes)
    pool.take_events()
    pool.get_new_blocks(1)
    # The chain's tail was freed first in LRU order, so it is evicted first; the head survives.
    assert pool.get_cached_block(hashes[1]) is None and pool.get_cached_block(hashes[0]) is blocks[0]
    assert pool.take_events() == [("removed", [hashes[1]])]


def test_lru_evicts_the_least_recently_freed_chain_first():
    """Of two freed chains, the one freed earlier is evicted first."""
    pool = BlockPool(4)
    a, ha = cache_chain(pool, list(range(32)))
    b, hb = cache_chain(pool, list(range(100, 132)))
    pool.free_blocks(a)
    pool.free_blocks(b)
    pool.get_new_blocks(2)
    assert [pool.get_cached_block(h) for h in ha] == [None, None]
    assert all(pool.get_cached_block(h) for h in hb)


def test_touch_takes_shared_blocks_out_of_the_free_queue_and_counts_references():
    """A hit block referenced by two requests is freed only when both let go; while referenced it is safe."""
    pool = BlockPool(2)
    blocks, hashes = cache_chain(pool, list(range(16)))
    pool.free_blocks(blocks)
    pool.touch(blocks)
    pool.touch(blocks)
    assert blocks[0].ref_cnt == 2 and pool.num_free == 1
    pool.get_new_blocks(1)  # the other block; the referenced one cannot be evicted
    assert pool.get_cached_block(hashes[0]) is blocks[0]
    pool.free_blocks(blocks)
    assert pool.num_free == 0
    pool.free_blocks(blocks)
    assert pool.num_free == 1


def test_stored_event_carries_the_chain_parent_and_tokens():
    """Caching blocks 1..2 of a chain reports their hashes, block 0's hash as parent, and their tokens."""
    pool = BlockPool(4)
    tokens = list(range(48))
    hashes = block_hashes(tokens)
    blocks = pool.get_new_blocks(3)
    pool.cache_full_blocks(blocks, hashes, 0, 1, tokens)
    pool.cache_full_blocks(blocks, hashes, 1, 3, tokens)
    assert pool.take_events() == [
        ("stored", [hashes[0]], None, tokens[:16]),
        ("stored", hashes[1:], hashes[0], tokens[16:]),
    ]


def test_a_duplicate_hash_keeps_the_first_block():
    """Two requests that computed the same block: the second block is not cached and no event repeats it."""
    pool = BlockPool(4)
    tokens = list(range(16))
    first, hashes = cache_chain(pool, tokens)
    pool.take_events()
    second = pool.get_new_blocks(1)
    pool.cache_full_blocks(second, hashes, 0, 1, tokens)
    assert pool.get_cached_block(hashes[0]) is first[0] and second[0].block_hash is None
    assert pool.take_events() == []


def test_reset_clears_only_an_unreferenced_cache():
    """reset_prefix_cache refuses while blocks are in use, else drops every hash with an all-cleared event."""
    pool = BlockPool(2)
    blocks, hashes = cache_chain(pool, list(range(16)))
    assert not pool.reset_prefix_cache()
    pool.free_blocks(blocks)
    pool.take_events()
    assert pool.reset_prefix_cache() and pool.get_cached_block(hashes[0]) is None
    assert pool.take_events() == [("cleared",)]
