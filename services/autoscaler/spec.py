"""Per-model autoscaling configuration: bounds, policies and their options, cooldowns, scale to zero. Parsed
from JSON (the --models flag or a file); every problem is refused at start with a message naming the field."""

from __future__ import annotations

import json
import shlex
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
    "version",
    "versions",
    "retire_after_s",
}
_VERSION_FIELDS = {"min_replicas", "max_replicas", "engine_args"}


@dataclass(frozen=True)
class VersionSpec:
    """One version the autoscaler can start: its bounds (None: the model's) and the engine flags that make an
    engine serve it beyond --model-version (vLLM: its weights, e.g. "--vllm-args='--model /models/m-v2'")."""

    min_replicas: int | None = None
    max_replicas: int | None = None
    engine_args: str = ""


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
    # The version replicas serve while no rollout names one (the engine's --model-version default).
    version: str = "v1"
    # Versions it can start besides `version` (a rollout may name them), with their own bounds and engine flags.
    versions: dict[str, VersionSpec] = field(default_factory=dict)
    # A promoted rollout's baseline keeps its replicas this long (a blue-green switch back finds them warm),
    # then it is drained to zero.
    retire_after_s: float = 300.0

    @property
    def available_versions(self) -> list[str]:
        """Versions this autoscaler can start replicas of (the registry accepts rollouts of them)."""
        return [self.version, *(v for v in self.versions if v != self.version)]

    def build_policies(self, **shared: Any) -> list[policies.Policy]:
        """The configured policies; `shared` state (the model's arrival history) goes to those that use it."""
        return [
            policies.build(
                name, opts, replica_rps=self.replica_rps, default_cold_start_s=self.cold_start_s, **shared
            )
            for name, opts in self.policies.items()
        ]


def _version_name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 128 or any(c.isspace() for c in v):
        raise ValueError(f"{where}: must be a version name (1-128 characters, no spaces), got {v!r}")
    return v


def _parse_versions(raw: Any, where: str, model_max: int) -> dict[str, VersionSpec]:
    if not isinstance(raw, dict):
        raise ValueError(
            f"{where}: must be a mapping of version -> {{min_replicas, max_replicas, engine_args}}"
        )
    out = {}
    for v, b in raw.items():
        at = f"{where}.{_version_name(v, where)}"
        if not isinstance(b, dict):
            raise ValueError(
                f"{at}: must be a mapping (min_replicas, max_replicas, engine_args; all optional)"
            )
        unknown = set(b) - _VERSION_FIELDS
        if unknown:
            raise ValueError(f"{at}: unknown field(s) {sorted(unknown)}; known: {sorted(_VERSION_FIELDS)}")
        lo = _number(b, "min_replicas", at, 0, integer=True) if "min_replicas" in b else None
        hi = _number(b, "max_replicas", at, 1, integer=True, minimum=1) if "max_replicas" in b else None
        if lo is not None and lo > (model_max if hi is None else hi):
            raise ValueError(
                f"{at}.min_replicas: {lo} is more than max_replicas {model_max if hi is None else hi}"
            )
        args = b.get("engine_args", "")
        try:
            if not isinstance(args, str):
                raise ValueError("not a string")
            shlex.split(args)
        except ValueError as e:
            raise ValueError(
                f"{at}.engine_args: must be engine flags as one shell-quoted string ({e})"
            ) from None
        out[v] = VersionSpec(lo, hi, args)
    return out


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
        version=_version_name(raw.get("version", "v1"), f"{where}.version"),
        versions=_parse_versions(raw.get("versions", {}), f"{where}.versions", hi),
        retire_after_s=float(_number(raw, "retire_after_s", where, 300.0)),
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
