"""The gateway's index of recent requests for Feedback: bounded, looked up by the id clients quote, compact."""

from __future__ import annotations

import sys
import uuid

from services.gateway.feedback import RecentRequests, Served
from services.gateway.pipeline import Outcome


def by(tenant: str, version: str = "") -> Outcome:
    """What a finished request's outcome says of who sent it and what served it."""
    return Outcome(request_id="", tenant_id=tenant, model_version=version)


def test_remembers_the_last_capacity_requests_by_their_id():
    """Ids (hex or not) map to who sent them and what served them; the oldest go first past capacity;
    unauthenticated ones are not kept."""
    recent = RecentRequests(capacity=3)
    ids = [uuid.uuid4().hex for _ in range(3)]
    for i, rid in enumerate(ids):
        recent.remember(rid, by("acme", "v2"), f"m{i}")
    recent.remember("not-hex-id", by("acme"), "m9")
    recent.remember(uuid.uuid4().hex, by(""), "m0")
    assert recent.get(ids[0]) is None
    assert recent.get(ids[1]) == Served("acme", "m1", "v2") and recent.get(ids[2]) == Served(
        "acme", "m2", "v2"
    )
    assert recent.get("not-hex-id") == Served("acme", "m9")
    assert recent.get("") is None


def test_entries_share_their_labels():
    """Entries with the same labels (tenant, model, version, arm) share one Served, and hex ids are kept as 16
    bytes."""
    recent = RecentRequests()
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    recent.remember(a, by("acme"), "sim-1b")
    recent.remember(b, by("acme"), "sim-1b")
    assert recent.get(a) is recent.get(b)
    key = next(iter(recent._items))
    assert isinstance(key, bytes) and sys.getsizeof(key) < sys.getsizeof(a)
