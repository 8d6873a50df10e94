"""The registry's durable state behind one interface: membership (replicas) and named documents (the
autoscaler's desired state, rollout plans), in SQLite (the embedded default) or etcd (store_etcd.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from enum import Enum

from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as pb


class StoreError(Exception):
    """The store could not be reached or refused the operation (callers answer UNAVAILABLE)."""


class StoreConflict(Exception):
    """A conditional write lost: the document's version was not the one expected (someone else wrote first)."""

    def __init__(self, kind: str, name: str, expected: int, actual: int) -> None:
        super().__init__(f"{kind}/{name}: expected version {expected}, found {actual}")
        self.kind, self.name, self.expected, self.actual = kind, name, expected, actual


@dataclass(frozen=True, slots=True)
class Doc:
    """One stored document: opaque bytes (callers store serialized protobuf messages) and a version that
    changes on every write (for compare-and-set; 0 means absent)."""

    name: str
    value: bytes
    version: int


class DocChange(Enum):
    PUT = "put"
    DELETED = "deleted"


@dataclass(frozen=True, slots=True)
class DocEvent:
    """A document was written or deleted (value is empty for DELETED)."""

    change: DocChange
    doc: Doc


@dataclass(frozen=True, slots=True)
class StoredReplica:
    """A replica as the store holds it, with the store's handle on its liveness (an etcd lease id; 0 for
    SQLite) and the revision of the write that produced this record (to skip echoes of our own writes)."""

    replica: pb.Replica
    registered_at: float
    lease: int = 0
    revision: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaEvent:
    """A change to membership made through the store by anyone (another registry, or the store expiring a
    lease): a put carries the replica, a deletion only its id."""

    replica_id: str
    stored: StoredReplica | None
    revision: int


class RegistryStore(ABC):
    """What the registry needs from durable storage. Every method is a coroutine so that a networked backend
    never blocks the event loop; the SQLite backend does its (sub-millisecond) work inline.

    Two families of state:
    - membership: replicas written at once on register/drain/deregister and their load in batches. With
      `external_leases` the store itself expires silent replicas (etcd leases, renewed by `keepalive`) and
      reports every change, by any registry, through `watch_replicas`; otherwise the registry's own reaper
      expires them and nothing else writes.
    - documents: small named blobs grouped by kind ("autoscaler", "rollout", ...), versioned for
      compare-and-set, with a change feed per kind. Other services keep durable control-plane state here so
      that it works on both backends (see /work/team/NOTES.md and docs/autoscaling.md).
    """

    #: True when the store expires replicas itself and other writers exist (etcd).
    external_leases: bool = False
    #: Human-readable location, for logs.
    where: str = ""

    async def open(self, lease_ttl_s: float) -> None:
        """Connect (and create what is missing). lease_ttl_s: how long a replica may stay silent."""
        return None

    @abstractmethod
    async def load_replicas(self) -> tuple[list[StoredReplica], int]:
        """Every stored replica, and the store revision they were read at (watch_replicas resumes after it)."""

    @abstractmethod
    async def put_replica(self, replica: pb.Replica, registered_at: float) -> StoredReplica:
        """Insert or replace one replica (registration), with a fresh lease where the store keeps leases."""

    @abstractmethod
    async def set_state(self, stored: StoredReplica, state: int) -> int:
        """Change one replica's lifecycle state (drain); the write's revision."""

    @abstractmethod
    async def delete_replicas(self, replica_ids: Iterable[str]) -> int:
        """Remove replicas (deregistered or expired); the store revision the deletion is part of (0 where the
        store has no revisions)."""

    @abstractmethod
    async def save_heartbeats(self, replicas: Iterable[StoredReplica]) -> dict[str, int]:
        """Write the load and heartbeat time of many replicas at once; replica id -> the revision of its
        write (0 where the store has no revisions), for those written."""

    async def keepalive(self, leases: Iterable[int]) -> set[int]:
        """Renew the store's leases of replicas that heartbeated; the leases the store no longer knows."""
        return set()

    async def watch_replicas(self, after_revision: int) -> AsyncIterator[ReplicaEvent]:
        """Membership changes after after_revision, by any writer, until cancelled (external_leases only)."""
        raise NotImplementedError("this store has a single writer: nothing to watch")
        yield  # pragma: no cover - makes this an async generator

    # -- documents -------------------------------------------------------------------------------------

    @abstractmethod
    async def get_doc(self, kind: str, name: str) -> Doc | None:
        """One document, or None."""

    @abstractmethod
    async def list_docs(self, kind: str) -> list[Doc]:
        """Every document of a kind, by name."""

    async def load_docs(self, kind: str) -> tuple[list[Doc], int]:
        """Every document of a kind, and the store revision they were read at (watch_docs resumes after it;
        every version read is at most that revision). 0 where the store has no revisions (SQLite: its single
        writer is this process, whose own writes are in memory already, so nothing can be missed)."""
        return await self.list_docs(kind), 0

    @abstractmethod
    async def put_doc(self, kind: str, name: str, value: bytes, *, if_version: int | None = None) -> int:
        """Write a document; its new version. With if_version, only if its version is that (0: only if it
        does not exist), else StoreConflict."""

    @abstractmethod
    async def delete_doc(self, kind: str, name: str) -> int | None:
        """Delete a document; the store revision of the deletion (0 where the store has no revisions), None if it
        did not exist."""

    @abstractmethod
    def watch_docs(self, kind: str, after_revision: int = 0) -> AsyncIterator[DocEvent]:
        """Changes to documents of a kind after after_revision (from load_docs; 0: from now on), until cancelled.
        A watch that breaks (etcd unreachable, its revision compacted) raises StoreError; callers watch again."""

    async def close(self) -> None:
        """Release connections and files."""
        return None


