"""Membership: registry watch events applied to the router's view, routability, and reconnecting."""

from __future__ import annotations

import asyncio
import random

import grpc
from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as reg

from services.router.membership import Change, Membership


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def replica(rid: str, model: str = "m", state=reg.REPLICA_STATE_SERVING, running: int = 0) -> reg.Replica:
    return reg.Replica(
        replica_id=rid,
        address=f"127.0.0.1:{5000 + len(rid)}",
        model=model,
        backend="sim",
        state=state,
        load=common_pb2.ReplicaLoad(running=running),
    )


def event(kind, *replicas) -> reg.WatchReplicasResponse:
    return reg.WatchReplicasResponse(type=kind, replicas=replicas)


SNAPSHOT, ADDED = reg.WATCH_EVENT_TYPE_SNAPSHOT, reg.WATCH_EVENT_TYPE_ADDED
UPDATED, REMOVED = reg.WATCH_EVENT_TYPE_UPDATED, reg.WATCH_EVENT_TYPE_REMOVED


def ids(replicas) -> list[str]:
    return sorted(r.replica_id for r in replicas)


def test_snapshot_replaces_everything_and_sets_ready():
    """A snapshot is the whole membership: replicas missing from it are removed; ready is set."""
    m = Membership()
    assert not m.ready.is_set()
    m.apply(event(SNAPSHOT, replica("a"), replica("b")))
    assert m.ready.is_set()
    changes = m.apply(event(SNAPSHOT, replica("b"), replica("c")))
    assert ids(m.replicas()) == ["b", "c"]
    assert sorted((c.value, r.replica_id) for c, r in changes) == [
        ("added", "c"),
        ("removed", "a"),
        ("updated", "b"),
    ]


def test_added_updated_removed_deltas():
    """Deltas add, update (load and state) and remove single replicas; unknown removals are ignored."""
    m = Membership()
    m.apply(event(SNAPSHOT))
    m.apply(event(ADDED, replica("a")))
    m.apply(event(UPDATED, replica("a", running=7)))
    assert m.get("a").load.running == 7
    assert m.apply(event(REMOVED, replica("zzz"))) == []
    m.apply(event(REMOVED, replica("a")))
    assert m.replicas() == []


def test_only_serving_replicas_are_routable():
    """DRAINING replicas stay listed (for status) but get no new requests; models count SERVING ones."""
    m = Membership()
    m.apply(event(SNAPSHOT, replica("a"), replica("b"), replica("c", model="other")))
    m.apply(event(UPDATED, replica("b", state=reg.REPLICA_STATE_DRAINING)))
    assert ids(m.routable("m")) == ["a"]
    assert ids(m.replicas()) == ["a", "b", "c"]
    assert ids(m.replicas("m")) == ["a", "b"] and m.replicas("nope") == []
    assert m.models() == {"m": 1, "other": 1}
    assert ids(m.routable("m", exclude={"a"})) == []


def test_cooldown_takes_a_replica_out_until_it_expires():
    """A replica marked unroutable returns after the cooldown, measured on the injected clock."""
    clock = Clock()
    m = Membership(cooldown_s=2.0, clock=clock)
    m.apply(event(SNAPSHOT, replica("a"), replica("b")))
    m.mark_unroutable("a")
    assert ids(m.routable("m")) == ["b"]
    clock.now += 1.9
    assert ids(m.routable("m")) == ["b"]
    clock.now += 0.2
    assert ids(m.routable("m")) == ["a", "b"]


def test_a_shorter_cooldown_keeps_a_longer_one_and_a_lift_ends_only_its_own():
    """A silent replica held out while probed (a short cooldown) keeps a failure's longer cooldown; lifting
    the probe's hold ends it only if no other cooldown replaced it."""
    clock = Clock()
    m = Membership(cooldown_s=5.0, clock=clock)
    m.apply(event(SNAPSHOT, replica("a"), replica("b")))
    held = m.mark_unroutable("a", cooldown_s=1.25)
    assert ids(m.routable("m")) == ["b"]
    m.lift_unroutable("a", held)  # the probe was answered
    assert ids(m.routable("m")) == ["a", "b"]
    m.mark_unroutable("a")  # a failure: 5 s
    assert m.mark_unroutable("a", cooldown_s=1.25) is None  # the longer one is kept: nothing to lift
    clock.now += 2.0
    assert ids(m.routable("m")) == ["b"]  # still the failure's cooldown
    assert m.mark_unroutable("nope") is None


def test_registry_re_adding_a_replica_ends_its_cooldown():
    """An ADDED event (the replica registered again) makes it routable at once."""
    m = Membership(cooldown_s=60.0, clock=Clock())
    m.apply(event(SNAPSHOT, replica("a")))
    m.mark_unroutable("a")
    m.apply(event(UPDATED, replica("a", running=1)))
    assert m.routable("m") == []
    m.apply(event(ADDED, replica("a")))
    assert ids(m.routable("m")) == ["a"]


