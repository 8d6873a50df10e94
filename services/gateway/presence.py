"""Which gateways are up, as rows of the gateway database (the one every gateway sharing tenants talks to)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from services.gateway.db import Database

# A gateway's row stays this long after it left or its lease ran out, so the others can tell "left" from "never
# in this database" (a gateway they last saw in Redis that has no row may be on another database); then pruned.
KEEP_DEPARTED_S = 3600.0


@dataclass(frozen=True)
class Presence:
    """One reading of the table: gateways whose lease runs, and gateways whose row says they left."""

    alive: frozenset[str]
    departed: frozenset[str]


class PresenceTable:
    """Each gateway renews a lease row (gateway_id, lease_until) every round; leases are judged by the gateways' own
    clocks (as job leases are), so hosts' clocks must agree to well within a lease (NTP does)."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    async def renew(self, gateway_id: str, ttl_s: float) -> Presence:
        """Extend this gateway's lease by ttl_s and read everyone's."""
        now = self._clock()
        await self.db.execute(
            "INSERT INTO gateway_presence (gateway_id, lease_until) VALUES (?, ?) "
            "ON CONFLICT (gateway_id) DO UPDATE SET lease_until = excluded.lease_until",
            gateway_id,
            now + ttl_s,
        )
        await self.db.execute("DELETE FROM gateway_presence WHERE lease_until < ?", now - KEEP_DEPARTED_S)
        rows = await self.db.fetch("SELECT gateway_id, lease_until FROM gateway_presence")
        return Presence(
            frozenset(g for g, until in rows if until > now),
            frozenset(g for g, until in rows if until <= now),
        )

    async def leave(self, gateway_id: str) -> None:
        """End this gateway's lease now (a gateway stopping): the others stop counting it at their next round."""
        await self.db.execute(
            "UPDATE gateway_presence SET lease_until = ? WHERE gateway_id = ?", self._clock(), gateway_id
        )
