"""Token and cost budgets that stay exact with any number of gateways on one database: a request is admitted by
reserving (a hold row) what it may still use, in one transaction under the tenant's row lock, against the
period's usage counter plus every live hold; the ledger's write of its usage row removes the hold and adds to
the counter in one transaction. Holds expire: a gateway renews its own, so the holds of one that died stop
counting within hold_s."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import structlog

from services.gateway.db import Database, DatabaseError
from services.gateway.ledger import period_start

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What admission may let a request use: a hold of `tokens` (prompt + max_tokens), and max_tokens
    capped where the budget ends (None: not capped). When refused: used is the period's usage plus other
    requests' holds."""

    admitted: bool
    used_tokens: int
    used_cost: float
    max_tokens: int | None = None


class Budgets:
    """Holds and usage counters in the accounts database (tables budget_holds, budget_usage)."""

    def __init__(
        self,
        db: Database,
        *,
        hold_s: float = 30.0,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.hold_s = hold_s
        # This gateway process: its holds are renewed while it lives.
        self.owner = owner or uuid.uuid4().hex
        self._clock = clock
        self._open: set[str] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._renew_loop(), name="budget-holds")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.hold_s / 3)
            try:
                if self._open:
                    await self.db.execute(
                        "UPDATE budget_holds SET expires_at = ? WHERE owner = ?",
                        self._clock() + self.hold_s,
                        self.owner,
                    )
                # Expired holds no longer count; removing them keeps the table small (any gateway may).
                await self.db.execute(
                    "DELETE FROM budget_holds WHERE expires_at < ?", self._clock() - self.hold_s
                )
            except DatabaseError:
                # Not renewed this round: the holds count until they expire, then admission is less strict
                # by at most this gateway's streams until the database answers again.
                log.warning("gateway.budget_holds_renew_failed", open=len(self._open))

    async def reserve(
        self,
        tenant_id: str,
        period: str,
        request_id: str,
        *,
        prompt_tokens: int,
        max_tokens: int | None,
        token_budget: int | None,
        cost_budget_usd: float | None,
        cost_of: Callable[[int, int], float],
        idempotency_key: str = "",
        resumed_tokens: int = 0,
    ) -> Reservation:
        """Admit the request if the budgets have room for its prompt and at least one more token than it
        resumes (max_tokens capped to the room left; with max_tokens None the prompt alone is checked and held),
        recording a hold; or say how much was used. A hold of an earlier attempt with the same idempotency key
        (its gateway died or the client left it) is taken over: it is the same generation."""
        now = self._clock()
        start = period_start(period, now)
        async with self.db.transaction() as tx:
            # One admission per tenant at a time, across gateways (SQLite: the write transaction locks all).
            await tx.fetchval(f"SELECT id FROM tenants WHERE id = ?{tx.for_update}", tenant_id)
            if idempotency_key:
                await tx.execute(
                    "DELETE FROM budget_holds WHERE tenant_id = ? AND idempotency_key = ?",
                    tenant_id,
                    idempotency_key,
                )
            tokens, cost = await _usage(tx, tenant_id, period, start)
            held_tokens, held_cost = await tx.fetchrow(
                "SELECT COALESCE(SUM(tokens), 0), COALESCE(SUM(cost_usd), 0) FROM budget_holds "
                "WHERE tenant_id = ? AND expires_at > ?",
                tenant_id,
                now,
            )
            used_tokens, used_cost = int(tokens + held_tokens), float(cost + held_cost)
            room = None  # completion tokens the budgets leave
            if token_budget:
                room = token_budget - used_tokens - prompt_tokens
            if cost_budget_usd:
                left = cost_budget_usd - used_cost - cost_of(prompt_tokens, 0)
                per_token = cost_of(0, 1)
                if used_cost >= cost_budget_usd or left < 0:
                    cost_room: int | None = -1
                else:
                    cost_room = math.floor(left / per_token) if per_token > 0 else None
                if cost_room is not None:
                    room = cost_room if room is None else min(room, cost_room)
            need = 0 if max_tokens is None else resumed_tokens + 1
            if room is not None and room < need:
                return Reservation(False, used_tokens, used_cost)
            capped = None
            if max_tokens is not None and room is not None and room < max_tokens:
                capped = room
            completion = 0 if max_tokens is None else (capped or max_tokens)
            await tx.execute(
                "INSERT INTO budget_holds (request_id, tenant_id, idempotency_key, tokens, cost_usd, owner, "
                "expires_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                request_id,
                tenant_id,
                idempotency_key or None,
                prompt_tokens + completion,
                cost_of(prompt_tokens, completion),
                self.owner,
                now + self.hold_s,
            )
        self._open.add(request_id)
        return Reservation(True, used_tokens, used_cost, capped)

    def settled(self, request_ids: Iterable[str]) -> None:
        """The ledger wrote these requests' rows (and removed their holds)."""
        self._open.difference_update(request_ids)

    async def release(self, request_id: str) -> None:
        """Drop a hold whose request was refused after it was reserved (nothing was served)."""
        self._open.discard(request_id)
        await self.db.execute("DELETE FROM budget_holds WHERE request_id = ?", request_id)


async def _usage(tx: Database, tenant_id: str, period: str, start: float) -> tuple[int, float]:
    """The tenant's usage counter for the period (created from the ledger on first use)."""
    row = await tx.fetchrow(
        "SELECT tokens, cost_usd FROM budget_usage WHERE tenant_id = ? AND period = ? AND period_start = ?",
        tenant_id,
        period,
        start,
    )
    if row is not None:
        return int(row[0]), float(row[1])
    tokens, cost = await tx.fetchrow(
        "SELECT COALESCE(SUM(prompt_tokens + completion_tokens), 0), COALESCE(SUM(cost_usd), 0) "
        "FROM usage_ledger WHERE tenant_id = ? AND at >= ?",
        tenant_id,
        start,
    )
    await tx.execute(
        "INSERT INTO budget_usage (tenant_id, period, period_start, tokens, cost_usd) VALUES (?, ?, ?, ?, ?)",
        tenant_id,
        period,
        start,
        int(tokens),
        float(cost),
    )
    return int(tokens), float(cost)
