"""Mean vs p99 on a latency stream: open-loop traffic with bursts through the whole mesh, every request's TTFT
kept with its time, then per-second mean, p50 and p99 drawn over each other: the mean stays calm while the tail
(what a user in a burst waits) jumps."""

from __future__ import annotations

import asyncio
import random
import time

import numpy as np

from fleetserve.client import NO_RETRY, AsyncClient, FleetServeError
from loadtest.experiments import Outcome, progress
from loadtest.fleet import SpawnedFleet
from loadtest.scenarios import words


def arrivals(
    duration_s: float, rate: float, burst_factor: float, every_s: float, rng: random.Random
) -> list[float]:
    """Poisson arrival times at `rate`, times burst_factor during the first second of every every_s."""
    t, out = 0.0, []
    while t < duration_s:
        r = rate * (burst_factor if (t % every_s) < 1.0 else 1.0)
        t += rng.expovariate(r)
        out.append(t)
    return [a for a in out if a < duration_s]


def windows(samples: list[tuple[float, float]], width_s: float = 1.0) -> list[dict]:
    """Per window of request start times: count, mean, p50, p99 of the TTFTs (ms) started in it."""
    if not samples:
        return []
    end = max(t for t, _ in samples)
    out = []
    for i in range(int(end / width_s) + 1):
        vals = [v for t, v in samples if i * width_s <= t < (i + 1) * width_s]
        if vals:
            a = np.asarray(vals)
            out.append(
                {
                    "t_s": round(i * width_s, 3),
                    "n": len(vals),
                    "ttft_ms": {
                        "mean": round(float(a.mean()), 2),
                        "p50": round(float(np.percentile(a, 50)), 2),
                        "p99": round(float(np.percentile(a, 99)), 2),
                    },
                }
            )
    return out


async def run(args, name: str) -> Outcome:
    duration = 6.0 if args.quick else args.duration_s
    rng = random.Random(args.seed)
    times = arrivals(duration, args.rate, args.burst_factor, args.burst_every_s, rng)
    samples: list[tuple[float, float]] = []
    failures = 0
    async with SpawnedFleet(args.engines, 1.0) as state:
        async with AsyncClient(state["gateway"], state["api_key"], model="sim-1b", retry=NO_RETRY) as client:
            await client.complete("warm up", max_tokens=2)
            progress(f"{name}: {len(times)} requests over {duration:g} s")
            start = time.perf_counter()

            async def one(at: float, prompt: str, max_tokens: int) -> None:
                nonlocal failures
                await asyncio.sleep(max(0.0, at - (time.perf_counter() - start)))
                sent = time.perf_counter() - start
                try:
                    done = await client.complete(prompt, max_tokens=max_tokens, ignore_eos=True)
                    samples.append((sent, done.ttft_s * 1000.0))
                except FleetServeError:
                    failures += 1

            jobs = [
                one(at, words(rng, rng.choice((60, 120, 250, 1200))), rng.choice((32, 64, 128)))
                for at in times
            ]
            await asyncio.gather(*jobs)
    samples.sort()
    series = windows(samples)
    all_ms = np.asarray([v for _, v in samples])
    mean, p50, p99 = float(all_ms.mean()), float(np.percentile(all_ms, 50)), float(np.percentile(all_ms, 99))
    worst = max(series, key=lambda w: w["ttft_ms"]["p99"])
    record = {
        "kind": "latency_timeline",
        "title": "TTFT per second: mean vs p99",
        "settings": {
            "duration_s": duration,
            "rate": args.rate,
            "burst_factor": args.burst_factor,
            "burst_every_s": args.burst_every_s,
            "engines": args.engines,
            "speed_factor": 1.0,
        },
        "requests": len(samples),
        "failures": failures,
        "overall_ttft_ms": {"mean": round(mean, 2), "p50": round(p50, 2), "p99": round(p99, 2)},
        "p99_over_mean": round(p99 / mean, 2),
        "worst_second": worst,
        "share_slower_than_2x_mean": round(float((all_ms > 2 * mean).mean()), 4),
        "series": series,
        "verdict": (
            f"mean TTFT {mean:.1f} ms, p99 {p99:.1f} ms ({p99 / mean:.1f}x the mean); in the worst second the p99 "
            f"was {worst['ttft_ms']['p99']} ms while that second's mean was {worst['ttft_ms']['mean']} ms"
        ),
    }

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 3.8))
        ax.scatter(
            [t for t, _ in samples], [v for _, v in samples], s=4, alpha=0.3, color="grey", label="requests"
        )
        ts = [w["t_s"] + 0.5 for w in series]
        ax.plot(ts, [w["ttft_ms"]["mean"] for w in series], label="mean per second", lw=2)
        ax.plot(ts, [w["ttft_ms"]["p99"] for w in series], label="p99 per second", lw=2)
        ax.axhline(mean, ls="--", lw=1, color="C0", label=f"overall mean {mean:.0f} ms")
        ax.axhline(p99, ls="--", lw=1, color="C1", label=f"overall p99 {p99:.0f} ms")
        for b in np.arange(0, duration, args.burst_every_s):
            ax.axvspan(b, b + 1, color="red", alpha=0.08)
        ax.set_xlabel("request start (s); bursts shaded")
        ax.set_ylabel("TTFT (ms)")
        ax.set_yscale("log")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Outcome(record, {"timeline": plot})
