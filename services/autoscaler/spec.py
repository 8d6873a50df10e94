"""Per-model autoscaling configuration: bounds, policies and their options, cooldowns, scale to zero. Parsed
from JSON (the --models flag or a file); every problem is refused at start with a message naming the field."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.autoscaler import policies

_FIELDS = {
    "min_replicas",
    "max_replicas",
    "policies",
    "replica_rps",
    "cold_start_s",
    "scale_up_cooldown_s",
    "scale_down_cooldown_s",
    "scale_to_zero",
    "idle_s",
    "max_step_up",
}


@dataclass(frozen=True)
class ModelSpec:
    """How one model scales."""

    model: str
    min_replicas: int = 1
    max_replicas: int = 8
    # Policy name -> its options; the desired count is the largest any of them asks for.
    policies: dict[str, dict[str, Any]] = field(default_factory=lambda: {"reactive": {}})
    # Requests/s one replica serves within the SLO (capacity and predictive policies).
    replica_rps: float = 0.0
    # Cold start to plan with until one has been measured.
    cold_start_s: float = 60.0
    # Least time between two scale-ups, and between any change and a scale-down (a scale-down also waits
    # until every recommendation over this window was that low: no flapping).
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 300.0
    # With min_replicas 0: stop the last replica after idle_s without a request; a request wakes it.
    scale_to_zero: bool = False
    idle_s: float = 300.0
    # Most replicas added in one decision (0: no limit).
    max_step_up: int = 0

    def build_policies(self) -> list[policies.Policy]:
        return [
            policies.build(name, opts, replica_rps=self.replica_rps, default_cold_start_s=self.cold_start_s)
            for name, opts in self.policies.items()
        ]


def _number(raw: dict, key: str, where: str, default: float, *, integer: bool = False, minimum: float = 0.0):
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{where}.{key}: must be {kind}, got {v!r}")
    if v < minimum:
        raise ValueError(f"{where}.{key}: must be >= {minimum:g}, got {v}")
    return v


def parse_model(model: str, raw: Any) -> ModelSpec:
    """One model's spec from its mapping; ValueError naming `models.<model>.<field>` on any problem."""
    where = f"models.{model}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: must be a mapping of settings")
    unknown = set(raw) - _FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(_FIELDS)}")
    lo = _number(raw, "min_replicas", where, 1, integer=True)
    hi = _number(raw, "max_replicas", where, 8, integer=True, minimum=1)
    if lo > hi:
        raise ValueError(f"{where}.min_replicas: {lo} is more than max_replicas {hi}")
    pol = raw.get("policies", {"reactive": {}})
    if isinstance(pol, list):
        pol = {name: {} for name in pol}
    if not isinstance(pol, dict) or not pol:
        raise ValueError(f"{where}.policies: must name at least one policy ({', '.join(policies.AVAILABLE)})")
    for name, opts in pol.items():
        if name not in policies.AVAILABLE:
            raise ValueError(
                f"{where}.policies: unknown policy {name!r}; known: {', '.join(policies.AVAILABLE)}"
            )
        if not isinstance(opts, dict):
            raise ValueError(f"{where}.policies.{name}: options must be a mapping")
    scale_to_zero = raw.get("scale_to_zero", False)
    if not isinstance(scale_to_zero, bool):
        raise ValueError(f"{where}.scale_to_zero: must be true or false")
    if scale_to_zero and lo != 0:
        raise ValueError(f"{where}.scale_to_zero: needs min_replicas 0 (it is {lo})")
    if lo == 0 and not scale_to_zero:
        raise ValueError(
            f"{where}.min_replicas: 0 needs scale_to_zero true (stop the last replica when idle)"
        )
    spec = ModelSpec(
        model=model,
        min_replicas=lo,
        max_replicas=hi,
        policies=pol,
        replica_rps=float(_number(raw, "replica_rps", where, 0.0)),
        cold_start_s=float(_number(raw, "cold_start_s", where, 60.0)),
        scale_up_cooldown_s=float(_number(raw, "scale_up_cooldown_s", where, 0.0)),
        scale_down_cooldown_s=float(_number(raw, "scale_down_cooldown_s", where, 300.0)),
        scale_to_zero=scale_to_zero,
        idle_s=float(_number(raw, "idle_s", where, 300.0)),
        max_step_up=int(_number(raw, "max_step_up", where, 0, integer=True)),
    )
    try:
        spec.build_policies()  # every option checked now, at start
    except ValueError as e:
        raise ValueError(f"{where}.policies.{e}") from None
    return spec


def parse_models(text: str) -> list[ModelSpec]:
    """Specs from JSON text, or from the JSON file it names (a path ending in .json)."""
    text = text.strip()
    if text.endswith(".json") and not text.startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as e:
            raise ValueError(f"models: cannot read {text}: {e}") from None
    try:
        raw = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"models: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or not raw:
        raise ValueError(
            'models: must be a JSON object {"<model>": {...settings...}} naming at least one model'
        )
    return [parse_model(m, v) for m, v in raw.items()]
