"""SQLiteDatabase on a file another process is writing: its start waits for the write lock instead of failing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

from services.gateway.db import SQLiteDatabase


def test_a_second_gateway_opens_the_file_while_the_first_holds_the_write_lock(tmp_path):
    """SQLite answers PRAGMA journal_mode=WAL "database is locked" at once, without its busy handler, while
    another connection holds the write lock (a gateway migrating the file as a second one starts: a fresh-clone CI
    run). The open waits for the lock to go (here 0.3 s) and the file ends up in WAL mode."""
    path = str(tmp_path / "gateway.db")
    writer = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    release = threading.Timer(0.3, lambda: writer.execute("COMMIT"))
    release.start()
    try:
        db = SQLiteDatabase(path)
    finally:
        release.join(5)
        writer.close()

    async def read() -> tuple:
        try:
            ((mode,),) = await db.fetch("PRAGMA journal_mode")
            ((count,),) = await db.fetch("SELECT count(*) FROM t")
            return mode, count
        finally:
            await db.close()

    assert asyncio.run(read()) == ("wal", 1)
