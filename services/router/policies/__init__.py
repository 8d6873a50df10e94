"""Routing policies behind one small interface, chosen by name (`--policy least_load`), and what they decide on."""

from __future__ import annotations

import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING, Any

import structlog
from opentelemetry import trace

from services.router.replica_load import LoadTracker, LoadWeights
from shared.prefix_hash import block_hashes

if TYPE_CHECKING:
    from services.router.membership import ReplicaInfo

log = structlog.get_logger(__name__)

# Tokens of output assumed for a request that sets no max_tokens (the engine's default is larger; this only
# weighs load).
DEFAULT_OUTPUT_TOKENS = 256
# Leading prompt blocks that make a session-less request's affinity key: 128 tokens, about the gateway's 512
# characters (services/gateway/routers.AFFINITY_CHARS) - the start of a conversation, which its later turns share.
AFFINITY_BLOCKS = 8


@functools.lru_cache(maxsize=4096)  # a hash per request on the engine call's path otherwise; few tenants
def cache_salt_for(tenant_id: str) -> str:
    """The engine cache salt of a tenant: derived from the tenant id alone, so every router computes the same
    one, and different for every tenant, so no tenant's prefix ever hits another tenant's cache blocks."""
    return blake2b(tenant_id.encode(), digest_size=12, person=b"fleetserve-salt").hexdigest()


