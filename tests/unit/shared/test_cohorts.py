"""Sticky cohort hashing: the same key always lands in the same place, places are uniform, slices and shares
pick as documented."""

from __future__ import annotations

import pytest
from scipy import stats as sps

from shared.cohorts import bucket, cohort_key, in_slice, pick


def test_user_then_session_then_request_decides():
    """A user id is the key (sticky), else a session id, else the request id (not sticky)."""
    assert cohort_key("t", "u", "s", "r") == ("t\0u\0u", True)
    assert cohort_key("t", "", "s", "r") == ("t\0s\0s", True)
    assert cohort_key("t", "", "", "r") == ("t\0r\0r", False)
    # Tenants are part of the key: the same user id in two tenants is two users.
    assert bucket("x", cohort_key("a", "u", "", "")[0]) != bucket("x", cohort_key("b", "u", "", "")[0])


def test_buckets_are_deterministic_and_uniform():
    """bucket() is a pure function; 20,000 keys are uniform on [0, 1) (Kolmogorov-Smirnov, p > 0.001)."""
    values = [bucket("salt", f"user-{i}") for i in range(20_000)]
    assert values == [bucket("salt", f"user-{i}") for i in range(20_000)]
    assert sps.kstest(values, "uniform").pvalue > 0.001
    # Another salt reshuffles: a user's place in one split says nothing about another.
    other = [bucket("other", f"user-{i}") for i in range(20_000)]
    assert abs(sps.pearsonr(values, other).statistic) < 0.05


def test_slices_and_shares():
    """in_slice takes [offset, offset+percent); pick walks the shares, the last taking any rounding."""
    assert in_slice(0.25, 20, 10) and not in_slice(0.30, 20, 10) and in_slice(0.20, 20, 10)
    assert [pick(p, [50, 30, 20]) for p in (0.0, 0.49, 0.5, 0.79, 0.8, 0.999)] == [0, 0, 1, 1, 2, 2]
    assert pick(0.9999, [33.3, 33.3, 33.3]) == 2


@pytest.mark.parametrize("percent", [1, 10, 50])
def test_a_growing_share_keeps_its_users(percent):
    """Users inside a p% share stay inside any larger share (a ramp never moves a user back)."""
    users = [f"u{i}" for i in range(5000)]
    inside = {u for u in users if bucket("ro", u) * 100 < percent}
    bigger = {u for u in users if bucket("ro", u) * 100 < percent * 2}
    assert inside <= bigger
