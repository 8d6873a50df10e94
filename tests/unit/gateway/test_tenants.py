"""Tenants and API keys, on SQLite and on PostgreSQL alike: hashed storage, bootstrap, authentication and
revocation through the cache, changes made by another process, schema migrations."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from services.gateway.db import connect
from services.gateway.schema import ACCOUNTS, open_accounts
from services.gateway.tenants import TenantStore, bearer_key, hash_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def open_store(url: str, **kw) -> TenantStore:
    return TenantStore(await open_accounts(url), **kw)


async def test_keys_are_stored_hashed_only(db_url):
    """The database holds the SHA-256 of a key and a short display prefix, never the key."""
    store = await open_store(db_url)
    t = await store.create_tenant("Acme Corp")
    key = await store.add_key(t.id)
    rows = await store.db.fetch("SELECT key_hash, key_prefix, tenant_id FROM api_keys")
    every_value = [v for r in await store.db.fetch("SELECT * FROM api_keys") for v in r]
    await store.close()
    assert rows == [(hash_key(key), key[:8], "acme-corp")]
    assert key not in every_value


async def test_bootstrap_creates_dev_tenant_once_with_a_generated_key(db_url):
    """The first start creates tenant dev with a generated fsk- key (returned once); later starts do not."""
    store = await open_store(db_url)
    key = await store.bootstrap()
    assert key is not None and key.startswith("fsk-")
    assert (await store.authenticate(key)).id == "dev"
    assert await store.bootstrap() is None
    assert await store.tenant_count() == 1
    await store.close()


async def test_gateways_bootstrapping_one_database_at_once_create_dev_once(db_url):
    """Several gateways starting together on one database (migrations and bootstrap racing) end with one dev
    tenant holding the configured key, and none of them fails."""
    stores = await asyncio.gather(*(open_store(db_url, cache_ttl_s=0) for _ in range(4)))
    await asyncio.gather(*(s.bootstrap("fsk-shared") for s in stores))
    assert [t.id for t in await stores[0].list_tenants()] == ["dev"]
    assert len(await stores[0].list_keys("dev")) == 1
    assert all([(await s.authenticate("fsk-shared")).id == "dev" for s in stores])
    for s in stores:
        await s.close()


async def test_bootstrap_with_a_configured_key(db_url):
    """A configured bootstrap key authenticates as dev and is not echoed back."""
    store = await open_store(db_url)
    assert await store.bootstrap("fsk-configured") is None
    assert (await store.authenticate("fsk-configured")).name == "dev"
    await store.close()


async def test_revoked_bootstrap_key_stays_revoked(db_url):
    """Restarting with a bootstrap key that was revoked does not bring it back."""
    store = await open_store(db_url, cache_ttl_s=0)
    await store.bootstrap("fsk-one")
    await store.revoke_key("fsk-one")
    await store.bootstrap("fsk-one")
    assert await store.authenticate("fsk-one") is None
    await store.close()


async def test_wrong_key_is_rejected(db_url):
    """An unknown key authenticates as nobody."""
    store = await open_store(db_url)
    await store.bootstrap("fsk-right")
    assert await store.authenticate("fsk-wrong") is None
    await store.close()


async def test_revocation_elsewhere_applies_after_the_cache_ttl(db_url):
    """A key revoked by another process keeps working only until the cached lookup expires."""
    clock = Clock()
    gateway = await open_store(db_url, cache_ttl_s=5.0, clock=clock)
    await gateway.bootstrap("fsk-live")
    assert await gateway.authenticate("fsk-live") is not None
    admin = await open_store(db_url)
    assert await admin.revoke_key("fsk-live")
    assert not await admin.revoke_key("fsk-live")  # already revoked
    clock.now += 4.9
    assert await gateway.authenticate("fsk-live") is not None  # served from the cache
    clock.now += 0.2
    assert await gateway.authenticate("fsk-live") is None
    await admin.close()
    await gateway.close()


async def test_revocation_in_process_applies_at_once(db_url):
    """Revoking through the same store drops the cached entry immediately."""
    store = await open_store(db_url, cache_ttl_s=60.0, clock=Clock())
    await store.bootstrap("fsk-k")
    assert await store.authenticate("fsk-k") is not None
    await store.revoke_key("fsk-k")
    assert await store.authenticate("fsk-k") is None
    await store.close()


@pytest.mark.parametrize(
    ("header", "key"),
    [
        ("Bearer fsk-a", "fsk-a"),
        ("bearer  fsk-b ", "fsk-b"),
        ("Basic abc", None),
        ("Bearer", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_header_parsing(header, key):
    """Only "Bearer <key>" carries a key (scheme case-insensitive)."""
    assert bearer_key(header) == key


async def test_limits_models_and_key_limits_reach_the_authenticated_tenant(db_url):
    """Tenant limits, allowed models and the key's own limits come back with the tenant a key authenticates as."""
    store = await open_store(db_url, cache_ttl_s=0)
    await store.create_tenant("Acme", tier="batch")
    key = await store.add_key("acme", name="ci")
    await store.set_tenant(
        "acme", rps=5, tokens_per_min=1000, max_streams=2, models=["m1", "m2"], budget_period="day"
    )
    (info,) = await store.list_keys("acme")
    assert await store.set_key_limits(info.key_id, rps=1)
    t = await store.authenticate(key)
    assert (t.tier, t.limits.rps, t.limits.tokens_per_min, t.limits.max_streams) == ("batch", 5.0, 1000, 2)
    assert t.limits.budget_period == "day" and t.models == frozenset({"m1", "m2"})
    assert (t.key_id, t.key_limits.rps) == (info.key_id, 1.0)
    assert t.may_use("m1") and not t.may_use("m3")
    await store.set_tenant("acme", rps=0, all_models=True)
    t = await store.authenticate(key)
    assert t.limits.rps is None and t.models is None and t.may_use("m3")
    await store.close()


