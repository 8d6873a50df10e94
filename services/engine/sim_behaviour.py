"""Planted behaviour of the sim per model version (slower steps, failing requests, shorter or refused answers), so
that tests and benchmarks can give a rollout a candidate that regresses in a known way."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
from dataclasses import dataclass

from services.engine.cost_model import CostModel

# What a refusing version answers (and what the output-quality checks look for).
REFUSAL_TEXT = "I'm sorry, but I can't help with that."
ANY_VERSION = "*"


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How one version differs from the calibrated sim. Draws are deterministic per (seed, request id), so a
    request that fails on one replica of a version fails on every replica of it (the version is broken for that
    input, not the replica), and a retry never hides the version's errors."""

    # Every step's GPU time is multiplied by this (2: twice the TPOT and prefill time).
    slowdown: float = 1.0
    # Fraction of requests that fail with INTERNAL before their first token.
    error_rate: float = 0.0
    # Answers end (finish reason stop) after this fraction of max_tokens, at least one token.
    length_factor: float = 1.0
    # Fraction of requests answered with REFUSAL_TEXT instead.
    refusal_rate: float = 0.0

    def __post_init__(self) -> None:
        if not (self.slowdown > 0 and math.isfinite(self.slowdown)):
            raise ValueError(f"slowdown must be > 0; got {self.slowdown}")
        for name in ("error_rate", "refusal_rate"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {v}")
        if not 0.0 < self.length_factor <= 1.0:
            raise ValueError(f"length_factor must be in (0, 1]; got {self.length_factor}")

    @property
    def planted(self) -> bool:
        return self != Behaviour()

    def slowed(self, cost: CostModel) -> CostModel:
        """cost with every GPU term of a step multiplied by slowdown (the front end is the same program)."""
        if self.slowdown == 1.0:
            return cost
        f = self.slowdown
        return dataclasses.replace(
            cost,
            base_ms=cost.base_ms * f,
            per_decode_seq_ms=cost.per_decode_seq_ms * f,
            per_context_token_ms=cost.per_context_token_ms * f,
            per_max_context_token_ms=cost.per_max_context_token_ms * f,
            per_prefill_token_ms=cost.per_prefill_token_ms * f,
        )

    def fails(self, seed: int, request_id: str) -> bool:
        """Whether this request fails (error_rate)."""
        return self.error_rate > 0 and _draw(seed, request_id, b"error") < self.error_rate

    def refuses(self, seed: int, request_id: str) -> bool:
        """Whether this request is refused (refusal_rate)."""
        return self.refusal_rate > 0 and _draw(seed, request_id, b"refusal") < self.refusal_rate

    def output_cap(self, max_tokens: int) -> int | None:
        """Where a shortened answer stops, or None when answers are not shortened."""
        if self.length_factor >= 1.0:
            return None
        return max(1, math.floor(max_tokens * self.length_factor))


def _draw(seed: int, request_id: str, what: bytes) -> float:
    """A uniform number in [0, 1) from (seed, request id, what)."""
    h = hashlib.blake2b(struct.pack("<Q", seed & (2**64 - 1)) + what + request_id.encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") / 2**64


def parse(text: str) -> dict[str, Behaviour]:
    """'VERSION:key=value,...;VERSION:...' -> {version: Behaviour}; VERSION '*' applies to any version without
    its own entry. Keys are Behaviour's fields. ValueError naming the bad part."""
    out: dict[str, Behaviour] = {}
    fields = {f.name for f in dataclasses.fields(Behaviour)}
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        version, sep, body = part.partition(":")
        version = version.strip()
        if not sep or not version:
            raise ValueError(f"{part!r}: expected VERSION:key=value,...")
        if version in out:
            raise ValueError(f"version {version!r} given twice")
        values: dict[str, float] = {}
        for item in (i.strip() for i in body.split(",")):
            if not item:
                continue
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or key not in fields:
                raise ValueError(f"{item!r}: expected one of {', '.join(sorted(fields))} = a number")
            try:
                values[key] = float(value)
            except ValueError:
                raise ValueError(f"{item!r}: {value.strip()!r} is not a number") from None
        try:
            out[version] = Behaviour(**values)
        except ValueError as e:
            raise ValueError(f"version {version!r}: {e}") from None
    return out


def for_version(table: dict[str, Behaviour], version: str) -> Behaviour:
    """The behaviour of version in a parsed table (its own entry, else '*', else the calibrated sim)."""
    return table.get(version) or table.get(ANY_VERSION) or Behaviour()
