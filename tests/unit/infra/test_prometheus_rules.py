"""The SLO rules file: generated from the objectives, accepted by promtool, and its alerts fire and clear as the
planted series in fleetserve-alerts.test.yml say (`promtool test rules`)."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from infra.prometheus import rules

RULES = rules.DEFAULT_OUT
TESTS = RULES.with_name("fleetserve-alerts.test.yml")


def _promtool() -> str:
    exe = shutil.which("promtool")
    if exe is None:
        pytest.skip(
            "promtool is not installed: `make test` installs Debian's prometheus package, which has it"
        )
    return exe


def test_committed_rules_are_what_the_generator_writes():
    """infra/prometheus/fleetserve-alerts.yml is the generator's output for the default objectives."""
    assert RULES.read_text() == rules.render(rules.slos_from(rules.parser().parse_args([])))


def test_every_window_pair_alerts_for_every_slo():
    """Four burn-rate pairs (14.4x 1h/5m, 6x 6h/30m page; 3x 1d/2h, 1x 3d/6h ticket) for each of the 3 SLOs."""
    doc = yaml.safe_load(RULES.read_text())
    alerts = [r for g in doc["groups"] if g["name"] == "fleetserve-slo-alerts" for r in g["rules"]]
    pairs = {
        (a["labels"]["slo"], a["labels"]["long_window"], a["labels"]["short_window"], a["labels"]["severity"])
        for a in alerts
    }
    expected = {
        (slo, long, short, sev)
        for slo in ("availability", "ttft", "tpot")
        for long, short, sev in (
            ("1h", "5m", "page"),
            ("6h", "30m", "page"),
            ("1d", "2h", "ticket"),
            ("3d", "6h", "ticket"),
        )
    }
    assert pairs == expected


def test_objectives_change_the_thresholds(tmp_path):
    """A 99.5% availability objective makes the fast-burn threshold 14.4 x 0.5% = 7.2%."""
    out = tmp_path / "alerts.yml"
    assert rules.main(["--availability", "0.995", "--out", str(out)]) == 0
    doc = yaml.safe_load(out.read_text())
    fast = next(
        r
        for g in doc["groups"]
        for r in g["rules"]
        if r.get("alert") == "FleetserveAvailabilityBudgetBurn" and r["labels"]["long_window"] == "1h"
    )
    assert "> 0.072\n" in fast["expr"]


def test_a_threshold_that_is_not_a_bucket_bound_is_refused():
    """--ttft-seconds must be a bucket boundary: `le` can only select existing buckets."""
    with pytest.raises(SystemExit, match="bucket boundary"):
        rules.main(["--ttft-seconds", "0.33", "--out", "-"])


def test_promtool_check_rules():
    """promtool accepts every rule (valid PromQL, valid names)."""
    r = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_unit_tests_of_the_alerts():
    """2% errors against 99.9% fire the fast burn within the 5-minute window and it clears after recovery;
    0.05% fires nothing; TTFT and TPOT thresholds fire only the burn rates they exceed; a registry's traffic watch
    of one kind breaking 3 times in 30 minutes opens a ticket, one etcd member restart (every kind once) does not;
    one kind's watch down for 5 minutes opens a ticket, down for 4 does not; the same for its replica-membership
    watch."""
    r = subprocess.run(
        [_promtool(), "test", "rules", TESTS.name],
        cwd=TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout
