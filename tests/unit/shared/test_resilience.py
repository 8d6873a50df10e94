"""Full-jitter exponential backoff for reconnecting to the registry."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from shared.resilience import full_jitter


@given(
    attempt=st.integers(min_value=0, max_value=10_000),
    base=st.floats(min_value=0.001, max_value=10),
    cap=st.floats(min_value=0.001, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_delay_is_within_zero_and_the_capped_exponential(attempt, base, cap, seed):
    """Every delay lies in [0, min(cap, base * 2**attempt)], even for huge attempt numbers."""
    d = full_jitter(attempt, base, cap, random.Random(seed))
    assert 0.0 <= d <= min(cap, base * 2 ** min(attempt, 32))


def test_ceiling_grows_then_caps():
    """The spread of delays doubles per attempt until it reaches the cap."""
    rng = random.Random(3)
    maxima = [max(full_jitter(a, 0.1, 1.0, rng) for _ in range(300)) for a in range(6)]
    assert maxima[0] <= 0.1 < maxima[2]
    assert all(m <= 1.0 for m in maxima)
    assert maxima[5] > 0.9
