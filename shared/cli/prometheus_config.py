"""`fleetserve prometheus-config`: a Prometheus scrape configuration for the running local fleet, from its state
file: every process's /metrics, labelled with its service (and, for engines, its replica id)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

from shared.cluster import read_state

JOB = "fleetserve"
# Launcher process names: a service name, or a service name and a sequence number (engine-3).
_NUMBERED = re.compile(r"^(?P<service>.+)-\d+$")


def targets(state: dict) -> list[dict]:
    """Prometheus file_sd / static_configs entries: one per process with a /metrics endpoint, labelled
    `service` (gateway, router, engine, registry, metrics, ...) and, for engines, `replica` (its replica id,
    the launcher's process name)."""
    out = []
    for name, address in sorted(state.get("metrics_addresses", {}).items()):
        m = _NUMBERED.match(name)
        service = m.group("service") if m else name
        labels = {"service": service}
        if service == "engine":
            labels["replica"] = name
        out.append({"targets": [address], "labels": labels})
    return out


def scrape_config(
    state: dict,
    *,
    scrape_interval: str = "5s",
    evaluation_interval: str | None = None,
    targets_file: str | None = None,
    rule_files: list[str] | tuple[str, ...] = (),
) -> dict:
    """A whole prometheus.yml: one job over every process of the fleet. With targets_file, the targets are
    read from that file (file_sd; Prometheus re-reads it when it changes, so rewriting it follows a fleet that
    grows or shrinks without a restart); otherwise they are listed inline. The engines an autoscaler starts and
    stops come and go between runs of this command, so they are always read from the file its provisioner keeps
    (`autoscaled_targets_file` in the state)."""
    job: dict = {"job_name": JOB, "scrape_interval": scrape_interval}
    files = [f for f in (targets_file, state.get("autoscaled_targets_file")) if f]
    if files:
        job["file_sd_configs"] = [{"files": files}]
    if not targets_file:
        job["static_configs"] = targets(state)
    config: dict = {
        "global": {
            "scrape_interval": scrape_interval,
            "evaluation_interval": evaluation_interval or scrape_interval,
        },
        "scrape_configs": [job],
    }
    if rule_files:
        config["rule_files"] = [str(Path(f).resolve()) for f in rule_files]
    return config


def run_prometheus_config(args) -> int:
    state = read_state(Path(args.data_dir) if args.data_dir else None)
    if not state.get("metrics_addresses"):
        print(
            "error: the running fleet lists no /metrics endpoints (started with --metrics-port -1, or by an "
            "older fleetserve): restart it with `fleetserve up`",
            file=sys.stderr,
        )
        return 1
    targets_file = None
    if args.targets_file:
        path = Path(args.targets_file).resolve()
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(targets(state), indent=2))
        tmp.replace(path)  # Prometheus never reads half a file
        targets_file = str(path)
    text = yaml.safe_dump(
        scrape_config(
            state,
            scrape_interval=args.scrape_interval,
            targets_file=targets_file,
            rule_files=args.rules or (),
        ),
        sort_keys=False,
    )
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("--out", help="write the configuration here (default: stdout)")
    parser.add_argument(
        "--targets-file",
        help="write the targets to this JSON file and point the configuration at it (file_sd): run the "
        "command again after the fleet changes and Prometheus follows without a restart",
    )
    parser.add_argument(
        "--scrape-interval", default="5s", help="how often Prometheus scrapes each process (default 5s)"
    )
    parser.add_argument(
        "--rules",
        action="append",
        metavar="FILE",
        help="a rules file to load (repeatable), e.g. infra/prometheus/fleetserve-alerts.yml",
    )
    parser.add_argument("--data-dir", help="the fleet's data directory (default: the running cluster's)")
