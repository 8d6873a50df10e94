"""The gateway's tables as versioned migrations per dialect (SQLite, PostgreSQL), and opening the databases they
live in: with SQLite two files (accounts: tenants, keys, ledger; jobs: batch jobs, feedback), with PostgreSQL one
database that every gateway shares."""

from __future__ import annotations

import os
from dataclasses import dataclass

from services.gateway.db import Database, Migration, SQLiteDatabase, check_url, connect, migrate, sqlite_path

# Versions are never edited once released: a change is a new version appended to its list.
ACCOUNTS: tuple[Migration, ...] = (
    Migration(
        1,
        "tenants, keys, config version, usage ledger",
        sqlite="""
CREATE TABLE IF NOT EXISTS tenants (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    tier            TEXT NOT NULL DEFAULT 'standard',
    created_at      REAL NOT NULL,
    rps             REAL,
    tokens_per_min  INTEGER,
    max_streams     INTEGER,
    token_budget    INTEGER,
    budget_period   TEXT NOT NULL DEFAULT 'month',
    cost_budget_usd REAL,
    models          TEXT
);
CREATE TABLE IF NOT EXISTS api_keys (
    key_hash       TEXT PRIMARY KEY,
    key_prefix     TEXT NOT NULL,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id),
    created_at     REAL NOT NULL,
    revoked_at     REAL,
    key_id         TEXT,
    name           TEXT NOT NULL DEFAULT '',
    rps            REAL,
    tokens_per_min INTEGER
);
CREATE INDEX IF NOT EXISTS api_keys_tenant ON api_keys(tenant_id);
CREATE UNIQUE INDEX IF NOT EXISTS api_keys_key_id ON api_keys(key_id);
CREATE TABLE IF NOT EXISTS meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT INTO meta (name, value) VALUES ('config_version', 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS usage_ledger (
    id                INTEGER PRIMARY KEY,
    request_id        TEXT NOT NULL,
    tenant_id         TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    cost_usd          REAL NOT NULL,
    status            TEXT NOT NULL,
    partial           INTEGER NOT NULL,
    at                REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ledger_tenant_at ON usage_ledger(tenant_id, at);
""",
        postgresql="""
CREATE TABLE tenants (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL UNIQUE,
    tier            TEXT NOT NULL DEFAULT 'standard',
    created_at      DOUBLE PRECISION NOT NULL,
    rps             DOUBLE PRECISION,
    tokens_per_min  INTEGER,
    max_streams     INTEGER,
    token_budget    BIGINT,
    budget_period   TEXT NOT NULL DEFAULT 'month',
    cost_budget_usd DOUBLE PRECISION,
    models          TEXT
);
CREATE TABLE api_keys (
    key_hash       TEXT PRIMARY KEY,
    key_prefix     TEXT NOT NULL,
    tenant_id      TEXT NOT NULL REFERENCES tenants(id),
    created_at     DOUBLE PRECISION NOT NULL,
    revoked_at     DOUBLE PRECISION,
    key_id         TEXT UNIQUE,
    name           TEXT NOT NULL DEFAULT '',
    rps            DOUBLE PRECISION,
    tokens_per_min INTEGER
);
CREATE INDEX api_keys_tenant ON api_keys(tenant_id);
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
INSERT INTO meta (name, value) VALUES ('config_version', 0) ON CONFLICT DO NOTHING;
CREATE TABLE usage_ledger (
    id                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    request_id        TEXT NOT NULL,
    tenant_id         TEXT NOT NULL,
    key_id            TEXT NOT NULL,
    model             TEXT NOT NULL,
    prompt_tokens     INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens     INTEGER NOT NULL,
    cost_usd          DOUBLE PRECISION NOT NULL,
    status            TEXT NOT NULL,
    partial           INTEGER NOT NULL,
    at                DOUBLE PRECISION NOT NULL
);
CREATE INDEX usage_ledger_tenant_at ON usage_ledger(tenant_id, at);
""",
    ),
    Migration(
        2,
        "ledger rows name the model version that served the request (rollouts)",
        sqlite="ALTER TABLE usage_ledger ADD COLUMN model_version TEXT NOT NULL DEFAULT '';",
        postgresql="ALTER TABLE usage_ledger ADD COLUMN model_version TEXT NOT NULL DEFAULT '';",
    ),
    Migration(
        3,
        "budget holds (what admitted requests may still use, until they expire) and per-period usage counters",
        sqlite="""
CREATE TABLE IF NOT EXISTS budget_usage (
    tenant_id    TEXT NOT NULL,
    period       TEXT NOT NULL,
    period_start REAL NOT NULL,
    tokens       INTEGER NOT NULL,
    cost_usd     REAL NOT NULL,
    PRIMARY KEY (tenant_id, period, period_start)
);
CREATE TABLE IF NOT EXISTS budget_holds (
    request_id      TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    idempotency_key TEXT,
    tokens          INTEGER NOT NULL,
    cost_usd        REAL NOT NULL,
    owner           TEXT NOT NULL,
    expires_at      REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS budget_holds_tenant ON budget_holds(tenant_id, idempotency_key);
CREATE INDEX IF NOT EXISTS budget_holds_owner ON budget_holds(owner);
""",
        postgresql="""
CREATE TABLE budget_usage (
    tenant_id    TEXT NOT NULL,
    period       TEXT NOT NULL,
    period_start DOUBLE PRECISION NOT NULL,
    tokens       BIGINT NOT NULL,
    cost_usd     DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (tenant_id, period, period_start)
);
CREATE TABLE budget_holds (
    request_id      TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    idempotency_key TEXT,
    tokens          BIGINT NOT NULL,
    cost_usd        DOUBLE PRECISION NOT NULL,
    owner           TEXT NOT NULL,
    expires_at      DOUBLE PRECISION NOT NULL
);
CREATE INDEX budget_holds_tenant ON budget_holds(tenant_id, idempotency_key);
CREATE INDEX budget_holds_owner ON budget_holds(owner);
""",
    ),
    Migration(
        4,
        "ledger rows carry the request's idempotency key: a resumed attempt is billed net of earlier attempts' rows",
        sqlite="""
ALTER TABLE usage_ledger ADD COLUMN idempotency_key TEXT;
CREATE INDEX IF NOT EXISTS usage_ledger_idempotency ON usage_ledger(tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
""",
        postgresql="""
ALTER TABLE usage_ledger ADD COLUMN idempotency_key TEXT;
CREATE INDEX usage_ledger_idempotency ON usage_ledger(tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
""",
    ),
    Migration(
        5,
        "gateway presence: which gateways are up (the fleet size the Redis limits' fallback divides limits by)",
        sqlite="""
CREATE TABLE IF NOT EXISTS gateway_presence (
    gateway_id  TEXT PRIMARY KEY,
    lease_until REAL NOT NULL
);
""",
        postgresql="""
CREATE TABLE gateway_presence (
    gateway_id  TEXT PRIMARY KEY,
    lease_until DOUBLE PRECISION NOT NULL
);
""",
    ),
)

