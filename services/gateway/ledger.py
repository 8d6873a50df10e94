"""The usage ledger: one database row per finished request (tokens and cost as reported to the client), written
in batches off the request path, and each tenant's running totals for the current budget period."""

from __future__ import annotations

import asyncio
import calendar
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from services.gateway.db import Database, DatabaseError
from services.gateway.tenants import PERIODS

log = structlog.get_logger(__name__)

_COLUMNS = (
    "request_id, tenant_id, key_id, model, prompt_tokens, completion_tokens, cached_tokens, cost_usd, "
    "status, partial, at, model_version, idempotency_key"
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
    # The model version that served it ("" when it never reached a replica).
    model_version: str = ""
    # Whether admission reserved a budget hold for it (removed when this row is written).
    held: bool = False
    # The client's key for the generation ("" for none): the attempts of one generation share it.
    idempotency_key: str = ""


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
    """Appends entries in batches and answers a tenant's usage in the current period from memory: the
    database's sum, re-read at most every refresh_s (rows other gateways wrote), plus this process's entries
    since. A batch is written as soon as a row is pending (group commit: rows recorded while a write is in
    flight go in the next one), at most once per flush_interval_s, so a gateway that dies loses at most the
    rows of its last interval."""

    def __init__(
        self,
        db: Database,
        *,
        flush_interval_s: float = 0.5,
        refresh_s: float = 2.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.flush_interval_s = flush_interval_s
        self.refresh_s = refresh_s
        self._clock = clock
        self._pending: list[Entry] = []
        # The batch being written: counted in totals until it is in the database.
        self._flushing: list[Entry] = []
        # (tenant, period start) -> [tokens, cost, read at]
        self._totals: dict[tuple[str, float], list[float]] = {}
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        # Batches committed so far: a total read while one committed is read again (it may be in neither the
        # sum nor the in-memory lists).
        self._committed = 0
        self._flush_lock = asyncio.Lock()
        # Told the request ids whose budget holds a write removed (Budgets.settled).
        self.on_settled: Callable[[list[str]], None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._flush_loop(), name="ledger-flush")

    async def _flush_loop(self) -> None:
        failures = 0
        while not self._closing.is_set():
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
                failures = 0
            except DatabaseError:
                # Kept in memory and retried: a busy or unreachable database must not lose usage.
                failures += 1
                log.exception("gateway.ledger_flush_failed", pending=len(self._pending), failures=failures)
                self._wake.set()
            pause = self.flush_interval_s * min(2**failures, 20)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), pause)

    def record(self, entry: Entry) -> None:
        self._pending.append(entry)
        self._wake.set()
        for (tenant, start), total in self._totals.items():
            if tenant == entry.tenant_id and entry.at >= start:
                total[0] += entry.prompt_tokens + entry.completion_tokens
                total[1] += entry.cost_usd

    async def flush(self) -> int:
        """Write pending entries in one transaction; returns how many. record() may run meanwhile: the batch
        is swapped out first, and put back if the write fails. A flush already under way is waited for (so
        that, when this returns, every row recorded before the call is in the database)."""
        async with self._flush_lock:
            return await self._flush_batch()

    async def _flush_batch(self) -> int:
        if not self._pending:
            return 0
        batch, self._pending = self._pending, []
        self._flushing = batch
        try:
            async with self.db.transaction() as tx:
                await tx.executemany(
                    f"INSERT INTO usage_ledger ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [_row(e) for e in batch],
                )
                # In the same transaction: the rows join the budgets' usage counters and their holds go, so
                # that a budget check never counts a request twice or not at all.
                await count_usage(
                    tx,
                    [(e.tenant_id, e.at, e.prompt_tokens + e.completion_tokens, e.cost_usd) for e in batch],
                )
                held = [e.request_id for e in batch if e.held]
                if held:
                    await tx.executemany(
                        "DELETE FROM budget_holds WHERE request_id = ?", [(r,) for r in held]
                    )
        except BaseException:
            self._pending[:0] = batch
            raise
        finally:
            self._flushing = []
        self._committed += 1
        if self.on_settled is not None:
            self.on_settled([e.request_id for e in batch if e.held])
        return len(batch)

    async def used(self, tenant_id: str, period: str) -> tuple[int, float]:
        """Tokens (prompt + completion) and cost the tenant used in the current period, all gateways."""
        now = self._clock()
        start = period_start(period, now)
        total = self._totals.get((tenant_id, start))
        if total is None or now - total[2] >= self.refresh_s:
            for _ in range(3):
                committed = self._committed
                tokens, cost = await self.db.fetchrow(
                    "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), COALESCE(SUM(cost_usd), 0) "
                    "FROM usage_ledger WHERE tenant_id = ? AND at >= ?",
                    tenant_id,
                    start,
                )
                if committed == self._committed and not self._flushing:
                    break
            for e in (*self._flushing, *self._pending):
                if e.tenant_id == tenant_id and e.at >= start:
                    tokens += e.prompt_tokens + e.completion_tokens
                    cost += e.cost_usd
            total = self._totals[(tenant_id, start)] = [tokens, cost, now]
        return int(total[0]), float(total[1])

    async def billed(self, tenant_id: str, idempotency_key: str) -> tuple[int, int]:
        """(most prompt tokens, sum of completion tokens) the rows of earlier attempts of one generation billed,
        written or still pending here."""
        prompt, completion = await self.db.fetchrow(
            "SELECT COALESCE(MAX(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM usage_ledger "
            "WHERE tenant_id = ? AND idempotency_key = ?",
            tenant_id,
            idempotency_key,
        )
        for e in (*self._flushing, *self._pending):
            if e.tenant_id == tenant_id and e.idempotency_key == idempotency_key:
                prompt, completion = max(prompt, e.prompt_tokens), completion + e.completion_tokens
        return int(prompt), int(completion)

    async def summary(self, tenant_id: str | None = None, since: float = 0.0) -> list[tuple]:
        """(tenant, model, requests, prompt, completion, cost) per tenant and model since a time (admin)."""
        sql = (
            "SELECT tenant_id, model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd) "
            "FROM usage_ledger WHERE at >= ?"
        )
        args: tuple = (since,)
        if tenant_id is not None:
            sql += " AND tenant_id = ?"
            args += (tenant_id,)
        rows = await self.db.fetch(sql + " GROUP BY tenant_id, model ORDER BY tenant_id, model", *args)
        return [(t, m, int(n), int(p), int(c), float(cost)) for t, m, n, p, c, cost in rows]

    async def close(self) -> None:
        """Stop the background writer after its write in progress, then write what is left (the database
        stays open: its owner closes it)."""
        self._closing.set()
        self._wake.set()
        if self._task is not None:
            await self._task
        try:
            await self.flush()
        except DatabaseError:
            log.exception("gateway.ledger_rows_lost", rows=len(self._pending))


