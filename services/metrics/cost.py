"""Cost attribution: each replica's time x its type's price per GPU-hour, split over the requests it finished in
the window by their GPU-time weight (prompt and output tokens weighted by the type's cost model), and summed by
tenant, model, version, request type (feature), length class, tier and replica type. Also what model routing
saved against sending an alias's every request to its large model."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as mpb

from services.engine.profile import load_profile
from services.metrics.gauges import ReplicaClock
from services.metrics.records import RequestRecord
from services.metrics.sketches import TieredBuckets

log = structlog.get_logger(__name__)

MS_PER_HOUR = 3_600_000.0
# Request lengths by class, in tokens: (upper bound, name).
PROMPT_CLASSES = ((256, "short"), (2048, "medium"), (math.inf, "long"))
OUTPUT_CLASSES = ((64, "short"), (512, "medium"), (math.inf, "long"))
# Cost lines are kept per 10 s for 10 minutes, then per 5 minutes for a day. A window takes every bucket it
# overlaps: its replica time is exact, and the requests of its edge buckets share it.
DEFAULT_TIERS = ((10.0, 600.0), (300.0, 86_400.0))
# Client-chosen feature tags per bucket beyond this many are counted under "(other)".
MAX_FEATURES = 256
NO_FEATURE = "(none)"
OTHER = "(other)"


def length_class(tokens: int, classes) -> str:
    return next(name for bound, name in classes if tokens < bound)


@dataclass(frozen=True)
class Price:
    """A replica type's price and the GPU milliseconds its cost model charges per token."""

    gpu_hour_usd: float
    prompt_ms: float = 1.0
    cached_ms: float = 0.0
    output_ms: float = 1.0

    def weight_ms(self, prompt: int, cached: int, output: int) -> float:
        """GPU milliseconds of a request (or a sum of requests) with these token counts."""
        cached = min(cached, prompt)
        return (prompt - cached) * self.prompt_ms + cached * self.cached_ms + output * self.output_ms

    @property
    def usd_per_gpu_ms(self) -> float:
        return self.gpu_hour_usd / MS_PER_HOUR


class PriceBook:
    """Prices by replica type (a GPU profile name): the profile's [pricing] and cost model, with per-type
    price overrides from the metrics service's config. An unknown type is priced by its override alone, every
    token weighing the same."""

    def __init__(self, overrides: dict[str, float] | None = None) -> None:
        self.overrides = dict(overrides or {})
        self._cache: dict[str, Price] = {}

    def price(self, replica_type: str) -> Price:
        p = self._cache.get(replica_type)
        if p is None:
            p = self._cache[replica_type] = self._load(replica_type)
        return p

    def _load(self, replica_type: str) -> Price:
        override = self.overrides.get(replica_type)
        try:
            profile = load_profile(replica_type) if replica_type else None
        except ValueError as e:
            log.warning("metrics.unknown_replica_type", replica_type=replica_type, error=str(e))
            profile = None
        if profile is None:
            return Price(override or 0.0)
        prompt, cached, output = profile.token_weights_ms()
        return Price(profile.gpu_hour_usd if override is None else override, prompt, cached, output)


def parse_prices(text: str) -> dict[str, float]:
    """ "h100-llama-1b=2.5,l4-llama-1b=0.7" -> {type: USD per GPU-hour}; ValueError naming a bad entry."""
    out: dict[str, float] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, eq, value = item.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = -1.0
        if not eq or not name.strip() or not price >= 0:
            raise ValueError(f"GPU price must be 'replica_type=usd_per_hour' (>= 0), got {item!r}")
        out[name.strip()] = price
    return out


# What one cost line is kept by: replica, tenant, model, version, feature, tier, prompt class, output class, and
# the alias the request asked for when model routing picked its model ("" otherwise).
LineKey = tuple[str, str, str, str, str, str, str, str, str]
R, TENANT, MODEL, VERSION, FEATURE, TIER, PCLASS, OCLASS, ALIAS = range(9)


@dataclass
class Tokens:
    """Requests and tokens of one line."""

    requests: int = 0
    prompt: int = 0
    cached: int = 0
    output: int = 0

    def add(self, other: Tokens) -> None:
        self.requests += other.requests
        self.prompt += other.prompt
        self.cached += other.cached
        self.output += other.output


@dataclass
class CostBucket:
    """The cost lines of the requests that ended in one time bucket."""

    lines: dict[LineKey, Tokens] = field(default_factory=dict)
    features: set[str] = field(default_factory=set)

    def add(self, key: LineKey, r: RequestRecord) -> None:
        t = self.lines.get(key)
        if t is None:
            t = self.lines[key] = Tokens()
        t.requests += 1
        t.prompt += r.prompt_tokens
        t.cached += r.cached_tokens
        t.output += r.output_tokens

    def merge(self, other: CostBucket) -> None:
        for key, t in other.lines.items():
            mine = self.lines.get(key)
            if mine is None:
                self.lines[key] = mine = Tokens()
            mine.add(t)
        self.features |= other.features


