"""The policy interface and the load-only policies: round_robin, random, least_load, power_of_two."""

from __future__ import annotations

import random

import pytest

from services.router import policies
from services.router.policies import RouteRequest, cache_salt_for
from services.router.policies.least_load import LeastLoadPolicy
from services.router.policies.power_of_two import PowerOfTwoPolicy
from services.router.policies.random_choice import RandomPolicy
from services.router.policies.round_robin import RoundRobinPolicy
from services.router.replica_load import LoadTracker
from shared.prefix_hash import block_hashes
from shared.tokenizer import load as load_tokenizer
from tests.unit.router.policy_helpers import chat, fleet, prompt, rep


def test_registry_creates_every_policy_by_name():
    """Every policy of the issue is available by name; an unknown name lists the available ones."""
    names = {"round_robin", "random", "least_load", "power_of_two", "cache_aware", "kv_aware", "session"}
    assert names <= set(policies.available())
    for name in names:
        kwargs = {"subscribe": False} if name == "kv_aware" else {}
        assert policies.create(name, **kwargs).name == name
    with pytest.raises(ValueError, match="least_load"):
        policies.create("round_robin_typo")


@pytest.mark.parametrize("name", ["round_robin", "random", "least_load", "power_of_two", "session"])
def test_every_decision_explains_itself(name):
    """decide() names the policy and a reason, and scores candidates; select() returns the same replica kind."""
    p = policies.create(name)
    cands = fleet(3)
    d = p.decide(cands, chat("hello", session="s1"))
    assert d.replica in cands
    assert d.policy == name and d.reason
    assert set(d.scores) <= {r.replica_id for r in cands} and d.scores
    attrs = d.attributes()
    assert attrs["fleetserve.route.policy"] == name
    assert attrs["fleetserve.route.reason"] == d.reason
    assert f"{d.replica.replica_id}=" in attrs["fleetserve.route.scores"]


def test_select_needs_candidates():
    """An empty candidate list is a caller bug, reported loudly."""
    with pytest.raises(ValueError):
        LeastLoadPolicy().select([], None)


def test_round_robin_takes_turns_and_survives_a_changing_set():
    """Replicas take turns in id order; when one drops out the turn moves on instead of restarting."""
    p = RoundRobinPolicy()
    a, b, c = fleet(3)
    assert [p.select([a, b, c], None).replica_id for _ in range(4)] == ["r0", "r1", "r2", "r0"]
    assert p.select([a, c], None).replica_id == "r2"  # r1 is out: after r0 comes r2
    assert p.select([a, b, c], None).replica_id == "r0"


def test_random_reaches_every_replica():
    """Uniform random choice uses every candidate over many requests."""
    p = RandomPolicy(random.Random(3))
    cands = fleet(4)
    assert {p.select(cands, None).replica_id for _ in range(100)} == {"r0", "r1", "r2", "r3"}


def test_least_load_reads_the_registry_report():
    """The replica reporting fewer running + waiting requests is chosen."""
    p = LeastLoadPolicy(random.Random(0))
    cands = [rep("a", running=3, waiting=2), rep("b", running=1, waiting=3), rep("c", running=4)]
    for r in cands:
        p.on_load_update(r)
    assert p.select(cands, None).replica_id == "c"


def test_least_load_counts_its_own_requests_since_the_report():
    """Requests this router sent after the last report count at once, so a stale report does not herd."""
    p = LeastLoadPolicy(random.Random(0))
    a, b = rep("a", running=0), rep("b", running=2)
    p.on_load_update(a)
    p.on_load_update(b)
    picks = [p.select([a, b], None).replica_id for _ in range(3)]
    assert picks[:2] == ["a", "a"]  # a: 0 then 1 (< b's 2)
    assert p.load.requests("a") == 3 - picks.count("b")
    # A new report covers what was counted: the estimate is the report again.
    p.on_load_update(rep("a", running=1))
    assert p.load.requests("a") == max(1, p.in_flight("a"))


