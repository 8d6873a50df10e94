"""Scaling decisions from a trace, in virtual time: replay an arrival-rate trace through a fleet of simulated
replicas (loadtest/autoscale_sim.py: the sim's cost model per replica, a cold start per new replica) under each
policy of the real autoscaler, and report SLO attainment, replica-hours, scale events, flaps and dropped/late
requests against an oracle that knows the future and a static fleet sized for the peak; a PNG per trace.

    fleetserve bench --autoscale --trace spike --out docs/benchmarks/autoscaling.json
    python -m loadtest.autoscale_bench --trace diurnal --trace spike --plots docs/benchmarks/autoscaling
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from loadtest.autoscale_model import ReplicaModel, Slo, Workload, measure
from loadtest.autoscale_sim import Timeline, autoscaler, flaps, needed, oracle_plan, simulate
from services.autoscaler.decider import Decider
from services.autoscaler.spec import parse_model

DAY = 86400
PROGRAM = "python -m loadtest.autoscale_bench"
SPIKE_AT = 14 * 3600  # the daily spike starts at 14:00


# -- traces ------------------------------------------------------------------------------------------------


def _noise(n: int, rng: np.random.Generator, sd: float = 0.05, corr_s: float = 300.0) -> np.ndarray:
    """Multiplicative AR(1) noise around 1 (slow wander, as real traffic has), floored at 0.5."""
    a = math.exp(-1.0 / corr_s)
    e = rng.normal(0.0, sd * math.sqrt(1 - a * a), n)
    x = np.empty(n)
    x[0] = 0.0
    for i in range(1, n):  # bounded by n
        x[i] = a * x[i - 1] + e[i]
    return np.maximum(0.5, 1.0 + x)


def trace(name: str, rps: float, days: int, seed: int) -> np.ndarray:
    """Per-second arrival rate: `rps` is one replica's SLO capacity, so the shapes are sized in replicas.
    diurnal: a daily sine from 2 to 12 replicas' worth (low at 02:00, high at 14:00); spike: 2 replicas' worth
    with a 5x spike at 14:00 every day (up within a minute, 10 minutes long, down within a minute); ramp: 2 to
    10 replicas' worth rising through each day's first 12 hours, then back down; sawtooth: 30-minute teeth from
    2 to 8 replicas' worth. All with 5% slowly wandering noise and Poisson arrivals on top."""
    n = days * DAY
    t = np.arange(n, dtype=float)
    tod = t % DAY
    rng = np.random.default_rng(seed)
    if name == "diurnal":
        shape = 2 + 10 * (0.5 - 0.5 * np.cos(2 * np.pi * (tod - 2 * 3600) / DAY))
    elif name == "spike":
        up = np.clip((tod - SPIKE_AT) / 60.0, 0, 1)
        down = np.clip((SPIKE_AT + 660 - tod) / 60.0, 0, 1)
        shape = 2 * (1 + 4 * np.minimum(up, down))
    elif name == "ramp":
        shape = 2 + 8 * np.clip(1 - np.abs(tod - 12 * 3600) / (12 * 3600), 0, 1)
    elif name == "sawtooth":
        shape = 2 + 6 * ((t % 1800) / 1800)
    else:
        raise ValueError(f"unknown trace {name!r}; known: diurnal, spike, ramp, sawtooth (or a CSV file)")
    return shape * rps * 0.9 * _noise(n, rng)


def trace_from_csv(path: str) -> np.ndarray:
    """A user's trace: CSV rows of (timestamp seconds, requests in the interval up to the next row); a header
    row is skipped. Returns the per-second rate (each interval's requests spread evenly over it)."""
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or row[0].startswith("#"):
                continue
            try:
                rows.append((float(row[0]), float(row[1])))
            except (ValueError, IndexError):
                if i == 0:
                    continue  # header
                raise ValueError(f"{path} line {i + 1}: expected 'timestamp,requests', got {row!r}") from None
    if len(rows) < 2:
        raise ValueError(f"{path}: needs at least two rows of timestamp,requests")
    rows.sort()
    t0 = rows[0][0]
    n = int(math.ceil(rows[-1][0] - t0)) + 1
    rate = np.zeros(n)
    for (a, count), (b, _) in zip(rows, rows[1:], strict=False):
        lo, hi = int(a - t0), max(int(a - t0) + 1, int(b - t0))
        rate[lo:hi] = count / (hi - lo)
    return rate


