"""cache_aware (approximate prefix index from what was routed) and kv_aware (precise index from KV events)."""

from __future__ import annotations

import random

import pytest
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway.embedded_router import EMBEDDED_POLICY_OPTIONS
from services.router.kv_index import KvIndex
from services.router.policies import RouteRequest
from services.router.policies.cache_aware import CacheAwarePolicy
from services.router.policies.kv_aware import KvAwarePolicy
from services.router.policy_set import parse_policy_options
from services.router.prefix_index import PrefixIndex
from tests.unit.router.policy_helpers import chat, fleet, rep


def _converse(p, cands, conv: str, turns: int, tenant: str = "t1"):
    """Route the turns of one conversation (each request holds the whole history); the replicas used."""
    history: list[str] = []
    used = []
    for i in range(turns):
        history.append(f"{conv} question {i}: how do I rotate the keys of service {conv}-{i}?")
        d = p.decide(cands, chat(*history, tenant=tenant))
        used.append(d.replica.replica_id)
        p.on_complete(d.replica.replica_id)
        history.append(f"answer {i} for {conv}: use the rotation runbook, step {i}.")
    return used


def test_cache_aware_keeps_a_conversation_on_its_replica():
    """Every later turn of a conversation goes where the earlier turns went (its history is cached there)."""
    p = CacheAwarePolicy(rng=random.Random(0))
    used = _converse(p, fleet(4), "conv-a", 6)
    assert len(set(used)) == 1


def test_cache_aware_spreads_conversations_at_low_load():
    """New conversations that share only a system prompt spread over replicas instead of piling onto one,
    even while earlier conversations still stream (the guard is relative to the fleet's load)."""
    p = CacheAwarePolicy(rng=random.Random(0))
    cands = fleet(4)
    chosen = []
    for c in range(4):
        d = p.decide(cands, chat(f"conversation {c}: first question about topic {c} " * 2))
        chosen.append(d.replica.replica_id)  # left in flight
    assert len(set(chosen)) == 4


def test_cache_aware_poor_match_goes_least_loaded_not_first_replica():
    """A prompt that matches nothing goes to the least-loaded replica, ties at random: every replica gets some."""
    p = CacheAwarePolicy(rng=random.Random(1))
    cands = fleet(3)
    seen = set()
    for i in range(30):
        d = p.decide(cands, chat(f"unrelated {i}", system=f"system prompt number {i} " * 20))
        assert d.reason == "poor_match"
        seen.add(d.replica.replica_id)
        p.on_complete(d.replica.replica_id)
    assert seen == {"r0", "r1", "r2"}


def test_cache_aware_imbalance_overrides_the_match():
    """When the replica holding the prefix is far busier than the rest, the request goes least-loaded."""
    p = CacheAwarePolicy(rng=random.Random(0))
    cands = fleet(2)
    first = p.decide(cands, chat("q1")).replica.replica_id
    p.on_complete(first)
    busy = rep(first, running=40)
    idle = next(r for r in cands if r.replica_id != first)
    p.on_load_update(busy)
    p.on_load_update(idle)
    d = p.decide([busy, idle], chat("q1", "a1", "q2"))
    assert d.replica.replica_id == idle.replica_id
    assert d.reason == "imbalanced"


def test_cache_aware_explains_the_match():
    """A matched decision scores each replica by the share of prompt blocks it holds."""
    p = CacheAwarePolicy(rng=random.Random(0))
    cands = fleet(3)
    first = p.decide(cands, chat("q1")).replica.replica_id
    p.on_complete(first)
    d = p.decide(cands, chat("q1", "a1", "q2"))
    assert d.reason == "prefix_match" and d.replica.replica_id == first
    assert d.scores[first] > 0.5 and all(s == 0 for r, s in d.scores.items() if r != first)
    assert d.details["matched_blocks"] > 0


@settings(max_examples=25, deadline=None)
@given(
    tenant_a=st.text(min_size=1, max_size=8),
    tenant_b=st.text(min_size=1, max_size=8),
    question=st.text(min_size=0, max_size=60),
)
def test_cache_aware_index_never_matches_across_tenants(tenant_a, tenant_b, question):
    """The same prompt sent by another tenant finds none of the first tenant's blocks in the index."""
    if tenant_a == tenant_b:
        return
    p = CacheAwarePolicy(rng=random.Random(0))
    cands = fleet(2)
    ra = RouteRequest.of(chat(question, tenant=tenant_a))
    chosen = p.decide(cands, ra).replica.replica_id
    rb = RouteRequest.of(chat(question, tenant=tenant_b))
    matched = p.index.match("m", rb.cache_salt, rb.block_hashes, [chosen])
    assert matched[chosen] == 0
    # Even looking the first tenant's hashes up under the second tenant's key finds nothing.
    assert p.index.match("m", rb.cache_salt, ra.block_hashes, [chosen])[chosen] == 0
    assert p.index.match("m", ra.cache_salt, ra.block_hashes, [chosen])[chosen] == len(ra.block_hashes)


