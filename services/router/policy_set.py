"""The router's policies: one instance per model (each model's policy chosen in config), model aliases
resolved first, and one Policy-shaped object for the servicer to call."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from opentelemetry import trace

from services.router import policies
from services.router.kv_index import StateListener
from services.router.membership import ReplicaInfo
from services.router.model_routing import ModelRouter
from services.router.policies import Decision, Policy, RouteRequest
from services.router.replica_load import LoadWeights

log = structlog.get_logger(__name__)


def parse_mapping(text: str) -> dict[str, str]:
    """ "a=x,b=y" -> {"a": "x", "b": "y"}; ValueError on an entry without "="."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise ValueError(f"expected 'key=value', got {item!r}")
        out[key.strip()] = value.strip()
    return out


def parse_policy_options(text: str) -> dict[str, dict[str, float]]:
    """ "cache_aware.min_match=0.6,load.kv_usage=2" -> {"cache_aware": {"min_match": 0.6}, "load": {...}}."""
    out: dict[str, dict[str, float]] = {}
    for key, value in parse_mapping(text).items():
        name, dot, param = key.partition(".")
        if not dot or not param:
            raise ValueError(f"policy option must be 'policy.param=value', got {key!r}")
        try:
            out.setdefault(name, {})[param] = float(value)
        except ValueError:
            raise ValueError(f"policy option {key!r} needs a number, got {value!r}") from None
    return out


def validate_options(options: dict[str, dict[str, float]]) -> None:
    """Build each configured policy once so a misspelled option fails at start, not on the first request."""
    load_fields = {f.name for f in dataclasses.fields(LoadWeights)}
    for name, params in options.items():
        if name == "load":
            unknown = set(params) - load_fields
            if unknown:
                raise ValueError(f"unknown load weight(s) {sorted(unknown)}; known: {sorted(load_fields)}")
            continue
        try:
            policies.create(name, **_kwargs(name, params, options.get("load", {})))
        except TypeError as e:
            raise ValueError(f"bad options for policy {name!r}: {e}") from None


def _kwargs(name: str, params: dict[str, float], load: dict[str, float]) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(params)
    if name == "kv_aware":
        kwargs.setdefault("subscribe", False)  # validation only: no subscriptions
    if load:
        kwargs["load_weights"] = LoadWeights(**load)
    return kwargs


