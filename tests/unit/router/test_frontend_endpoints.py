"""RouterServicer.endpoint: a replica's front ends taken in turn, or packed (--frontend-pack)."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from services.router.membership import ReplicaInfo
from services.router.servicer import RouterServicer

FES = ("a:1", "a:2", "a:3")


def _router(pack: int):
    r = SimpleNamespace(frontend_pack=pack, endpoint_live=Counter(), _turns={})
    r.endpoint = lambda replica: RouterServicer.endpoint(r, replica)
    r.endpoint_done = lambda address: RouterServicer.endpoint_done(r, address)
    return r


def _replica(endpoints=FES):
    return ReplicaInfo(
        replica_id="e1", model="m", address=endpoints[0] if endpoints else "a:9", endpoints=endpoints
    )


def test_in_turn_by_default_and_every_pick_is_given_back():
    r = _router(0)
    picks = [r.endpoint(_replica()) for _ in range(4)]
    assert picks == ["a:1", "a:2", "a:3", "a:1"]
    for a in picks:
        r.endpoint_done(a)
    assert not r.endpoint_live


def test_packed_fills_the_first_front_end_then_the_next_then_the_least_busy():
    r = _router(2)
    picks = [r.endpoint(_replica()) for _ in range(6)]
    assert picks == ["a:1", "a:1", "a:2", "a:2", "a:3", "a:3"]
    assert r.endpoint(_replica()) == "a:1"  # all full: the least busy (ties: the replica's order)
    r.endpoint_done("a:2")
    r.endpoint_done("a:2")
    assert r.endpoint(_replica()) == "a:2"  # room again before the later ones
    r.endpoint_done("a:1")
    r.endpoint_done("a:1")
    assert r.endpoint(_replica()) == "a:1"  # streams ended on the first: it takes the next again


def test_a_replica_with_one_address_is_counted_too():
    r = _router(2)
    a = r.endpoint(_replica(()))
    assert a == "a:9" and r.endpoint_live == {"a:9": 1}
    r.endpoint_done(a)
    assert not r.endpoint_live


def test_router_workers_pack_their_share_so_together_they_fill_front_ends_like_one_router():
    from services.router.config import RouterSettings

    def spread(workers: int, streams: int) -> list[int]:
        share = RouterSettings(frontend_pack=32, worker_count=workers).frontend_pack_per_worker
        routers = [_router(share) for _ in range(workers)]
        picks = [routers[i % workers].endpoint(_replica()) for i in range(streams)]
        return [picks.count(a) for a in FES]

    assert RouterSettings(frontend_pack=32, worker_count=3).frontend_pack_per_worker == 11
    assert RouterSettings(frontend_pack=0, worker_count=4).frontend_pack_per_worker == 0
    assert spread(1, 48) == [32, 16, 0]
    # Four workers at the whole pack each would have put all 48 on the first front end.
    assert spread(4, 48) == [32, 16, 0]
    assert spread(2, 96) == spread(1, 96) == [32, 32, 32]
