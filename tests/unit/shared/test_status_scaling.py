"""`fleetserve status`'s autoscaling table: desired vs actual per model, and a row per version while a rollout
splits the model (baseline, candidate, a version retiring), with the arrival rate and where it came from."""

from __future__ import annotations

import time

from rich.console import Console

from shared.cli.status import scaling_table


def render(models: list[dict]) -> str:
    console = Console(width=400, record=True)
    console.print(scaling_table(models))
    return console.export_text()


def model(**over) -> dict:
    m = {
        "model": "sim-1b",
        "desired": 4,
        "serving": 3,
        "starting": 1,
        "draining": 0,
        "min_replicas": 1,
        "max_replicas": 8,
        "policies": ["capacity"],
        "arrival_rate": 31.5,
        "arrival_source": "routers",
        "versions": [
            {
                "version": "v1",
                "role": "current",
                "share": 1.0,
                "desired": 4,
                "serving": 3,
                "starting": 1,
                "draining": 0,
                "min_replicas": 1,
                "max_replicas": 8,
                "arrival_rate": 31.5,
                "reason": "no rollout",
            }
        ],
        "decisions": [
            {
                "at_unix": time.time() - 5,
                "previous": 3,
                "desired": 4,
                "policy": "capacity",
                "reason": "31.5 req/s / 10.0 per replica x 1.10 -> 4",
                "version": "v1",
            }
        ],
    }
    m.update(over)
    return m


def test_one_version_is_one_row_with_the_arrival_rate_and_its_source():
    text = render([model()])
    assert "31.5 req/s (routers)" in text and "@v1 3->4 [capacity]" in text
    assert "current" not in text  # no version rows while one version serves the model as usual


def test_a_rollout_shows_a_row_per_version_with_role_share_and_reason():
    versions = [
        {
            **model()["versions"][0],
            "role": "baseline",
            "share": 0.75,
            "desired": 3,
            "reason": "r-1: baseline",
        },
        {
            **model()["versions"][0],
            "version": "v2",
            "role": "candidate",
            "share": 0.25,
            "desired": 1,
            "serving": 1,
            "starting": 0,
            "arrival_rate": 7.9,
            "reason": "r-1: candidate at 25%",
        },
    ]
    text = render([model(versions=versions)])
    assert "@v1 baseline 75%" in text and "@v2 candidate 25%" in text
    assert "7.9 req/s" in text and "r-1: candidate at 25%" in text
