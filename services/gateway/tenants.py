"""Tenants and their API keys in SQLite (keys stored as SHA-256 hashes only), with a short lookup cache."""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

KEY_PREFIX_LEN = 8
DEV_TENANT = "dev"
_MAX_CACHED = 10_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    tier       TEXT NOT NULL DEFAULT 'standard',
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash   TEXT PRIMARY KEY,
    key_prefix TEXT NOT NULL,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    created_at REAL NOT NULL,
    revoked_at REAL
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant_id);
"""


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a request belongs to."""

    id: str
    name: str
    tier: str = "standard"


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key: the only form in which keys are stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    """A new random API key."""
    return "fsk-" + secrets.token_urlsafe(24)


def bearer_key(authorization: str | None) -> str | None:
    """The key in an "authorization: Bearer <key>" header value, or None."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() != "bearer" or not key:
        return None
    return key


class TenantStore:
    """Tenants and API keys. authenticate() caches each lookup (hits and misses) for cache_ttl_s, so SQLite
    is not read on every request, while a key revoked elsewhere stops working within cache_ttl_s."""

    def __init__(
        self, db_path: str, cache_ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.db_path = db_path
        self.cache_ttl_s = cache_ttl_s
        self._clock = clock
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=2000")
        self._db.executescript(_SCHEMA)
        self._cache: dict[str, tuple[Tenant | None, float]] = {}

    def close(self) -> None:
        self._db.close()

    # -- admin ------------------------------------------------------------------------------------------

    def create_tenant(self, name: str, tier: str = "standard", tenant_id: str | None = None) -> Tenant:
        """A new tenant; its id defaults to a slug of its name."""
        tid = tenant_id or re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or secrets.token_hex(6)
        self._db.execute(
            "INSERT INTO tenants (id, name, tier, created_at) VALUES (?, ?, ?, ?)",
            (tid, name, tier, time.time()),
        )
        return Tenant(tid, name, tier)

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self._db.execute("SELECT id, name, tier FROM tenants WHERE id = ?", (tenant_id,)).fetchone()
        return Tenant(*row) if row else None

    def tenant_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM tenants").fetchone()[0]

    def add_key(self, tenant_id: str, key: str | None = None) -> str:
        """Store a key (a new random one by default) for tenant_id; returns the key, which is not kept."""
        key = key or generate_key()
        self._db.execute(
            "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, created_at) VALUES (?, ?, ?, ?)",
            (hash_key(key), key[:KEY_PREFIX_LEN], tenant_id, time.time()),
        )
        self._cache.pop(hash_key(key), None)
        return key

    def key_known(self, key: str) -> bool:
        """Whether key was ever stored (revoked or not)."""
        return (
            self._db.execute("SELECT 1 FROM api_keys WHERE key_hash = ?", (hash_key(key),)).fetchone()
            is not None
        )

    def revoke_key(self, key: str) -> bool:
        """Revoke key; False if it was unknown or already revoked."""
        h = hash_key(key)
        cur = self._db.execute(
            "UPDATE api_keys SET revoked_at = ? WHERE key_hash = ? AND revoked_at IS NULL", (time.time(), h)
        )
        self._cache.pop(h, None)
        return cur.rowcount > 0

    def bootstrap(self, key: str = "") -> str | None:
        """On first start (no tenants), create tenant "dev" with key, or a generated one that is logged
        once (gateway.dev_key_created) and returned. A bootstrap key that was never stored
        is added to "dev" on later starts too (the launcher keeps its key across data dirs); a revoked
        one stays revoked."""
        if self.tenant_count() == 0:
            self.create_tenant(DEV_TENANT, tier="standard", tenant_id=DEV_TENANT)
            created = self.add_key(DEV_TENANT, key or None)
            if key:
                log.info("gateway.dev_tenant_created", tenant=DEV_TENANT, key_prefix=key[:KEY_PREFIX_LEN])
                return None
            # Only the hash is stored: this line is the one time the generated key can be seen.
            log.warning("gateway.dev_key_created", tenant=DEV_TENANT, api_key=created)
            return created
        if key and not self.key_known(key) and self.get_tenant(DEV_TENANT) is not None:
            self.add_key(DEV_TENANT, key)
            log.info("gateway.bootstrap_key_added", tenant=DEV_TENANT, key_prefix=key[:KEY_PREFIX_LEN])
        return None

    # -- the request path ---------------------------------------------------------------------------------

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning key, or None for an unknown or revoked key."""
        h = hash_key(key)
        now = self._clock()
        hit = self._cache.get(h)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = self._db.execute(
            "SELECT t.id, t.name, t.tier FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
            "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
            (h,),
        ).fetchone()
        tenant = Tenant(*row) if row else None
        if len(self._cache) >= _MAX_CACHED:
            # Bounded: a flood of random keys must not grow memory; dropping all costs one query each.
            self._cache.clear()
        self._cache[h] = (tenant, now + self.cache_ttl_s)
        return tenant
