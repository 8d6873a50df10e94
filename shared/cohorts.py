"""Sticky cohort assignment: a user's place in [0, 1) is a hash of a salt, the tenant and the user (or session)
id, so the same user lands in the same rollout share, experiment arm or flag on every request and every router."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def cohort_key(tenant_id: str, user_id: str, session_id: str, request_id: str) -> tuple[str, bool]:
    """What a request is assigned by, and whether that is sticky: the user id, else the session id, else the
    request id (a request without either is assigned on its own, so it may land anywhere next time)."""
    if user_id:
        return f"{tenant_id}\0u\0{user_id}", True
    if session_id:
        return f"{tenant_id}\0s\0{session_id}", True
    return f"{tenant_id}\0r\0{request_id}", False


def bucket(salt: str, key: str) -> float:
    """A uniform number in [0, 1) for (salt, key): blake2b, so every process (and language) computes the same."""
    digest = hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_slice(position: float, offset_percent: float, percent: float) -> bool:
    """Whether a bucket position falls in the slice [offset, offset + percent) of the hash space, in percent."""
    p = position * 100.0
    return offset_percent <= p < offset_percent + percent


def pick(position: float, percents: Sequence[float]) -> int:
    """Index of the share a position in [0, 1) falls into, shares given in percent adding up to 100 (the last
    one takes any rounding left over)."""
    p = position * 100.0
    edge = 0.0
    for i, share in enumerate(percents):
        edge += share
        if p < edge:
            return i
    return len(percents) - 1


def arm_percents(percents: Sequence[float]) -> list[float]:
    """An experiment's arm shares in percent, as given (all 0 means an equal split): the one reading the registry
    validates, the routers assign by and the autoscaler sizes each arm's version by."""
    if percents and all(p == 0 for p in percents):
        return [100.0 / len(percents)] * len(percents)
    return list(percents)