def test_models_once_served_stay_known():
    """A model whose replicas all left is still known (so: retry later), an unseen one is not."""
    m = Membership()
    m.apply(event(SNAPSHOT, replica("a")))
    m.apply(event(REMOVED, replica("a")))
    assert m.knows_model("m") and not m.knows_model("nope")
    assert m.models() == {}


def test_a_model_without_replicas_for_forget_model_after_s_is_forgotten_unless_expected():
    """Restarting (replicas back within the limit) keeps a model known; decommissioned (none for longer) is
    forgotten, so its requests get NOT_FOUND; a model that wakes on demand is known for good."""
    clock = Clock()
    m = Membership(clock=clock, forget_model_after_s=60.0)
    m.expect(["wakes"])
    m.apply(event(SNAPSHOT, replica("a"), replica("w", model="wakes")))
    m.apply(event(REMOVED, replica("a"), replica("w", model="wakes")))
    clock.now += 59.0
    assert m.known_models() == {"m", "wakes"}
    m.apply(event(ADDED, replica("a")))  # back in time: the clock starts again when it next leaves
    m.apply(event(REMOVED, replica("a")))
    clock.now += 59.0
    assert m.knows_model("m")
    clock.now += 2.0
    assert m.known_models() == {"wakes"} and not m.knows_model("m")
    m.apply(event(ADDED, replica("b")))  # a new replica of it: known again
    assert m.knows_model("m")


def test_listeners_hear_every_change():
    """Subscribers get (change, replica) for each applied change."""
    m = Membership()
    heard = []
    m.subscribe(lambda c, r: heard.append((c, r.replica_id)))
    m.apply(event(SNAPSHOT, replica("a")))
    m.apply(event(UPDATED, replica("a")))
    m.apply(event(REMOVED, replica("a")))
    assert heard == [(Change.ADDED, "a"), (Change.UPDATED, "a"), (Change.REMOVED, "a")]


class _Broken(grpc.aio.AioRpcError):
    def __init__(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> None:
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "registry down")


async def test_watch_reconnects_with_backoff_and_keeps_membership():
    """When the stream breaks, the last membership is kept, reconnects back off (growing, jittered) and
    the backoff resets once events flow again."""
    m = Membership()
    sleeps: list[float] = []
    opened = 0
    resumed = asyncio.Event()

    def open_stream():
        nonlocal opened
        opened += 1
        n = opened

        async def stream():
            if n == 1:
                yield event(SNAPSHOT, replica("a"), replica("b"))
                raise _Broken()
            if n < 5:
                raise _Broken()
            yield event(SNAPSHOT, replica("b"))
            resumed.set()
            await asyncio.sleep(3600)

        return stream()

    async def fake_sleep(s: float) -> None:
        # Membership is kept while reconnecting.
        assert ids(m.replicas()) == ["a", "b"]
        sleeps.append(s)

    task = asyncio.create_task(m.watch(open_stream, 0.1, 5.0, random.Random(0), sleep=fake_sleep))
    try:
        await asyncio.wait_for(resumed.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert opened == 5
    assert len(sleeps) == 4
    ceilings = [0.1, 0.2, 0.4, 0.8]  # attempt 0 after the first break, then doubling
    assert all(0 <= s <= c for s, c in zip(sleeps, ceilings, strict=True))
    assert ids(m.replicas()) == ["b"]


def test_replica_that_changes_model_moves_with_it():
    """An update with another model routes the replica for the new model only."""
    m = Membership()
    m.apply(event(SNAPSHOT, replica("a", model="old")))
    m.apply(event(UPDATED, replica("a", model="new")))
    assert m.routable("old") == [] and ids(m.routable("new")) == ["a"]
    m.apply(event(REMOVED, replica("a", model="new")))
    assert m.routable("new") == []


async def test_watch_timeout_resubscribes_at_once():
    """The watch's own deadline ending a healthy stream is a resubscription, not a failure: no backoff."""
    m = Membership()
    sleeps: list[float] = []
    opened = 0
    resumed = asyncio.Event()

    def open_stream():
        nonlocal opened
        opened += 1
        n = opened

        async def stream():
            yield event(SNAPSHOT, replica("a"))
            if n == 1:
                raise _Broken(grpc.StatusCode.DEADLINE_EXCEEDED)
            resumed.set()
            await asyncio.sleep(3600)

        return stream()

    async def fake_sleep(s: float) -> None:
        sleeps.append(s)

    task = asyncio.create_task(m.watch(open_stream, sleep=fake_sleep))
    try:
        await asyncio.wait_for(resumed.wait(), 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert opened == 2 and sleeps == []
