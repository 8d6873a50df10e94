"""Pipeline rules that need no network: the tier a request runs at."""

from __future__ import annotations

import pytest
from fleetserve.common.v1 import common_pb2 as c

from services.gateway.pipeline import effective_priority


@pytest.mark.parametrize(
    ("requested", "tier", "runs_at"),
    [
        (c.PRIORITY_UNSPECIFIED, "standard", c.PRIORITY_STANDARD),
        (c.PRIORITY_UNSPECIFIED, "batch", c.PRIORITY_BATCH),
        (c.PRIORITY_INTERACTIVE, "standard", c.PRIORITY_STANDARD),
        (c.PRIORITY_INTERACTIVE, "interactive", c.PRIORITY_INTERACTIVE),
        (c.PRIORITY_BATCH, "interactive", c.PRIORITY_BATCH),
    ],
)
def test_a_request_runs_at_its_tier_or_lower_never_above_its_tenants(requested, tier, runs_at):
    """Unspecified means the tenant's tier; a tenant may ask for a lower tier but never a higher one."""
    assert effective_priority(requested, tier) == runs_at