JOBS: tuple[Migration, ...] = (
    Migration(
        1,
        "batch jobs, their items, feedback",
        sqlite="""
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    model           TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash    TEXT NOT NULL,
    total           INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    completed_at    REAL,
    cancelled_at    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs(completed_at) WHERE completed_at IS NULL;
CREATE TABLE IF NOT EXISTS job_items (
    job_id            TEXT NOT NULL REFERENCES jobs(id),
    idx               INTEGER NOT NULL,
    request           BLOB NOT NULL,
    custom_id         TEXT NOT NULL,
    result            BLOB,
    ok                INTEGER,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE IF NOT EXISTS feedback (
    id          TEXT PRIMARY KEY,
    request_id  TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    rating      INTEGER NOT NULL,
    tags        TEXT NOT NULL,
    comment     TEXT NOT NULL,
    created_at  REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback(request_id);
""",
        postgresql="""
CREATE TABLE jobs (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    model           TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash    TEXT NOT NULL,
    total           INTEGER NOT NULL,
    created_at      DOUBLE PRECISION NOT NULL,
    completed_at    DOUBLE PRECISION,
    cancelled_at    DOUBLE PRECISION
);
CREATE UNIQUE INDEX jobs_idempotency ON jobs(tenant_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_unfinished ON jobs(completed_at) WHERE completed_at IS NULL;
CREATE TABLE job_items (
    job_id            TEXT NOT NULL REFERENCES jobs(id),
    idx               INTEGER NOT NULL,
    request           BYTEA NOT NULL,
    custom_id         TEXT NOT NULL,
    result            BYTEA,
    ok                INTEGER,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
CREATE TABLE feedback (
    id          TEXT PRIMARY KEY,
    request_id  TEXT NOT NULL,
    tenant_id   TEXT NOT NULL,
    model       TEXT NOT NULL,
    rating      INTEGER NOT NULL,
    tags        TEXT NOT NULL,
    comment     TEXT NOT NULL,
    created_at  DOUBLE PRECISION NOT NULL
);
CREATE INDEX feedback_request ON feedback(request_id);
""",
    ),
    Migration(
        2,
        "item leases: which gateway runs an item, until when, and how often it was started",
        sqlite="""
ALTER TABLE job_items ADD COLUMN lease_owner TEXT;
ALTER TABLE job_items ADD COLUMN lease_until REAL;
ALTER TABLE job_items ADD COLUMN runs INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS job_items_open ON job_items(job_id, idx) WHERE result IS NULL;
""",
        postgresql="""
ALTER TABLE job_items ADD COLUMN lease_owner TEXT;
ALTER TABLE job_items ADD COLUMN lease_until DOUBLE PRECISION;
ALTER TABLE job_items ADD COLUMN runs INTEGER NOT NULL DEFAULT 0;
CREATE INDEX job_items_open ON job_items(job_id, idx) WHERE result IS NULL;
""",
    ),
    Migration(
        3,
        "item progress (the tokens generated so far, saved with each lease renewal): a taken-over item resumes",
        sqlite="ALTER TABLE job_items ADD COLUMN progress BLOB;",
        postgresql="ALTER TABLE job_items ADD COLUMN progress BYTEA;",
    ),
)

