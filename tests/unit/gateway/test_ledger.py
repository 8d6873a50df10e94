"""The usage ledger: calendar periods, batched writes, period totals across processes, prices."""

from __future__ import annotations

import asyncio
import calendar

import pytest

from services.gateway.ledger import Entry, Ledger, cost_usd, period_end, period_start
from services.gateway.schema import open_accounts
from tests.support import assert_eventually

T = calendar.timegm((2026, 12, 31, 22, 30, 15))


def entry(
    tenant: str = "a", prompt: int = 10, completion: int = 5, at: float = T, cost: float = 0.0
) -> Entry:
    return Entry("r", tenant, "key_x", "m", prompt, completion, 0, cost, "OK", False, at)


def test_periods_follow_the_utc_calendar():
    """Hour, day and month periods start and end on UTC boundaries (a month end rolls the year)."""
    assert period_start("hour", T) == calendar.timegm((2026, 12, 31, 22, 0, 0))
    assert period_end("hour", T) == calendar.timegm((2026, 12, 31, 23, 0, 0))
    assert period_start("day", T) == calendar.timegm((2026, 12, 31, 0, 0, 0))
    assert period_start("month", T) == calendar.timegm((2026, 12, 1, 0, 0, 0))
    assert period_end("month", T) == calendar.timegm((2027, 1, 1, 0, 0, 0))
    with pytest.raises(ValueError):
        period_start("week", T)


def test_cost_from_prices_per_million():
    """Cost is prompt and completion tokens at the model's prices per 1M; unpriced models cost nothing."""
    prices = {"m": (1.0, 4.0)}
    assert cost_usd(prices, "m", 1_000_000, 500_000) == pytest.approx(3.0)
    assert cost_usd(prices, "other", 10, 10) == 0.0


async def test_used_counts_pending_and_flushed_rows_of_the_period_only(db_url):
    """A tenant's usage is this period's rows, written or still pending; other tenants and periods do not count."""
    clock = [T]
    db = await open_accounts(db_url)
    ledger = Ledger(db, refresh_s=0, clock=lambda: clock[0])
    ledger.record(entry(prompt=10, completion=5, cost=0.5))
    ledger.record(entry(tenant="b", prompt=100))
    ledger.record(entry(prompt=1, completion=1, at=T - 40 * 86400))  # last month
    assert await ledger.used("a", "month") == (15, 0.5)
    assert await ledger.flush() == 3
    ledger.record(entry(prompt=2, completion=3))
    assert await ledger.used("a", "month") == (20, 0.5)
    await ledger.close()
    await db.close()


async def test_rows_written_by_another_process_count_after_the_refresh_interval(db_url):
    """Usage another gateway wrote to the shared database is seen once refresh_s has passed."""
    clock = [T]
    mine_db, other_db = await open_accounts(db_url), await open_accounts(db_url)
    mine = Ledger(mine_db, refresh_s=2.0, clock=lambda: clock[0])
    other = Ledger(other_db, clock=lambda: clock[0])
    assert await mine.used("a", "day") == (0, 0.0)
    other.record(entry(prompt=7, completion=3))
    await other.flush()
    mine.record(entry(prompt=1, completion=1))
    assert await mine.used("a", "day") == (2, 0.0)  # cached total plus its own row
    clock[0] += 2.0
    assert await mine.used("a", "day") == (12, 0.0)
    assert await mine.summary("a") == [("a", "m", 1, 7, 3, 0.0)]  # its own row is still pending
    await mine.close()
    await other.close()
    await mine_db.close()
    await other_db.close()


async def test_background_flushes_and_close_write_every_row_exactly_once(db_url):
    """Rows recorded while background flushes run, and a close that lands mid-flush, end up in the database
    once each (close waits for the write in progress)."""
    db = await open_accounts(db_url)
    total = 0
    for _ in range(10):
        ledger = Ledger(db, flush_interval_s=0.001)
        ledger.start()
        for i in range(300):
            ledger.record(entry(prompt=1, completion=0))
            total += 1
            if i % 50 == 0:
                await asyncio.sleep(0.002)
        await ledger.close()
    assert await db.fetchrow("SELECT COUNT(*), SUM(prompt_tokens) FROM usage_ledger") == (total, total)
    await db.close()


async def test_a_row_is_written_without_waiting_for_the_flush_interval(db_url):
    """Group commit: on a quiet ledger the first row goes to the database at once, not after flush_interval_s
    (a gateway killed right after a request loses at most the rows of one interval)."""
    db = await open_accounts(db_url)
    ledger = Ledger(db, flush_interval_s=3600)
    ledger.start()
    ledger.record(entry())
    await assert_eventually(
        lambda: db.fetchval("SELECT COUNT(*) FROM usage_ledger"), timeout_s=10, message="row not written"
    )
    await ledger.close()
    await db.close()
