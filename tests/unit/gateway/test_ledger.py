"""The usage ledger: calendar periods, batched writes, period totals across processes, prices."""

from __future__ import annotations

import asyncio
import calendar
import sqlite3

import pytest

from services.gateway.ledger import Entry, Ledger, cost_usd, period_end, period_start

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


def test_used_counts_pending_and_flushed_rows_of_the_period_only(tmp_path):
    """A tenant's usage is this period's rows, written or still pending; other tenants and periods do not count."""
    clock = [T]
    ledger = Ledger(str(tmp_path / "l.db"), refresh_s=0, clock=lambda: clock[0])
    ledger.record(entry(prompt=10, completion=5, cost=0.5))
    ledger.record(entry(tenant="b", prompt=100))
    ledger.record(entry(prompt=1, completion=1, at=T - 40 * 86400))  # last month
    assert ledger.used("a", "month") == (15, 0.5)
    assert ledger.flush() == 3
    ledger.record(entry(prompt=2, completion=3))
    assert ledger.used("a", "month") == (20, 0.5)
    ledger.close_now()


def test_rows_written_by_another_process_count_after_the_refresh_interval(tmp_path):
    """Usage another gateway wrote to the shared database is seen once refresh_s has passed."""
    clock = [T]
    db = str(tmp_path / "l.db")
    mine = Ledger(db, refresh_s=2.0, clock=lambda: clock[0])
    other = Ledger(db, clock=lambda: clock[0])
    assert mine.used("a", "day") == (0, 0.0)
    other.record(entry(prompt=7, completion=3))
    other.flush()
    mine.record(entry(prompt=1, completion=1))
    assert mine.used("a", "day") == (2, 0.0)  # cached total plus its own row
    clock[0] += 2.0
    assert mine.used("a", "day") == (12, 0.0)
    assert mine.summary("a") == [("a", "m", 1, 7, 3, 0.0)]  # its own row is still pending
    mine.close_now()
    other.close_now()


@pytest.mark.asyncio
async def test_background_flushes_and_close_write_every_row_exactly_once(tmp_path):
    """Rows recorded while flushes run in a thread, and a close that lands mid-flush, end up in the database
    once each (close waits for the write in progress)."""
    db = str(tmp_path / "l.db")
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
    raw = sqlite3.connect(db)
    assert raw.execute("SELECT COUNT(*), SUM(prompt_tokens) FROM usage_ledger").fetchone() == (total, total)
    raw.close()
