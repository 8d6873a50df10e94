"""Tenants, their API keys (stored as SHA-256 hashes only), tiers, limits and allowed models in the gateway's
database (SQLite or PostgreSQL), with a short lookup cache whose staleness is bounded by a TTL and by a version
counter that every admin change bumps."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from services.gateway.db import Database, IntegrityError

log = structlog.get_logger(__name__)

KEY_PREFIX_LEN = 8
DEV_TENANT = "dev"
TIERS = ("interactive", "standard", "batch")
PERIODS = ("hour", "day", "month")
_MAX_CACHED = 10_000

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
    """Tenants and API keys. authenticate() caches each lookup (hits and misses) for cache_ttl_s, so the
    database is not read on every request. A change made elsewhere (`fleetserve admin`, another gateway)
    applies within cache_ttl_s, and within version_poll_s when that is set: every admin change bumps
    meta.config_version, and a changed version empties the cache."""

    def __init__(
        self,
        db: Database,
        cache_ttl_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        version_poll_s: float | None = None,
    ) -> None:
        self.db = db
        self.cache_ttl_s = cache_ttl_s
        self.version_poll_s = version_poll_s
        self._clock = clock
        self._cache: dict[str, tuple[Tenant | None, float]] = {}
        self._version: int | None = None
        self._version_checked = clock()
        # Keys authenticated since the background refresh last ran (start_refresh): the ones it keeps fresh.
        self._used: set[str] = set()
        self._refresher: asyncio.Task | None = None

    @property
    def db_path(self) -> str:
        """The SQLite file (empty for PostgreSQL)."""
        return getattr(self.db, "path", "")

    async def close(self) -> None:
        await self.stop_refresh()
        await self.db.close()

    def start_refresh(self) -> None:
        """Keep lookups fresh in the background (a serving gateway): the config version is read every 0.8
        version_poll_s, and a key in use is looked up again before its cached entry expires, so a request does
        not wait for the database for either. At a few requests per second (a single stream of long
        generations) the version check alone, due every version_poll_s, fell on almost every request, a
        database round trip through a thread before its first token. Changes still apply within
        version_poll_s and cache_ttl_s: sooner, if anything."""
        if self._refresher is None:
            self._refresher = asyncio.get_running_loop().create_task(
                self._refresh_loop(), name="gateway.tenant_refresh"
            )

    async def stop_refresh(self) -> None:
        task, self._refresher = self._refresher, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _refresh_loop(self) -> None:
        periods = [p for p in (self.version_poll_s, self.cache_ttl_s) if p]
        if not periods:
            return
        # Often enough that a request never finds the version check due (nor a key it uses expired).
        interval = max(0.01, 0.8 * min(periods))
        while True:
            await asyncio.sleep(interval)
            try:
                await self.refresh(2 * interval)
            except Exception as e:  # noqa: BLE001 - requests check for themselves meanwhile
                log.warning("gateway.tenant_refresh_failed", error=str(e)[:200])

    async def refresh(self, margin_s: float) -> None:
        """One background pass: the config version (a change empties the cache), then the keys used since the
        last pass whose entries expire within margin_s, looked up again."""
        now = self._clock()
        if self.version_poll_s is not None:
            version = await self.config_version()
            if version != self._version:
                self._version = version
                self._cache.clear()
            self._version_checked = max(self._version_checked, now)
        used, self._used = self._used, set()
        for h in used:
            entry = self._cache.get(h)
            if entry is None or entry[1] - self._clock() > margin_s:
                continue
            looked_up = self._clock()
            tenant = await self._lookup(h)
            if self._cache.get(h) is entry:  # not revoked, cleared or replaced meanwhile (that one is newer)
                self._cache[h] = (tenant, looked_up + self.cache_ttl_s)

    async def config_version(self) -> int:
        return await self.db.fetchval("SELECT value FROM meta WHERE name = 'config_version'")

    async def _changed(self, tx: Database | None = None) -> None:
        await (tx or self.db).execute("UPDATE meta SET value = value + 1 WHERE name = 'config_version'")
        self._cache.clear()

    # -- admin ------------------------------------------------------------------------------------------

    async def create_tenant(self, name: str, tier: str = "standard", tenant_id: str | None = None) -> Tenant:
        """A new tenant; its id defaults to a slug of its name."""
        if tier not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}; got {tier!r}")
        tid = tenant_id or re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or secrets.token_hex(6)
        async with self.db.transaction() as tx:
            await self._insert_tenant(tx, tid, name, tier)
            await self._changed(tx)
        return Tenant(tid, name, tier)

    @staticmethod
    async def _insert_tenant(tx: Database, tid: str, name: str, tier: str) -> None:
        await tx.execute(
            "INSERT INTO tenants (id, name, tier, created_at) VALUES (?, ?, ?, ?)",
            tid,
            name,
            tier,
            time.time(),
        )

    @staticmethod
    async def _insert_key(tx: Database, tenant_id: str, key: str, name: str) -> None:
        h = hash_key(key)
        await tx.execute(
            "INSERT INTO api_keys (key_hash, key_prefix, tenant_id, created_at, key_id, name) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            h,
            key[:KEY_PREFIX_LEN],
            tenant_id,
            time.time(),
            key_id_of(h),
            name,
        )

    async def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = await self.db.fetchrow(
            f"SELECT id, name, tier, models, {', '.join(_LIMIT_FIELDS)} FROM tenants WHERE id = ?",
            tenant_id,
        )
        return self._tenant(row) if row else None

    async def list_tenants(self) -> list[Tenant]:
        rows = await self.db.fetch(
            f"SELECT id, name, tier, models, {', '.join(_LIMIT_FIELDS)} FROM tenants ORDER BY id"
        )
        return [self._tenant(r) for r in rows]

    @staticmethod
    def _tenant(row: tuple) -> Tenant:
        tid, name, tier, models, *limits = row
        return Tenant(tid, name, tier, Limits(*limits), _models_from_db(models))

    async def tenant_count(self) -> int:
        return await self.db.fetchval("SELECT COUNT(*) FROM tenants")

    async def set_tenant(
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
        if await self.get_tenant(tenant_id) is None:
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
            async with self.db.transaction() as tx:
                await tx.execute(f"UPDATE tenants SET {sets} WHERE id = ?", *updates.values(), tenant_id)
                await self._changed(tx)
        return await self.get_tenant(tenant_id)  # type: ignore[return-value]

    async def add_key(self, tenant_id: str, key: str | None = None, name: str = "") -> str:
        """Store a key (a new random one by default) for tenant_id; returns the key, which is not kept."""
        if await self.get_tenant(tenant_id) is None:
            raise KeyError(f"no tenant {tenant_id!r}")
        key = key or generate_key()
        async with self.db.transaction() as tx:
            await self._insert_key(tx, tenant_id, key, name)
            await self._changed(tx)
        return key

    async def list_keys(self, tenant_id: str | None = None) -> list[KeyInfo]:
        """Keys (of one tenant, or all), oldest first; revoked ones included."""
        sql = (
            "SELECT key_id, tenant_id, key_prefix, name, created_at, revoked_at, rps, tokens_per_min "
            "FROM api_keys"
        )
        args: tuple = ()
        if tenant_id is not None:
            sql += " WHERE tenant_id = ?"
            args = (tenant_id,)
        rows = await self.db.fetch(sql + " ORDER BY created_at, key_id", *args)
        return [KeyInfo(*r[:6], Limits(rps=r[6], tokens_per_min=r[7])) for r in rows]

    async def set_key_limits(self, key_id: str, **limits: object) -> bool:
        """Set a key's own rps / tokens_per_min (None or 0 removes one); False for an unknown key id."""
        bad = set(limits) - {"rps", "tokens_per_min"}
        if bad:
            raise ValueError(f"a key has only rps and tokens_per_min limits; got {', '.join(sorted(bad))}")
        if not limits:
            return await self.db.fetchrow("SELECT 1 FROM api_keys WHERE key_id = ?", key_id) is not None
        sets = ", ".join(f"{k} = ?" for k in limits)
        values = tuple(_limit_value(k, v) for k, v in limits.items())
        async with self.db.transaction() as tx:
            changed = await tx.execute(f"UPDATE api_keys SET {sets} WHERE key_id = ?", *values, key_id)
            await self._changed(tx)
        return changed > 0

    async def key_known(self, key: str) -> bool:
        """Whether key was ever stored (revoked or not)."""
        return await self.db.fetchrow("SELECT 1 FROM api_keys WHERE key_hash = ?", hash_key(key)) is not None

    async def revoke_key(self, key: str) -> bool:
        """Revoke key; False if it was unknown or already revoked."""
        return await self._revoke("key_hash = ?", hash_key(key))

    async def revoke_key_id(self, key_id: str) -> bool:
        """Revoke the key with this public id; False if it was unknown or already revoked."""
        return await self._revoke("key_id = ?", key_id)

    async def _revoke(self, where: str, value: str) -> bool:
        async with self.db.transaction() as tx:
            changed = await tx.execute(
                f"UPDATE api_keys SET revoked_at = ? WHERE {where} AND revoked_at IS NULL", time.time(), value
            )
            if changed:
                await self._changed(tx)
        return changed > 0

    async def bootstrap(self, key: str = "") -> str | None:
        """On first start (no tenants), create tenant "dev" (tier interactive: it may use every tier) with
        key, or a generated one that is returned (the caller shows it once; it is never logged). A bootstrap key
        that was never stored is added to "dev" on later starts too (the launcher keeps its key across data
        dirs); a revoked one stays revoked. Gateways starting together on one shared database create "dev"
        once: the loser of the race finds the winner's tenant."""
        if await self.tenant_count() == 0:
            created = key or generate_key()
            try:
                # One transaction: a gateway that loses the race sees the tenant and its key together.
                async with self.db.transaction() as tx:
                    await self._insert_tenant(tx, DEV_TENANT, DEV_TENANT, "interactive")
                    await self._insert_key(tx, DEV_TENANT, created, "bootstrap")
                    await self._changed(tx)
            except IntegrityError:
                pass  # another gateway created it between the count and the insert
            else:
                if key:
                    log.info("gateway.dev_tenant_created", tenant=DEV_TENANT, key_prefix=key[:KEY_PREFIX_LEN])
                    return None
                # Only the hash is stored: the caller shows the key once (services/gateway/bootstrap.py).
                log.info("gateway.dev_tenant_created", tenant=DEV_TENANT, key_prefix=created[:KEY_PREFIX_LEN])
                return created
        if key and not await self.key_known(key) and await self.get_tenant(DEV_TENANT) is not None:
            try:
                await self.add_key(DEV_TENANT, key, name="bootstrap")
            except IntegrityError:
                return None  # another gateway added the same key just now
            log.info("gateway.bootstrap_key_added", tenant=DEV_TENANT, key_prefix=key[:KEY_PREFIX_LEN])
        return None

    # -- the request path ---------------------------------------------------------------------------------

    async def authenticate(self, key: str) -> Tenant | None:
        """The tenant owning key (with its limits and the key's), or None for an unknown or revoked key."""
        h = hash_key(key)
        now = self._clock()
        if self._version is None or (
            self.version_poll_s is not None and now - self._version_checked >= self.version_poll_s
        ):
            self._version_checked = now
            version = await self.config_version()
            if version != self._version:
                self._version = version
                self._cache.clear()
        hit = self._cache.get(h)
        if hit is not None and hit[1] > now:
            if hit[0] is not None:
                self._used.add(h)
            return hit[0]
        tenant = await self._lookup(h)
        if tenant is not None:
            self._used.add(h)
        if len(self._cache) >= _MAX_CACHED:
            # Bounded: a flood of random keys must not grow memory; dropping all costs one query each.
            self._cache.clear()
        self._cache[h] = (tenant, now + self.cache_ttl_s)
        return tenant

    async def _lookup(self, h: str) -> Tenant | None:
        """The tenant of the key whose hash is h (with the key's limits), None for an unknown or revoked key."""
        row = await self.db.fetchrow(
            "SELECT t.id, t.name, t.tier, t.models, "
            + ", ".join(f"t.{f}" for f in _LIMIT_FIELDS)
            + ", k.key_id, k.rps, k.tokens_per_min FROM api_keys k JOIN tenants t ON t.id = k.tenant_id "
            "WHERE k.key_hash = ? AND k.revoked_at IS NULL",
            h,
        )
        tenant = None
        if row:
            base = self._tenant(row[: 4 + len(_LIMIT_FIELDS)])
            key_id, rps, tpm = row[4 + len(_LIMIT_FIELDS) :]
            tenant = dataclasses.replace(base, key_id=key_id, key_limits=Limits(rps=rps, tokens_per_min=tpm))
        return tenant


def _limit_value(name: str, value: object) -> float | int | None:
    """A limit as stored: None for unlimited (None or 0), else a positive number; ValueError otherwise."""
    if value is None or value == 0:
        return None
    number = float(value)  # type: ignore[arg-type]
    if not number > 0 or number != number:
        raise ValueError(f"{name} must be positive (0 removes the limit); got {value!r}")
    return number if name in ("rps", "cost_budget_usd") else int(number)