# -- policies under test -----------------------------------------------------------------------------------


def policy_specs(rps: float, cold_start_s: float, trace_name: str, peak: int) -> dict[str, dict]:
    """The autoscaler configurations compared (each a models.<m> spec as `--models` takes it)."""
    base = {
        "min_replicas": 1,
        "max_replicas": max(4, int(peak * 1.5)),
        "replica_rps": rps,
        "cold_start_s": cold_start_s,
        "scale_down_cooldown_s": 300,
    }
    # Reactive: output tokens/s per replica at 85% of what a replica serves within the SLO; queue and TTFT
    # p99 as alarms.
    reactive = {
        "target_running_per_replica": 0,
        "target_output_tokens_per_s": "__TOKENS__",
        "target_waiting_per_replica": 4,
        "ttft_slo_ms": 500,
        "tolerance": 0.1,
    }
    specs = {
        "reactive": {**base, "policies": {"reactive": reactive}},
        "capacity": {**base, "policies": {"capacity": {"headroom": 0.1}}},
        "predictive": {**base, "policies": {"predictive": {"headroom": 0.1}}},
        "predictive+reactive": {
            **base,
            "policies": {"predictive": {"headroom": 0.1}, "reactive": reactive},
        },
    }
    if trace_name == "spike":
        window = {"cron": "58 13 * * *", "duration_s": 900, "min_replicas": peak, "tz": "UTC"}
        specs["scheduled+reactive"] = {
            **base,
            "policies": {"scheduled": {"windows": [window]}, "reactive": reactive},
        }
    return specs


@dataclass
class Result:
    name: str
    timeline: Timeline
    seconds: float


def score(tl: Timeline, lo: int, hi: int, flap_window_s: float) -> dict:
    """The numbers of one run over seconds [lo, hi)."""
    arrivals = float(tl.arrivals[lo:hi].sum())
    ok = float(tl.ok[lo:hi].sum())
    events = [e for e in tl.events if lo <= e[0] < hi]
    return {
        "requests": int(arrivals),
        "slo_attainment": round(ok / arrivals, 5) if arrivals else 1.0,
        "late": int(round(tl.late[lo:hi].sum())),
        "dropped": int(round(tl.dropped[lo:hi].sum())),
        "replica_hours": round(float(tl.replicas[lo:hi].sum()) / 3600.0, 3),
        "scale_events": len(events),
        "flaps": flaps(events, flap_window_s),
        "max_replicas": int(tl.replicas[lo:hi].max()),
        "ttft_p99_ms_worst_second": round(float(tl.ttft_p99_ms[lo:hi].max()), 1),
    }


