"""GPU profiles: one TOML file per model+GPU (infra/profiles/) with the sim's KV-cache size, context length and
cost-model terms."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from services.engine.cost_model import CostModel

PROFILES_DIR = Path(__file__).resolve().parents[2] / "infra" / "profiles"
DEFAULT_PROFILE = "h100-llama-1b"
_COST_KEYS = {
    "step_base_ms": "base_ms",
    "per_decode_seq_ms": "per_decode_seq_ms",
    "per_context_token_ms": "per_context_token_ms",
    "per_max_context_token_ms": "per_max_context_token_ms",
    "per_prefill_token_ms": "per_prefill_token_ms",
    "request_overhead_ms": "request_overhead_ms",
    "frontend_request_ms": "frontend_request_ms",
    "per_prompt_token_overhead_ms": "per_prompt_token_overhead_ms",
    "per_output_token_overhead_ms": "per_output_token_overhead_ms",
}


@dataclass(frozen=True)
class GpuProfile:
    """What a profile file holds."""

    name: str
    description: str
    calibrated: bool
    num_kv_blocks: int
    max_model_len: int
    cost: CostModel
    # Cold start of a replica (process start to serving), in seconds at real speed.
    startup_s: float = 0.0
    # [pricing]: what one GPU of this kind costs per hour (0: not priced), and the batch size at which an output
    # token's share of a step's fixed time is reckoned (cost attribution weights, services/metrics/cost.py).
    gpu_hour_usd: float = 0.0
    reference_batch: int = 32

    def token_weights_ms(self) -> tuple[float, float, float]:
        """GPU milliseconds the cost model charges an uncached prompt token, a cached prompt token and an
        output token: the weights a replica's time is split over its requests by."""
        c = self.cost
        output = c.base_ms / self.reference_batch + c.per_decode_seq_ms + c.per_context_token_ms
        return c.per_prefill_token_ms, c.per_context_token_ms, output


def profile_path(name_or_path: str) -> Path:
    """A profile name (infra/profiles/<name>.toml) or a path to a .toml file."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        return Path(name_or_path)
    return PROFILES_DIR / f"{name_or_path}.toml"


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name_or_path: str = DEFAULT_PROFILE) -> GpuProfile:
    """Read and check a profile; ValueError naming the file and the problem when it is missing or wrong."""
    path = profile_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(
            f"GPU profile {name_or_path!r} not found at {path} (known: {', '.join(available_profiles())})"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"GPU profile {path}: {e}") from None
    try:
        engine, cost = data["engine"], data["cost"]
        unknown = set(cost) - set(_COST_KEYS)
        if unknown:
            raise ValueError(f"unknown [cost] keys {sorted(unknown)}; known: {sorted(_COST_KEYS)}")
        defaults = {f.name: f.default for f in fields(CostModel)}
        terms = {field: float(cost.get(key, defaults[field])) for key, field in _COST_KEYS.items()}
        if any(v < 0 for v in terms.values()):
            raise ValueError("cost terms must be >= 0")
        pricing = data.get("pricing", {})
        profile = GpuProfile(
            gpu_hour_usd=float(pricing.get("gpu_hour_usd", 0.0)),
            reference_batch=int(pricing.get("reference_batch", 32)),
            name=path.stem,
            description=str(data.get("description", "")),
            calibrated=bool(data.get("calibrated", False)),
            num_kv_blocks=int(engine["num_kv_blocks"]),
            max_model_len=int(engine["max_model_len"]),
            cost=CostModel(**terms),
            startup_s=float(engine.get("startup_s", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"GPU profile {path}: {e!s}") from None
    if profile.gpu_hour_usd < 0 or profile.reference_batch < 1:
        raise ValueError(f"GPU profile {path}: [pricing] needs gpu_hour_usd >= 0 and reference_batch >= 1")
    if profile.num_kv_blocks < 1 or profile.max_model_len < 1:
        raise ValueError(f"GPU profile {path}: num_kv_blocks and max_model_len must be >= 1")
    if profile.startup_s < 0:
        raise ValueError(f"GPU profile {path}: startup_s must be >= 0")
    return profile
