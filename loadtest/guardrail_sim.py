"""Monte Carlo of a rate guardrail (error_rate<=LIMIT@N) judged continuously over a rollout step, the old rule (the
point estimate at every look from N samples on) against the sequential one (services/registry/rollouts/
sequential.py): how often a step advances or rolls back a version of a given true error rate, and after how many
requests. `python -m loadtest.guardrail_sim` prints the table in docs/rollouts.md.

The controller looks several times a second, i.e. about once per request at the candidate's rates in tests; this
simulation looks after every request (the most looks the old rule can suffer; the sequential rule is valid at any
number)."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np

from services.registry.rollouts import sequential


@dataclass(frozen=True, slots=True)
class Outcome:
    """Shares of steps that advanced / rolled back / were still undecided, and the median samples to a decision
    (of those decided)."""

    advanced: float
    rolled_back: float
    undecided: float
    median_samples: float


def thresholds(limit: float, min_samples: int, horizon: int, confidence: float, old: bool):
    """Per n in 0..horizon: the fewest errors that breach and the most that pass (no look before min_samples)."""
    n = np.arange(horizon + 1)
    if old:
        top = np.floor(limit * n + 1e-9)
        breach, ok = top + 1, top
    else:
        # The sequential verdicts are monotone in s at each n: find both edges from the verdict of every (n, s).
        breach = np.full(horizon + 1, np.inf)
        ok = np.full(horizon + 1, -1.0)
        for k in range(1, horizon + 1):
            v = sequential.verdicts(k, np.arange(k + 1), limit, confidence)
            if (v == 1).any():
                breach[k] = np.argmax(v == 1)
            if (v == -1).any():
                ok[k] = np.flatnonzero(v == -1).max()
    breach[:min_samples] = np.inf
    ok[:min_samples] = -1.0
    return breach, ok


def simulate(
    rate: float,
    limit: float,
    min_samples: int,
    bake: int,
    hold: int,
    draws: int,
    seed: int,
    old: bool,
    confidence: float = sequential.DEFAULT_CONFIDENCE,
    edges=None,
) -> Outcome:
    """Steps of a version with this true rate: a breach at any look rolls back; from `bake` samples on (the bake's
    end) the first look that passes advances (the old rule: the look at `bake` passes or it already rolled back);
    the new rule holds up to `hold` samples, then the step is undecided."""
    horizon = bake if old else hold
    breach, ok = edges if edges is not None else thresholds(limit, min_samples, horizon, confidence, old)
    breach, ok = breach[1 : horizon + 1], ok[1 : horizon + 1]
    rng = np.random.default_rng(seed)
    adv = rb = 0
    decided_at: list[np.ndarray] = []
    chunk = max(1, 4_000_000 // horizon)
    for start in range(0, draws, chunk):
        m = min(chunk, draws - start)
        errors = np.cumsum(rng.random((m, horizon)) < rate, axis=1, dtype=np.int32)
        hit = errors >= breach
        first_rb = np.where(hit.any(1), hit.argmax(1), horizon)
        passing = errors <= ok
        passing[:, : bake - 1] = False  # no advance before the bake ends
        first_adv = np.where(passing.any(1), passing.argmax(1), horizon)
        if old:
            first_adv = np.where(first_rb < horizon, horizon, bake - 1)
        rolled = first_rb < first_adv
        advanced = ~rolled & (first_adv < horizon)
        rb += int(rolled.sum())
        adv += int(advanced.sum())
        decided_at.append(np.where(rolled, first_rb, first_adv)[rolled | advanced] + 1)
    at = np.concatenate(decided_at)
    return Outcome(adv / draws, rb / draws, 1 - (adv + rb) / draws, float(np.median(at)) if at.size else 0.0)


def table(draws: int, seed: int, limit: float = 0.02, min_samples: int = 30, hold_factor: int = 4) -> str:
    """The markdown table of docs/rollouts.md."""
    rows = [
        "| error rate | step (requests) | old: advances | old: rolls back | new, at the bake's end: advances / "
        f"rolls back / holds | new, held to {hold_factor}x: advances / rolls back / undecided "
        "| new: median requests to a decision (decided steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for rate in (0.05, 0.01):
        for bake in (40, 80, 200, 500, 1000):
            old = simulate(rate, limit, min_samples, bake, bake, draws, seed, old=True)
            edges = thresholds(limit, min_samples, hold_factor * bake, sequential.DEFAULT_CONFIDENCE, False)
            at_bake = simulate(rate, limit, min_samples, bake, bake, draws, seed, old=False, edges=edges)
            held = simulate(
                rate, limit, min_samples, bake, hold_factor * bake, draws, seed, old=False, edges=edges
            )
            rows.append(
                f"| {rate:.0%} | {bake} | {old.advanced:.4f} | {old.rolled_back:.4f} | "
                f"{at_bake.advanced:.4f} / {at_bake.rolled_back:.4f} / {at_bake.undecided:.4f} | "
                f"{held.advanced:.4f} / {held.rolled_back:.4f} / {held.undecided:.4f} | {held.median_samples:.0f} |"
            )
    return "\n".join(rows)


def samples_to_decide(
    draws: int, seed: int, limit: float = 0.02, min_samples: int = 30, horizon: int = 8000
) -> str:
    """How many requests the sequential rule takes to decide, with no bake (the cost of being sure)."""
    edges = thresholds(limit, min_samples, horizon, sequential.DEFAULT_CONFIDENCE, False)
    lines = []
    for rate in (0.0, 0.005, 0.01, 0.015, 0.03, 0.05, 0.15):
        o = simulate(rate, limit, min_samples, 1, horizon, draws, seed, old=False, edges=edges)
        lines.append(
            f"| {rate:.1%} | {o.advanced:.4f} | {o.rolled_back:.4f} | {o.undecided:.4f} | {o.median_samples:.0f} |"
        )
    head = (
        f"| error rate | advances within {horizon} | rolls back within {horizon} | undecided | median requests |\n"
        "|---|---|---|---|---|"
    )
    return head + "\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--draws", type=int, default=20_000)
    p.add_argument("--seed", type=int, default=20261204)
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    print(table(args.draws, args.seed))
    print()
    print(samples_to_decide(args.draws // 4, args.seed))
    print(f"\n({args.draws} draws a cell, seed {args.seed}, {time.perf_counter() - t0:.1f} s)")


if __name__ == "__main__":
    main()
