"""Admission of one request against its tenant's and key's limits (requests/s, tokens/min, concurrent streams,
token and cost budgets per period), and the accounting once it ends (completion tokens, the ledger)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog
from opentelemetry import metrics

from services.gateway.budgets import Budgets
from services.gateway.ledger import Entry, Ledger, cost_usd, period_end
from services.gateway.limits import LimitBackend, Rate
from services.gateway.tenants import Limits, Tenant
from shared.errors import ResourceExhausted

log = structlog.get_logger(__name__)

# Before a tenant has finished any stream, the wait advised when its streams are all taken.
_DEFAULT_STREAM_S = 1.0
_EWMA = 0.2


@dataclass
class Ticket:
    """What admission took for one request, given back or reconciled by finish()."""

    tenant: Tenant
    model: str
    request_id: str
    prompt_tokens: int
    token_rates: list[Rate] = field(default_factory=list)
    stream_key: str = ""
    opened: float = 0.0
    # A budget hold was reserved (the ledger row removes it); max_tokens the budget capped the request to.
    held: bool = False
    max_tokens: int | None = None
    # The generation's key, and how many of its tokens an earlier attempt delivered (a resume).
    idempotency_key: str = ""
    resumed_tokens: int = 0


def _rates(owner: str, subject: str, limits: Limits) -> tuple[Rate | None, Rate | None]:
    rps = tpm = None
    if limits.rps:
        # A bucket holds at least one request, so a rate below 1/s (0.1: one per 10 s) admits anything at all.
        burst = max(1.0, limits.rps)
        rps = Rate(f"{owner}:rps", burst, burst / limits.rps, subject, f"{limits.rps:g} requests per second")
    if limits.tokens_per_min:
        tpm = Rate(
            f"{owner}:tpm",
            float(limits.tokens_per_min),
            60.0,
            subject,
            f"{limits.tokens_per_min} tokens per minute",
        )
    return rps, tpm


class Admission:
    """Checks limits in a fixed order (cheapest refusal first, nothing taken unless everything passes) and
    raises ResourceExhausted with QuotaFailure (which limit) and RetryInfo (when it would pass)."""

    def __init__(
        self,
        backend: LimitBackend,
        ledger: Ledger,
        meter: metrics.Meter,
        *,
        prices: Mapping[str, tuple[float, float]] | None = None,
        clock: Callable[[], float] = time.time,
        budgets: Budgets | None = None,
    ) -> None:
        self.backend = backend
        self.ledger = ledger
        self.budgets = budgets or Budgets(ledger.db, clock=clock)
        ledger.on_settled = self.budgets.settled
        self.prices = dict(prices or {})
        self._clock = clock
        self._stream_s: dict[str, float] = {}
        self._limited = meter.create_counter(
            "fleetserve.gateway.limited",
            unit="{request}",
            description="Requests refused by a tenant or key limit, by limit.",
        )

    def _refuse(self, tenant: Tenant, limit: str, message: str, subject: str, retry_s: float | None):
        self._limited.add(1, {"limit": limit, "tenant": tenant.id})
        return ResourceExhausted(
            message,
            reason=limit,
            retry_after_s=None if retry_s is None else retry_hint(max(retry_s, 0.001)),
            quota_violations=[(subject, message)],
            metadata={"tenant": tenant.id, "limit": limit},
        )

    @staticmethod
    def counts_tokens(tenant: Tenant) -> bool:
        """Whether admitting the tenant needs the prompt's token count (a token rate or a token budget)."""
        return bool(
            tenant.limits.tokens_per_min or tenant.key_limits.tokens_per_min or tenant.limits.token_budget
        )

    async def admit(
        self,
        tenant: Tenant,
        model: str,
        request_id: str,
        prompt_tokens: int,
        lease_s: float,
        *,
        max_tokens: int | None = None,
        idempotency_key: str = "",
        resumed_tokens: int = 0,
    ) -> Ticket:
        """Take what the request needs or raise ResourceExhausted; the ticket must reach finish(). With a
        budget, max_tokens (when given) is held too and capped to what the budget leaves (ticket.max_tokens)."""
        ticket = Ticket(
            tenant,
            model,
            request_id,
            prompt_tokens,
            opened=time.monotonic(),
            idempotency_key=idempotency_key,
            resumed_tokens=resumed_tokens,
        )
        await self._check_budgets(ticket, max_tokens, idempotency_key, resumed_tokens)
        try:
            return await self._take_limits(ticket, tenant, prompt_tokens, request_id, lease_s)
        except BaseException:
            if ticket.held:
                await self.budgets.release(request_id)
            raise

    async def _take_limits(
        self, ticket: Ticket, tenant: Tenant, prompt_tokens: int, request_id: str, lease_s: float
    ) -> Ticket:
        t_rps, t_tpm = _rates(f"t:{tenant.id}", f"tenant:{tenant.id}", tenant.limits)
        k_rps, k_tpm = _rates(f"k:{tenant.key_id}", f"key:{tenant.key_id}", tenant.key_limits)
        wants: list[tuple[Rate, float]] = [(r, 1.0) for r in (t_rps, k_rps) if r is not None]
        for r in (t_tpm, k_tpm):
            if r is None:
                continue
            if prompt_tokens > r.capacity:
                raise self._refuse(
                    tenant,
                    "PROMPT_EXCEEDS_TOKEN_RATE",
                    f"the prompt's {prompt_tokens} tokens exceed the limit of {r.what}; "
                    "it can never be admitted",
                    r.subject,
                    None,
                )
            wants.append((r, float(prompt_tokens)))
            ticket.token_rates.append(r)
        # The stream slot first, then the rates, so that a request refused by either takes nothing.
        cap = tenant.limits.max_streams
        if cap:
            key = f"s:{tenant.id}"
            if not await self.backend.open_stream(key, cap, request_id, lease_s):
                # Expected time until one of `cap` streams of typical length ends, if their ages are spread.
                wait = self._stream_s.get(tenant.id, _DEFAULT_STREAM_S) / cap
                raise self._refuse(
                    tenant,
                    "CONCURRENT_STREAMS_LIMIT",
                    f"tenant:{tenant.id} already has its limit of {cap} concurrent streams open",
                    f"tenant:{tenant.id}",
                    wait,
                )
            ticket.stream_key = key
        try:
            refused = await self.backend.take(wants)
        except BaseException:
            await self._close_stream(ticket)
            raise
        if refused:
            await self._close_stream(ticket)
            rate, wait = max(refused, key=lambda rw: rw[1])
            limit = "RATE_LIMITED" if rate.key.endswith(":rps") else "TOKEN_RATE_LIMITED"
            raise self._refuse(
                tenant,
                limit,
                f"{rate.subject} is over its limit of {rate.what}; retry in {wait:.3f} s",
                rate.subject,
                wait,
            )
        return ticket

    async def _close_stream(self, ticket: Ticket) -> None:
        if ticket.stream_key:
            await self.backend.close_stream(ticket.stream_key, ticket.request_id)

    async def _check_budgets(
        self, ticket: Ticket, max_tokens: int | None, idempotency_key: str, resumed_tokens: int
    ) -> None:
        tenant, prompt_tokens = ticket.tenant, ticket.prompt_tokens
        lim = tenant.limits
        if not lim.token_budget and not lim.cost_budget_usd:
            return
        got = await self.budgets.reserve(
            tenant.id,
            lim.budget_period,
            ticket.request_id,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            token_budget=lim.token_budget,
            cost_budget_usd=lim.cost_budget_usd,
            cost_of=lambda p, c: cost_usd(self.prices, ticket.model, p, c),
            idempotency_key=idempotency_key,
            resumed_tokens=resumed_tokens,
        )
        if got.admitted:
            ticket.held, ticket.max_tokens = True, got.max_tokens
            return
        now = self._clock()
        need = prompt_tokens + (0 if max_tokens is None else resumed_tokens + 1)
        if lim.token_budget and got.used_tokens + need > lim.token_budget:
            raise self._refuse(
                tenant,
                "TOKEN_BUDGET_EXHAUSTED",
                f"tenant:{tenant.id} used {got.used_tokens} of its {lim.token_budget} tokens this "
                f"{lim.budget_period}, requests in flight included (this prompt needs {prompt_tokens})",
                f"tenant:{tenant.id}",
                period_end(lim.budget_period, now) - now,
            )
        raise self._refuse(
            tenant,
            "COST_BUDGET_EXHAUSTED",
            f"tenant:{tenant.id} spent ${got.used_cost:.6f} of its ${lim.cost_budget_usd:g} budget "
            f"this {lim.budget_period}, requests in flight included",
            f"tenant:{tenant.id}",
            period_end(lim.budget_period, now) - now,
        )

    async def finish(
        self,
        ticket: Ticket,
        *,
        status: str,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        cached_tokens: int | None,
        relayed_chunks: int,
        model_version: str = "",
    ) -> Entry:
        """Give the stream slot back, charge tokens the admission could not know, and write the ledger row.
        Without a final usage chunk (cancelled, failed) the gateway's own counts stand in: the prompt as
        tokenized on admission and one token per relayed chunk (an estimate: the engine sends about one
        token per chunk). Such rows are marked partial."""
        tenant = ticket.tenant
        partial = completion_tokens is None
        prompt = ticket.prompt_tokens if prompt_tokens is None else prompt_tokens
        completion = relayed_chunks if completion_tokens is None else completion_tokens
        if partial and ticket.resumed_tokens:
            completion += ticket.resumed_tokens  # relayed chunks are this attempt's; usage counts the whole
        if ticket.resumed_tokens and ticket.idempotency_key:
            # A resume (its usage counts the whole generation): net of what earlier attempts' rows billed (a live
            # gateway the client left wrote a partial row; a dead one wrote none, and this bills its part).
            try:
                billed_prompt, billed_completion = await self.ledger.billed(tenant.id, ticket.idempotency_key)
            except Exception:  # noqa: BLE001 - a row billed whole beats a row lost
                log.exception("gateway.ledger_net_failed", request_id=ticket.request_id)
            else:
                prompt = max(0, prompt - billed_prompt)
                completion = max(0, completion - billed_completion)
        entry = Entry(
            request_id=ticket.request_id,
            tenant_id=tenant.id,
            key_id=tenant.key_id,
            model=ticket.model,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached_tokens or 0,
            cost_usd=cost_usd(self.prices, ticket.model, prompt, completion),
            status=status,
            partial=partial,
            at=self._clock(),
            model_version=model_version,
            held=ticket.held,
            idempotency_key=ticket.idempotency_key,
        )
        # The row first: a limits backend that fails below must not lose what the request was billed.
        self.ledger.record(entry)
        try:
            if ticket.stream_key:
                await self._close_stream(ticket)
                elapsed = time.monotonic() - ticket.opened
                prev = self._stream_s.get(tenant.id)
                self._stream_s[tenant.id] = elapsed if prev is None else prev + _EWMA * (elapsed - prev)
        finally:
            extra = completion + max(0, prompt - ticket.prompt_tokens)
            if extra and ticket.token_rates:
                await self.backend.charge([(r, float(extra)) for r in ticket.token_rates])
        return entry


def retry_hint(seconds: float) -> float:
    """Seconds rounded up to the millisecond (a client that waits this long is not refused for rounding)."""
    return math.ceil(seconds * 1000) / 1000
