"""Tenants and API keys: hashed storage, bootstrap, authentication and revocation through the cache."""

from __future__ import annotations

import sqlite3

import pytest

from services.gateway.tenants import TenantStore, bearer_key, hash_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path):
    return str(tmp_path / "gateway.db")


def test_keys_are_stored_hashed_only(db):
    """The database holds the SHA-256 of a key and a short display prefix, never the key."""
    store = TenantStore(db)
    t = store.create_tenant("Acme Corp")
    key = store.add_key(t.id)
    store.close()
    raw = sqlite3.connect(db)
    rows = raw.execute("SELECT key_hash, key_prefix, tenant_id FROM api_keys").fetchall()
    dump = "\n".join(raw.iterdump())
    raw.close()
    assert rows == [(hash_key(key), key[:8], "acme-corp")]
    assert key not in dump


def test_bootstrap_creates_dev_tenant_once_with_a_generated_key(db):
    """The first start creates tenant dev with a generated fsk- key (returned once); later starts do not."""
    store = TenantStore(db)
    key = store.bootstrap()
    assert key is not None and key.startswith("fsk-")
    assert store.authenticate(key).id == "dev"
    assert store.bootstrap() is None
    assert store.tenant_count() == 1
    store.close()


def test_bootstrap_with_a_configured_key(db):
    """A configured bootstrap key authenticates as dev and is not echoed back."""
    store = TenantStore(db)
    assert store.bootstrap("fsk-configured") is None
    assert store.authenticate("fsk-configured").name == "dev"
    store.close()


def test_revoked_bootstrap_key_stays_revoked(db):
    """Restarting with a bootstrap key that was revoked does not bring it back."""
    store = TenantStore(db, cache_ttl_s=0)
    store.bootstrap("fsk-one")
    store.revoke_key("fsk-one")
    store.bootstrap("fsk-one")
    assert store.authenticate("fsk-one") is None
    store.close()


def test_wrong_key_is_rejected(db):
    """An unknown key authenticates as nobody."""
    store = TenantStore(db)
    store.bootstrap("fsk-right")
    assert store.authenticate("fsk-wrong") is None
    store.close()


def test_revocation_elsewhere_applies_after_the_cache_ttl(db):
    """A key revoked by another process keeps working only until the cached lookup expires."""
    clock = Clock()
    gateway = TenantStore(db, cache_ttl_s=5.0, clock=clock)
    gateway.bootstrap("fsk-live")
    assert gateway.authenticate("fsk-live") is not None
    admin = TenantStore(db)
    assert admin.revoke_key("fsk-live")
    assert not admin.revoke_key("fsk-live")  # already revoked
    clock.now += 4.9
    assert gateway.authenticate("fsk-live") is not None  # served from the cache
    clock.now += 0.2
    assert gateway.authenticate("fsk-live") is None
    admin.close()
    gateway.close()


def test_revocation_in_process_applies_at_once(db):
    """Revoking through the same store drops the cached entry immediately."""
    store = TenantStore(db, cache_ttl_s=60.0, clock=Clock())
    store.bootstrap("fsk-k")
    assert store.authenticate("fsk-k") is not None
    store.revoke_key("fsk-k")
    assert store.authenticate("fsk-k") is None
    store.close()


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


def test_limits_models_and_key_limits_reach_the_authenticated_tenant(db):
    """Tenant limits, allowed models and the key's own limits come back with the tenant a key authenticates as."""
    store = TenantStore(db, cache_ttl_s=0)
    store.create_tenant("Acme", tier="batch")
    key = store.add_key("acme", name="ci")
    store.set_tenant(
        "acme", rps=5, tokens_per_min=1000, max_streams=2, models=["m1", "m2"], budget_period="day"
    )
    (info,) = store.list_keys("acme")
    assert store.set_key_limits(info.key_id, rps=1)
    t = store.authenticate(key)
    assert (t.tier, t.limits.rps, t.limits.tokens_per_min, t.limits.max_streams) == ("batch", 5.0, 1000, 2)
    assert t.limits.budget_period == "day" and t.models == frozenset({"m1", "m2"})
    assert (t.key_id, t.key_limits.rps) == (info.key_id, 1.0)
    assert t.may_use("m1") and not t.may_use("m3")
    store.set_tenant("acme", rps=0, all_models=True)
    t = store.authenticate(key)
    assert t.limits.rps is None and t.models is None and t.may_use("m3")
    store.close()


@pytest.mark.parametrize(
    "change",
    [dict(rps=-1), dict(budget_period="week"), dict(tier="gold"), dict(bogus=1)],
)
def test_bad_limit_values_are_refused(db, change):
    """Negative limits, unknown periods, tiers or limit names are errors, not silently stored."""
    store = TenantStore(db)
    store.create_tenant("Acme")
    with pytest.raises(ValueError):
        store.set_tenant("acme", **change)
    store.close()


def test_admin_changes_apply_within_the_version_poll_even_with_a_long_cache(db):
    """With a 60 s lookup cache, a change made by another process (the admin CLI) applies within
    version_poll_s: the bumped config version empties the cache."""
    clock = Clock()
    gateway = TenantStore(db, cache_ttl_s=60.0, clock=clock, version_poll_s=1.0)
    gateway.bootstrap("fsk-live")
    assert gateway.authenticate("fsk-live").limits.rps is None
    admin = TenantStore(db)
    admin.set_tenant("dev", rps=3)
    clock.now += 0.5
    assert gateway.authenticate("fsk-live").limits.rps is None  # within the poll interval: cached
    clock.now += 0.5
    assert gateway.authenticate("fsk-live").limits.rps == 3.0
    admin.revoke_key_id(admin.list_keys("dev")[0].key_id)
    clock.now += 1.0
    assert gateway.authenticate("fsk-live") is None
    admin.close()
    gateway.close()


def test_databases_from_before_limits_are_migrated(db):
    """A database created by the first release (no limit columns) opens, and its keys get ids."""
    raw = sqlite3.connect(db)
    raw.executescript(
        "CREATE TABLE tenants (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, tier TEXT NOT NULL DEFAULT "
        "'standard', created_at REAL NOT NULL);"
        "CREATE TABLE api_keys (key_hash TEXT PRIMARY KEY, key_prefix TEXT NOT NULL, tenant_id TEXT NOT NULL, "
        "created_at REAL NOT NULL, revoked_at REAL);"
        f"INSERT INTO tenants VALUES ('dev', 'dev', 'standard', 0);"
        f"INSERT INTO api_keys VALUES ('{hash_key('fsk-old')}', 'fsk-old', 'dev', 0, NULL);"
    )
    raw.commit()
    raw.close()
    store = TenantStore(db)
    t = store.authenticate("fsk-old")
    assert t.id == "dev" and t.key_id.startswith("key_") and t.limits.rps is None
    store.close()
