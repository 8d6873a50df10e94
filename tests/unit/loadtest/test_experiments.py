"""The exercises as experiments: the registry and CLI, and the pure parts of the experiments (the retry storm's
model, the latency stream's windows, the labelled routing tasks)."""

from __future__ import annotations

import importlib
import json
import random
from dataclasses import replace

import pytest

from loadtest.experiments import EXERCISES
from loadtest.experiments.latency_stream import arrivals, windows
from loadtest.experiments.model_routing import tasks
from loadtest.retry_storm import CAREFUL, NAIVE, StormSettings, recovery_s, simulate, summary
from shared.cli.main import build_parser
from shared.cli.main import main as cli_main


def test_every_exercise_is_a_subcommand_with_a_runnable_module():
    """Each exercise parses as `fleetserve experiment NAME` with its own options, its module has run(), and no
    name takes one of the A/B verbs."""
    parser = build_parser()
    for name, ex in EXERCISES.items():
        args = parser.parse_args(["experiment", name, "--quick", "--seed", "3"])
        assert args.experiment_command == name and args.quick and args.seed == 3
        assert callable(importlib.import_module(f"loadtest.experiments.{ex.module}").run)
    assert not set(EXERCISES) & {"create", "status", "analyze", "list", "stop"}


def test_naive_retries_amplify_the_load_and_never_recover_while_backoff_with_a_budget_does():
    """Against the same struggle, immediate retries multiply the attempts and keep the replica saturated after
    it is healthy again (a metastable failure); backoff + jitter + a retry budget add almost nothing and goodput
    recovers within seconds."""
    s = StormSettings(duration_s=90.0)
    naive, careful = summary(s, simulate(s, NAIVE)), summary(s, simulate(s, CAREFUL))
    assert naive["amplification"] > 4 and naive["recovery_s"] is None
    assert (
        careful["amplification"] < 1.2 and careful["recovery_s"] is not None and careful["recovery_s"] <= 10
    )
    assert careful["retries_throttled"] > 0 and naive["retries_throttled"] == 0
    assert careful["success_rate"] > naive["success_rate"]


def test_without_a_struggle_nobody_retries_and_everything_is_served():
    """The model is not what fails: with a healthy replica both clients make one attempt per request."""
    s = replace(StormSettings(duration_s=30.0), struggle_capacity=100.0)
    for clients in (NAIVE, CAREFUL):
        r = summary(s, simulate(s, clients))
        assert r["amplification"] == 1.0 and r["success_rate"] > 0.98 and r["wasted_work"] == 0


def test_recovery_is_the_first_window_that_serves_what_was_offered():
    """recovery_s counts from the end of the struggle to the first 5 s window serving >= 95% of its offered."""
    s = StormSettings(duration_s=20.0, struggle_from_s=5.0, struggle_to_s=8.0)
    tl = simulate(replace(s, struggle_capacity=100.0), CAREFUL)
    assert recovery_s(s, tl) == 0.0


def test_bursty_arrivals_and_per_second_windows():
    """Arrivals are denser in the first second of each period; windows hold each second's mean and p99."""
    times = arrivals(80.0, 5.0, 6.0, 8.0, random.Random(1))
    in_burst = sum(1 for t in times if t % 8.0 < 1.0)
    assert in_burst / 10 > 2.5 * (len(times) - in_burst) / 70  # per second, bursts carry ~6x the rate
    w = windows([(0.1, 10.0), (0.5, 30.0), (1.2, 5.0)])
    assert [x["t_s"] for x in w] == [0.0, 1.0] and w[0]["ttft_ms"]["mean"] == 20.0 and w[0]["n"] == 2


def test_routing_tasks_are_labelled_and_not_all_recognisable():
    """About 30% of the tasks are hard; some hard ones carry no keyword and some easy ones are long."""
    ts = tasks(400, random.Random(2))
    hard = [t for t in ts if t.hard]
    assert 0.22 < len(hard) / len(ts) < 0.38
    assert any(t.prompt.startswith("Which is right") for t in hard)
    assert any(not t.hard and t.prompt.startswith("Summarise") for t in ts)


@pytest.mark.slow
def test_the_retry_storm_experiment_runs_from_the_cli(tmp_path, capsys):
    """`fleetserve experiment retry-storm --quick --out F.json` writes the record and its plot beside it."""
    out = tmp_path / "storm.json"
    assert cli_main(["experiment", "retry-storm", "--quick", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["experiment"] == "retry-storm" and "verdict" in record
    assert (tmp_path / record["plots"]["timeline"]).stat().st_size > 10_000
    assert json.loads(capsys.readouterr().out)["results"] == record["results"]


def test_timeline_and_comparison_records_are_drawn_by_fleetserve_report(tmp_path):
    """The records that carry a `kind` are in the shapes `fleetserve report` draws."""
    from loadtest.report import render

    timeline = {"kind": "latency_timeline", "title": "t", "series": windows([(0.1, 10.0), (1.5, 30.0)])}
    comparison = {
        "kind": "policy_comparison",
        "policies": {
            "round_robin": {
                "ttft_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                "tpot_ms": {"p99": 1.0},
                "throughput_tok_s": 10.0,
            }
        },
    }
    for name, doc in (("t.json", timeline), ("c.json", comparison)):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        assert all(p.stat().st_size > 5000 for p in render(path))