def test_least_load_weighs_tokens_of_work():
    """Two replicas with one request each: the one holding the long request is the heavier."""
    p = LeastLoadPolicy(random.Random(0))
    a, b = rep("a", running=1, tokens=8000), rep("b", running=1, tokens=200)
    p.on_load_update(a)
    p.on_load_update(b)
    assert p.select([a, b], None).replica_id == "b"


def test_least_load_weighs_kv_usage():
    """Equal request counts: the replica whose KV cache is nearly full is avoided."""
    p = LeastLoadPolicy(random.Random(0))
    a, b = rep("a", running=2, kv=(950, 1000)), rep("b", running=2, kv=(100, 1000))
    p.on_load_update(a)
    p.on_load_update(b)
    assert p.select([a, b], None).replica_id == "b"


def test_least_load_spreads_full_ties_at_random():
    """Replicas tied on everything are chosen at random, so each gets some of the traffic."""
    p = LeastLoadPolicy(random.Random(1))
    cands = fleet(3)
    seen = set()
    for _ in range(60):
        chosen = p.select(cands, None)
        seen.add(chosen.replica_id)
        p.on_complete(chosen.replica_id)
    assert seen == {"r0", "r1", "r2"}


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


def test_power_of_two_takes_the_lighter_of_its_pair():
    """With two candidates the pair is both: the lighter always wins; with more, the heaviest never does."""
    p = PowerOfTwoPolicy(random.Random(0))
    light, heavy = rep("a", running=0), rep("b", running=9)
    p.on_load_update(light)
    p.on_load_update(heavy)
    for _ in range(5):
        assert p.select([light, heavy], None).replica_id == "a"
        p.on_complete("a")
    p2 = PowerOfTwoPolicy(random.Random(1))
    cands = [rep("x", running=1), rep("y", running=2), rep("z", running=50)]
    for r in cands:
        p2.on_load_update(r)
    for _ in range(50):
        chosen = p2.select(cands, None).replica_id
        p2.on_complete(chosen)
        assert chosen != "z"


def test_load_tracker_tokens_are_the_report_plus_changes_since():
    """Tokens routed since the last report add to it, ended requests take back their share, and a new report
    replaces the estimate; requests never read below this router's own in-flight count."""
    t = LoadTracker()
    t.started("a", 1000)
    t.started("a", 3000)
    assert t.tokens("a") == 4000
    t.ended("a")
    assert t.tokens("a") == 2000  # 4000 routed since the (empty) report, one mean share ended
    t.report(rep("a", running=0, tokens=1500))
    assert t.tokens("a") == 1500
    assert t.requests("a") == 1  # the report says 0 running, but one of ours is still in flight
    t.started("a", 500)
    assert t.tokens("a") == 2000 and t.requests("a") == 2
    t.ended("a")
    # 1500 reported + 500 since, less a mean share (2500 // 2) of what is in flight there.
    assert t.tokens("a") == 750
    t.ended("a")
    assert t.tokens("a") == 0  # floored: the report already counted part of what ended since
    t.ended("a")  # one too many: ignored
    assert t.in_flight("a") == 0 and t.tokens("a") == 0 and t.requests("a") == 0


def test_cache_salt_is_per_tenant_and_stable():
    """Each tenant gets its own salt, the same in every router process; no tenant gets another's."""
    assert cache_salt_for("acme") == cache_salt_for("acme")
    assert cache_salt_for("acme") != cache_salt_for("globex")
    assert cache_salt_for("") != cache_salt_for("acme")


def test_route_request_tokens_match_the_engine_tokenizer():
    """The router tokenizes a chat with the fleet tokenizer and template, and salts block hashes per tenant."""
    req = chat("what is the runbook for a full disk?", tenant="acme")
    routed = RouteRequest.of(req)
    tok = load_tokenizer()
    assert routed.token_ids == tok.encode_chat(req.spec.messages)
    assert routed.block_hashes == block_hashes(routed.token_ids, cache_salt_for("acme"))
    other = RouteRequest.of(chat("what is the runbook for a full disk?", tenant="globex"))
    assert not set(routed.block_hashes) & set(other.block_hashes)
    plain = RouteRequest.of(prompt("hello there"))
    assert plain.token_ids == tok.encode("hello there")
    assert RouteRequest.of(routed) is routed
