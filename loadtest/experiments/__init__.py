"""The book's exercises as experiments: `fleetserve experiment NAME [--quick] [--seed N] [--out FILE.json]` runs
one, prints its JSON record (what was measured, the settings, a verdict) and, with --out, writes the record and
its plots (FILE-*.png) beside it. Results pages: docs/experiments/NAME.md."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Exercise:
    """One experiment: the module that runs it (`async run(args, name) -> Outcome`), a line of help, and its own
    options (flag, argparse keywords), declared here so that building the CLI imports no experiment."""

    module: str
    help: str
    options: tuple[tuple[str, dict], ...] = ()


def _int(default: int, help: str) -> dict:
    return {"type": int, "default": default, "help": f"{help} (default {default})"}


def _float(default: float, help: str) -> dict:
    return {"type": float, "default": default, "help": f"{help} (default {default:g})"}


EXERCISES: dict[str, Exercise] = {
    "streaming-ttft": Exercise(
        "streaming",
        "streaming vs whole response: time to the first visible token",
        (
            ("--requests", _int(40, "requests per mode")),
            ("--max-tokens", _int(256, "tokens per reply")),
            ("--speed-factor", _float(1.0, "sim speed; 1 is H100 timings")),
        ),
    ),
    "least-load-tail": Exercise(
        "routing",
        "least-load vs round-robin: TTFT tail under variable request sizes",
        (
            ("--requests", _int(200, "requests per policy")),
            ("--replicas", _int(4, "sim replicas")),
            ("--profile", {"default": "h100-llama-8b", "help": "GPU profile (default h100-llama-8b)"}),
        ),
    ),
    "cache-aware-ttft": Exercise(
        "routing",
        "cache-aware vs blind routing: TTFT of multi-turn chats",
        (
            ("--requests", _int(200, "requests per policy")),
            ("--replicas", _int(4, "sim replicas")),
            ("--profile", {"default": "h100-llama-8b", "help": "GPU profile (default h100-llama-8b)"}),
        ),
    ),
    "mean-vs-p99": Exercise(
        "latency_stream",
        "mean vs p99 on a plotted latency stream with bursts",
        (
            ("--duration-s", _float(40.0, "seconds of traffic")),
            ("--rate", _float(6.0, "mean requests/s outside bursts")),
            ("--burst-factor", _float(6.0, "rate multiplier in a burst")),
            ("--burst-every-s", _float(8.0, "a 1 s burst this often")),
            ("--engines", _int(2, "sim engines")),
        ),
    ),
    "scaling-cold-start": Exercise(
        "scaling",
        "reactive vs predictive autoscaling with a cold start (virtual time)",
        (
            ("--cold-start-s", _float(120.0, "cold start of a new replica, s")),
            ("--trace", {"default": "spike", "help": "spike (default), diurnal, ramp or sawtooth"}),
        ),
    ),
    "model-routing-cost": Exercise(
        "model_routing",
        "small/large model routing: cost saved at a measured quality proxy",
        (("--requests", _int(80, "tasks per arm")), ("--concurrency", _int(4, "requests in flight"))),
    ),
    "ab-planted": Exercise(
        "ab",
        "A/B test with a planted difference (v2 30% slower per token), after an A/A control",
        (
            ("--samples-per-arm", _int(100, "samples per arm (the horizon)")),
            ("--concurrency", _int(4, "requests in flight")),
        ),
    ),
    "retry-storm": Exercise(
        "retry_storm",
        "naive retries vs backoff + jitter + retry budget on a struggling replica (virtual time)",
        (
            ("--struggle-capacity", _float(25.0, "requests/s served while struggling (healthy: 100)")),
            ("--offered", _float(70.0, "new requests per second")),
        ),
    ),
    "cost-by-type": Exercise(
        "cost",
        "cost by request type and by replica type",
        (
            ("--requests", _int(120, "streamed requests, plus 2 batch jobs")),
            ("--concurrency", _int(8, "requests in flight")),
        ),
    ),
}


@dataclass
class Outcome:
    """What an experiment returns: its record (JSON-able) and the plots to draw from it (name -> fn(path))."""

    record: dict
    plots: dict


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """Every exercise as a subcommand (of `fleetserve experiment`)."""
    for name, ex in EXERCISES.items():
        p = sub.add_parser(name, help=ex.help, description=ex.help)
        p.add_argument("--quick", action="store_true", help="a small run (a smoke test, not a result)")
        p.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
        p.add_argument("--out", help="write the JSON record here, and its plots beside it (FILE-*.png)")
        for flag, kwargs in ex.options:
            p.add_argument(flag, **kwargs)


def run(args: argparse.Namespace, name: str) -> int:
    """Run exercise `name` with parsed args; print (and with --out, write) its record. 0 unless it failed to run."""
    from loadtest.bench import _run_async
    from loadtest.fleet import structlog_to_stderr

    module = importlib.import_module(f"loadtest.experiments.{EXERCISES[name].module}")
    started = time.perf_counter()
    with structlog_to_stderr():
        outcome: Outcome = _run_async(module.run(args, name))
    record = {
        "experiment": name,
        "command": "fleetserve experiment " + " ".join(sys.argv[2:])
        if sys.argv[1:2] == ["experiment"]
        else name,
        "quick": args.quick,
        "seed": args.seed,
        **outcome.record,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "loadavg_1m": _loadavg()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record["plots"] = {}
        for plot_name, draw in outcome.plots.items():
            png = out.with_name(f"{out.stem}-{plot_name}.png")
            draw(png)
            record["plots"][plot_name] = png.name
        out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def progress(msg: str) -> None:
    print(f"[experiment] {msg}", file=sys.stderr, flush=True)