@pytest.mark.parametrize(
    "change",
    [dict(rps=-1), dict(budget_period="week"), dict(tier="gold"), dict(bogus=1)],
)
async def test_bad_limit_values_are_refused(tmp_path, change):
    """Negative limits, unknown periods, tiers or limit names are errors, not silently stored."""
    store = await open_store(str(tmp_path / "gateway.db"))
    await store.create_tenant("Acme")
    with pytest.raises(ValueError):
        await store.set_tenant("acme", **change)
    await store.close()


async def test_admin_changes_apply_within_the_version_poll_even_with_a_long_cache(db_url):
    """With a 60 s lookup cache, a change made by another process (the admin CLI) applies within
    version_poll_s: the bumped config version empties the cache."""
    clock = Clock()
    gateway = await open_store(db_url, cache_ttl_s=60.0, clock=clock, version_poll_s=1.0)
    await gateway.bootstrap("fsk-live")
    assert (await gateway.authenticate("fsk-live")).limits.rps is None
    admin = await open_store(db_url)
    await admin.set_tenant("dev", rps=3)
    clock.now += 0.5
    assert (await gateway.authenticate("fsk-live")).limits.rps is None  # within the poll interval: cached
    clock.now += 0.5
    assert (await gateway.authenticate("fsk-live")).limits.rps == 3.0
    await admin.revoke_key_id((await admin.list_keys("dev"))[0].key_id)
    clock.now += 1.0
    assert await gateway.authenticate("fsk-live") is None
    await admin.close()
    await gateway.close()


async def test_the_background_refresh_keeps_requests_off_the_database(db_url):
    """A serving gateway's refresh pass (start_refresh runs one every 0.8 poll interval) reads the config
    version and looks up the keys in use before their entries expire: a request then finds both fresh and
    waits for no database round trip, and changes made elsewhere still apply within version_poll_s and
    cache_ttl_s (sooner, if anything)."""
    clock = Clock()
    gateway = await open_store(db_url, cache_ttl_s=5.0, clock=clock, version_poll_s=1.0)
    await gateway.bootstrap("fsk-live")
    assert (await gateway.authenticate("fsk-live")).limits.rps is None
    admin = await open_store(db_url)
    await admin.set_tenant("dev", rps=3)
    clock.now += 0.5
    await gateway.refresh(margin_s=1.0)  # the pass sees the change, not a request
    assert gateway._version_checked == 0.5
    clock.now += 0.9
    # 1.4 s since the store opened: a request-side version check would be due without the pass at 0.5.
    assert clock() - gateway._version_checked < gateway.version_poll_s
    assert (await gateway.authenticate("fsk-live")).limits.rps == 3.0

    keys = await open_store(db_url, cache_ttl_s=5.0, clock=clock)  # no version poll: the TTL alone
    assert await keys.authenticate("fsk-live") is not None  # looked up at 1.4: cached until 6.4
    await admin.revoke_key_id((await admin.list_keys("dev"))[0].key_id)
    clock.now = 3.0
    await keys.refresh(margin_s=1.0)  # expires in 3.4 s: not yet due
    assert await keys.authenticate("fsk-live") is not None
    clock.now = 5.5
    await keys.refresh(margin_s=1.0)  # expires in 0.9 s, and the key was used: looked up again
    assert await keys.authenticate("fsk-live") is None  # the revocation, before the old entry's expiry
    for store in (admin, keys, gateway):
        await store.close()


async def test_migrations_are_recorded_and_applied_once(db_url):
    """Opening a database twice applies each schema version once and records it in schema_migrations."""
    (await open_store(db_url)).db  # noqa: B018 - first open migrates
    db = await connect(db_url)
    rows = await db.fetch("SELECT component, version FROM schema_migrations ORDER BY version")
    await db.close()
    store = await open_store(db_url)
    again = await store.db.fetch("SELECT component, version FROM schema_migrations ORDER BY version")
    await store.close()
    assert rows == again == [("accounts", m.version) for m in ACCOUNTS]


async def test_databases_from_before_limits_are_migrated(tmp_path):
    """A SQLite file created by the first release (no limit columns, no schema versions) opens, and its keys
    get ids."""
    db = str(tmp_path / "gateway.db")
    raw = sqlite3.connect(db)
    raw.executescript(
        "CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, tier TEXT NOT NULL DEFAULT "
        "'standard', created_at REAL NOT NULL);"
        "CREATE TABLE api_keys (key_hash TEXT PRIMARY KEY, key_prefix TEXT NOT NULL, tenant_id TEXT NOT NULL, "
        "created_at REAL NOT NULL, revoked_at REAL);"
        "INSERT INTO tenants VALUES ('dev', 'dev', 'standard', 0);"
        f"INSERT INTO api_keys VALUES ('{hash_key('fsk-old')}', 'fsk-old', 'dev', 0, NULL);"
    )
    raw.commit()
    raw.close()
    store = await open_store(db)
    t = await store.authenticate("fsk-old")
    assert t.id == "dev" and t.key_id.startswith("key_") and t.limits.rps is None
    await store.close()
