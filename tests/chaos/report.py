"""What a fault test measured, for docs/benchmarks/reliability.md: with FLEETSERVE_CHAOS_REPORT set, each test
adds its record (requests, failures by status, lost tokens, detection and recovery times) to that JSON file (the
fuzz tests add theirs to $FLEETSERVE_FUZZ_REPORT's the same way)."""

from __future__ import annotations

import json
import os


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of values, rounded to the ms; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return round(ordered[k], 3)


def record(fault: str, **fields) -> None:
    """Add (or replace) fault's record in $FLEETSERVE_CHAOS_REPORT (nothing when unset)."""
    add_record("FLEETSERVE_CHAOS_REPORT", fault, fields)


def add_record(path_env: str, name: str, fields: dict) -> None:
    """Add (or replace) name's record in the JSON file named by $path_env (nothing when unset)."""
    path = os.environ.get(path_env)
    if not path:
        return
    try:
        with open(path) as f:
            report = json.load(f)
    except (OSError, ValueError):
        report = {}
    report[name] = fields
    with open(path, "w") as f:
        json.dump(report, f, indent=2, sort_keys=True)