def run_trace(
    name: str, rates: np.ndarray, model: ReplicaModel, args, progress
) -> tuple[dict, dict[str, Result], np.ndarray]:
    rps = model.rps_at_slo
    arrivals = np.random.default_rng(args.seed + 1).poisson(np.maximum(rates, 0.0))
    need = needed(rates, rps)
    plan = oracle_plan(need, args.cold_start_s)
    peak = int(need.max())
    results: dict[str, Result] = {}
    common = dict(
        cold_start_s=args.cold_start_s, initial=int(need[0]), deadline_s=args.deadline_s, arrivals=arrivals
    )

    def timed(label, fn):
        t0 = time.perf_counter()
        tl = fn()
        results[label] = Result(label, tl, time.perf_counter() - t0)
        progress(f"{name}: {label} done in {results[label].seconds:.1f}s")

    timed(
        "oracle",
        lambda: simulate(
            rates,
            model,
            lambda t, s: int(plan[t]),
            decision_interval_s=1,
            cancel_booting_first=False,
            **common,
        ),
    )
    timed("static_peak", lambda: simulate(rates, model, lambda t, s: peak, **common))
    in_flight = model.at(rps).mean_in_flight
    tokens_at_slo = rps * model.workload.output_tokens
    for label, raw in policy_specs(rps, args.cold_start_s, name, peak).items():
        for opts in raw["policies"].values():
            if opts.get("target_output_tokens_per_s") == "__TOKENS__":
                opts["target_output_tokens_per_s"] = round(tokens_at_slo * 0.85, 1)
        decider = Decider(parse_model(f"{name}-{label}", raw), initial=int(need[0]))
        decide, observe = autoscaler(decider)
        timed(
            label,
            lambda decide=decide, observe=observe: simulate(rates, model, decide, observe=observe, **common),
        )
    return {"peak_needed": peak, "in_flight_at_slo_per_replica": round(in_flight, 2)}, results, need


def windows(name: str, n: int) -> dict[str, tuple[int, int]]:
    """Where each trace is scored: its last day (the first is history for the predictor), and for the spike also
    the spike itself (from 5 minutes before to 20 minutes after its start)."""
    last = (max(0, n - DAY), n)
    out = {"last_day": last}
    if name == "spike":
        s = last[0] + SPIKE_AT
        out["spike_window"] = (s - 300, s + 1200)
    return out


def report(name: str, info: dict, results: dict[str, Result], n: int, flap_window_s: float) -> dict:
    out: dict = {"trace": name, **info, "windows": {}}
    for wname, (lo, hi) in windows(name, n).items():
        rows = {label: score(r.timeline, lo, hi, flap_window_s) for label, r in results.items()}
        base = rows["oracle"]["replica_hours"]
        for row in rows.values():
            row["vs_oracle_replica_hours"] = round(row["replica_hours"] / base, 3) if base else None
        out["windows"][wname] = {"from_s": lo, "to_s": hi, "policies": rows}
    return out