def test_prefix_index_evicts_a_replica_lru_at_its_capacity():
    """A replica's oldest blocks leave the index once it holds more than its KV cache can."""
    idx = PrefixIndex()
    idx.set_capacity("a", 4)
    idx.insert("m", "s", [1, 2, 3], "a")
    idx.insert("m", "s", [7, 8, 9], "a")
    assert idx.blocks("a") == 4
    assert idx.match("m", "s", [1, 2, 3], ["a"])["a"] == 0  # block 1 (oldest) was evicted
    assert idx.match("m", "s", [7, 8, 9], ["a"])["a"] == 3
    idx.remove("a")
    assert idx.match("m", "s", [7, 8, 9], ["a"])["a"] == 0


def _stored(seq: int, hashes, snapshot: bool = False) -> engine_pb.KvEventBatch:
    ev = engine_pb.KvEvent(block_stored=engine_pb.BlockStored(block_hashes=hashes, block_size=16))
    return engine_pb.KvEventBatch(seq=seq, events=[ev], snapshot=snapshot)


def _removed(seq: int, hashes) -> engine_pb.KvEventBatch:
    ev = engine_pb.KvEvent(block_removed=engine_pb.BlockRemoved(block_hashes=hashes))
    return engine_pb.KvEventBatch(seq=seq, events=[ev])


def test_kv_index_follows_stored_removed_and_cleared():
    """Stored blocks are found, removed ones are not; a clear empties the replica; runs stop at a hole."""
    idx = KvIndex()
    assert idx.apply("a", _stored(0, [10, 11, 12], snapshot=True))
    assert idx.match([10, 11, 12, 13], ["a", "b"]) == {"a": 3, "b": 0}
    assert idx.apply("a", _removed(1, [11]))
    assert idx.match([10, 11, 12], ["a"]) == {"a": 1}
    clear = engine_pb.KvEventBatch(seq=2, events=[engine_pb.KvEvent(all_blocks_cleared={})])
    assert idx.apply("a", clear)
    assert idx.blocks("a") == 0


def test_kv_index_snapshot_replaces_and_gap_asks_for_resync():
    """A snapshot replaces what was known; a seq gap clears the replica and asks for a new snapshot."""
    idx = KvIndex()
    idx.apply("a", _stored(0, [1, 2], snapshot=True))
    idx.apply("a", _stored(0, [5], snapshot=True))  # a new stream (router or engine restarted)
    assert idx.match([1, 2], ["a"])["a"] == 0 and idx.match([5], ["a"])["a"] == 1
    assert idx.apply("a", _stored(1, [6]))
    assert not idx.apply("a", _stored(3, [7]))  # seq 2 was dropped
    assert idx.blocks("a") == 0 and not idx.synced("a")
    assert not idx.apply("a", _stored(4, [8]))  # still no snapshot: nothing is trusted
    assert idx.apply("a", _stored(0, [8], snapshot=True)) and idx.synced("a")


def _engine_caches(idx: KvIndex, replica: str, request) -> None:
    idx.apply(replica, _stored(0, RouteRequest.of(request).block_hashes, snapshot=True))


def test_kv_aware_routes_to_the_replica_holding_the_prefix():
    """With equal load, the replica whose engine reported the prompt's blocks wins, and the decision says so."""
    p = KvAwarePolicy(subscribe=False, rng=random.Random(0))
    cands = fleet(3)
    _engine_caches(p.index, "r2", chat("q1", "a1"))
    d = p.decide(cands, chat("q1", "a1", "q2"))
    assert d.replica.replica_id == "r2" and d.reason == "cached_prefix"
    assert d.scores["r2"] < d.scores["r0"] == d.scores["r1"]


def test_kv_aware_trades_cache_against_load():
    """A cached replica under much more load loses to an idle one; the weights set the trade."""
    cands = [rep("r0", running=30, tokens=30_000), rep("r1")]
    req = chat("q1", "a1", "q2")
    p = KvAwarePolicy(subscribe=False, rng=random.Random(0))
    for r in cands:
        p.on_load_update(r)
    _engine_caches(p.index, "r0", chat("q1", "a1"))
    assert p.decide(cands, req).replica.replica_id == "r1"
    heavy_cache = KvAwarePolicy(prefill_weight=1000.0, subscribe=False, rng=random.Random(0))
    for r in cands:
        heavy_cache.on_load_update(r)
    _engine_caches(heavy_cache.index, "r0", chat("q1", "a1"))
    assert heavy_cache.decide(cands, req).replica.replica_id == "r0"


