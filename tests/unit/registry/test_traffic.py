"""The registry's traffic state applying store changes: a watch echo from before a delete made here is skipped."""

from __future__ import annotations

from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.registry.rollouts.traffic import FLAG, TrafficState
from services.registry.store import Doc, DocChange, DocEvent, SqliteStore


async def test_a_watch_echo_of_a_save_older_than_a_delete_here_is_not_applied(tmp_path):
    """The echo of a flag's save that arrives while this registry deletes the flag, or after its delete landed at a
    later revision, neither puts the flag back nor wakes watchers; once the watch brings the deletion, a later save
    of the flag applies (even before the delete's reply)."""
    store = SqliteStore(str(tmp_path / "registry.db"))
    traffic = TrafficState(store)
    traffic.deletes[FLAG].deleting("f")  # an etcd delete of f in flight
    traffic.deletes[FLAG].deleted("g", 7)  # an etcd delete of g landed at revision 7
    w = traffic.watch()
    w.changed.clear()  # its first snapshot
    traffic._apply(FLAG, saved("f", 5))
    traffic._apply(FLAG, saved("g", 6))
    assert traffic.flags == {} and not w.changed.is_set()
    traffic._apply(FLAG, DocEvent(DocChange.DELETED, Doc("f", b"", 0)))  # the watch outran the delete's reply
    traffic._apply(FLAG, saved("f", 9))  # another registry's later save
    assert list(traffic.flags) == ["f"] and w.changed.is_set()
    await store.close()


def saved(name: str, revision: int) -> DocEvent:
    flag = pb.FeatureFlag(name=name, model="m", users=["u"])
    return DocEvent(DocChange.PUT, Doc(name, flag.SerializeToString(), revision))
