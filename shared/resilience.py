"""Resilience primitives shared by the services: exponential backoff with full jitter."""

from __future__ import annotations

import random


def full_jitter(attempt: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Delay before retry number `attempt` (0-based): uniform in [0, min(cap, base * 2**attempt)], so many
    clients retrying together (a fleet restarted at once, routers reconnecting) do not retry in lockstep."""
    # Bound the exponent: 2**attempt overflows a float long before anyone retries that often.
    ceiling = min(cap_s, base_s * 2 ** min(attempt, 32))
    return (rng or random).uniform(0.0, ceiling)
