"""A retry storm: naive immediate retries vs backoff + jitter + a retry budget against a struggling replica
(loadtest/retry_storm.py, virtual time: the project's RetryPolicy and RetryBudget make the decisions)."""

from __future__ import annotations

from dataclasses import asdict, replace

from loadtest.experiments import Outcome
from loadtest.retry_storm import CAREFUL, NAIVE, StormSettings, simulate, summary


async def run(args, name: str) -> Outcome:
    s = replace(
        StormSettings(),
        struggle_capacity=args.struggle_capacity,
        offered=args.offered,
        duration_s=60.0 if args.quick else 120.0,
    )
    timelines = {c.name: simulate(s, c, args.seed) for c in (NAIVE, CAREFUL)}
    rows = {k: summary(s, tl) for k, tl in timelines.items()}
    n, c = rows[NAIVE.name], rows[CAREFUL.name]

    def rec(r):
        return "never (within the run)" if r is None else f"{r:g} s"

    record = {
        "settings": asdict(s),
        "clients": {
            NAIVE.name: {"max_attempts": NAIVE.max_attempts, "delay": "none"},
            CAREFUL.name: {
                "max_attempts": CAREFUL.max_attempts,
                "delay": "full jitter, base 0.1 s, cap 5 s",
                "budget": "RetryBudget(max_tokens=50, token_ratio=0.1)",
            },
        },
        "results": rows,
        "series": {
            k: {"attempts": tl.attempts, "goodput": tl.goodput, "offered": tl.offered, "queue": tl.queue}
            for k, tl in timelines.items()
        },
        "verdict": (
            f"naive retries: {n['amplification']}x attempts per request ({n['amplification_during_struggle']}x while "
            f"it struggled, peak {n['peak_attempts_per_s']}/s), recovery {rec(n['recovery_s'])}; backoff + jitter + "
            f"budget: {c['amplification']}x, recovery {rec(c['recovery_s'])} after the replica was healthy again"
        ),
    }

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for ax, (label, tl) in zip(axes, timelines.items(), strict=True):
            ax.plot(tl.attempts, label="attempts/s at the replica")
            ax.plot(tl.goodput, label="served in time/s")
            ax.plot(tl.offered, label="new requests/s", lw=0.8)
            ax.axvspan(s.struggle_from_s, s.struggle_to_s, color="red", alpha=0.1, label="struggling")
            ax.set_title(label)
            ax.set_xlabel("s")
            ax.set_yscale("symlog", linthresh=100)
        axes[0].set_ylabel("per second")
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Outcome(record, {"timeline": plot})