# Columns that SQLite files written before versioned migrations may lack (they were added with ALTER TABLE
# on open): added before version 1 is recorded, so such a file upgrades in place.
_LEGACY_COLUMNS = {
    "tenants": {
        "rps": "REAL",
        "tokens_per_min": "INTEGER",
        "max_streams": "INTEGER",
        "token_budget": "INTEGER",
        "budget_period": "TEXT NOT NULL DEFAULT 'month'",
        "cost_budget_usd": "REAL",
        "models": "TEXT",
    },
    "api_keys": {
        "key_id": "TEXT",
        "name": "TEXT NOT NULL DEFAULT ''",
        "rps": "REAL",
        "tokens_per_min": "INTEGER",
    },
    "jobs": {"cancelled_at": "REAL"},
}


async def _legacy_sqlite(tx: Database) -> None:
    if tx.dialect != "sqlite":
        return
    for table, columns in _LEGACY_COLUMNS.items():
        have = {row[1] for row in await tx.fetch(f"PRAGMA table_info({table})")}
        if not have:
            continue  # a new file: version 1 creates the table whole
        for name, decl in columns.items():
            if name not in have:
                await tx.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")
        if table == "api_keys":
            await tx.execute(
                "UPDATE api_keys SET key_id = 'key_' || substr(key_hash, 1, 12) WHERE key_id IS NULL"
            )


@dataclass
class Databases:
    """Where the gateway's state lives: accounts (tenants, keys, ledger) and jobs (batch jobs, feedback) are
    the same PostgreSQL database, or two SQLite files."""

    accounts: Database
    jobs: Database

    @property
    def shared(self) -> bool:
        """Whether every gateway pointed at it sees the same state (PostgreSQL)."""
        return self.accounts.dialect == "postgresql"

    async def close(self) -> None:
        await self.accounts.close()
        if self.jobs is not self.accounts:
            await self.jobs.close()


async def open_accounts(url_or_path: str) -> Database:
    """The accounts database at a URL or a SQLite file path, migrated (admin CLI, tests)."""
    db = await _connect(url_or_path)
    try:
        await migrate(db, "accounts", ACCOUNTS, before_first=_legacy_sqlite)
    except BaseException:
        await db.close()
        raise
    return db


async def open_databases(db_url: str, db_path: str, jobs_db_path: str = "", pool_size: int = 10) -> Databases:
    """Both databases, migrated: db_url (PostgreSQL or sqlite:///) when given, else the SQLite files db_path
    and jobs_db_path (default: gateway-jobs.db beside db_path)."""
    if db_url and sqlite_path(db_url) is None:
        check_url(db_url)
        db = await connect(db_url, max_size=pool_size)
        dbs = Databases(db, db)
    else:
        accounts_path = sqlite_path(db_url) if db_url else db_path
        jobs_path = jobs_db_path or jobs_path_beside(accounts_path)
        dbs = Databases(SQLiteDatabase(accounts_path), SQLiteDatabase(jobs_path))
    try:
        await migrate(dbs.accounts, "accounts", ACCOUNTS, before_first=_legacy_sqlite)
        await migrate(dbs.jobs, "jobs", JOBS, before_first=_legacy_sqlite)
    except BaseException:
        await dbs.close()
        raise
    return dbs


def jobs_path_beside(accounts_path: str) -> str:
    """The default jobs file: gateway-jobs.db in the accounts file's directory."""
    return os.path.join(os.path.dirname(os.path.abspath(accounts_path)), "gateway-jobs.db")


async def _connect(url_or_path: str) -> Database:
    if "://" in url_or_path or url_or_path.startswith("sqlite:"):
        return await connect(url_or_path)
    return SQLiteDatabase(url_or_path)
