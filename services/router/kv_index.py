"""The precise prefix index of kv_aware: each replica's cached blocks exactly as its engine reports them over
EngineService.SubscribeKvEvents (a snapshot first, then stored/removed batches), and the subscriptions."""

from __future__ import annotations

import asyncio
import enum
import random
from collections.abc import Awaitable, Callable, Iterable, Sequence

import grpc
import structlog
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc

from services.router.prefix_index import longest_runs
from shared.channels import open_channel
from shared.errors import KvEventsOff, details_of
from shared.resilience import full_jitter

log = structlog.get_logger(__name__)


class KvIndex:
    """Block hash -> replicas that hold it, from engine KV events. Hashes are the fleet's prefix hashes, whose
    chain starts from the tenant's cache salt, so a block of one tenant never has the hash of another tenant's
    block (64-bit hashes: a collision is a ~2^-64 event) and the index needs no tenant key of its own."""

    def __init__(self) -> None:
        self._holders: dict[int, set[str]] = {}
        self._blocks: dict[str, set[int]] = {}
        self._seq: dict[str, int] = {}

    def apply(self, replica_id: str, batch: engine_pb.KvEventBatch) -> bool:
        """Apply one batch from replica_id's stream. False when the batch's seq shows a gap (events were
        dropped): the index of that replica is then cleared and the caller must resubscribe with a snapshot."""
        if batch.snapshot:
            self.clear(replica_id)
        else:
            last = self._seq.get(replica_id)
            if last is None or batch.seq != last + 1:
                log.warning("router.kv_events_gap", replica=replica_id, expected=last, seq=batch.seq)
                self.clear(replica_id)
                self._seq.pop(replica_id, None)
                return False
        self._seq[replica_id] = batch.seq
        blocks = self._blocks.setdefault(replica_id, set())
        for ev in batch.events:
            kind = ev.WhichOneof("event")
            if kind == "block_stored":
                for h in ev.block_stored.block_hashes:
                    blocks.add(h)
                    self._holders.setdefault(h, set()).add(replica_id)
            elif kind == "block_removed":
                for h in ev.block_removed.block_hashes:
                    blocks.discard(h)
                    self._drop(h, replica_id)
            elif kind == "all_blocks_cleared":
                self.clear(replica_id)
                blocks = self._blocks.setdefault(replica_id, set())
        return True

    def _drop(self, h: int, replica_id: str) -> None:
        held = self._holders.get(h)
        if held is not None:
            held.discard(replica_id)
            if not held:
                del self._holders[h]

    def clear(self, replica_id: str) -> None:
        """Forget every block of replica_id (a snapshot or a reset follows, or the replica left)."""
        for h in self._blocks.pop(replica_id, ()):
            self._drop(h, replica_id)

    def remove(self, replica_id: str) -> None:
        self.clear(replica_id)
        self._seq.pop(replica_id, None)

    def match(self, hashes: Sequence[int], replica_ids: Iterable[str]) -> dict[str, int]:
        """Per replica, the longest run of hashes (from the first) it has cached."""
        return longest_runs(hashes, [self._holders.get(h) for h in hashes], replica_ids)

    def blocks(self, replica_id: str) -> int:
        return len(self._blocks.get(replica_id, ()))

    def synced(self, replica_id: str) -> bool:
        """Whether a snapshot (or a gapless stream since one) of replica_id has been applied."""
        return replica_id in self._seq


ChannelFactory = Callable[[str], grpc.aio.Channel]


class KvStreamState(enum.IntEnum):
    """Where the KV-event stream of a followed replica stands (the values are the Prometheus gauge's)."""

    SYNCED = 0  # a snapshot applied, the stream since followed: the index holds the replica's cache
    CONNECTING = 1  # no snapshot yet, or the stream broke and is retried with backoff
    OFF = 2  # the engine publishes no KV events (KV_EVENTS_OFF): scored by load alone, retried slowly


# Told (replica id, model, state) on every change; state None: the replica is no longer followed.
StateListener = Callable[[str, str, "KvStreamState | None"], None]

_OFF = "kv_events_off"  # _one_stream's answer for a replica that publishes none


def _insecure_channel(address: str) -> grpc.aio.Channel:
    return open_channel(address)


