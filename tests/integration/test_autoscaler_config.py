"""Bad autoscaling configuration is refused at start, by the real processes, with a message that names the field:
the autoscaler service itself (`python -m services.autoscaler --models ...`) exits before it serves, and `fleetserve
up --autoscale` refuses before it starts anything. (Every kind of bad value is covered on the parser in
tests/unit/autoscaler/test_policies.py; this proves the processes use it at start.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _run(args: list[str], home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLEETSERVE_HOME": str(home)}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_autoscaler_refuses_min_above_max_naming_the_field(tmp_path: Path):
    bad = {"sim-1b": {"min_replicas": 5, "max_replicas": 2}}
    p = _run(["-m", "services.autoscaler", "--port", "0", "--models", json.dumps(bad)], tmp_path)
    assert p.returncode != 0
    assert "models.sim-1b.min_replicas: 5 is more than max_replicas 2" in p.stdout + p.stderr


def test_fleetserve_up_refuses_a_schedule_that_does_not_parse_before_starting_anything(tmp_path: Path):
    window = {"cron": "every morning", "duration_s": 60, "min_replicas": 2}
    bad = {"sim-1b": {"policies": {"scheduled": {"windows": [window]}}}}
    p = _run(
        ["-m", "shared.cli.main", "up", "--autoscale", "--autoscale-models", json.dumps(bad), "--no-live"],
        tmp_path,
    )
    out = " ".join((p.stdout + p.stderr).split())  # rich wraps long lines
    assert p.returncode == 2, out
    assert "models.sim-1b.policies.scheduled.windows[0].cron" in out
    assert not (tmp_path / "cluster.json").exists()  # nothing was started