def test_kv_aware_never_hits_another_tenants_blocks():
    """Blocks cached for one tenant do not attract the same prompt from another tenant."""
    p = KvAwarePolicy(subscribe=False, rng=random.Random(0))
    cands = fleet(2)
    _engine_caches(p.index, "r1", chat("q1", "a1", tenant="acme"))
    d = p.decide(cands, chat("q1", "a1", "q2", tenant="globex"))
    assert d.details["matched_blocks"] == 0 and d.reason == "least_cost_no_cache"


def test_kv_aware_forgets_a_removed_replica():
    """A replica that leaves takes its index entries with it."""
    p = KvAwarePolicy(subscribe=False)
    _engine_caches(p.index, "r1", chat("q1"))
    p.remove("r1")
    assert p.index.blocks("r1") == 0


@pytest.mark.parametrize("session", ["", "conv"])
def test_independent_cache_aware_routers_keep_a_conversation_on_one_replica(session):
    """Two routers that each see every other turn of a conversation (the embedded routers of two gateway workers)
    send all its turns to one replica: a turn whose history a router never saw ties, and ties go where the
    conversation's affinity key (its session, else its leading blocks) hashes - where the other router sent it.
    Conversations still spread over the replicas."""
    routers = [CacheAwarePolicy(rng=random.Random(1)), CacheAwarePolicy(rng=random.Random(2))]
    cands = fleet(4)
    homes = set()
    for c in range(8):
        system = f"You are assistant number {c} of the support desk for product line {c}. " * 12
        history: list[str] = []
        used = []
        for i in range(4):
            history.append(f"question {i} of conversation {c}: how do I rotate key {c}-{i}?")
            p = routers[(c + i) % 2]
            d = p.decide(cands, chat(*history, system=system, session=f"{session}{c}" if session else ""))
            used.append(d.replica.replica_id)
            p.on_complete(d.replica.replica_id)
            history.append(f"answer {i}: see the rotation runbook, step {i}.")
        assert len(set(used)) == 1, (c, used)
        homes.add(used[0])
    assert len(homes) >= 2


def test_affinity_key_is_a_conversations_for_all_its_turns():
    """A request's affinity key: its tenant's session when it has one, else its leading prompt blocks, which
    every turn of a conversation shares (and another tenant's same prompt does not)."""
    system = "You are the assistant of the operations team; answer in one line. " * 12
    turn1 = RouteRequest.of(chat("first question", system=system))
    turn2 = RouteRequest.of(chat("first question", "an answer", "second question", system=system))
    assert len(turn1.block_hashes) >= 8
    assert turn1.affinity_key == turn2.affinity_key != b""
    assert (
        RouteRequest.of(chat("first question", system=system, tenant="t2")).affinity_key != turn1.affinity_key
    )
    assert (
        RouteRequest.of(chat("x", session="s1")).affinity_key
        == RouteRequest.of(chat("y", session="s1")).affinity_key
    )
    assert (
        RouteRequest.of(chat("x", session="s1", tenant="t2")).affinity_key
        != RouteRequest.of(chat("x", session="s1")).affinity_key
    )


def test_a_turn_goes_home_through_a_router_that_sees_its_home_one_request_busier():
    """Routers count only their own requests in flight until the next load report, so they disagree about load
    by a request or so: with the embedded routers' wider ties (EMBEDDED_POLICY_OPTIONS) a turn whose history
    this router never saw still goes where the other router sent the conversation while that replica is at
    most one request busier here."""
    wide = parse_policy_options(",".join(f"{k}={v}" for k, v in EMBEDDED_POLICY_OPTIONS.items()))[
        "cache_aware"
    ]
    a, b = (CacheAwarePolicy(rng=random.Random(seed), **wide) for seed in (1, 2))
    cands = fleet(4)
    # b has sent the shared system prompt everywhere (other conversations, finished).
    for r in cands:
        b.index.insert(
            "m", RouteRequest.of(chat("x")).cache_salt, RouteRequest.of(chat("x")).block_hashes, r.replica_id
        )
    home = a.decide(cands, chat("first question", session="c1")).replica.replica_id
    a.on_complete(home)
    b.load.started(home, 300)  # one of b's own requests streams there
    d = b.decide(cands, chat("first question", "an answer", "second question", session="c1"))
    assert d.replica.replica_id == home, d
