"""Which gateways are up (rows of the gateway database, and Redis's presence set), and so how many share a limit."""

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


class FleetSize:
    """N, the number of gateways the fallback divides each limit by, from what the presence leases said last.

    - configured (--limits-fallback-gateways): wins; for fleets that know their size (a Deployment's replicas).
    - seen: the gateways alive in the gateway database's presence table at its last reading, plus those in Redis's
      presence set at its last reading unless the database says they left. The database is what the gateways
      sharing tenants already share (one SQLite file on a host, PostgreSQL across hosts) and is read while Redis
      is down, so gateways that start during an outage count each other, and one that leaves during it stops
      being counted (its lease ends). Redis's set is kept as last seen: it covers gateways on another database,
      and a gateway that died is gone from it within a lease (3 presence intervals) while Redis is up.
    - default (--limits-fallback-unknown-gateways, 2): nothing read yet (before the first round, or neither Redis
      nor the database has answered), or only one database reading counting fewer than the default. Not 1: a
      gateway that knows nothing must not grant the whole limit, which N gateways doing at once would turn into N
      times the limit; 2 is the smallest fleet that uses Redis for
      sharing, and the base Kubernetes manifest's replica count. Logged once as gateway.limits_fleet_size_unknown
      and exported as fleetserve:limits_fallback_gateways_unknown so an operator can alert on it."""

    def __init__(self, configured: int = 0, unknown: int = 2) -> None:
        self.configured = configured
        self.unknown = max(1, unknown)
        self.redis: frozenset[str] | None = None
        self.database: Presence | None = None
        self.database_rounds = 0
        self.seen: int | None = None

    def read_database(self, reading: Presence) -> None:
        self.database = reading
        self.database_rounds += 1

    def recount(self) -> None:
        if self.redis is None and self.database is None:
            self.seen = None
            return
        members: set[str] = set(self.database.alive) if self.database is not None else set()
        if self.redis is not None:
            members |= self.redis - (self.database.departed if self.database is not None else frozenset())
        # A first database reading may predate the rows of gateways that start in the same second (a fleet
        # started, or restarted, while Redis is down): until a second one, fewer than the default is no proof.
        early = self.redis is None and self.database_rounds < 2
        self.seen = None if early and len(members) < self.unknown else len(members)

    @property
    def source(self) -> str:
        if self.configured:
            return "configured"
        return "default" if not self.seen else "seen"

    def __call__(self) -> int:
        return self.configured or self.seen or self.unknown
