"""Budget holds on a real database (SQLite file and PostgreSQL): gateways admitting one tenant at the same time
never pass its budget together, the last request is capped to what is left, the holds of a gateway that died
stop counting when they expire, and a resumed attempt takes over its first attempt's hold."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.budgets import Budgets
from services.gateway.ledger import Entry, Ledger
from services.gateway.schema import open_accounts
from services.gateway.tenants import TenantStore

pytestmark = pytest.mark.asyncio

NOW = 1_790_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def free(p: int, c: int) -> float:
    return 0.0


async def reserve(b: Budgets, rid: str, prompt: int = 10, max_tokens: int | None = 20, **kw):
    return await b.reserve(
        "acme",
        "day",
        rid,
        prompt_tokens=prompt,
        max_tokens=max_tokens,
        token_budget=kw.pop("token_budget", 600),
        cost_budget_usd=kw.pop("cost_budget_usd", None),
        cost_of=kw.pop("cost_of", free),
        **kw,
    )


def entry(rid: str, tokens: int, clock: Clock) -> Entry:
    return Entry(rid, "acme", "k", "m", 10, tokens - 10, 0, 0.0, "OK", False, clock(), held=True)


async def _db(url: str):
    db = await open_accounts(url)
    await TenantStore(db).create_tenant("acme", tenant_id="acme")
    return db


async def test_two_gateways_admitting_at_once_never_pass_the_budget(db_url):
    """40 requests of 30 tokens (10 prompt + 20 max_tokens) at once through two gateways' Budgets, budget 600:
    exactly 20 are admitted; once their rows are written, 600 are used and nothing more is admitted."""
    clock = Clock()
    dbs = [await _db(db_url), await open_accounts(db_url)]
    try:
        a, b = (Budgets(db, clock=clock) for db in dbs)
        got = await asyncio.gather(*(reserve((a, b)[i % 2], f"r{i}") for i in range(40)))
        admitted = [f"r{i}" for i, r in enumerate(got) if r.admitted]
        assert len(admitted) == 20 and all(r.max_tokens is None for r in got if r.admitted)
        ledger = Ledger(dbs[0], clock=clock)
        ledger.on_settled = a.settled
        for rid in admitted:
            ledger.record(entry(rid, 30, clock))
        await ledger.flush()
        assert await dbs[0].fetchval("SELECT COUNT(*) FROM budget_holds") == 0
        assert (
            await dbs[1].fetchrow(
                "SELECT tokens FROM budget_usage WHERE tenant_id = 'acme' AND period = 'day'"
            )
        )[0] == 600
        refused = await reserve(b, "late", prompt=1, max_tokens=1)
        assert not refused.admitted and refused.used_tokens == 600
    finally:
        for db in dbs:
            await db.close()


async def test_the_last_request_is_capped_and_a_dead_gateways_holds_expire(db_url):
    """With 15 tokens left a request of prompt 10 may generate 5 (max_tokens capped); a gateway that dies
    holding them (never renewed) blocks the tenant only until its hold expires."""
    clock = Clock()
    db = await _db(db_url)
    try:
        dead, alive = Budgets(db, clock=clock, hold_s=5), Budgets(db, clock=clock, hold_s=5)
        first = await reserve(alive, "big", prompt=10, max_tokens=575, token_budget=600)
        assert first.admitted and first.max_tokens is None
        ledger = Ledger(db, clock=clock)
        ledger.record(entry("big", 585, clock))
        await ledger.flush()
        capped = await reserve(dead, "capped", max_tokens=20, token_budget=600)
        assert capped.admitted and capped.max_tokens == 5
        assert not (await reserve(alive, "blocked", prompt=1, max_tokens=1, token_budget=600)).admitted
        clock.now += 5.1  # the dead gateway never renewed its hold
        after = await reserve(alive, "after", prompt=5, max_tokens=20, token_budget=600)
        assert after.admitted and after.max_tokens == 10
    finally:
        await db.close()


async def test_a_resumed_attempt_takes_over_its_first_attempts_hold(db_url):
    """The same idempotency key (a client resuming through another gateway): the first attempt's hold is
    replaced, not added to; a resume needs room beyond the tokens it resumes."""
    clock = Clock()
    db = await _db(db_url)
    try:
        a, b = Budgets(db, clock=clock), Budgets(db, clock=clock)
        assert (await reserve(a, "first", max_tokens=280, token_budget=300, idempotency_key="k1")).admitted
        resumed = await reserve(
            b, "again", max_tokens=280, token_budget=300, idempotency_key="k1", resumed_tokens=50
        )
        assert resumed.admitted and resumed.max_tokens is None
        assert await db.fetchval("SELECT COUNT(*) FROM budget_holds") == 1
        # Another request's hold leaves 300 - 290 - 10 = 0 room for completion: a resume of 5 tokens is refused.
        other = await reserve(a, "other", prompt=5, max_tokens=5, token_budget=305)
        assert other.admitted
        cut = await reserve(
            b, "cut", prompt=10, max_tokens=20, token_budget=305, idempotency_key="k2", resumed_tokens=5
        )
        assert not cut.admitted
    finally:
        await db.close()


async def test_a_cost_budget_caps_max_tokens_at_the_completion_price(db_url):
    """Cost budget $1 at $1000/M prompt and $2000/M completion tokens: a prompt of 500 ($0.5) leaves room for
    250 completion tokens."""
    db = await _db(db_url)
    try:
        got = await reserve(
            Budgets(db, clock=Clock()),
            "r",
            prompt=500,
            max_tokens=1000,
            token_budget=None,
            cost_budget_usd=1.0,
            cost_of=lambda p, c: (p * 1000.0 + c * 2000.0) / 1e6,
        )
        assert got.admitted and got.max_tokens == 250
    finally:
        await db.close()