def validate_doc_key(kind: str, name: str) -> None:
    """Kinds and names become key path segments (etcd) and rows (SQLite): refuse what would break either."""
    for what, v in (("kind", kind), ("name", name)):
        if not v or len(v) > 256 or "/" in v or "\0" in v:
            raise ValueError(f"document {what} {v!r} must be 1-256 characters without '/' or NUL")


# -- SQLite ------------------------------------------------------------------------------------------------

_SCHEMA = (
    """
CREATE TABLE IF NOT EXISTS replicas (
    id                  TEXT PRIMARY KEY,
    address             TEXT NOT NULL,
    model               TEXT NOT NULL,
    backend             TEXT NOT NULL,
    state               INTEGER NOT NULL,
    load                BLOB NOT NULL,   -- serialized fleetserve.common.v1.ReplicaLoad
    last_heartbeat_unix REAL NOT NULL,
    registered_at       REAL NOT NULL,   -- Unix seconds
    model_version       TEXT NOT NULL DEFAULT ''
)
""",
    """
CREATE TABLE IF NOT EXISTS documents (
    kind    TEXT NOT NULL,
    name    TEXT NOT NULL,
    value   BLOB NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (kind, name)
)
""",
)
# Columns added after the first release: (name, declaration). Added at open when an older file lacks them.
_LATER_COLUMNS = (
    ("model_version", "TEXT NOT NULL DEFAULT ''"),
    ("started_unix", "REAL NOT NULL DEFAULT 0"),
    ("role", "INTEGER NOT NULL DEFAULT 0"),
    # Comma-separated host:port of a replica's front ends (Replica.endpoints).
    ("endpoints", "TEXT NOT NULL DEFAULT ''"),
)


