"""The gateway's database, chosen by URL: SQLite (a local file, the default) or PostgreSQL (asyncpg, shared by
every gateway), behind one small async interface, and the versioned SQL migrations applied at start."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import structlog

from shared.errors import Unavailable

log = structlog.get_logger(__name__)

POSTGRES_SCHEMES = ("postgresql", "postgres")


class DatabaseError(Unavailable):
    """The database failed or could not be reached (either backend): a request that meets it is UNAVAILABLE
    (DATABASE_UNAVAILABLE) with a retry delay; background work retries later."""

    reason = "DATABASE_UNAVAILABLE"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, retry_after_s=1.0)
        # The client's message: the detail (driver errors, addresses) is for the gateway's log only.
        self.message = "the gateway's database is unavailable; retry shortly"


class IntegrityError(Exception):
    """A uniqueness or reference constraint refused a write (either backend)."""


def redact(url: str) -> str:
    """url without its password (safe to log)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def sqlite_path(url: str) -> str | None:
    """The file of a sqlite:///PATH URL (sqlite:////abs/path or sqlite:///rel/path), else None."""
    if not url.startswith("sqlite:"):
        return None
    path = url.removeprefix("sqlite:").removeprefix("//")
    return path.removeprefix("/") if not path.startswith("//") else path[1:]


def check_url(url: str) -> str:
    """url if it names a backend this gateway speaks; ValueError (saying which ones) otherwise."""
    if not url or sqlite_path(url) is not None:
        return url
    if urlsplit(url).scheme in POSTGRES_SCHEMES:
        return url
    raise ValueError(
        f"unsupported database URL {redact(url)!r}: use postgresql://user:password@host:port/dbname "
        "or sqlite:///path/to/file.db"
    )


class Database:
    """What the stores use: statements with `?` placeholders (converted for PostgreSQL), rows as tuples,
    transactions as `async with db.transaction() as tx:` (tx has the same methods), errors as DatabaseError."""

    dialect: str = ""
    # Appended to a SELECT that must lock the rows it reads until the transaction ends (PostgreSQL only: a
    # SQLite write transaction locks the whole database already).
    for_update: str = ""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""
        raise NotImplementedError

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        raise NotImplementedError

    async def fetch(self, sql: str, *args: Any) -> list[tuple]:
        raise NotImplementedError

    async def fetchrow(self, sql: str, *args: Any) -> tuple | None:
        rows = await self.fetch(sql, *args)
        return rows[0] if rows else None

    async def fetchval(self, sql: str, *args: Any) -> Any:
        row = await self.fetchrow(sql, *args)
        return None if row is None else row[0]

    async def script(self, sql: str) -> None:
        """Run several statements (a migration); inside a transaction when called on one."""
        raise NotImplementedError

    def transaction(self) -> contextlib.AbstractAsyncContextManager[Database]:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


# -- SQLite ------------------------------------------------------------------------------------------------


def _split_statements(script: str) -> list[str]:
    """The statements of a script: executescript() would COMMIT first, breaking the migration's transaction."""
    out, current = [], ""
    for line in script.splitlines(keepends=True):
        current += line
        if sqlite3.complete_statement(current):
            if current.strip():
                out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out