class PolicySet(Policy):
    """Routes each model's requests with that model's policy (created on first use) and forwards membership and
    completion events to the policies that follow the replica. A request may name another policy
    (RouteRequest.policy_override: an experiment arm or feature flag); that policy is created for the model
    beside its own and shares its load tracker, so in-flight accounting stays one per replica."""

    name = "per_model"

    def __init__(
        self,
        default: str = "least_load",
        per_model: dict[str, str] | None = None,
        options: dict[str, dict[str, float]] | None = None,
        model_router: ModelRouter | None = None,
        channel_factory: Callable[[str], Any] | None = None,
        kv_state: StateListener | None = None,
    ) -> None:
        super().__init__()
        # How kv_aware opens its KV-event streams to engines (the router's TLS); None: kv_aware's default.
        self.channel_factory = channel_factory
        # Told where each replica's KV-event stream stands (the router's gauge).
        self.kv_state = kv_state
        self.default = default
        self.per_model = dict(per_model or {})
        self.options = options or {}
        self.model_router = model_router or ModelRouter({})
        self._policies: dict[tuple[str, str], Policy] = {}
        self._owner: dict[str, str] = {}  # replica id -> model whose policies follow it
        self._replicas: dict[str, ReplicaInfo] = {}  # last report of each, for a policy created later

    def _create(self, name: str) -> Policy:
        kwargs = dict(self.options.get(name, {}))
        if "load" in self.options:
            kwargs["load_weights"] = LoadWeights(**self.options["load"])
        if name == "kv_aware" and self.channel_factory is not None:
            kwargs["channel_factory"] = self.channel_factory
        if name == "kv_aware" and self.kv_state is not None:
            kwargs["on_kv_state"] = self.kv_state
        return policies.create(name, **kwargs)

    def policy_for(self, model: str, name: str = "") -> Policy:
        """The model's policy, or the policy called name for that model."""
        own = self.per_model.get(model, self.default)
        name = name or own
        p = self._policies.get((model, name))
        if p is None:
            p = self._policies[(model, name)] = self._create(name)
            if name != own:
                p.load = self.policy_for(model).load
                for r in self._replicas.values():
                    if r.model == model:
                        p.on_load_update(r)
        return p

    def _of_model(self, model: str) -> list[Policy]:
        return [p for (m, _), p in self._policies.items() if m == model]

    def prepare(self, request: Any) -> RouteRequest:
        """The request as policies see it, with a model alias resolved (the request's spec.model is set to the
        model chosen, so the engine gets a model it serves)."""
        routed = RouteRequest.of(request)
        decision = self.model_router.resolve(routed)
        if decision is not None:
            routed.model_decision = decision
            routed.model = decision.model
            routed.pb.spec.model = decision.model
            span = trace.get_current_span()
            if span.is_recording():
                span.set_attributes(decision.attributes())
            log.info(
                "router.model_routed",
                alias=decision.alias,
                model=decision.model,
                pool=decision.pool,
                reason=decision.reason,
            )
        return routed

    def _decide(self, candidates: Sequence[ReplicaInfo], request: RouteRequest) -> Decision:
        raise NotImplementedError  # decide() is overridden

    def decide(self, candidates: Sequence[ReplicaInfo], request: Any) -> Decision:
        if not candidates:
            raise ValueError("select() needs at least one candidate")
        model = candidates[0].model
        override = getattr(request, "policy_override", "")
        decision = self.policy_for(model, override).decide(candidates, request)
        self._owner.setdefault(decision.replica.replica_id, model)
        return decision

    def on_complete(self, replica_id: str) -> None:
        # Every policy of the model shares the model's load tracker: its own policy ends the attempt.
        model = self._owner.get(replica_id)
        if model is not None and (model, self.per_model.get(model, self.default)) in self._policies:
            self.policy_for(model).on_complete(replica_id)

    def on_load_update(self, replica: ReplicaInfo) -> None:
        old = self._owner.get(replica.replica_id)
        if old is not None and old != replica.model:
            for p in self._of_model(old):
                p.remove(replica.replica_id)
        self._owner[replica.replica_id] = replica.model
        self._replicas[replica.replica_id] = replica
        self.policy_for(replica.model)
        for p in self._of_model(replica.model):
            p.on_load_update(replica)

    def remove(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)
        model = self._owner.pop(replica_id, None)
        if model is not None:
            for p in self._of_model(model):
                p.remove(replica_id)

    def in_flight(self, replica_id: str) -> int:
        model = self._owner.get(replica_id)
        return self.policy_for(model).in_flight(replica_id) if model is not None else 0

    async def close(self) -> None:
        for p in self._policies.values():
            await p.close()


def from_settings(
    settings, channel_factory: Callable[[str], Any] | None = None, kv_state: StateListener | None = None
) -> PolicySet:
    """The PolicySet a RouterSettings describes; channel_factory opens kv_aware's streams to engines, kv_state
    hears where each of them stands."""
    from services.router.model_routing import DifficultyRule, load_classifier, parse_aliases

    classifier = (
        load_classifier(settings.model_route_classifier)
        if settings.model_route_classifier
        else DifficultyRule(
            settings.model_route_max_prompt_tokens,
            settings.model_route_max_output_tokens,
            tuple(k.strip().lower() for k in settings.model_route_keywords.split(",") if k.strip()),
        )
    )
    return PolicySet(
        settings.policy,
        parse_mapping(settings.model_policies),
        parse_policy_options(settings.policy_options),
        ModelRouter(parse_aliases(settings.model_aliases), classifier),
        channel_factory,
        kv_state,
    )
