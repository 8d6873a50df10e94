"""The registry's SQLite store: replicas round-trip, heartbeat batches, drain state and deletion."""

from __future__ import annotations

from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as pb

from services.registry.store import ReplicaStore


def replica(rid: str, running: int = 0) -> pb.Replica:
    return pb.Replica(
        replica_id=rid,
        address="10.0.0.1:7000",
        model="m",
        backend="vllm",
        model_version="v2",
        state=pb.REPLICA_STATE_SERVING,
        load=common_pb2.ReplicaLoad(running=running, kv_blocks_total=100, prefix_cache_hit_rate=0.25),
        last_heartbeat_unix=1.7e9,
    )


def test_replicas_survive_reopening_the_file(tmp_path):
    """What is written is read back field for field after the database is closed and opened again."""
    path = str(tmp_path / "r.db")
    s = ReplicaStore(path)
    s.upsert(replica("r1", running=2), registered_at=123.0)
    s.upsert(replica("r2"), registered_at=124.0)
    s.close()
    s = ReplicaStore(path)
    got = s.load_all()
    s.close()
    assert [(r.replica_id, at) for r, at in got] == [("r1", 123.0), ("r2", 124.0)]
    assert got[0][0] == replica("r1", running=2)


def test_heartbeat_batch_updates_load_and_time():
    """save_heartbeats writes many replicas' load and heartbeat time at once."""
    s = ReplicaStore(":memory:")
    s.upsert(replica("r1"), 1.0)
    s.upsert(replica("r2"), 1.0)
    a, b = replica("r1", running=9), replica("r2", running=4)
    a.last_heartbeat_unix = b.last_heartbeat_unix = 1.8e9
    assert s.save_heartbeats([a, b]) == 2
    got = {r.replica_id: r for r, _ in s.load_all()}
    assert got["r1"].load.running == 9 and got["r2"].load.running == 4
    assert got["r1"].last_heartbeat_unix == 1.8e9
    assert s.save_heartbeats([]) == 0


def test_set_state_and_delete():
    """Drain state is stored; deleted replicas are gone."""
    s = ReplicaStore(":memory:")
    for rid in ("r1", "r2", "r3"):
        s.upsert(replica(rid), 1.0)
    s.set_state("r1", pb.REPLICA_STATE_DRAINING)
    s.delete(["r2", "r3"])
    got = s.load_all()
    assert [(r.replica_id, r.state) for r, _ in got] == [("r1", pb.REPLICA_STATE_DRAINING)]


def test_upsert_replaces_same_id():
    """Registering an id again replaces its row."""
    s = ReplicaStore(":memory:")
    s.upsert(replica("r1"), 1.0)
    other = replica("r1")
    other.address = "10.0.0.2:7000"
    s.upsert(other, 2.0)
    assert [(r.address, at) for r, at in s.load_all()] == [("10.0.0.2:7000", 2.0)]


def test_a_database_from_before_model_versions_is_upgraded(tmp_path):
    """A replicas table without the model_version column gets it (empty for the stored rows) on open."""
    import sqlite3

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
    s = ReplicaStore(path)
    s.upsert(replica("new"), registered_at=3.0)
    got = {r.replica_id: r.model_version for r, _ in s.load_all()}
    s.close()
    assert got == {"old": "", "new": "v2"}
