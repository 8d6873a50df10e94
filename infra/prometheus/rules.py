"""Writes infra/prometheus/fleetserve-alerts.yml: recording rules for the fleet's SLIs over every window and
multi-window, multi-burn-rate alerts on them (Google SRE workbook, "Alerting on SLOs"), from the objectives
given on the command line, plus the registry's own alerts (an etcd watch, of traffic or membership, that keeps breaking or stays down):

    python -m infra.prometheus.rules --availability 0.999 --ttft-seconds 2.0 --ttft-objective 0.99 \\
        --tpot-seconds 0.1 --tpot-objective 0.99 --out infra/prometheus/fleetserve-alerts.yml

The defaults are the metrics service's default SLOs (docs/observability.md): availability 99.9%, TTFT p99 under
2 s, TPOT p99 under 100 ms.

Generated rather than hand-written: 3 SLIs x 7 windows of recording rules and 4 alert pairs each differ only in
numbers, and an operator changing an objective should not have to edit 40 expressions consistently."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from prometheus_client.utils import floatToGoString

from shared import prom

DEFAULT_OUT = Path(__file__).with_name("fleetserve-alerts.yml")

# gRPC codes that are not the fleet's fault (as the metrics service counts them, services/metrics/slo.py
# NOT_FLEET_ERRORS): success, the client's own mistakes, the client leaving, backpressure it was asked to honour.
NOT_FLEET_ERRORS = (
    "OK",
    "CANCELLED",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "UNAUTHENTICATED",
)


@dataclass(frozen=True)
class BurnWindow:
    """Alert when the budget burns `factor` times too fast over both the long and the short window (the short
    one makes the alert clear soon after the burn stops)."""

    long: str
    short: str
    factor: float
    severity: str


# The SRE workbook's recommendation: 2% of a 30-day budget in 1 h or 5% in 6 h pages; 10% in 3 d opens a ticket.
WINDOWS = (
    BurnWindow("1h", "5m", 14.4, "page"),
    BurnWindow("6h", "30m", 6.0, "page"),
    BurnWindow("1d", "2h", 3.0, "ticket"),
    BurnWindow("3d", "6h", 1.0, "ticket"),
)


@dataclass(frozen=True)
class Slo:
    """One objective: the fraction of requests that must be good, and how a window's bad fraction is computed."""

    name: str  # availability, ttft, tpot
    alert: str
    objective: float
    description: str
    # PromQL of the bad-event ratio with {w} for the range.
    ratio: str

    @property
    def budget(self) -> float:
        return round(1.0 - self.objective, 10)

    def record(self, window: str) -> str:
        return f"model_name:fleetserve_slo_{self.name}_bad:ratio_rate{window}"


def availability(objective: float) -> Slo:
    # Valid events are the requests the fleet had to serve: OK or a fleet error. A flood of bad API keys or
    # rate-limited retries must not dilute the error ratio.
    not_errors = "|".join(NOT_FLEET_ERRORS)
    not_valid = "|".join(c for c in NOT_FLEET_ERRORS if c != "OK")
    return Slo(
        "availability",
        "FleetserveAvailabilityBudgetBurn",
        objective,
        f"{objective * 100:g}% of the requests the fleet had to serve (OK or a fleet error) end without a fleet "
        "error (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, ...)",
        # "or ... * 0": a model without a single failed request has no error series; its ratio is 0, not absent.
        f'(\n  sum by (model_name) (rate(fleetserve:requests_total{{code!~"{not_errors}"}}[{{w}}]))\n'
        f'  or\n  sum by (model_name) (rate(fleetserve:requests_total{{code="OK"}}[{{w}}])) * 0\n)\n'
        f'/\nsum by (model_name) (rate(fleetserve:requests_total{{code!~"{not_valid}"}}[{{w}}]))',
    )


def _latency(name: str, alert: str, metric: str, seconds: float, objective: float, what: str) -> Slo:
    le = floatToGoString(seconds)  # how prometheus-client writes the bucket's le label
    return Slo(
        name,
        alert,
        objective,
        f"{objective * 100:g}% of requests have {what} under {seconds * 1000:g} ms",
        f'1 - (\n  sum by (model_name) (rate({metric}_bucket{{le="{le}"}}[{{w}}]))\n'
        f"  /\n  sum by (model_name) (rate({metric}_count[{{w}}]))\n)",
    )


