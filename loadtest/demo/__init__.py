"""`fleetserve demo capstone`: the capstone demo (loadtest/demo/run.py) and its report (loadtest/demo/report.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="demo", required=True)
    c = sub.add_parser(
        "capstone",
        help="a sim fleet through two compressed days with a spike, autoscaling, model and cache-aware routing, "
        "tenants with limits and a replica killed; an HTML report with plots and SLO verdicts",
    )
    c.add_argument(
        "--out", default="demo-report", help="directory for report.html, report.json, plots (demo-report)"
    )
    c.add_argument("--quick", action="store_true", help="one short day (a smoke test; about a minute)")
    c.add_argument("--day-s", type=float, help="seconds one compressed day lasts (default 75)")
    c.add_argument("--days", type=int, help="compressed days (default 2; the first teaches the predictor)")
    c.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    c.add_argument("--backend", choices=["sim", "vllm"], default="sim", help="engine backend (default sim)")
    c.add_argument("--vllm-args", default="", help="with --backend vllm: the engines' vLLM flags")
    c.add_argument("--screenshot", help="also write a PNG of the report (headless Chromium) here")


def run(args: argparse.Namespace) -> int:
    from loadtest.bench import _run_async
    from loadtest.demo import report
    from loadtest.demo.run import QUICK, DemoSettings, run_demo
    from loadtest.fleet import structlog_to_stderr

    settings = QUICK if args.quick else DemoSettings()
    overrides = {k: v for k, v in (("day_s", args.day_s), ("days", args.days)) if v is not None}
    settings = dataclasses.replace(
        settings, seed=args.seed, backend=args.backend, vllm_args=args.vllm_args, **overrides
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        with structlog_to_stderr():
            record = _run_async(run_demo(settings, out))
    except KeyboardInterrupt:
        return 130
    record["wall_s"] = round(time.perf_counter() - started, 1)
    page = report.write(record, out)
    print(f"[demo] report: {page}", file=sys.stderr)
    if args.screenshot and not report.screenshot(page, Path(args.screenshot)):
        print("[demo] no Chromium found: no screenshot", file=sys.stderr)
    print(
        json.dumps(
            {"report": str(page), "wall_s": record["wall_s"], "verdicts": record["verdicts"]}, indent=2
        )
    )
    return 0 if record["verdicts"]["zero_failed_requests"] else 1
