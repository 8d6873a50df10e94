"""Tenants, their API keys (stored as SHA-256 hashes only), tiers, limits and allowed models in SQLite, with
a short lookup cache whose staleness is bounded by a TTL and by a version counter that every admin change bumps."""

from __future__ import annotations

import dataclasses
import hashlib
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)

KEY_PREFIX_LEN = 8
DEV_TENANT = "dev"
TIERS = ("interactive", "standard", "batch")
PERIODS = ("hour", "day", "month")
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
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (name, value) VALUES ('config_version', 0);
"""

# Columns added after the first release: ALTER TABLE on open, so older databases keep working.
_TENANT_COLUMNS = {
    "rps": "REAL",
    "tokens_per_min": "INTEGER",
    "max_streams": "INTEGER",
    "token_budget": "INTEGER",
    "budget_period": "TEXT NOT NULL DEFAULT 'month'",
    "cost_budget_usd": "REAL",
    "models": "TEXT",
}
_KEY_COLUMNS = {
    "key_id": "TEXT",
    "name": "TEXT NOT NULL DEFAULT ''",
    "rps": "REAL",
    "tokens_per_min": "INTEGER",
}
_LIMIT_FIELDS = ("rps", "tokens_per_min", "max_streams", "token_budget", "budget_period", "cost_budget_usd")


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of a tenant (all fields) or of one key (rps and tokens_per_min); None means unlimited."""

    rps: float | None = None
    tokens_per_min: int | None = None
    max_streams: int | None = None
    token_budget: int | None = None
    budget_period: str = "month"
    cost_budget_usd: float | None = None


@dataclass(frozen=True, slots=True)
class Tenant:
    """Who a request belongs to, with the limits that apply to it and the key it came with."""

    id: str
    name: str
    tier: str = "standard"
    limits: Limits = Limits()
    # None: every model; otherwise only these.
    models: frozenset[str] | None = None
    key_id: str = ""
    key_limits: Limits = Limits()

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """An API key as listed by the admin (never the key itself)."""

    key_id: str
    tenant_id: str
    prefix: str
    name: str
    created_at: float
    revoked_at: float | None
    limits: Limits


def hash_key(key: str) -> str:
    """SHA-256 hex of an API key: the only form in which keys are stored. surrogatepass: a header whose bytes
    are not UTF-8 (aiohttp hands them over as surrogate escapes) hashes to no stored key, rather than raising."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(key_hash: str) -> str:
    """The public id of a key (safe to show and log): derived from its hash."""
    return "key_" + key_hash[:12]


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


def _models_from_db(value: str | None) -> frozenset[str] | None:
    return None if value is None else frozenset(m for m in value.split(",") if m)


class TenantStore:
    """Tenants and API keys. authenticate() caches each lookup (hits and misses) for cache_ttl_s, so SQLite
    is not read on every request. A change made elsewhere (`fleetserve admin`, another gateway) applies within
    cache_ttl_s, and within version_poll_s when that is set: every admin change bumps meta.config_version,
    and a changed version empties the cache."""

    def __init__(
        self,
        db_path: str,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        version_poll_s: float | None = None,
    ) -> None:
        self.db_path = db_path
        self.cache_ttl_s = cache_ttl_s
        self.version_poll_s = version_poll_s
        self._clock = clock
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=2000")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._cache: dict[str, tuple[Tenant | None, float]] = {}
        self._version = self.config_version()
        self._version_checked = clock()

    def _migrate(self) -> None:
        for table, columns in (("tenants", _TENANT_COLUMNS), ("api_keys", _KEY_COLUMNS)):
            have = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        self._db.execute(
            "UPDATE api_keys SET key_id = 'key_' || substr(key_hash, 1, 12) WHERE key_id IS NULL"
        )
        self._db.execute("CREATE UNIQUE INDEX IF NOT EXISTS api_keys_key_id ON api_keys(key_id)")

    def close(self) -> None:
        self._db.close()

    @property
    def db(self) -> sqlite3.Connection:
        """The connection (the ledger shares it: one writer per process)."""
        return self._db

    def config_version(self) -> int:
        return self._db.execute("SELECT value FROM meta WHERE name = 'config_version'").fetchone()[0]

    def _changed(self) -> None:
        self._db.execute("UPDATE meta SET value = value + 1 WHERE name = 'config_version'")
        self._cache.clear()

    # -- admin ------------------------------------------------------------------------------------------

    def create_tenant(self, name: str, tier: str = "standard", tenant_id: str | None = None) -> Tenant:
        """A new tenant; its id defaults to a slug of its name."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
        tid = tenant_id or re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or secrets.token_hex(6)
        self._db.execute(
            "INSERT INTO tenants (id, name, tier, created_at) VALUES (?, ?, ?, ?)",
            (tid, name, tier, time.time()),
        )
        self._changed()
        return Tenant(tid, name, tier)

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self._db.execute(
            f"SELECT id, name, tier, models, {', '.join(_LIMIT_FIELDS)} FROM tenants WHERE id = ?",
            (tenant_id,),
        ).fetchone()
        return self._tenant(row) if row else None

    def list_tenants(self) -> list[Tenant]:
        rows = self._db.execute(
            f"SELECT id, name, tier, models, {', '.join(_LIMIT_FIELDS)} FROM tenants ORDER BY id"
        ).fetchall()
        return [self._tenant(r) for r in rows]

    @staticmethod
    def _tenant(row: tuple) -> Tenant:
        tid, name, tier, models, *limits = row
        return Tenant(tid, name, tier, Limits(*limits), _models_from_db(models))

    def tenant_count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM tenants").fetchone()[0]

    def set_tenant(
        self,
        tenant_id: str,
        *,
        tier: str | None = None,
        models: Iterable[str] | None = None,
        all_models: bool = False,
        **limits: object,
    ) -> Tenant:
        """Change a tenant's tier, allowed models (all_models=True: every model) or limits (a limit set to
        None or 0 is removed). Applies to running gateways within their cache staleness bound."""
        if self.get_tenant(tenant_id) is None:
            raise KeyError(f"no tenant {tenant_id!r}")
        updates: dict[str, object] = {}
        if tier is not None:
            if tier not in TIERS:
                raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
            updates["tier"] = tier
        if all_models:
            updates["models"] = None
        elif models is not None:
            updates["models"] = ",".join(sorted({m.strip() for m in models if m.strip()}))
        for name, value in limits.items():
            if name not in _LIMIT_FIELDS:
                raise ValueError(f"unknown limit {name!r}; known: {', '.join(_LIMIT_FIELDS)}")
            if name == "budget_period":
                if value not in PERIODS:
                    raise ValueError(f"budget_period must be one of {', '.join(PERIODS)}; got {value!r}")
                updates[name] = value
            else:
                updates[name] = _limit_value(name, value)
        if updates:
            sets = ", ".join(f"{k} = ?" for k in updates)
            self._db.execute(f"UPDATE tenants SET {sets} WHERE id = ?", (*updates.values(), tenant_id))
            self._changed()
        return self.get_tenant(tenant_id)  # type: ignore[return-value]

    def add_key(self, tenant_id: str, key: str | None = None, name: str = "") -> str:
        """Store a key (a new random one by default) for tenant_id; returns the key, which is not kept."""
        if self.get_tenant(tenant_id) is None:
            raise KeyError(f"no tenant {tenant_id!r}")
        key = key or generate_key()
        h = hash_key(key)
        self._db.execute(
            "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, created_at, key_id, name) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (h, key[:KEY_PREFIX_LEN], tenant_id, time.time(), key_id_of(h), name),
        )
        self._changed()
        return key

    def list_keys(self, tenant_id: str | None = None) -> list[KeyInfo]:
        """Keys (of one tenant, or all), oldest first; revoked ones included."""
        sql = (
            "SELECT key_id, tenant_id, key_prefix, name, created_at, revoked_at, rps, tokens_per_min "
            "FROM api_keys"
        )
        args: tuple = ()
        if tenant_id is not None:
            sql += " WHERE tenant_id = ?"
            args = (tenant_id,)
        rows = self._db.execute(sql + " ORDER BY created_at, key_id", args).fetchall()
        return [KeyInfo(*r[:6], Limits(rps=r[6], tokens_per_min=r[7])) for r in rows]

    def set_key_limits(self, key_id: str, **limits: object) -> bool:
        """Set a key's own rps / tokens_per_min (None or 0 removes one); False for an unknown key id."""
        bad = set(limits) - {"rps", "tokens_per_min"}
        if bad:
            raise ValueError(f"a key has only rps and tokens_per_min limits; got {', '.join(sorted(bad))}")
        if not limits:
            return (
                self._db.execute("SELECT 1 FROM api_keys WHERE key_id = ?", (key_id,)).fetchone() is not None
            )
        sets = ", ".join(f"{k} = ?" for k in limits)
        values = tuple(_limit_value(k, v) for k, v in limits.items())
        cur = self._db.execute(f"UPDATE api_keys SET {sets} WHERE key_id = ?", (*values, key_id))
        self._changed()
        return cur.rowcount > 0

    def key_known(self, key: str) -> bool:
        """Whether key was ever stored (revoked or not)."""
        return (
            self._db.execute("SELECT 1 FROM api_keys WHERE key_hash = ?", (hash_key(key),)).fetchone()
            is not None
        )

    def revoke_key(self, key: str) -> bool:
        """Revoke key; False if it was unknown or already revoked."""
        return self._revoke("key_hash = ?", hash_key(key))

    def revoke_key_id(self, key_id: str) -> bool:
        """Revoke the key with this public id; False if it was unknown or already revoked."""
        return self._revoke("key_id = ?", key_id)

    def _revoke(self, where: str, value: str) -> bool:
        cur = self._db.execute(
            f"UPDATE api_keys SET revoked_at = ? WHERE {where} AND revoked_at IS NULL", (time.time(), value)
        )
        if cur.rowcount:
            self._changed()
        return cur.rowcount > 0

    def bootstrap(self, key: str = "") -> str | None:
        """On first start (no tenants), create tenant "dev" (tier interactive: it may use every tier) with
        key, or a generated one that is logged once (gateway.dev_key_created) and returned. A bootstrap key
        that was never stored is added to "dev" on later starts too (the launcher keeps its key across data
        dirs); a revoked one stays revoked."""
        if self.tenant_count() == 0:
            self.create_tenant(DEV_TENANT, tier="interactive", tenant_id=DEV_TENANT)
            created = self.add_key(DEV_TENANT, key or None, name="bootstrap")
            if key:
                log.info("gateway.dev_tenant_created", tenant=DEV_TENANT, key_prefix=key[:KEY_PREFIX_LEN])
                return None
            # Only the hash is stored: this line is the one time the generated key can be seen.
            log.warning("gateway.dev_key_created", tenant=DEV_TENANT, api_key=created)
            return created
        if key and not self.key_known(key) and self.get_tenant(DEV_TENANT) is not None:
            self.add_key(DEV_TENANT, key, name="bootstrap")
            log.info("gateway.bootstrap_key_added", tenant=DEV_TENANT, key_prefix=key[:KEY_PREFIX_LEN])
        return None

    # -- the request path ---------------------------------------------------------------------------------

    def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning key (with its limits and the key's), or None for an unknown or revoked key."""
        h = hash_key(key)
        now = self._clock()
        if self.version_poll_s is not None and now - self._version_checked >= self.version_poll_s:
            self._version_checked = now
            version = self.config_version()
            if version != self._version:
                self._version = version
                self._cache.clear()
        hit = self._cache.get(h)
        if hit is not None and hit[1] > now:
            return hit[0]
        row = self._db.execute(
            "SELECT t.id, t.name, t.tier, t.models, "
            + ", ".join(f"t.{f}" for f in _LIMIT_FIELDS)
            + ", k.key_id, k.rps, k.tokens_per_min FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
            "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
            (h,),
        ).fetchone()
        tenant = None
        if row:
            base = self._tenant(row[: 4 + len(_LIMIT_FIELDS)])
            key_id, rps, tpm = row[4 + len(_LIMIT_FIELDS) :]
            tenant = dataclasses.replace(base, key_id=key_id, key_limits=Limits(rps=rps, tokens_per_min=tpm))
        if len(self._cache) >= _MAX_CACHED:
            # Bounded: a flood of random keys must not grow memory; dropping all costs one query each.
            self._cache.clear()
        self._cache[h] = (tenant, now + self.cache_ttl_s)
        return tenant


def _limit_value(name: str, value: object) -> float | int | None:
    """A limit as stored: None for unlimited (None or 0), else a positive number; ValueError otherwise."""
    if value is None or value == 0:
        return None
    number = float(value)  # type: ignore[arg-type]
    if not number > 0 or number != number:
        raise ValueError(f"{name} must be positive (0 removes the limit); got {value!r}")
    return number if name in ("rps", "cost_budget_usd") else int(number)
