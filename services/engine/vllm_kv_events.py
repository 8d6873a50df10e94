"""vLLM's KV events as fleet KV events: read vLLM's ZMQ publisher, recompute fleet block hashes, and index what
is cached so a subscriber can be sent a snapshot."""

from __future__ import annotations

import asyncio
import contextlib
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from fleetserve.engine.v1 import engine_service_pb2 as pb

from services.engine.kv_events import block_removed, block_stored
from shared.prefix_hash import BLOCK_SIZE, hash_block

log = structlog.get_logger(__name__)

# vLLM tags its KV events (msgspec tagged structs) with their class names.
_STORED, _REMOVED, _CLEARED = "BlockStored", "BlockRemoved", "AllBlocksCleared"


@dataclass(slots=True)
class _Cached:
    """A block vLLM holds, in fleet terms: its fleet hash, its parent's, and its tokens (packed, 64 bytes)."""

    fleet_hash: int
    parent: int | None
    tokens: bytes


@dataclass(slots=True)
class TranslatorStats:
    """Events the translation could not express in fleet hashes (each a counter since start)."""

    batches: int = 0
    # Partial blocks (vLLM caches the tail of a prompt when asked): fleet hashes cover full blocks only.
    partial_blocks: int = 0
    # Stored blocks whose parent was never seen (an event lost before this reader connected).
    orphan_blocks: int = 0
    # Gaps in vLLM's publisher sequence numbers (events dropped between vLLM and this reader).
    seq_gaps: int = 0


def salt_of(extra_keys: Sequence[Any] | None) -> str:
    """The cache salt vLLM mixed into a chain's first block: vLLM puts (lora name, multi-modal keys, cache_salt,
    prompt-embeds keys) in a block's extra keys, and this backend sends neither LoRA nor multi-modal inputs nor
    prompt embeddings, so the first block's keys are (cache_salt,) or None for an unsalted request."""
    if not extra_keys or not extra_keys[0]:
        return ""
    strings = [k for k in extra_keys[0] if isinstance(k, str)]
    return strings[-1] if strings else ""


class KvEventTranslator:
    """vLLM block hashes -> fleet block hashes (shared/prefix_hash.py), recomputed from each stored block's
    token ids, its parent and the tenant's salt. vLLM's own hashes cannot be reused: they are SHA-256 over
    pickled tuples with a per-process random seed, so no router could compute them. The map from vLLM hash to
    fleet block doubles as the index of everything cached, for snapshots."""

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self.stats = TranslatorStats()
        self._blocks: dict[Any, _Cached] = {}

    def __len__(self) -> int:
        return len(self._blocks)

    def translate(self, events: Iterable[Mapping[str, Any]]) -> list[pb.KvEvent]:
        """Fleet events for one vLLM batch's events (decoded msgpack maps, tagged by "type"), in order."""
        self.stats.batches += 1
        out: list[pb.KvEvent] = []
        for ev in events:
            kind = ev.get("type")
            if kind == _STORED:
                stored = self._stored(ev)
                if stored is not None:
                    out.append(stored)
            elif kind == _REMOVED:
                removed = [c.fleet_hash for h in ev["block_hashes"] if (c := self._blocks.pop(h, None))]
                if removed:
                    out.append(block_removed(removed))
            elif kind == _CLEARED:
                self._blocks.clear()
                out.append(pb.KvEvent(all_blocks_cleared=pb.AllBlocksCleared()))
        return out

    def _stored(self, ev: Mapping[str, Any]) -> pb.KvEvent | None:
        bs = self.block_size
        hashes: list[Any] = ev["block_hashes"]
        tokens: list[int] = ev["token_ids"]
        if ev.get("block_size") != bs or len(tokens) != len(hashes) * bs:
            self.stats.partial_blocks += len(hashes)
            return None
        vparent = ev.get("parent_block_hash")
        if vparent is None:
            parent: int | None = None
            salt = salt_of(ev.get("extra_keys"))
        else:
            known = self._blocks.get(vparent)
            if known is None:
                self.stats.orphan_blocks += len(hashes)
                return None
            parent, salt = known.fleet_hash, ""
        first_parent = parent
        fleet: list[int] = []
        blocks = self._blocks
        for i, vhash in enumerate(hashes):
            chunk = tokens[i * bs : (i + 1) * bs]
            h = hash_block(parent, chunk, salt)
            blocks[vhash] = _Cached(h, parent, array("I", chunk).tobytes())
            fleet.append(h)
            parent = h
        return block_stored(fleet, first_parent, tokens, bs)

    def snapshot(self) -> list[pb.KvEvent]:
        """One BlockStored per cached block, parents first (a child is only ever stored after its parent)."""
        bs = self.block_size
        return [
            block_stored([c.fleet_hash], c.parent, array("I", c.tokens).tolist(), bs)
            for c in self._blocks.values()
        ]


class ZmqKvEventReader:
    """Subscribes to vLLM's ZMQ KV-event publisher (PUB socket in the engine-core process, frames
    (topic, seq as 8 big-endian bytes, msgpack KVEventBatch)) and hands each translated batch to publish()
    on the event loop, where the KvEventHub lives."""

    def __init__(
        self,
        endpoint: str,
        translator: KvEventTranslator,
        publish: Callable[[list[pb.KvEvent], float], None],
        topic: str = "",
    ) -> None:
        self.endpoint = endpoint
        self.topic = topic
        self.translator = translator
        self._publish = publish
        self._task: asyncio.Task | None = None
        self._socket = None
        self._last_seq = -1

    def start(self) -> None:
        """Connect and start reading (before any request runs: ZMQ drops what is published before a SUB joins)."""
        import msgspec
        import zmq
        import zmq.asyncio

        ctx = zmq.asyncio.Context.instance()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # no limit here: dropping would desynchronise the index
        sock.connect(self.endpoint)
        sock.setsockopt(zmq.SUBSCRIBE, self.topic.encode())
        self._socket = sock
        self._task = asyncio.get_running_loop().create_task(
            self._run(sock, msgspec.msgpack.Decoder()), name="engine.vllm_kv_events"
        )

    async def _run(self, sock, decoder) -> None:
        translator, publish = self.translator, self._publish
        while True:
            try:
                frames = await sock.recv_multipart()
                if len(frames) != 3:
                    continue
                _, seq_bytes, payload = frames
                seq = int.from_bytes(seq_bytes, "big", signed=True)
                if self._last_seq >= 0 and seq != self._last_seq + 1:
                    translator.stats.seq_gaps += 1
                    log.warning("engine.kv_events_gap", expected=self._last_seq + 1, got=seq)
                self._last_seq = seq
                # KVEventBatch is an array-like struct: [ts, events, data_parallel_rank?].
                batch = decoder.decode(payload)
                events = translator.translate(batch[1])
                if events:
                    publish(events, float(batch[0]))
            except asyncio.CancelledError:
                raise
            except Exception:
                # One undecodable batch must not end the stream of every later one.
                log.exception("engine.kv_events_failed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None