def ttft(seconds: float, objective: float) -> Slo:
    return _latency(
        "ttft",
        "FleetserveTTFTBudgetBurn",
        "fleetserve:time_to_first_token_seconds",
        seconds,
        objective,
        "their first token",
    )


def tpot(seconds: float, objective: float) -> Slo:
    return _latency(
        "tpot",
        "FleetserveTPOTBudgetBurn",
        "fleetserve:request_time_per_output_token_seconds",
        seconds,
        objective,
        "a time per output token",
    )


def _windows() -> list[str]:
    seen: list[str] = []
    for w in WINDOWS:
        for x in (w.short, w.long):
            if x not in seen:
                seen.append(x)
    return sorted(seen, key=_seconds)


def _seconds(window: str) -> int:
    return int(window[:-1]) * {"m": 60, "h": 3600, "d": 86400}[window[-1]]


# A registry's etcd watch (of one kind of traffic document, or of replica membership) broke this often within the
# window: one break is what an etcd member restart or a compaction causes, and the registry rereads and watches again
# within seconds; three in 30 minutes is a watch that keeps failing, and between breaks its routers may lag behind
# what the other registries write. Traffic is per kind, since one member restart breaks all four at once.
WATCH_BREAKS, WATCH_BREAKS_WINDOW = 3, "30m"


# A registry's etcd watch has been down (its ..._watch_up 0) this long: one long outage is a single break, which the
# break count never alerts on. A break heals within seconds once etcd answers (retries every 5 s at most) and a
# member restart or leader election within a minute, so 5 minutes down is etcd or the network to it not coming back
# by itself, and still short enough to catch before other registries' writes pile up unseen by this registry's
# routers.
WATCH_DOWN_FOR = "5m"


@dataclass(frozen=True)
class Watch:
    """One of the registry's etcd watches, as its alerts name it."""

    alert: str  # alert name prefix: <alert>Broken, <alert>Down
    metric: str  # metric name prefix: <metric>_breaks_total, <metric>_up
    watched: str  # what is watched, in the summary
    missed: str  # what its routers miss meanwhile (other registries' ...)
    log: str  # log event prefix: <log>_broken, <log>_resumed


# Both tickets, not pages: routers keep serving with the last configuration and replicas they got, around a replica
# that is gone with their breakers and failover (user-facing damage pages through the SLO alerts); changes made
# through other registries are only late here, and new replicas idle.
WATCHES = (
    Watch(
        "FleetserveRegistryTrafficWatch",
        "fleetserve:registry_traffic_watch",
        "{{ $labels.kind }} documents",
        "rollout, experiment and flag changes",
        "registry.traffic_watch",
    ),
    Watch(
        "FleetserveRegistryReplicaWatch",
        "fleetserve:registry_replica_watch",
        "replica membership",
        "replica registrations, drains and removals (and etcd's lease expiries)",
        "registry.replica_watch",
    ),
)


def registry_alerts() -> list[dict]:
    """Alerts on the registry's own health (not an SLO): one of its etcd watches (traffic, membership) breaking
    again and again, or down for long."""
    return [alert for watch in WATCHES for alert in _watch_alerts(watch)]


def _watch_alerts(w: Watch) -> list[dict]:
    where = "check its --etcd-endpoint members (etcdctl endpoint health) and the network to them"
    return [
        {
            "alert": f"{w.alert}Broken",
            "expr": f"increase({w.metric}_breaks_total[{WATCH_BREAKS_WINDOW}]) >= {WATCH_BREAKS}",
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": f"{{{{ $labels.instance }}}}: the registry's etcd watch of {w.watched} "
                f"broke {WATCH_BREAKS} or more times in {WATCH_BREAKS_WINDOW}",
                "description": f"Between breaks this registry's routers may miss other registries' {w.missed}. "
                f"Runbook: the registry's log lines {w.log}_broken say why (error); {where}; "
                "docs/observability.md#alerting-rules.",
            },
        },
        {
            "alert": f"{w.alert}Down",
            "expr": f"{w.metric}_up == 0",
            "for": WATCH_DOWN_FOR,
            "labels": {"severity": "ticket"},
            "annotations": {
                "summary": f"{{{{ $labels.instance }}}}: the registry's etcd watch of {w.watched} "
                f"has been down for {WATCH_DOWN_FOR} or more",
                "description": "Until it reads etcd again, this registry and so its routers do not see other "
                f"registries' {w.missed}. Why for {WATCH_DOWN_FOR}: a broken watch is retried every 5 s at most "
                f"and an etcd member restart heals within a minute, so {WATCH_DOWN_FOR} down does not heal by "
                f"itself. Runbook: the registry's log lines {w.log}_broken say why (error) and {w.log}_resumed "
                f"when it is back; {where}; docs/observability.md#alerting-rules.",
            },
        },
    ]