class _SQLiteRunner(Database):
    """Statements on one sqlite3 connection, each run on the database's own thread (a local file: a statement
    takes microseconds to milliseconds, and must never stall the event loop's streams while it waits for a
    lock another process holds)."""

    dialect = "sqlite"

    def __init__(self, conn: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._conn = conn
        self._executor = executor

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        except sqlite3.IntegrityError as e:
            raise IntegrityError(str(e)) from e
        except sqlite3.Error as e:
            raise DatabaseError(f"sqlite: {e}") from e

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._call(lambda: self._conn.execute(sql, args).rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        await self._call(lambda: self._conn.executemany(sql, rows))

    async def fetch(self, sql: str, *args: Any) -> list[tuple]:
        return await self._call(lambda: self._conn.execute(sql, args).fetchall())

    async def script(self, sql: str) -> None:
        def run() -> None:
            for statement in _split_statements(sql):
                self._conn.execute(statement)

        await self._call(run)


def _wal(conn: sqlite3.Connection, timeout_s: float) -> None:
    """PRAGMA journal_mode=WAL, retried for up to timeout_s while another process writes the file. Hand-written
    because SQLite answers this pragma "database is locked" at once, without its busy handler, while another
    connection holds the write lock (it would deadlock waiting): two gateways started together on one file, one
    migrating, failed the other's start (a fresh-clone CI run)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() >= deadline:
                raise
            time.sleep(0.02)  # start-up only, before the loop serves anything


class SQLiteDatabase(_SQLiteRunner):
    """A SQLite file (WAL, so readers in other processes never block the writer). Statements are serialized
    by an asyncio lock, which a transaction holds to its end so that no other statement lands inside it."""

    def __init__(self, path: str, busy_timeout_ms: int = 5000) -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        if path != ":memory:":
            _wal(conn, busy_timeout_ms / 1000.0)
            # A power cut may lose the last commits; a process crash loses nothing.
            conn.execute("PRAGMA synchronous=NORMAL")
        super().__init__(conn, ThreadPoolExecutor(1, thread_name_prefix="sqlite"))
        self.path = path
        self._lock = asyncio.Lock()

    async def execute(self, sql: str, *args: Any) -> int:
        async with self._lock:
            return await super().execute(sql, *args)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        async with self._lock:
            await super().executemany(sql, rows)

    async def fetch(self, sql: str, *args: Any) -> list[tuple]:
        async with self._lock:
            return await super().fetch(sql, *args)

    async def script(self, sql: str) -> None:
        async with self._lock:
            await super().script(sql)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        async with self._lock:
            tx = _SQLiteRunner(self._conn, self._executor)
            # IMMEDIATE: take the write lock now, so two processes never both read then both write.
            await tx._call(self._conn.execute, "BEGIN IMMEDIATE")
            try:
                yield tx
            except BaseException:
                await asyncio.shield(tx._call(self._conn.execute, "ROLLBACK"))
                raise
            await tx._call(self._conn.execute, "COMMIT")

    async def close(self) -> None:
        async with self._lock:
            await self._call(self._conn.close)
        self._executor.shutdown(wait=True)


# -- PostgreSQL --------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"'(?:[^']|'')*'|\?")


@functools.lru_cache(maxsize=512)
def to_postgres(sql: str) -> str:
    """`?` placeholders as PostgreSQL's $1, $2, ... (question marks inside string literals are left alone)."""
    n = 0

    def number(m: re.Match) -> str:
        nonlocal n
        if m.group(0) != "?":
            return m.group(0)
        n += 1
        return f"${n}"

    return _PLACEHOLDER.sub(number, sql)


def _rowcount(status: str) -> int:
    # asyncpg returns the command tag: "UPDATE 3", "INSERT 0 1", "DELETE 0".
    last = status.rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else 0


class _PostgresRunner(Database):
    """Statements on an asyncpg pool or one of its connections (both have execute/fetch/executemany)."""

    dialect = "postgresql"
    for_update = " FOR UPDATE"

    def __init__(self, target: Any) -> None:
        self._target = target

    async def _call(self, coro_fn: Callable[[], Any]) -> Any:
        import asyncpg

        try:
            return await coro_fn()
        except asyncpg.IntegrityConstraintViolationError as e:
            raise IntegrityError(str(e)) from e
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as e:
            raise DatabaseError(f"postgresql: {type(e).__name__}: {e}") from e

    async def execute(self, sql: str, *args: Any) -> int:
        return _rowcount(await self._call(lambda: self._target.execute(to_postgres(sql), *args)))

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            await self._call(lambda: self._target.executemany(to_postgres(sql), rows))

    async def fetch(self, sql: str, *args: Any) -> list[tuple]:
        return [tuple(r) for r in await self._call(lambda: self._target.fetch(to_postgres(sql), *args))]

    async def script(self, sql: str) -> None:
        # Without arguments asyncpg sends the simple query protocol, which runs every statement of the script.
        await self._call(lambda: self._target.execute(sql))


class PostgresDatabase(_PostgresRunner):
    """A pool of asyncpg connections to one PostgreSQL database."""

    def __init__(self, pool: Any, url: str) -> None:
        super().__init__(pool)
        self.url = redact(url)

    @classmethod
    async def open(
        cls, url: str, *, min_size: int = 1, max_size: int = 10, timeout_s: float = 10.0
    ) -> PostgresDatabase:
        import asyncpg

        try:
            pool = await asyncpg.create_pool(
                url, min_size=min_size, max_size=max_size, timeout=timeout_s, command_timeout=timeout_s
            )
        except (asyncpg.PostgresError, OSError, TimeoutError) as e:
            raise DatabaseError(f"cannot connect to {redact(url)}: {type(e).__name__}: {e}") from e
        return cls(pool, url)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[Database]:
        async with self._target.acquire() as conn, conn.transaction():
            yield _PostgresRunner(conn)

    async def close(self) -> None:
        await self._target.close()


async def connect(url: str, **pool: Any) -> Database:
    """The database at url: postgresql://... (a pool), or sqlite:///path (a file, created if missing)."""
    path = sqlite_path(url)
    if path is not None:
        return SQLiteDatabase(path)
    check_url(url)
    return await PostgresDatabase.open(url, **pool)


# -- migrations --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    """One version of a component's schema: the SQL that takes it there from the version before, per dialect."""

    version: int
    name: str
    sqlite: str
    postgresql: str

    def sql(self, dialect: str) -> str:
        return self.sqlite if dialect == "sqlite" else self.postgresql


_MIGRATIONS_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  TEXT NOT NULL,
    version    INTEGER NOT NULL,
    name       TEXT NOT NULL,
    applied_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (component, version)
)
"""


async def migrate(
    db: Database,
    component: str,
    migrations: Sequence[Migration],
    *,
    before_first: Callable[[Database], Any] | None = None,
) -> list[int]:
    """Apply the component's migrations not applied yet, in order, in one transaction with their version rows;
    the versions applied. Any number of gateways may start at once: on PostgreSQL an advisory lock (per
    component) makes the others wait and then find nothing to do; on SQLite the write lock does the same.
    before_first(tx) runs before version 1 is applied (SQLite files from before versioned migrations)."""
    async with db.transaction() as tx:
        if db.dialect == "postgresql":
            await tx.fetchval("SELECT pg_advisory_xact_lock(hashtext(?))", f"fleetserve.schema.{component}")
        await tx.script(_MIGRATIONS_TABLE)
        done = {
            v
            for (v,) in await tx.fetch("SELECT version FROM schema_migrations WHERE component = ?", component)
        }
        applied = []
        for m in sorted(migrations, key=lambda m: m.version):
            if m.version in done:
                continue
            if m.version == 1 and before_first is not None:
                await before_first(tx)
            await tx.script(m.sql(db.dialect))
            await tx.execute(
                "INSERT INTO schema_migrations (component, version, name, applied_at) VALUES (?, ?, ?, ?)",
                component,
                m.version,
                m.name,
                time.time(),
            )
            applied.append(m.version)
    if applied:
        log.info("gateway.schema_migrated", component=component, versions=applied, dialect=db.dialect)
    return applied
