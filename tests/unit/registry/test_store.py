"""The registry's SQLite store on its own: an older database file is upgraded in place on open (the contract
both backends share is tested against SQLite and a real etcd in tests/integration/test_registry_store.py)."""

from __future__ import annotations

import sqlite3

from fleetserve.registry.v1 import registry_service_pb2 as pb

from services.registry.store import SqliteStore


async def test_a_database_from_before_model_versions_and_cold_starts_is_upgraded(tmp_path):
    """A replicas table without the model_version and started_unix columns gets them (empty for the stored
    rows) on open, and the documents table is created."""
    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE replicas (id TEXT PRIMARY KEY, address TEXT NOT NULL, model TEXT NOT NULL, backend TEXT "
        "NOT NULL, state INTEGER NOT NULL, load BLOB NOT NULL, last_heartbeat_unix REAL NOT NULL, registered_at "
        "REAL NOT NULL)"
    )
    db.execute("INSERT INTO replicas VALUES ('old', 'h:1', 'm', 'sim', 1, x'', 1.0, 2.0)")
    db.commit()
    db.close()
    s = SqliteStore(path)
    new = pb.Replica(replica_id="new", address="h:2", model="m", model_version="v2", started_unix=5.0)
    await s.put_replica(new, registered_at=3.0)
    await s.put_doc("autoscaler", "m", b"x")
    got = {
        x.replica.replica_id: (x.replica.model_version, x.replica.started_unix)
        for x in (await s.load_replicas())[0]
    }
    await s.close()
    assert got == {"old": ("", 0.0), "new": ("v2", 5.0)}