class RouteRequest:
    """What policies look at for one request: tenant, session, model and, computed at most once and only when a
    policy asks, the prompt's token ids and block hashes (salted per tenant, as the engine hashes them)."""

    __slots__ = ("pb", "model", "model_decision", "__dict__")

    def __init__(self, pb: Any, model: str | None = None) -> None:
        self.pb = pb
        # The model actually routed to (a resolved alias), and how it was resolved (None: no alias).
        self.model: str = model if model is not None else (pb.spec.model if pb is not None else "")
        self.model_decision: Any = None

    @classmethod
    def of(cls, request: Any) -> RouteRequest:
        """request itself when it is a RouteRequest already, else a view of the router GenerateRequest."""
        return request if isinstance(request, RouteRequest) else cls(request)

    # The servicer reads these as it would from the GenerateRequest.
    @property
    def spec(self):
        return self.pb.spec

    @property
    def routing(self):
        return self.pb.routing

    @property
    def request_id(self) -> str:
        return self.pb.request_id if self.pb is not None else ""

    @property
    def tenant_id(self) -> str:
        return self.pb.routing.tenant_id if self.pb is not None else ""

    @property
    def session_id(self) -> str:
        return self.pb.routing.session_id if self.pb is not None else ""

    @functools.cached_property
    def cache_salt(self) -> str:
        return cache_salt_for(self.tenant_id)

    @functools.cached_property
    def token_ids(self) -> list[int]:
        """The prompt's token ids, as the engine tokenizes it (the fleet tokenizer and chat template)."""
        if self.pb is None:
            return []
        from shared.tokenizer import load  # the tokenizer loads once per process, on first use

        return load().encode_spec(self.pb.spec)

    @functools.cached_property
    def block_hashes(self) -> list[int]:
        """Hashes of the prompt's full blocks, chained and salted with the tenant's cache salt."""
        return block_hashes(self.token_ids, self.cache_salt)

    @functools.cached_property
    def affinity_key(self) -> bytes:
        """What ties a request to its conversation for any router that sees it: the tenant's session id, else
        the hash of its prompt's first AFFINITY_BLOCKS blocks (salted per tenant; every turn of a conversation
        starts with them); b"" when neither exists (a prompt shorter than one block)."""
        if self.session_id:
            return f"s\x00{self.tenant_id}\x00{self.session_id}".encode()
        hashes = self.block_hashes
        if not hashes:
            return b""
        return (
            b"b\x00"
            + self.model.encode()
            + hashes[min(len(hashes), AFFINITY_BLOCKS) - 1].to_bytes(8, "little")
        )

    @functools.cached_property
    def prompt_tokens_estimate(self) -> int:
        """Tokens in the prompt: exact once token_ids were computed, else ~4 characters per token (for load
        weighting, where tokenizing for nothing would cost more than it tells)."""
        if "token_ids" in self.__dict__:
            return len(self.token_ids)
        if self.pb is None:
            return 0
        spec = self.pb.spec
        chars = len(spec.prompt) if spec.prompt else sum(len(m.content) + 8 for m in spec.messages)
        return chars // 4 + 1

    @property
    def max_tokens(self) -> int:
        if self.pb is None:
            return DEFAULT_OUTPUT_TOKENS
        return self.pb.spec.sampling.max_tokens or DEFAULT_OUTPUT_TOKENS

    @property
    def work_tokens(self) -> int:
        """Tokens of work the request brings: prompt plus output."""
        return self.prompt_tokens_estimate + self.max_tokens


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's choice and why: every candidate's score (the policy's own scale; the reason says which way
    is better) and details worth a log line."""

    replica: ReplicaInfo
    reason: str
    scores: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    policy: str = ""

    def scores_text(self) -> str:
        """Scores as `id=score,...` (a span attribute value)."""
        return ",".join(f"{rid}={s:g}" for rid, s in sorted(self.scores.items()))

    def attributes(self) -> dict[str, Any]:
        """Span attributes of the decision."""
        attrs = {
            "fleetserve.route.policy": self.policy,
            "fleetserve.route.reason": self.reason,
            "fleetserve.route.scores": self.scores_text(),
        }
        for k, v in self.details.items():
            attrs[f"fleetserve.route.{k}"] = v if isinstance(v, (str, bool, int, float)) else str(v)
        return attrs


def record(decision: Decision, span: trace.Span | None = None) -> None:
    """Explain a decision: span attributes on span (default: the current span) and a debug log line with every
    score (built only when debug lines are logged)."""
    if span is None:
        span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(decision.attributes())
    if not log.is_enabled_for(logging.DEBUG):
        return
    log.debug(
        "router.replica_selected",
        replica=decision.replica.replica_id,
        policy=decision.policy,
        reason=decision.reason,
        scores=decision.scores,
        **{k: v for k, v in decision.details.items() if k not in ("replica", "policy", "reason", "scores")},
    )


class Policy(ABC):
    """Picks a replica for each request. The router calls select() (or decide(), which also says why) once per
    attempt and on_complete() once when that attempt ends (however it ends); the base class keeps the load
    estimate (LoadTracker) from those calls and from the registry's load reports."""

    name: str = ""

    def __init__(self, load_weights: LoadWeights | None = None) -> None:
        self.load = LoadTracker(load_weights)

    @abstractmethod
    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        """The choice among candidates (never empty)."""

    def decide(self, candidates: Sequence[ReplicaInfo], request: Any) -> Decision:
        """One of candidates (never empty: the router raises NoHealthyReplica itself) for request (a RouteRequest
        or the router's GenerateRequest), with the candidates' scores and the reason; counts it as started."""
        if not candidates:
            raise ValueError("select() needs at least one candidate")
        routed = RouteRequest.of(request)
        decision = self._decide(candidates, routed)
        # Policies that know how much of the prompt is cached say how much work is left (details["work_tokens"]).
        work = decision.details.get("work_tokens")
        self.load.started(decision.replica.replica_id, routed.work_tokens if work is None else work)
        self._chosen(decision.replica, routed)
        if decision.policy == self.name:
            return decision  # least_loaded names its policy: no second Decision on the first token's path
        return Decision(decision.replica, decision.reason, decision.scores, decision.details, self.name)

    def select(self, candidates: Sequence[ReplicaInfo], request: Any) -> ReplicaInfo:
        """decide() without the explanation."""
        return self.decide(candidates, request).replica

    def prepare(self, request: Any) -> RouteRequest:
        """The request as policies see it (once per request, so its tokens are computed at most once); a
        PolicySet also resolves model aliases here."""
        return RouteRequest.of(request)

    def _chosen(self, replica: ReplicaInfo, request: RouteRequest) -> None:  # noqa: B027 - optional hook
        """After a decision: policies with an index of what they routed update it here."""

    def in_flight(self, replica_id: str) -> int:
        """Attempts this policy sent to replica_id that have not completed."""
        return self.load.in_flight(replica_id)

    def on_complete(self, replica_id: str) -> None:
        """An attempt that select() sent to replica_id ended."""
        self.load.ended(replica_id)

    def on_load_update(self, replica: ReplicaInfo) -> None:
        """The registry reported new state or load for replica (also called when it joins)."""
        self.load.report(replica)

    def remove(self, replica_id: str) -> None:
        """replica_id left the fleet; forget what is kept about it. Attempts still streaming from it call
        on_complete later, which then finds nothing to release."""
        self.load.forget(replica_id)

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Stop background work (subscriptions) when the router stops."""


def rendezvous_rank(key: bytes, replica_id: str) -> int:
    """Rendezvous (highest-random-weight) rank of replica_id for key: every router ranks a key's replicas alike
    (blake2b: Python's hash() differs between processes), and a replica that leaves moves only its own keys."""
    return int.from_bytes(blake2b(key + b"\x00" + replica_id.encode(), digest_size=8).digest(), "big")


def least_loaded(
    policy: Policy,
    candidates: Sequence[ReplicaInfo],
    rng,
    reason: str,
    key: bytes = b"",
    tolerance: float = 0.0,
    **details: Any,
) -> Decision:
    """The candidate with the lowest load score: the fallback of the cache-aware policies as well as least_load
    itself. Ties (scores within tolerance of the lowest) go to the one key ranks first by rendezvous hashing
    when a key is given (so independent routers agree on it), else at random (so no replica gets every tie)."""
    scores = {r.replica_id: round(policy.load.score(r.replica_id), 4) for r in candidates}
    if len(candidates) == 1:
        return Decision(candidates[0], reason, scores, details, policy.name)
    low = min(scores.values())
    best = [r for r in candidates if scores[r.replica_id] <= low + tolerance]
    if len(best) == 1:
        chosen = best[0]
    elif key:
        chosen = max(best, key=lambda r: rendezvous_rank(key, r.replica_id))
    else:
        chosen = rng.choice(best)
    return Decision(chosen, reason, scores, details, policy.name)


_REGISTRY: dict[str, Callable[..., Policy]] = {}


def register(name: str) -> Callable[[type[Policy]], type[Policy]]:
    """Class decorator: make a policy available under name."""

    def deco(cls: type[Policy]) -> type[Policy]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """Names of the registered policies."""
    return sorted(_REGISTRY)


def create(name: str, **kwargs: Any) -> Policy:
    """A new policy by name; ValueError naming the available ones otherwise."""
    try:
        factory = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; available: {', '.join(available())}") from None
    return factory(**kwargs)


# Built-in policies register themselves on import.
from services.router.policies import (  # noqa: E402, F401
    cache_aware,
    kv_aware,
    least_load,
    power_of_two,
    random_choice,
    round_robin,
    session,
)
