"""One model's scaling across its versions: the model's arrival history (shared by every version's predictive
policy, so a rollout's new version inherits the model's season), a decider per version, each version's bounds
from its part in the traffic (services/autoscaler/versions.py), and each version's signals cut from the model's."""

from __future__ import annotations

import dataclasses
import math

from services.autoscaler.decider import Bounds, Decider, Decision
from services.autoscaler.policies import predictive
from services.autoscaler.signals import ModelSignals
from services.autoscaler.spec import ModelSpec, VersionSpec
from services.autoscaler.versions import BASELINE, CURRENT, RETIRING, VersionPlan


class ModelScaler:
    """Desired replicas per version of one model."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        opts = spec.policies.get("predictive")
        self.history = predictive.history(opts) if opts is not None else None
        self.deciders: dict[str, Decider] = {}

    def observe(self, now: float, model_rate: float) -> None:
        """One sample of the model's arrival rate (all versions together)."""
        if self.history is not None:
            self.history.observe(now, model_rate)

    def decider(self, version: str, initial: int = 0) -> Decider:
        """The version's decider (a new version starts from `initial` replicas)."""
        d = self.deciders.get(version)
        if d is None:
            shared = {"history": self.history} if self.history is not None else {}
            d = Decider(self.spec, self.spec.build_policies(**shared), initial=initial, version=version)
            self.deciders[version] = d
        return d

    def forget(self, version: str) -> None:
        """A retired version that has no replica left."""
        self.deciders.pop(version, None)

    @property
    def desired(self) -> int:
        return sum(d.desired for d in self.deciders.values())

    def bounds(self, vp: VersionPlan, now: float, serving: dict[str, int] | None = None) -> Bounds:
        """A version's bounds from its role: the model's for the version serving it (and a running rollout's
        baseline), at least its warm count for a candidate, shadow, experiment or flag version (a rollout waits
        for a serving candidate), zero for a retired one once due and once the version replacing it serves what
        it wants (`serving`: SERVING replicas per version); a version's own configured bounds first."""
        spec = self.spec
        own = spec.versions.get(vp.version, VersionSpec())
        hi = own.max_replicas if own.max_replicas is not None else spec.max_replicas
        if vp.role == RETIRING:
            due, why = now >= vp.retire_at, vp.why
            successor = self.deciders.get(vp.replaced_by)
            if due and successor is not None:
                have = (serving or {}).get(vp.replaced_by, 0)
                if have < successor.desired:
                    due, why = (
                        False,
                        f"{why}; waiting for {vp.replaced_by} to serve ({have}/{successor.desired})",
                    )
            return Bounds(0, hi, retiring=True, retire_due=due, why=why)
        if vp.role in (CURRENT, BASELINE):
            lo = own.min_replicas if own.min_replicas is not None else spec.min_replicas
            return Bounds(min(lo, hi), hi, scale_to_zero=spec.scale_to_zero and lo == 0)
        lo = max(vp.warm, own.min_replicas or 0)
        return Bounds(min(lo, hi), hi)

    def decide(self, vp: VersionPlan, s: ModelSignals, serving: dict[str, int] | None = None) -> Decision:
        return self.decider(vp.version).decide(s, self.bounds(vp, s.now, serving))


def version_rates(
    plans: dict[str, VersionPlan], model_rate: float, measured: dict[str, float], serving: dict[str, int]
) -> dict[str, float]:
    """Each version's arrival rate: its share of the model's, or what the routers measured for it where that is
    more (an experiment or flag whose reach is unknown); a version with no serving replica has its share served
    by its fallback version (the routers send it there), so that one is sized for both."""
    rates = {v: max(p.share * model_rate, measured.get(v, 0.0)) for v, p in plans.items()}
    for v, p in plans.items():
        if p.fallback and not serving.get(v) and p.fallback in rates:
            rates[p.fallback] += p.share * model_rate
    return rates


def version_signals(
    model: ModelSignals, rate: float, model_rate: float, planned_share: float, **own: float | int
) -> ModelSignals:
    """A version's signals: its own replicas and load (`own`: serving, starting, running, waiting, kv_usage,
    output_tokens_per_s, ttft_p99_ms, mean_e2e_s), its arrival rate, its share of the model's arrivals (what
    the predictive policy scales the model's forecast by; the planned share while the model has no traffic),
    and its share of the requests queued for the model in the routers (rounded up: a request waiting for a
    version at zero wakes it)."""
    share = rate / model_rate if model_rate > 0 else planned_share
    queued = math.ceil(model.queued * min(1.0, share)) if model.queued else 0
    return dataclasses.replace(model, arrival_rate=rate, share=share, queued=queued, **own)
