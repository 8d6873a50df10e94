"""session (consistent hashing with bounded load), model aliases, and per-model policies (PolicySet)."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.router.model_routing import DifficultyRule, ModelRouter, parse_aliases
from services.router.policies.cache_aware import CacheAwarePolicy
from services.router.policies.least_load import LeastLoadPolicy
from services.router.policies.session import SessionPolicy
from services.router.policy_set import PolicySet, parse_policy_options, validate_options
from tests.unit.router.policy_helpers import chat, fleet, prompt


def test_session_sticks_to_its_replica():
    """Requests of one session go to the same replica while it has room."""
    p = SessionPolicy()
    cands = fleet(4)
    picks = set()
    for _ in range(10):
        rid = p.select(cands, chat("hi", session="conv-42")).replica_id
        p.on_complete(rid)
        picks.add(rid)
    assert len(picks) == 1


def test_session_spreads_sessions_and_moves_few_when_a_replica_leaves():
    """Many sessions use every replica; removing one moves only the sessions it held."""
    p = SessionPolicy()
    cands = fleet(4)

    def home(session: str, cs) -> str:
        rid = p.select(cs, chat("hi", session=session)).replica_id
        p.on_complete(rid)
        return rid

    before = {f"s{i}": home(f"s{i}", cands) for i in range(200)}
    assert set(before.values()) == {"r0", "r1", "r2", "r3"}
    after = {s: home(s, cands[:3]) for s in before}
    moved = [s for s in before if before[s] != after[s]]
    assert all(before[s] == "r3" for s in moved)


def test_session_without_id_goes_least_loaded():
    """A request with no session id is balanced by load."""
    p = SessionPolicy(rng=random.Random(0))
    d = p.decide(fleet(2), chat("hi"))
    assert d.reason == "no_session"


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("req"), st.integers(0, 5)), st.tuples(st.just("done"), st.integers(0, 5))
        ),
        max_size=120,
    ),
    replicas=st.integers(1, 6),
    load_factor=st.sampled_from([1.0, 1.25, 2.0]),
)
def test_session_bounded_load_invariant(ops, replicas, load_factor):
    """Whatever the sessions and completions, no replica holds more than ceil(c * in-flight / n) requests,
    even when every request belongs to the same few sessions."""
    p = SessionPolicy(load_factor=load_factor)
    cands = fleet(replicas)
    held: list[str] = []
    for kind, n in ops:
        if kind == "req":
            rid = p.select(cands, chat("x", session=f"s{n}")).replica_id
            held.append(rid)
            total = len(held)
            assert held.count(rid) <= math.ceil(load_factor * total / replicas)
        elif held:
            rid = held.pop(n % len(held))
            p.on_complete(rid)
        for r in cands:
            assert p.in_flight(r.replica_id) == held.count(r.replica_id)


def test_difficulty_rule_reads_length_output_and_keywords():
    """Long prompts, long outputs and hard-work keywords go to the large pool; the rest to the small."""
    rule = DifficultyRule(max_small_prompt_tokens=200, max_small_output_tokens=100, keywords=("prove",))
    from services.router.policies import RouteRequest

    assert rule(RouteRequest.of(prompt("what time is it"))) == (False, "short_and_simple")
    hard, why = rule(RouteRequest.of(prompt("word " * 400)))
    assert hard and why.startswith("prompt_tokens=")
    hard, why = rule(RouteRequest.of(prompt("hi", max_tokens=500)))
    assert hard and why == "max_tokens=500>100"
    hard, why = rule(RouteRequest.of(chat("Please PROVE that the sum is finite", system="Be brief.")))
    assert hard and "prove" in why


def test_alias_resolves_and_sets_the_model():
    """`auto` becomes the small or the large model, the request carries it, and the decision is kept."""
    ps = PolicySet(model_router=ModelRouter(parse_aliases("auto=small-1b|large-8b")))
    easy = ps.prepare(prompt("hi", model="auto"))
    assert easy.model == "small-1b" and easy.spec.model == "small-1b"
    assert easy.model_decision.pool == "small" and easy.model_decision.alias == "auto"
    hard = ps.prepare(prompt("derive the formula", model="auto"))
    assert hard.spec.model == "large-8b" and hard.model_decision.reason == "keyword='derive'"
    plain = ps.prepare(prompt("hi", model="small-1b"))
    assert plain.model_decision is None and plain.model == "small-1b"
    attrs = hard.model_decision.attributes()
    assert attrs["fleetserve.model_alias"] == "auto" and attrs["fleetserve.model_pool"] == "large"


def test_pluggable_classifier_decides():
    """A classifier replaces the rule: its verdict and reason are recorded."""
    ps = PolicySet(
        model_router=ModelRouter(parse_aliases("auto=s|l"), classifier=lambda r: (True, "classifier=always"))
    )
    d = ps.prepare(prompt("hi", model="auto")).model_decision
    assert (d.model, d.reason) == ("l", "classifier=always")


def test_parse_aliases_rejects_malformed():
    """An alias entry without both pools fails loudly."""
    with pytest.raises(ValueError):
        parse_aliases("auto=only-one")


def test_policy_set_uses_each_models_policy_and_routes_completions():
    """Each model gets its configured policy; completions reach the policy that picked the replica."""
    ps = PolicySet("least_load", {"chat": "cache_aware"})
    chat_fleet, other = fleet(2, "chat"), [r for r in fleet(4, "base")[2:]]
    for r in chat_fleet + other:
        ps.on_load_update(r)
    assert isinstance(ps.policy_for("chat"), CacheAwarePolicy)
    assert isinstance(ps.policy_for("base"), LeastLoadPolicy)
    d = ps.decide(chat_fleet, chat("hi", model="chat"))
    assert d.policy == "cache_aware"
    assert ps.in_flight(d.replica.replica_id) == 1
    ps.on_complete(d.replica.replica_id)
    assert ps.in_flight(d.replica.replica_id) == 0


def test_policy_options_are_parsed_and_checked():
    """Options reach the policy; an unknown option or load weight fails at start."""
    opts = parse_policy_options("cache_aware.min_match=0.8,load.kv_usage=2")
    assert opts == {"cache_aware": {"min_match": 0.8}, "load": {"kv_usage": 2.0}}
    validate_options(opts)
    ps = PolicySet("cache_aware", options=opts)
    p = ps.policy_for("m")
    assert p.min_match == 0.8 and p.load.weights.kv_usage == 2.0
    with pytest.raises(ValueError):
        validate_options(parse_policy_options("cache_aware.nope=1"))
    with pytest.raises(ValueError):
        validate_options(parse_policy_options("load.nope=1"))
