"""The capstone demo's workload: a day's arrival rate (low at night, high in the afternoon, a spike) compressed into
`day_s` seconds and repeated, tenants of different tiers, multi-turn chats whose conversations share their
tenant's system prompt, and single questions of which some are hard (routed to the large model)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from loadtest.scenarios import words


@dataclass(frozen=True)
class DayShape:
    """Requests per second over a compressed day: lo..hi on a daily cosine (low at 02:00, high at 14:00) and a
    spike of `spike_factor` times the rate from 15:00 for an hour (in compressed time)."""

    day_s: float
    lo: float
    hi: float
    spike_factor: float = 2.5
    spike_from_h: float = 15.0
    spike_hours: float = 1.0

    def hour(self, t: float) -> float:
        return (t % self.day_s) / self.day_s * 24.0

    def in_spike(self, t: float) -> bool:
        h = self.hour(t)
        return self.spike_from_h <= h < self.spike_from_h + self.spike_hours

    def rate(self, t: float) -> float:
        h = self.hour(t)
        base = self.lo + (self.hi - self.lo) * (0.5 - 0.5 * math.cos(2 * math.pi * (h - 2.0) / 24.0))
        return base * (self.spike_factor if self.in_spike(t) else 1.0)

    def arrivals(self, duration_s: float, rng: random.Random) -> list[float]:
        """Poisson arrival times under the rate (thinning; bounded by duration_s x the peak rate)."""
        peak = self.hi * self.spike_factor
        t, out = 0.0, []
        for _ in range(int(duration_s * peak * 3) + 10):
            t += rng.expovariate(peak)
            if t >= duration_s:
                break
            if rng.random() < self.rate(t) / peak:
                out.append(t)
        return out


@dataclass(frozen=True)
class TenantPlan:
    """A tenant of the demo: its tier, limits (`fleetserve admin limits` flags) and share of the traffic."""

    name: str
    tier: str
    share: float
    limits: tuple[str, ...] = ()


TENANTS = (
    TenantPlan("acme", "interactive", 0.5),
    TenantPlan("globex", "standard", 0.35, ("--max-streams", "24")),
    # A small tenant over its rate limit in the busy hours: it is told when to come back (RetryInfo) and does.
    TenantPlan("initech", "batch", 0.15, ("--rps", "1.5")),
)


@dataclass
class Chat:
    """One user's conversation: its history (the tenant's system prompt first), sent whole each turn."""

    tenant: str
    session: str
    messages: list[dict[str, str]]
    turns_left: int
    busy: bool = False


@dataclass
class Request:
    """What one arrival sends: a chat turn or a single prompt (hard: only the large model does it well)."""

    tenant: str
    kind: str  # "chat" | "easy" | "hard"
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    session: str = ""
    max_tokens: int = 48
    chat: Chat | None = None


@dataclass
class Traffic:
    """Draws the requests of the arrivals: 60% chat turns (continuing an idle conversation of the tenant, or
    opening one), 30% easy questions, 10% hard ones (they name reasoning, so the router's rule sends them to
    the large model)."""

    rng: random.Random
    tenants: tuple[TenantPlan, ...] = TENANTS
    chats: dict[str, list[Chat]] = field(default_factory=dict)
    _seq: int = 0

    def system_prompt(self, tenant: str) -> str:
        return f"You are {tenant}'s assistant. House rules: " + words(random.Random(f"sys:{tenant}"), 300)

    def next(self) -> Request:
        tenant = self.rng.choices(self.tenants, weights=[t.share for t in self.tenants])[0].name
        r = self.rng.random()
        if r < 0.6:
            return self._chat_turn(tenant)
        if r < 0.9:
            return Request(tenant, "easy", prompt=f"Quick question: {words(self.rng, 40)}", max_tokens=32)
        return Request(tenant, "hard", prompt=f"Prove step by step that {words(self.rng, 60)}", max_tokens=96)

    def _chat_turn(self, tenant: str) -> Request:
        pool = self.chats.setdefault(tenant, [])
        idle = [c for c in pool if not c.busy and c.turns_left > 0]
        if idle and self.rng.random() < 0.8:
            chat = self.rng.choice(idle)
        else:
            self._seq += 1
            chat = Chat(
                tenant,
                f"{tenant}-conv-{self._seq}",
                [{"role": "system", "content": self.system_prompt(tenant)}],
                self.rng.randint(3, 8),
            )
            pool.append(chat)
        chat.busy = True
        chat.turns_left -= 1
        chat.messages.append({"role": "user", "content": words(self.rng, self.rng.randint(20, 60))})
        return Request(
            tenant, "chat", messages=list(chat.messages), session=chat.session, max_tokens=48, chat=chat
        )

    def done(self, req: Request, reply: str | None) -> None:
        """A request finished: a chat takes the reply into its history (or drops the turn on failure)."""
        chat = req.chat
        if chat is None:
            return
        chat.busy = False
        if reply is None:
            chat.messages.pop()
        else:
            chat.messages.append({"role": "assistant", "content": reply})
        if chat.turns_left <= 0:
            self.chats[chat.tenant].remove(chat)
