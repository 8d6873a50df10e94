"""Reactive vs predictive autoscaling with a cold start, in virtual time on the autoscale engineer's simulator
(loadtest/autoscale_sim.py: per-replica timings measured on the sim's scheduler, each new replica paying the cold
start before it serves): a daily spike arrives; the reactive policy sees it only once it is there and its new
replicas come up a cold start later, the predictive one learned the day before and has them ready. Scored over
the spike window of the second day against an oracle that knows the future."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from loadtest.autoscale_bench import Result, load_model, plot, policy_specs, score, trace, windows
from loadtest.autoscale_sim import autoscaler, needed, oracle_plan, simulate
from loadtest.experiments import Outcome, progress
from services.autoscaler.decider import Decider
from services.autoscaler.spec import parse_model

# One replica's measured curve (req/s within the SLO at each load), from the autoscaling benchmark's run.
REPLICA_MODEL = Path(__file__).resolve().parents[2] / "docs" / "benchmarks" / "autoscaling.json"
POLICIES = ("reactive", "predictive", "predictive+reactive")


async def run(args, name: str) -> Outcome:
    model = load_model(str(REPLICA_MODEL))
    days = 1 if args.quick else 2
    rates = trace(args.trace, model.rps_at_slo, days, args.seed)
    if args.quick:
        rates = rates[13 * 3600 : 15 * 3600]  # two hours around the spike: a smoke test of the wiring only
    arrivals = np.random.default_rng(args.seed + 1).poisson(rates.clip(min=0.0))
    need = needed(rates, model.rps_at_slo)
    peak = int(need.max())
    common = dict(cold_start_s=args.cold_start_s, initial=int(need[0]), deadline_s=60.0, arrivals=arrivals)
    results: dict[str, Result] = {}
    t0 = time.perf_counter()
    plan = oracle_plan(need, args.cold_start_s)
    results["oracle"] = Result(
        "oracle",
        simulate(
            rates,
            model,
            lambda t, s: int(plan[t]),
            decision_interval_s=1,
            cancel_booting_first=False,
            **common,
        ),
        time.perf_counter() - t0,
    )
    tokens_at_slo = model.rps_at_slo * model.workload.output_tokens
    specs = policy_specs(model.rps_at_slo, args.cold_start_s, args.trace, peak)
    for label in POLICIES:
        raw = specs[label]
        for opts in raw["policies"].values():
            if opts.get("target_output_tokens_per_s") == "__TOKENS__":
                opts["target_output_tokens_per_s"] = round(tokens_at_slo * 0.85, 1)
        decide, observe = autoscaler(Decider(parse_model(f"{args.trace}-{label}", raw), initial=int(need[0])))
        t0 = time.perf_counter()
        results[label] = Result(
            label, simulate(rates, model, decide, observe=observe, **common), time.perf_counter() - t0
        )
        progress(f"{name}: {label} simulated in {results[label].seconds:.1f} s")
    spans = windows(args.trace, len(rates)) if not args.quick else {"spike_window": (0, len(rates))}
    wname = "spike_window" if "spike_window" in spans else "last_day"
    lo, hi = spans[wname]
    rows = {label: score(r.timeline, lo, hi, 600.0) for label, r in results.items()}
    base = rows["oracle"]["replica_hours"]
    for row in rows.values():
        row["vs_oracle_replica_hours"] = round(row["replica_hours"] / base, 3) if base else None
    r, p = rows["reactive"], rows["predictive"]
    record = {
        "settings": {
            "trace": args.trace,
            "days": days,
            "cold_start_s": args.cold_start_s,
            "window": wname,
            "replica_rps_at_slo": round(model.rps_at_slo, 2),
            "replica_model": str(REPLICA_MODEL.name),
            "slo": {"ttft_ms": model.slo.ttft_ms, "tpot_ms": model.slo.tpot_ms},
        },
        "window_s": [lo, hi],
        "policies": rows,
        "verdict": (
            f"{args.trace} with a {args.cold_start_s:g} s cold start: reactive met the SLO for "
            f"{r['slo_attainment']:.2%} of requests ({r['late'] + r['dropped']} late or dropped), predictive for "
            f"{p['slo_attainment']:.2%} ({p['late'] + p['dropped']}), at {r['replica_hours']} vs "
            f"{p['replica_hours']} replica-hours (oracle {base})"
        ),
    }
    return Outcome(
        record, {"timeline": lambda path: plot(args.trace, results, model.rps_at_slo, path, (lo, hi))}
    )
