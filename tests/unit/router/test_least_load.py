"""The least_load policy and the policy registry."""

from __future__ import annotations

import random

import pytest
from fleetserve.common.v1 import common_pb2

from services.router import policies
from services.router.membership import ReplicaInfo
from services.router.policies.least_load import LeastLoadPolicy


def rep(rid: str, running: int = 0, waiting: int = 0) -> ReplicaInfo:
    return ReplicaInfo(
        rid,
        f"127.0.0.1:{hash(rid) % 1000 + 1000}",
        "m",
        load=common_pb2.ReplicaLoad(running=running, waiting=waiting),
    )


def test_fewest_in_flight_wins_over_reported_load():
    """The router's own in-flight count decides before the registry's (possibly stale) load."""
    p = LeastLoadPolicy(random.Random(0))
    a, b = rep("a", running=0), rep("b", running=50)
    assert p.select([a, b], None).replica_id == "a"  # a: 0 in flight, lighter reported load
    assert p.select([a, b], None).replica_id == "b"  # now a has 1 in flight, b has 0
    assert p.select([a, b], None).replica_id == "a"  # 1 each: b's reported load breaks the tie


def test_reported_running_plus_waiting_breaks_ties():
    """With equal in-flight counts, the replica reporting fewer running + waiting requests is chosen."""
    p = LeastLoadPolicy(random.Random(0))
    cands = [rep("a", running=3, waiting=2), rep("b", running=1, waiting=3), rep("c", running=4)]
    assert p.select(cands, None).replica_id == "c"


def test_full_ties_are_spread_at_random():
    """Replicas tied on both counts are chosen at random, so each gets some of the traffic."""
    p = LeastLoadPolicy(random.Random(1))
    cands = [rep("a"), rep("b"), rep("c")]
    seen = set()
    for _ in range(60):
        chosen = p.select(cands, None)
        seen.add(chosen.replica_id)
        p.on_complete(chosen.replica_id)
    assert seen == {"a", "b", "c"}


def test_on_complete_and_remove_release_in_flight():
    """on_complete undoes a select; remove forgets a replica; neither goes below zero."""
    p = LeastLoadPolicy()
    a = rep("a")
    p.select([a], None)
    p.select([a], None)
    assert p.in_flight("a") == 2
    p.on_complete("a")
    assert p.in_flight("a") == 1
    p.remove("a")
    assert p.in_flight("a") == 0
    p.on_complete("a")  # an attempt still streaming from a removed replica
    assert p.in_flight("a") == 0


def test_select_needs_candidates():
    """An empty candidate list is a caller bug, reported loudly."""
    with pytest.raises(ValueError):
        LeastLoadPolicy().select([], None)


def test_registry_creates_policies_by_name():
    """Policies are found by name; an unknown name lists the available ones."""
    assert "least_load" in policies.available()
    assert isinstance(policies.create("least_load"), LeastLoadPolicy)
    with pytest.raises(ValueError, match="least_load"):
        policies.create("round_robin_typo")
