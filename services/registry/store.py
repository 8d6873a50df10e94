"""Durable membership in SQLite: membership changes are written at once, heartbeat load in batches."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable

from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as pb

_SCHEMA = """
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
"""


class ReplicaStore:
    """The replicas table. One connection, used from the event loop thread only."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; batches use explicit BEGIN
        if path != ":memory:":
            # WAL: readers never block the writer and a commit is one append. synchronous=NORMAL skips the
            # fsync per commit; a power cut may lose the last changes, which heartbeats and re-registration
            # restore within one lease.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(replicas)")}
        if "model_version" not in columns:  # a database written before versions existed
            self._db.execute("ALTER TABLE replicas ADD COLUMN model_version TEXT NOT NULL DEFAULT ''")

    def load_all(self) -> list[tuple[pb.Replica, float]]:
        """Every stored replica with its registration time (Unix seconds)."""
        rows = self._db.execute(
            "SELECT id, address, model, backend, state, load, last_heartbeat_unix, registered_at, model_version "
            "FROM replicas ORDER BY id"
        ).fetchall()
        out = []
        for rid, address, model, backend, state, load, last_hb, registered_at, version in rows:
            rep = pb.Replica(
                replica_id=rid,
                address=address,
                model=model,
                model_version=version,
                backend=backend,
                state=state,
                load=common_pb2.ReplicaLoad.FromString(load),
                last_heartbeat_unix=last_hb,
            )
            out.append((rep, registered_at))
        return out

    def upsert(self, replica: pb.Replica, registered_at: float) -> None:
        """Insert or replace one replica (registration)."""
        self._db.execute(
            "INSERT OR REPLACE INTO replicas "
            "(id, address, model, backend, state, load, last_heartbeat_unix, registered_at, model_version) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            ),
        )

    def set_state(self, replica_id: str, state: int) -> None:
        """Change one replica's lifecycle state (drain)."""
        self._db.execute("UPDATE replicas SET state = ? WHERE id = ?", (int(state), replica_id))

    def delete(self, replica_ids: Iterable[str]) -> None:
        """Remove replicas (deregistered or expired)."""
        ids = [(rid,) for rid in replica_ids]
        if ids:
            with self._transaction():
                self._db.executemany("DELETE FROM replicas WHERE id = ?", ids)

    def save_heartbeats(self, replicas: Iterable[pb.Replica]) -> int:
        """Write the load and heartbeat time of many replicas in one transaction; how many were written."""
        rows = [(r.load.SerializeToString(), r.last_heartbeat_unix, r.replica_id) for r in replicas]
        if rows:
            with self._transaction():
                self._db.executemany(
                    "UPDATE replicas SET load = ?, last_heartbeat_unix = ? WHERE id = ?", rows
                )
        return len(rows)

    def close(self) -> None:
        self._db.close()

    def _transaction(self):
        return _Transaction(self._db)


class _Transaction:
    """BEGIN ... COMMIT (ROLLBACK on error) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN")

    def __exit__(self, exc_type, exc, tb) -> None:
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