class KvSubscriptions:
    """One SubscribeKvEvents stream per replica feeding a KvIndex, always with include_snapshot, so a router
    that restarts or falls behind (a seq gap) rebuilds the replica's index from what the engine holds now.
    Streams reconnect with full-jitter backoff and are renewed before their (long, finite) deadline. A replica
    that publishes no KV events (a vLLM engine without --vllm-kv-events: FAILED_PRECONDITION KV_EVENTS_OFF) is
    warned about once, stays in the fleet with nothing cached in the index (kv_aware scores it by load alone),
    and is asked again every backoff_max_s, quietly, so a restart with events is picked up."""

    def __init__(
        self,
        index: KvIndex,
        channel_factory: ChannelFactory = _insecure_channel,
        *,
        stream_timeout_s: float = 600.0,
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_state: StateListener | None = None,
    ) -> None:
        self.index = index
        self._channel_factory = channel_factory
        self.stream_timeout_s = stream_timeout_s
        self.backoff_base_s, self.backoff_max_s = backoff_base_s, backoff_max_s
        self._sleep = sleep
        self._on_state = on_state
        self._tasks: dict[str, tuple[str, asyncio.Task]] = {}
        # replica id -> (model, state of its stream), for the gauge and tests.
        self._states: dict[str, tuple[str, KvStreamState]] = {}
        self.subscribed = 0  # streams opened, reconnects included (status and tests)
        # Replicas told to be off (router.kv_events_off): not the state, which a crash between "off" and a restart
        # with events turns to connecting; "on" is said for each of them, "off" once until then.
        self._warned_off: set[str] = set()

    def ensure(self, replica_id: str, address: str, model: str = "") -> None:
        """Follow replica_id (of model) at address (restart the stream if the address changed). Needs a
        running loop."""
        current = self._tasks.get(replica_id)
        if current is not None and current[0] == address and not current[1].done():
            return
        if current is not None:
            current[1].cancel()
        if replica_id not in self._states:
            self._set(replica_id, KvStreamState.CONNECTING, model)
        task = asyncio.get_running_loop().create_task(
            self._follow(replica_id, address), name=f"router.kv_events.{replica_id}"
        )
        self._tasks[replica_id] = (address, task)

    def state(self, replica_id: str) -> KvStreamState | None:
        """Where replica_id's stream stands; None when it is not followed."""
        entry = self._states.get(replica_id)
        return entry[1] if entry is not None else None

    def drop(self, replica_id: str) -> None:
        entry = self._tasks.pop(replica_id, None)
        if entry is not None:
            entry[1].cancel()
        self.index.remove(replica_id)
        self._forget(replica_id)

    async def close(self) -> None:
        tasks = [t for _, t in self._tasks.values()]
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for replica_id in list(self._states):
            self._forget(replica_id)

    def _set(self, replica_id: str, state: KvStreamState, model: str | None = None) -> None:
        old = self._states.get(replica_id)
        if model is None:
            model = old[0] if old is not None else ""
        if old == (model, state):
            return
        self._states[replica_id] = (model, state)
        if self._on_state is not None:
            self._on_state(replica_id, model, state)

    def _forget(self, replica_id: str) -> None:
        self._warned_off.discard(replica_id)
        old = self._states.pop(replica_id, None)
        if old is not None and self._on_state is not None:
            self._on_state(replica_id, old[0], None)

    async def _follow(self, replica_id: str, address: str) -> None:
        channel = self._channel_factory(address)
        stub = engine_grpc.EngineServiceStub(channel)
        attempt = 0
        try:
            while True:
                reason = await self._one_stream(stub, replica_id)
                if reason is None:
                    attempt = 0
                    continue  # renewed or resynced at once
                if reason == _OFF:
                    if replica_id not in self._warned_off:
                        # Once per replica (until it syncs or leaves): a retry every few seconds would flood.
                        self._warned_off.add(replica_id)
                        log.warning(
                            "router.kv_events_off",
                            replica=replica_id,
                            address=address,
                            effect="kv_aware scores this replica by load alone (no cached blocks known)",
                            fix="restart its vLLM engine with --vllm-kv-events, or route this model with "
                            "another policy (cache_aware needs no KV events)",
                            retry_every_s=self.backoff_max_s,
                        )
                        self._set(replica_id, KvStreamState.OFF)
                    attempt = 0
                    await self._sleep(self.backoff_max_s)  # slowly: it changes only when the engine restarts
                    continue
                self._set(replica_id, KvStreamState.CONNECTING)
                delay = full_jitter(attempt, self.backoff_base_s, self.backoff_max_s, random)
                log.info(
                    "router.kv_events_broken", replica=replica_id, reason=reason, retry_in_s=round(delay, 3)
                )
                attempt += 1
                await self._sleep(delay)
        finally:
            await channel.close(grace=None)

    async def _one_stream(self, stub, replica_id: str) -> str | None:
        """Follow one stream until it ends; None to resubscribe at once, else why it broke (back off)."""
        call = stub.SubscribeKvEvents(
            engine_pb.SubscribeKvEventsRequest(include_snapshot=True), timeout=self.stream_timeout_s
        )
        self.subscribed += 1
        got_any = False
        try:
            async for resp in call:
                if not self.index.apply(replica_id, resp.batch):
                    return None  # a gap: resubscribe for a fresh snapshot
                if not got_any:
                    got_any = True
                    if replica_id in self._warned_off:
                        self._warned_off.discard(replica_id)
                        log.info("router.kv_events_on", replica=replica_id)  # restarted with events
                    self._set(replica_id, KvStreamState.SYNCED)
            return "stream ended"
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and got_any:
                return None
            if e.code() == grpc.StatusCode.FAILED_PRECONDITION and details_of(e).reason == KvEventsOff.reason:
                return _OFF
            return f"{e.code().name}: {e.details()}"
        finally:
            call.cancel()
            # What this stream said may be stale from now on: forget it until the next snapshot.
            self.index.remove(replica_id)
