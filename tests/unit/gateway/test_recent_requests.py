"""The gateway's index of recent requests for Feedback: bounded, looked up by the id clients quote, compact."""

from __future__ import annotations

import sys
import uuid

from services.gateway.feedback import RecentRequests


def test_remembers_the_last_capacity_requests_by_their_id():
    """Ids (hex or not) map to (tenant, model); the oldest go first past capacity; unauthenticated ones are not
    kept."""
    recent = RecentRequests(capacity=3)
    ids = [uuid.uuid4().hex for _ in range(3)]
    for i, rid in enumerate(ids):
        recent.remember(rid, "acme", f"m{i}")
    recent.remember("not-hex-id", "acme", "m9")
    recent.remember(uuid.uuid4().hex, "", "m0")
    assert recent.get(ids[0]) is None
    assert recent.get(ids[1]) == ("acme", "m1") and recent.get(ids[2]) == ("acme", "m2")
    assert recent.get("not-hex-id") == ("acme", "m9")
    assert recent.get("") is None


def test_entries_share_their_tenant_model_pair():
    """Entries of one (tenant, model) share one tuple, and hex ids are kept as 16 bytes."""
    recent = RecentRequests()
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    recent.remember(a, "acme", "sim-1b")
    recent.remember(b, "acme", "sim-1b")
    assert recent.get(a) is recent.get(b)
    key = next(iter(recent._items))
    assert isinstance(key, bytes) and sys.getsizeof(key) < sys.getsizeof(a)