DIMENSIONS = {
    mpb.COST_DIMENSION_TENANT: TENANT,
    mpb.COST_DIMENSION_MODEL: MODEL,
    mpb.COST_DIMENSION_VERSION: VERSION,
    mpb.COST_DIMENSION_FEATURE: FEATURE,
    mpb.COST_DIMENSION_PROMPT_CLASS: PCLASS,
    mpb.COST_DIMENSION_OUTPUT_CLASS: OCLASS,
    mpb.COST_DIMENSION_TIER: TIER,
}


@dataclass
class Priced:
    """A line with its cost."""

    key: LineKey
    tokens: Tokens
    cost_usd: float
    replica_type: str


class CostLedger:
    """Cost lines in time buckets, priced when asked: a window's replica time is known only then."""

    def __init__(
        self,
        prices: PriceBook,
        replicas: ReplicaClock,
        aliases: dict[str, tuple[str, str]] | None = None,
        clock: Callable[[], float] = time.time,
        tiers=DEFAULT_TIERS,
    ) -> None:
        self.prices = prices
        self.replicas = replicas
        # alias -> (small model, large model), as the router resolves it.
        self.aliases = dict(aliases or {})
        self._clock = clock
        self._buckets: TieredBuckets[CostBucket] = TieredBuckets(CostBucket, tiers)

    @property
    def retention_s(self) -> float:
        return self._buckets.retention_s

    def add(self, r: RequestRecord) -> None:
        now = self._clock()
        bucket = self._buckets.bucket(min(r.end_unix_s, now), now)
        if bucket is None:
            return
        feature = r.feature or NO_FEATURE
        if feature not in bucket.features:
            if len(bucket.features) >= MAX_FEATURES:
                feature = OTHER
            bucket.features.add(feature)
        key = (
            r.replica_id,
            r.tenant,
            r.model,
            f"{r.model}@{r.version}" if r.version else r.model,
            feature,
            r.tier,
            length_class(r.prompt_tokens, PROMPT_CLASSES),
            length_class(r.output_tokens, OUTPUT_CLASSES),
            r.requested_model if r.routed_by_alias else "",
        )
        bucket.add(key, r)

    def request_usd(self, r: RequestRecord) -> float:
        """One request's GPU time at its replica type's price, as if the replica were fully busy: a per-request
        figure that needs no window (A/B samples); the window's attributed cost also carries idle time."""
        replica = self.replicas.replicas.get(r.replica_id)
        if replica is None:
            return 0.0
        p = self.prices.price(replica.replica_type)
        return p.weight_ms(r.prompt_tokens, r.cached_tokens, r.output_tokens) * p.usd_per_gpu_ms

    def report(
        self, start: float, end: float, group_by: Iterable[int] = (), now: float | None = None
    ) -> mpb.GetCostResponse:
        """The cost of [start, end], broken down by the dimensions asked for (every one when none)."""
        now = self._clock() if now is None else now
        lines = CostBucket()
        for _, _, b in self._buckets.select(start, end, now, overlap=True):
            lines.merge(b)
        resp = mpb.GetCostResponse(start_unix=start, end_unix=end)
        priced = self._price(lines.lines, start, end, resp)
        dims = list(group_by) or [*DIMENSIONS, mpb.COST_DIMENSION_REPLICA_TYPE]
        attributed = resp.attributed_usd
        for dim in dims:
            resp.breakdowns.append(_breakdown(dim, priced, attributed))
        drivers = [(bd.lines[0], bd.dimension) for bd in resp.breakdowns if len(bd.lines) > 1]
        if drivers:
            line, dim = max(drivers, key=lambda x: x[0].cost_usd)
            resp.biggest_driver.CopyFrom(line)
            resp.biggest_driver_dimension = dim
        resp.routing_savings.extend(self._savings(priced))
        return resp

    def _price(self, lines: dict[LineKey, Tokens], start: float, end: float, resp) -> list[Priced]:
        """Each line's share of its replica's cost, filling the totals and replica rows of resp."""
        by_replica: dict[str, list[tuple[LineKey, Tokens]]] = {}
        for key, t in lines.items():
            by_replica.setdefault(key[R], []).append((key, t))
            resp.requests += t.requests
            resp.tokens += t.prompt + t.output
        priced: list[Priced] = []
        for rid, replica in sorted(self.replicas.replicas.items()):
            seconds = replica.seconds_in(start, end)
            if seconds <= 0:
                continue
            price = self.prices.price(replica.replica_type)
            cost = seconds / 3600.0 * price.gpu_hour_usd
            mine = by_replica.pop(rid, [])
            resp.replicas.add(
                replica_id=rid,
                replica_type=replica.replica_type,
                model=replica.model,
                gpu_hours=seconds / 3600.0,
                price_per_gpu_hour=price.gpu_hour_usd,
                cost_usd=cost,
                requests=sum(t.requests for _, t in mine),
            )
            resp.total_usd += cost
            resp.gpu_hours += seconds / 3600.0
            if not mine:
                resp.idle_usd += cost
                continue
            weights = [price.weight_ms(t.prompt, t.cached, t.output) for _, t in mine]
            total = sum(weights)
            if total <= 0:  # requests that used no tokens (failed before prefill) share it evenly
                weights = [float(t.requests) for _, t in mine]
                total = sum(weights)
            for (key, t), w in zip(mine, weights, strict=True):
                priced.append(Priced(key, t, cost * w / total, replica.replica_type))
            resp.attributed_usd += cost
        # Requests on replicas the clock never saw (no replica, or its gauge not in yet) cost nothing here.
        for rest in by_replica.values():
            priced += [Priced(key, t, 0.0, "") for key, t in rest]
        if resp.tokens:
            resp.cost_per_1k_tokens = resp.attributed_usd / resp.tokens * 1000
        if resp.requests:
            resp.cost_per_request = resp.attributed_usd / resp.requests
        return priced

    def _savings(self, priced: list[Priced]) -> list[mpb.RoutingSavings]:
        out = []
        aliases = sorted({p.key[ALIAS] for p in priced if p.key[ALIAS]})
        for alias in aliases:
            small, large = self.aliases.get(alias, ("", ""))
            mine = [p for p in priced if p.key[ALIAS] == alias]
            if not large:
                served = {p.key[MODEL] for p in mine}
                if len(served) < 2:
                    continue  # with one model seen and no config, which one is "large" is unknown
                # The model whose output tokens cost most is the large one.
                ranked = sorted(served, key=lambda m: self._model_price(m, priced).output_ms)
                small, large = ranked[0], ranked[-1]
            out.append(self._alias_savings(alias, small, large, mine, priced))
        return out

    def _model_price(self, model: str, priced: list[Priced]) -> Price:
        types = [p.replica_type for p in priced if p.key[MODEL] == model and p.replica_type]
        types += [r.replica_type for r in self.replicas.replicas.values() if r.model == model]
        return self.prices.price(types[0]) if types else Price(0.0)

    def _alias_savings(
        self, alias: str, small: str, large: str, mine: list[Priced], priced: list[Priced]
    ) -> mpb.RoutingSavings:
        large_price = self._model_price(large, priced)
        large_lines = [p for p in priced if p.key[MODEL] == large and p.cost_usd > 0]
        large_weight = sum(
            large_price.weight_ms(p.tokens.prompt, p.tokens.cached, p.tokens.output) for p in large_lines
        )
        if large_weight > 0:
            # What the large pool actually cost per GPU-ms of work in this window (its idle time included).
            usd_per_ms, basis = sum(p.cost_usd for p in large_lines) / large_weight, "observed"
        else:
            usd_per_ms, basis = large_price.usd_per_gpu_ms, "profile"
        actual = sum(p.cost_usd for p in mine)
        all_large = list_saved = 0.0
        for p in mine:
            if p.key[MODEL] == large:
                all_large += p.cost_usd
                continue
            t = p.tokens
            on_large = large_price.weight_ms(t.prompt, t.cached, t.output)
            all_large += on_large * usd_per_ms
            own = self.prices.price(p.replica_type) if p.replica_type else Price(0.0)
            list_saved += (
                on_large * large_price.usd_per_gpu_ms
                - own.weight_ms(t.prompt, t.cached, t.output) * own.usd_per_gpu_ms
            )
        return mpb.RoutingSavings(
            alias=alias,
            small_model=small,
            large_model=large,
            small_requests=sum(p.tokens.requests for p in mine if p.key[MODEL] != large),
            large_requests=sum(p.tokens.requests for p in mine if p.key[MODEL] == large),
            actual_usd=actual,
            all_large_usd=all_large,
            saved_usd=all_large - actual,
            basis=basis,
            saved_at_full_use_usd=list_saved,
        )


def _breakdown(dim: int, priced: list[Priced], attributed: float) -> mpb.CostBreakdown:
    groups: dict[str, tuple[Tokens, list[float]]] = {}
    for p in priced:
        key = p.replica_type if dim == mpb.COST_DIMENSION_REPLICA_TYPE else p.key[DIMENSIONS[dim]]
        key = key or "(unknown)"
        t, cost = groups.setdefault(key, (Tokens(), [0.0]))
        t.add(p.tokens)
        cost[0] += p.cost_usd
    lines = []
    for key, (t, (cost,)) in groups.items():
        tokens = t.prompt + t.output
        lines.append(
            mpb.CostLine(
                key=key,
                cost_usd=cost,
                requests=t.requests,
                prompt_tokens=t.prompt,
                output_tokens=t.output,
                cost_per_1k_tokens=cost / tokens * 1000 if tokens else 0.0,
                cost_per_request=cost / t.requests if t.requests else 0.0,
                share=cost / attributed if attributed else 0.0,
            )
        )
    lines.sort(key=lambda line: (-line.cost_usd, line.key))
    return mpb.CostBreakdown(dimension=dim, lines=lines)
