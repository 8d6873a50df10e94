"""What one replica does at a given arrival rate, measured on the sim's own scheduler and cost model on a virtual
clock (services/engine/calibration.VirtualEngine, open loop with Poisson arrivals): the share of requests within
the SLO, TTFT p99, mean end-to-end time and requests in flight. The autoscaling bench's fleet model looks these up
per replica per second instead of stepping every replica's scheduler (a day of a 12-replica fleet is ~10^8
engine steps; the table is ~10^5)."""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import asdict, dataclass

from services.engine.calibration import VirtualEngine
from services.engine.profile import load_profile
from services.engine.sim_request import SimRequest
from services.engine.sim_tokens import OUTPUT_IDS


@dataclass(frozen=True)
class Slo:
    """A request meets the SLO when its TTFT and its TPOT are both within these."""

    ttft_ms: float = 500.0
    tpot_ms: float = 50.0


@dataclass(frozen=True)
class Workload:
    """Requests of the bench: random-token prompts (no prefix hits), fixed output length."""

    prompt_tokens: int = 256
    output_tokens: int = 128


@dataclass(frozen=True)
class Point:
    """One replica at one arrival rate (requests/s), in steady state."""

    rate: float
    throughput: float
    attainment: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p99_ms: float
    mean_e2e_s: float
    mean_in_flight: float


def open_loop(
    profile: str, rate: float, workload: Workload, slo: Slo, *, duration_s: float, seed: int = 0
) -> Point:
    """Poisson arrivals at `rate` into one virtual engine for duration_s (the first fifth is warm-up, not
    counted); what the requests that arrived after warm-up saw."""
    prof = load_profile(profile)
    eng = VirtualEngine(prof.cost, num_kv_blocks=prof.num_kv_blocks)
    rng = random.Random(seed)
    warm = duration_s * 200.0  # ms: a fifth of the run
    end = duration_s * 1000.0
    last = end * 0.8  # requests arriving in [warm, last) are measured; later ones only keep the load on
    t = 0.0
    arrivals: list[float] = []
    while t < end:
        t += rng.expovariate(rate) * 1000.0
        arrivals.append(t)
    done: dict[str, float] = {}
    i = 0
    # Bounded: the engine steps at least every few ms of virtual time, and the run ends at `end`.
    for _ in range(50_000_000):
        while i < len(arrivals) and arrivals[i] <= eng.now:
            ids = [rng.choice(OUTPUT_IDS) for _ in range(workload.prompt_tokens)]
            rid = f"r{i}"
            eng.submit(
                SimRequest(
                    rid,
                    prompt_ids=ids,
                    resumed_ids=[],
                    digest=i,
                    max_tokens=workload.output_tokens,
                    arrival=i,
                )
            )
            # submit() stamps the engine's clock; the request really arrived at arrivals[i].
            eng.submitted_at[rid] = arrivals[i]
            i += 1
        if eng.now >= end:
            break
        if not eng.sched.has_work() and not eng._arrivals:
            if i >= len(arrivals):
                break
            eng.now = arrivals[i]
            continue
        for req in eng.step():
            done[req.request_id] = eng.now
    window = [rid for rid, at in eng.submitted_at.items() if warm <= at < last]
    counted = [rid for rid in window if rid in done]
    ttft, tpot, e2e = [], [], []
    ok = 0
    for rid in counted:
        first = eng.first_token_at[rid] - eng.submitted_at[rid]
        per = (done[rid] - eng.first_token_at[rid]) / max(1, workload.output_tokens - 1)
        ttft.append(first)
        tpot.append(per)
        e2e.append(done[rid] - eng.submitted_at[rid])
        ok += first <= slo.ttft_ms and per <= slo.tpot_ms
    # Requests of the window that had not finished when the run ended (overload) count as misses.
    total = len(window)
    span_s = (last - warm) / 1000.0
    ttft.sort()
    tpot.sort()

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else math.inf

    mean_e2e = sum(e2e) / len(e2e) / 1000.0 if e2e else math.inf
    return Point(
        rate=rate,
        throughput=len(counted) / span_s,
        attainment=ok / total if total else 1.0,
        ttft_p50_ms=pct(ttft, 0.5),
        ttft_p99_ms=pct(ttft, 0.99),
        tpot_p99_ms=pct(tpot, 0.99),
        mean_e2e_s=mean_e2e,
        mean_in_flight=rate * mean_e2e if math.isfinite(mean_e2e) else math.inf,
    )