def _row(e: Entry) -> tuple:
    return (
        e.request_id,
        e.tenant_id,
        e.key_id,
        e.model,
        e.prompt_tokens,
        e.completion_tokens,
        e.cached_tokens,
        float(e.cost_usd),
        e.status,
        int(e.partial),
        float(e.at),
        e.model_version,
        e.idempotency_key or None,
    )


async def count_usage(tx: Database, rows: Iterable[tuple[str, float, int, float]]) -> None:
    """Inside the ledger's write: add rows (tenant, at, tokens, cost) to the usage counters that exist (a counter
    is created, from the ledger, by the first admission that needs it), under the tenants' row locks so that a
    counter being created meanwhile sees either these rows in the ledger or here, never neither."""
    sums: dict[tuple[str, str, float], list[float]] = {}
    for tenant, at, tokens, cost in rows:
        for period in PERIODS:
            s = sums.setdefault((tenant, period, period_start(period, at)), [0, 0.0])
            s[0] += tokens
            s[1] += cost
    for tenant in sorted({t for t, _, _ in sums}):  # one order everywhere: no deadlock between writers
        await tx.fetchval(f"SELECT id FROM tenants WHERE id = ?{tx.for_update}", tenant)
    await tx.executemany(
        "UPDATE budget_usage SET tokens = tokens + ?, cost_usd = cost_usd + ? "
        "WHERE tenant_id = ? AND period = ? AND period_start = ?",
        [
            (int(t), float(c), tenant, period, start)
            for (tenant, period, start), (t, c) in sorted(sums.items())
        ],
    )