def plot(name: str, results: dict[str, Result], rps: float, path: Path, span: tuple[int, int]) -> None:
    """One PNG per trace: a column per policy; rows: load (req/s) with serving capacity, replicas desired vs
    paid for, TTFT p99 per second (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = span
    labels = list(results)
    fig, axes = plt.subplots(3, len(labels), figsize=(3.2 * len(labels), 7.5), sharex=True, sharey="row")
    step = max(1, (hi - lo) // 2000)
    x = (np.arange(lo, hi, step) - lo) / 3600.0
    for j, label in enumerate(labels):
        tl = results[label].timeline
        sl = slice(lo, hi, step)
        ax = axes[0][j]
        # Arrivals averaged per plotted point, so one-second noise does not hide the shape.
        load = np.convolve(tl.arrivals[lo:hi], np.ones(step) / step, mode="same")[::step]
        ax.plot(x, load, lw=0.8, label="arrivals/s")
        ax.plot(x, tl.serving[sl] * rps, lw=0.8, label="serving capacity")
        ax.set_title(label, fontsize=9)
        axes[1][j].plot(x, tl.desired[sl], lw=0.8, label="desired")
        axes[1][j].plot(x, tl.replicas[sl], lw=0.8, label="paid for")
        axes[2][j].semilogy(x, np.maximum(tl.ttft_p99_ms[sl], 1.0), lw=0.6)
        axes[2][j].axhline(500, color="red", lw=0.6, ls="--")
        axes[2][j].set_xlabel("hours")
    axes[0][0].set_ylabel("req/s")
    axes[1][0].set_ylabel("replicas")
    axes[2][0].set_ylabel("TTFT p99 ms")
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(f"{name}: load, replicas and TTFT p99 per policy", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--trace",
        action="append",
        help="diurnal, spike, ramp, sawtooth, or a CSV file of timestamp,requests (repeatable; default: all four)",
    )
    p.add_argument("--days", type=int, default=2, help="days simulated; the last is scored (default 2)")
    p.add_argument(
        "--cold-start-s", type=float, default=60.0, help="cold start of a new replica (default 60)"
    )
    p.add_argument(
        "--profile", default="h100-llama-1b", help="GPU profile of the replicas (default h100-llama-1b)"
    )
    p.add_argument("--prompt-tokens", type=int, default=256)
    p.add_argument("--output-tokens", type=int, default=128)
    p.add_argument("--ttft-slo-ms", type=float, default=500.0)
    p.add_argument("--tpot-slo-ms", type=float, default=50.0)
    p.add_argument(
        "--deadline-s", type=float, default=60.0, help="a request waiting longer is dropped (default 60)"
    )
    p.add_argument(
        "--flap-window-s", type=float, default=600.0, help="a reversal within this is a flap (600)"
    )
    p.add_argument("--measure-s", type=float, default=20.0, help="virtual seconds per measured replica point")
    p.add_argument(
        "--replica-model", help="reuse the replica curve from an earlier run's JSON (skips measuring)"
    )
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--plots", help="directory for one PNG per trace (default: beside --out)")
    p.add_argument("--quiet", action="store_true")
    return p


def load_model(path: str) -> ReplicaModel:
    from loadtest.autoscale_model import Point

    raw = json.loads(Path(path).read_text())["replica_model"]
    return ReplicaModel(
        profile=raw["profile"],
        workload=Workload(**raw["workload"]),
        slo=Slo(**raw["slo"]),
        points=[Point(**p) for p in raw["points"]],
        rps_at_slo=raw["rps_at_slo"],
        rps_max=raw["rps_max"],
        target=raw["attainment_target"],
    )


def main(argv: list[str] | None = None) -> int:
    args = add_arguments(
        argparse.ArgumentParser(prog="fleetserve bench --autoscale", description=__doc__)
    ).parse_args(argv)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(f"[autoscale-bench] {msg}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    if args.replica_model:
        model = load_model(args.replica_model)
        progress(f"replica model from {args.replica_model}: {model.rps_at_slo:.1f} req/s within the SLO")
    else:
        progress("measuring one replica on the sim's scheduler (virtual clock) ...")
        model = measure(
            args.profile,
            Workload(args.prompt_tokens, args.output_tokens),
            Slo(args.ttft_slo_ms, args.tpot_slo_ms),
            duration_s=args.measure_s,
            progress=progress,
        )
        progress(
            f"one replica: {model.rps_at_slo:.1f} req/s within the SLO, {model.rps_max:.1f} at saturation"
        )
    record = {
        "command": " ".join(
            [PROGRAM if argv is None else "python -m loadtest.autoscale_bench", *(argv or sys.argv[1:])]
        ),
        "cold_start_s": args.cold_start_s,
        "days": args.days,
        "seed": args.seed,
        "replica_model": model.as_dict(),
        "traces": [],
    }
    plots = Path(args.plots) if args.plots else (Path(args.out).with_suffix("") if args.out else None)
    for name in args.trace or ["diurnal", "spike", "ramp", "sawtooth"]:
        if name.endswith(".csv"):
            rates = trace_from_csv(name)
            label = Path(name).stem
        else:
            rates = trace(name, model.rps_at_slo, args.days, args.seed)
            label = name
        info, results, _ = run_trace(label, rates, model, args, progress)
        entry = report(label, info, results, len(rates), args.flap_window_s)
        entry["sim_seconds"] = {k: round(r.seconds, 2) for k, r in results.items()}
        if plots is not None:
            plots.mkdir(parents=True, exist_ok=True)
            for wname, (lo, hi) in windows(label, len(rates)).items():
                png = plots / f"{label}-{wname}.png"
                plot(label, results, model.rps_at_slo, png, (lo, hi))
                entry["windows"][wname]["plot"] = str(png)
        record["traces"].append(entry)
    record["wall_s"] = round(time.perf_counter() - started, 1)
    text = json.dumps(record, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
