"""loadtest.relay_bench: every handler shape it times relays every message of every stream, and the tracker
variants it compares give the same bytes."""

from __future__ import annotations

import asyncio

from loadtest import relay_bench
from loadtest.hop_bench import chunks
from services.router.resume import ChunkTracker


def test_every_shape_relays_every_message():
    """bare and pumped handlers under 0 or 3 generator layers each deliver all n messages of every stream."""

    async def run() -> list[int]:
        shapes = [relay_bench.stack(name, layers) for name in ("bare", "pumped") for layers in (0, 3)]
        return [sum(await asyncio.gather(*(relay_bench.consume(s, 9) for _ in range(4)))) for s in shapes]

    assert asyncio.run(run()) == [36, 36, 36, 36]


def test_the_tracker_variants_relay_the_same_bytes():
    """The reference (a parse per chunk) and ChunkTracker.relay hand on hop_bench's chunks unchanged."""
    msgs = chunks(64)
    for fn in (relay_bench.parse_every_chunk, ChunkTracker.relay):
        t = ChunkTracker()
        t.next_attempt()
        assert [fn(t, m) for m in msgs] == msgs
    assert relay_bench.tracker_us(ChunkTracker.relay, msgs, 3) > 0
