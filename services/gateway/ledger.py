"""The usage ledger: one SQLite row per finished request (tokens and cost as reported to the client), written
in batches off the request path, and each tenant's running totals for the current budget period."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass

import structlog

log = structlog.get_logger(__name__)

_SCHEMA = """
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
    -- 1 when the stream ended without a final usage chunk: the tokens are the gateway's own count.
    partial           INTEGER NOT NULL,
    at                REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_ledger_tenant_at ON usage_ledger(tenant_id, at);
"""
_COLUMNS = (
    "request_id, tenant_id, key_id, model, prompt_tokens, completion_tokens, cached_tokens, cost_usd, "
    "status, partial, at"
)


@dataclass(frozen=True, slots=True)
class Entry:
    """One request's usage."""

    request_id: str
    tenant_id: str
    key_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float
    status: str
    partial: bool
    at: float


def period_start(period: str, now: float) -> float:
    """Start (unix seconds, UTC calendar) of the hour, day or month that contains now."""
    t = time.gmtime(now)
    if period == "hour":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, 0, 0))
    if period == "day":
        return calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
    if period == "month":
        return calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
    raise ValueError(f"unknown budget period {period!r}")


def period_end(period: str, now: float) -> float:
    """End (exclusive) of the period that contains now: when a used-up budget comes back."""
    start = period_start(period, now)
    if period == "hour":
        return start + 3600
    if period == "day":
        return start + 86400
    t = time.gmtime(start)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0))


def cost_usd(prices: Mapping[str, tuple[float, float]], model: str, prompt: int, completion: int) -> float:
    """Cost of a request from the model's prices per 1M prompt and completion tokens (0 for unpriced models)."""
    p = prices.get(model)
    return 0.0 if p is None else (prompt * p[0] + completion * p[1]) / 1e6


class Ledger:
    """Appends entries in batches (every flush_interval_s, and on close) and answers a tenant's usage in the
    current period from memory: the database's sum, re-read at most every refresh_s (rows other gateways
    wrote), plus this process's entries since."""

    def __init__(
        self,
        db_path: str,
        *,
        flush_interval_s: float = 0.5,
        refresh_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._db = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=2000")
        self._db.executescript(_SCHEMA)
        # Flushes write on their own connection (from a thread): reads on self._db never see half a batch.
        self._writer = sqlite3.connect(db_path, isolation_level=None, check_same_thread=False)
        self._writer.execute("PRAGMA busy_timeout=2000")
        self.flush_interval_s = flush_interval_s
        self.refresh_s = refresh_s
        self._clock = clock
        self._pending: list[Entry] = []
        # The batch being written (by a flush in a thread): counted in totals until it is in the database.
        self._flushing: list[Entry] = []
        # (tenant, period start) -> [tokens, cost, read at]
        self._totals: dict[tuple[str, float], list[float]] = {}
        self._task: asyncio.Task | None = None
        self._inflight: asyncio.Future[int] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_loop(), name="ledger-flush")

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval_s)
            try:
                # In a thread: a big batch is milliseconds of SQLite work that must not stall the streams.
                # Shielded: close() waits for a write in progress instead of closing the database under it.
                self._inflight = asyncio.ensure_future(asyncio.to_thread(self.flush))
                await asyncio.shield(self._inflight)
            except sqlite3.Error:
                # Kept in memory and retried next time: a busy database must not lose usage.
                log.exception("gateway.ledger_flush_failed", pending=len(self._pending))

    def record(self, entry: Entry) -> None:
        self._pending.append(entry)
        for (tenant, start), total in self._totals.items():
            if tenant == entry.tenant_id and entry.at >= start:
                total[0] += entry.prompt_tokens + entry.completion_tokens
                total[1] += entry.cost_usd

    def flush(self) -> int:
        """Write pending entries in one transaction; returns how many. Safe in a thread while record() runs:
        the batch is swapped out first, and put back if the write fails."""
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        self._flushing = batch
        try:
            with self._writer:
                self._writer.execute("BEGIN")
                self._writer.executemany(
                    f"INSERT INTO usage_ledger ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [astuple(e) for e in batch],
                )
        except BaseException:
            self._pending[:0] = batch
            raise
        finally:
            self._flushing = []
        return len(batch)

    def used(self, tenant_id: str, period: str) -> tuple[int, float]:
        """Tokens (prompt + completion) and cost the tenant used in the current period, all gateways."""
        now = self._clock()
        start = period_start(period, now)
        total = self._totals.get((tenant_id, start))
        if total is None or now - total[2] >= self.refresh_s:
            tokens, cost = self._db.execute(
                "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), COALESCE(SUM(cost_usd), 0) "
                "FROM usage_ledger WHERE tenant_id = ? AND at >= ?",
                (tenant_id, start),
            ).fetchone()
            for e in (*self._flushing, *self._pending):
                if e.tenant_id == tenant_id and e.at >= start:
                    tokens += e.prompt_tokens + e.completion_tokens
                    cost += e.cost_usd
            total = self._totals[(tenant_id, start)] = [tokens, cost, now]
        return int(total[0]), float(total[1])

    def summary(self, tenant_id: str | None = None, since: float = 0.0) -> list[tuple]:
        """(tenant, model, requests, prompt, completion, cost) per tenant and model since a time (admin)."""
        sql = (
            "SELECT tenant_id, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd) "
            "FROM usage_ledger WHERE at >= ?"
        )
        args: tuple = (since,)
        if tenant_id is not None:
            sql += " AND tenant_id = ?"
            args += (tenant_id,)
        return self._db.execute(sql + " GROUP BY tenant_id, model ORDER BY tenant_id, model", args).fetchall()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight is not None:
            with contextlib.suppress(Exception):
                await self._inflight
        self.close_now()

    def close_now(self) -> None:
        """Write what is pending and close, without the event loop (the admin CLI)."""
        self.flush()
        self._writer.close()
        self._db.close()