@dataclass
class ReplicaModel:
    """A replica's measured response curve (points by rate), its capacity within the SLO and at saturation."""

    profile: str
    workload: Workload
    slo: Slo
    points: list[Point]
    #: Highest measured rate whose attainment is >= target (requests/s one replica serves within the SLO).
    rps_at_slo: float
    #: Highest throughput measured (requests/s at saturation).
    rps_max: float
    target: float

    def at(self, rate: float) -> Point:
        """The point for `rate` (linear interpolation between measured rates; past the last, the last)."""
        rates = [p.rate for p in self.points]
        if rate <= rates[0]:
            p = self.points[0]
            return Point(
                rate,
                rate,
                p.attainment,
                p.ttft_p50_ms,
                p.ttft_p99_ms,
                p.tpot_p99_ms,
                p.mean_e2e_s,
                rate * p.mean_e2e_s,
            )
        j = bisect.bisect_left(rates, rate)
        if j >= len(rates):
            return self.points[-1]
        a, b = self.points[j - 1], self.points[j]
        w = (rate - a.rate) / (b.rate - a.rate)

        def mix(x, y):
            return x + (y - x) * w

        return Point(
            rate,
            mix(a.throughput, b.throughput),
            mix(a.attainment, b.attainment),
            mix(a.ttft_p50_ms, b.ttft_p50_ms),
            mix(a.ttft_p99_ms, b.ttft_p99_ms),
            mix(a.tpot_p99_ms, b.tpot_p99_ms),
            mix(a.mean_e2e_s, b.mean_e2e_s),
            mix(a.mean_in_flight, b.mean_in_flight),
        )

    def as_dict(self) -> dict:
        return {
            "profile": self.profile,
            "workload": asdict(self.workload),
            "slo": asdict(self.slo),
            "attainment_target": self.target,
            "rps_at_slo": round(self.rps_at_slo, 3),
            "rps_max": round(self.rps_max, 3),
            "points": [{k: round(v, 4) for k, v in asdict(p).items()} for p in self.points],
        }


def measure(
    profile: str = "h100-llama-1b",
    workload: Workload = Workload(),
    slo: Slo = Slo(),
    *,
    target: float = 0.999,
    duration_s: float = 30.0,
    steps: int = 14,
    progress=None,
) -> ReplicaModel:
    """Measure the curve: find the saturation rate by doubling, then sample `steps` rates up to just past it."""
    probe = 4.0
    points: dict[float, Point] = {}
    for _ in range(12):  # bounded doubling
        p = open_loop(profile, probe, workload, slo, duration_s=duration_s / 2)
        points[probe] = p
        if progress:
            progress(f"probe {probe:.0f} req/s: attainment {p.attainment:.4f}")
        if p.attainment < 0.5:  # saturated: requests queue without bound
            break
        probe *= 2
    hi = probe
    rates = sorted({round(hi * k / steps, 3) for k in range(1, steps + 1)})
    measured = []
    for r in rates:
        p = open_loop(profile, r, workload, slo, duration_s=duration_s, seed=int(r * 1000))
        measured.append(p)
        if progress:
            progress(f"{r:.1f} req/s: attainment {p.attainment:.4f}, TTFT p99 {p.ttft_p99_ms:.0f} ms")
    # Attainment must not rise with load in the table (noise can make it): take the running minimum.
    fixed, low = [], 1.0
    for p in measured:
        low = min(low, p.attainment)
        fixed.append(Point(**{**asdict(p), "attainment": low}))
    ok = [p.rate for p in fixed if p.attainment >= target]
    return ReplicaModel(
        profile=profile,
        workload=workload,
        slo=slo,
        points=fixed,
        rps_at_slo=max(ok) if ok else fixed[0].rate,
        rps_max=max(p.throughput for p in fixed),
        target=target,
    )