def rules(slos: list[Slo]) -> dict:
    """The rules file as a dict: a group of recording rules per SLI, one of SLO alerts, one of registry alerts."""
    groups = []
    for slo in slos:
        groups.append(
            {
                "name": f"fleetserve-slo-{slo.name}-sli",
                "rules": [{"record": slo.record(w), "expr": slo.ratio.replace("{w}", w)} for w in _windows()],
            }
        )
    alerts = []
    for slo in slos:
        for w in WINDOWS:
            threshold = round(w.factor * slo.budget, 10)
            alerts.append(
                {
                    "alert": slo.alert,
                    "expr": f"{slo.record(w.long)} > {threshold:g}\nand\n{slo.record(w.short)} > {threshold:g}",
                    "labels": {
                        "severity": w.severity,
                        "slo": slo.name,
                        "long_window": w.long,
                        "short_window": w.short,
                    },
                    "annotations": {
                        # No $value: the bad ratio is on the SLI's recording rule, and static text keeps the
                        # rules' unit tests exact.
                        "summary": f"{{{{ $labels.model_name }}}}: {slo.name} error budget burning over "
                        f"{w.factor:g}x too fast in the last {w.long} and {w.short} "
                        f"(more than {threshold * 100:g}% bad, {slo.budget * 100:g}% allowed)",
                        "description": f"SLO: {slo.description}. At {w.factor:g}x the budget of a 30-day window "
                        f"is gone in {30 / w.factor:.1f} days.",
                    },
                }
            )
    groups.append({"name": "fleetserve-slo-alerts", "rules": alerts})
    groups.append({"name": "fleetserve-registry-alerts", "rules": registry_alerts()})
    return {"groups": groups}


class _Literal(str):
    """A multi-line string dumped as a YAML block (readable PromQL)."""


def _literal(dumper: yaml.Dumper, data: _Literal):
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")


def render(slos: list[Slo]) -> str:
    doc = rules(slos)
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule["expr"] = _Literal(rule["expr"]) if "\n" in rule["expr"] else rule["expr"]
    dumper = type("_Dumper", (yaml.SafeDumper,), {})
    dumper.add_representer(_Literal, _literal)
    header = (
        "# Generated by `python -m infra.prometheus.rules` (edit the objectives there, not here).\n"
        "# Check: promtool check rules infra/prometheus/fleetserve-alerts.yml\n"
        "#        promtool test rules infra/prometheus/fleetserve-alerts.test.yml\n"
    )
    return header + yaml.dump(doc, Dumper=dumper, sort_keys=False, width=120)


def slos_from(args) -> list[Slo]:
    for seconds, buckets, flag in (
        (args.ttft_seconds, prom.TTFT_BUCKETS, "--ttft-seconds"),
        (args.tpot_seconds, prom.TPOT_BUCKETS, "--tpot-seconds"),
    ):
        if seconds not in buckets:
            raise SystemExit(f"{flag} must be a histogram bucket boundary: one of {list(buckets)}")
    for value in (args.availability, args.ttft_objective, args.tpot_objective):
        if not 0 < value < 1:
            raise SystemExit("objectives are fractions between 0 and 1, e.g. 0.999")
    return [
        availability(args.availability),
        ttft(args.ttft_seconds, args.ttft_objective),
        tpot(args.tpot_seconds, args.tpot_objective),
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m infra.prometheus.rules", description=__doc__.split("\n")[0])
    p.add_argument("--availability", type=float, default=0.999, help="availability objective (0.999)")
    p.add_argument("--ttft-seconds", type=float, default=2.0, help="TTFT threshold, a bucket bound (2.0)")
    p.add_argument("--ttft-objective", type=float, default=0.99, help="fraction under it (0.99)")
    p.add_argument("--tpot-seconds", type=float, default=0.1, help="TPOT threshold, a bucket bound (0.1)")
    p.add_argument("--tpot-objective", type=float, default=0.99, help="fraction under it (0.99)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where to write ('-': stdout)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    text = render(slos_from(args))
    if args.out == "-":
        sys.stdout.write(text)
    else:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