class SqliteStore(RegistryStore):
    """The embedded default: one SQLite file, one connection used from the event loop thread only. The
    registry process is its only writer, so leases live in the registry's memory and there is nothing to
    watch but this process's own document writes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.where = f"sqlite:{path}"
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; batches use explicit BEGIN
        if path != ":memory:":
            # WAL: readers never block the writer and a commit is one append. synchronous=NORMAL skips the
            # fsync per commit; a power cut may lose the last changes, which heartbeats and re-registration
            # restore within one lease.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        for stmt in _SCHEMA:
            self._db.execute(stmt)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(replicas)")}
        for name, decl in _LATER_COLUMNS:
            if name not in have:
                self._db.execute(f"ALTER TABLE replicas ADD COLUMN {name} {decl}")
        self._doc_watchers: dict[str, set[asyncio.Queue[DocEvent]]] = {}

    async def load_replicas(self) -> tuple[list[StoredReplica], int]:
        rows = self._db.execute(
            "SELECT id, address, model, backend, state, load, last_heartbeat_unix, registered_at, model_version, "
            "started_unix, role, endpoints FROM replicas ORDER BY id"
        ).fetchall()
        out = []
        for (
            rid,
            address,
            model,
            backend,
            state,
            load,
            last_hb,
            registered_at,
            version,
            started,
            role,
            ends,
        ) in rows:
            rep = pb.Replica(
                replica_id=rid,
                address=address,
                model=model,
                model_version=version,
                backend=backend,
                state=state,
                load=common_pb2.ReplicaLoad.FromString(load),
                last_heartbeat_unix=last_hb,
                started_unix=started,
                registered_unix=registered_at,
                role=role,
                endpoints=[e for e in ends.split(",") if e],
            )
            out.append(StoredReplica(rep, registered_at))
        return out, 0

    async def put_replica(self, replica: pb.Replica, registered_at: float) -> StoredReplica:
        self._db.execute(
            "INSERT OR REPLACE INTO replicas "
            "(id, address, model, backend, state, load, last_heartbeat_unix, registered_at, model_version, "
            "started_unix, role, endpoints) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                replica.replica_id,
                replica.address,
                replica.model,
                replica.backend,
                int(replica.state),
                replica.load.SerializeToString(),
                replica.last_heartbeat_unix,
                registered_at,
                replica.model_version,
                replica.started_unix,
                int(replica.role),
                ",".join(replica.endpoints),
            ),
        )
        return StoredReplica(replica, registered_at)

    async def set_state(self, stored: StoredReplica, state: int) -> int:
        self._db.execute(
            "UPDATE replicas SET state = ? WHERE id = ?", (int(state), stored.replica.replica_id)
        )
        return 0

    async def delete_replicas(self, replica_ids: Iterable[str]) -> int:
        ids = [(rid,) for rid in replica_ids]
        if ids:
            with _Transaction(self._db):
                self._db.executemany("DELETE FROM replicas WHERE id = ?", ids)
        return 0

    async def save_heartbeats(self, replicas: Iterable[StoredReplica]) -> dict[str, int]:
        rows = [
            (s.replica.load.SerializeToString(), s.replica.last_heartbeat_unix, s.replica.replica_id)
            for s in replicas
        ]
        if rows:
            with _Transaction(self._db):
                self._db.executemany(
                    "UPDATE replicas SET load = ?, last_heartbeat_unix = ? WHERE id = ?", rows
                )
        return {rid: 0 for _, _, rid in rows}

    async def get_doc(self, kind: str, name: str) -> Doc | None:
        row = self._db.execute(
            "SELECT value, version FROM documents WHERE kind = ? AND name = ?", (kind, name)
        ).fetchone()
        return Doc(name, row[0], row[1]) if row else None

    async def list_docs(self, kind: str) -> list[Doc]:
        rows = self._db.execute(
            "SELECT name, value, version FROM documents WHERE kind = ? ORDER BY name", (kind,)
        ).fetchall()
        return [Doc(n, v, ver) for n, v, ver in rows]

    async def put_doc(self, kind: str, name: str, value: bytes, *, if_version: int | None = None) -> int:
        validate_doc_key(kind, name)
        with _Transaction(self._db):
            row = self._db.execute(
                "SELECT version FROM documents WHERE kind = ? AND name = ?", (kind, name)
            ).fetchone()
            current = row[0] if row else 0
            if if_version is not None and if_version != current:
                raise StoreConflict(kind, name, if_version, current)
            version = current + 1
            self._db.execute(
                "INSERT OR REPLACE INTO documents (kind, name, value, version) VALUES (?, ?, ?, ?)",
                (kind, name, bytes(value), version),
            )
        self._notify(kind, DocEvent(DocChange.PUT, Doc(name, bytes(value), version)))
        return version

    async def delete_doc(self, kind: str, name: str) -> int | None:
        cur = self._db.execute("DELETE FROM documents WHERE kind = ? AND name = ?", (kind, name))
        if not cur.rowcount:
            return None
        self._notify(kind, DocEvent(DocChange.DELETED, Doc(name, b"", 0)))
        return 0

    async def watch_docs(self, kind: str, after_revision: int = 0) -> AsyncIterator[DocEvent]:
        # No revisions here (load_docs says 0) and no other writer: from now on is all there is.
        q: asyncio.Queue[DocEvent] = asyncio.Queue()
        self._doc_watchers.setdefault(kind, set()).add(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._doc_watchers[kind].discard(q)

    def _notify(self, kind: str, event: DocEvent) -> None:
        for q in self._doc_watchers.get(kind, ()):
            q.put_nowait(event)

    async def close(self) -> None:
        self._db.close()


class _Transaction:
    """BEGIN ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")


def open_store(
    kind: str, *, db_path: str = "", etcd_endpoint: str = "", etcd_prefix: str = ""
) -> RegistryStore:
    """The store named by --store: "sqlite" (db_path) or "etcd" (endpoint host:port, key prefix)."""
    if kind == "sqlite":
        return SqliteStore(db_path)
    if kind == "etcd":
        from services.registry.store_etcd import EtcdStore

        return EtcdStore(etcd_endpoint, etcd_prefix)
    raise ValueError(f"unknown store {kind!r}; known: sqlite, etcd")
