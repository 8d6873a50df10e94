"""Feature flags: validation of a flag (who it targets and what it gives them)."""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping

from fleetserve.registry.v1 import rollout_service_pb2 as pb

from shared.errors import InvalidArgument

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def validate(flag: pb.FeatureFlag, versions: Mapping[str, set[str]], policies: Collection[str]) -> None:
    """InvalidArgument naming every bad field of flag."""
    bad: list[tuple[str, str]] = []
    if not NAME.match(flag.name):
        bad.append(("flag.name", "1-64 letters, digits, '.', '-' or '_', starting with a letter or digit"))
    known = versions.get(flag.model)
    if not flag.model:
        bad.append(("flag.model", "required"))
    elif known is None:
        bad.append(("flag.model", f"no replica of {flag.model!r} has registered"))
    if not (flag.tenants or flag.users or flag.percent):
        bad.append(("flag", "targets nobody: give tenants, users or a percent of users"))
    if not (math.isfinite(flag.percent) and 0.0 <= flag.percent <= 100.0):
        bad.append(("flag.percent", f"a percent in [0, 100]; got {flag.percent}"))
    if any(not t for t in flag.tenants):
        bad.append(("flag.tenants", "tenant ids must not be empty"))
    if any(not u for u in flag.users):
        bad.append(("flag.users", "user ids must not be empty"))
    v = flag.variant
    if not (v.model_version or v.routing_policy):
        bad.append(("flag.variant", "gives nothing: set model_version or routing_policy"))
    if v.model_version and known is not None and v.model_version not in known:
        listed = ", ".join(sorted(known)) or "none"
        bad.append(("flag.variant.model_version", f"unknown version {v.model_version!r}; known: {listed}"))
    if v.routing_policy and v.routing_policy not in policies:
        bad.append(("flag.variant.routing_policy", f"unknown policy {v.routing_policy!r}"))
    if bad:
        raise InvalidArgument(
            "invalid feature flag: " + "; ".join(f"{f} {d}" for f, d in bad), field_violations=bad
        )
