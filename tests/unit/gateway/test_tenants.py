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
