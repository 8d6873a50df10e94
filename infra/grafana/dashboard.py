"""Writes infra/grafana/fleetserve.json, the fleet's Grafana dashboard on its Prometheus metrics:
`python -m infra.grafana.dashboard`. Import the JSON in Grafana (Dashboards -> New -> Import) and pick the
Prometheus data source that scrapes the fleet (`fleetserve prometheus-config`).

Generated rather than hand-written: every panel is the same few dozen lines of Grafana JSON around its PromQL,
so the queries below are the whole content, and they stay readable and reviewable."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_OUT = Path(__file__).with_name("fleetserve.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"
MODEL = 'model_name=~"$model"'
# gRPC codes that do not count against the fleet (infra/prometheus/rules.py, services/metrics/slo.py).
NOT_FLEET_ERRORS = (
    "OK|CANCELLED|INVALID_ARGUMENT|NOT_FOUND|PERMISSION_DENIED|RESOURCE_EXHAUSTED|UNAUTHENTICATED"
)
NOT_VALID = "CANCELLED|INVALID_ARGUMENT|NOT_FOUND|PERMISSION_DENIED|RESOURCE_EXHAUSTED|UNAUTHENTICATED"


def quantiles(metric: str, selector: str = MODEL) -> list[tuple[str, str]]:
    """p50/p95/p99 of a histogram and its mean, drawn side by side (the mean hides the tail)."""
    out = [
        (
            f"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{int(q * 100)}",
        )
        for q in (0.5, 0.95, 0.99)
    ]
    out.append(
        (
            f"sum(rate({metric}_sum{{{selector}}}[{RATE}]))\n/\nsum(rate({metric}_count{{{selector}}}[{RATE}]))",
            "mean",
        )
    )
    return out


@dataclass
class Panel:
    """One time-series panel: a title, what it shows, its queries (expr, legend) and its unit."""

    title: str
    description: str
    targets: list[tuple[str, str]]
    unit: str = "short"
    width: int = 12
    stack: bool = False
    extra: dict = field(default_factory=dict)


ROWS: list[tuple[str, list[Panel]]] = [
    (
        "Latency as clients see it (gateway)",
        [
            Panel(
                "TTFT: p50 / p95 / p99 and mean",
                "Time to first token from the request's arrival at the gateway (fleetserve:time_to_first_token_"
                "seconds). The mean is drawn beside the percentiles: it hides the tail.",
                quantiles("fleetserve:time_to_first_token_seconds"),
                "s",
                8,
            ),
            Panel(
                "TPOT: p50 / p95 / p99 and mean",
                "Per request, (end - first token) / (output tokens - 1) "
                "(fleetserve:request_time_per_output_token_seconds).",
                quantiles("fleetserve:request_time_per_output_token_seconds"),
                "s",
                8,
            ),
            Panel(
                "End-to-end latency: p50 / p95 / p99 and mean",
                "Arrival to end of stream, requests that finished OK (fleetserve:e2e_request_latency_seconds).",
                quantiles("fleetserve:e2e_request_latency_seconds"),
                "s",
                8,
            ),
        ],
    ),
    (
        "Traffic and errors",
        [
            Panel(
                "Throughput",
                "Requests per second and tokens per second (prompt, generated) through the gateways.",
                [
                    (f"sum(rate(fleetserve:requests_total{{{MODEL}}}[{RATE}]))", "requests/s"),
                    (f"sum(rate(fleetserve:generation_tokens_total{{{MODEL}}}[{RATE}]))", "output tokens/s"),
                    (f"sum(rate(fleetserve:prompt_tokens_total{{{MODEL}}}[{RATE}]))", "prompt tokens/s"),
                    (
                        f"sum(rate(fleetserve:prompt_tokens_cached_total{{{MODEL}}}[{RATE}]))",
                        "prompt tokens from cache/s",
                    ),
                ],
                "short",
                8,
            ),
            Panel(
                "Requests by status",
                "Requests per second by final gRPC status code (HTTP requests by the code they map from).",
                [(f"sum by (code) (rate(fleetserve:requests_total{{{MODEL}}}[{RATE}]))", "{{code}}")],
                "reqps",
                8,
                stack=True,
            ),
            Panel(
                "Fleet error rate",
                "Fleet errors (UNAVAILABLE, INTERNAL, DEADLINE_EXCEEDED, ...) over the requests the fleet had to "
                "serve (OK or a fleet error): the availability SLI. Client errors and backpressure excluded.",
                [
                    (
                        f'(sum by (model_name) (rate(fleetserve:requests_total{{code!~"{NOT_FLEET_ERRORS}", {MODEL}}}'
                        f"[{RATE}])) or sum by (model_name) (rate(fleetserve:requests_total"
                        f'{{code="OK", {MODEL}}}[{RATE}])) * 0)\n/\n'
                        f'sum by (model_name) (rate(fleetserve:requests_total{{code!~"{NOT_VALID}", {MODEL}}}'
                        f"[{RATE}]))",
                        "{{model_name}}",
                    )
                ],
                "percentunit",
                8,
            ),
        ],
    ),
    (
        "Engines (vLLM's metric names)",
        [
            Panel(
                "Running and waiting per replica",
                "Requests in the engine's batch (vllm:num_requests_running) and queued (vllm:num_requests_waiting)"
                ", and requests open at the gateways (fleetserve:num_requests_running).",
                [
                    (f"sum by (replica) (vllm:num_requests_running{{{MODEL}}})", "{{replica}} running"),
                    (f"sum by (replica) (vllm:num_requests_waiting{{{MODEL}}})", "{{replica}} waiting"),
                    (f"sum(fleetserve:num_requests_running{{{MODEL}}})", "gateway in flight"),
                ],
                "short",
                8,
            ),
            Panel(
                "KV-cache usage per replica",
                "Fraction of the engine's KV blocks in use (vllm:kv_cache_usage_perc).",
                [(f"max by (replica) (vllm:kv_cache_usage_perc{{{MODEL}}})", "{{replica}}")],
                "percentunit",
                8,
                extra={"max": 1, "min": 0},
            ),
            Panel(
                "Prefix-cache hit rate per replica",
                "Prompt tokens found in the prefix cache over prompt tokens looked up "
                "(vllm:prefix_cache_hits / vllm:prefix_cache_queries).",
                [
                    (
                        f"sum by (replica) (rate(vllm:prefix_cache_hits_total{{{MODEL}}}[{RATE}]))\n/\n"
                        f"sum by (replica) (rate(vllm:prefix_cache_queries_total{{{MODEL}}}[{RATE}]))",
                        "{{replica}}",
                    )
                ],
                "percentunit",
                8,
                extra={"max": 1, "min": 0},
            ),
            Panel(
                "Engine TTFT p99 per replica",
                "Time to first token inside each engine (vllm:time_to_first_token_seconds): compare with the "
                "gateway's to see what the mesh adds.",
                [
                    (
                        f"histogram_quantile(0.99, sum by (le, replica) "
                        f"(rate(vllm:time_to_first_token_seconds_bucket{{{MODEL}}}[{RATE}])))",
                        "{{replica}}",
                    )
                ],
                "s",
                12,
            ),
            Panel(
                "Engine output tokens/s per replica",
                "Generated tokens per second of each engine (vllm:generation_tokens).",
                [
                    (
                        f"sum by (replica) (rate(vllm:generation_tokens_total{{{MODEL}}}[{RATE}]))",
                        "{{replica}}",
                    )
                ],
                "short",
                12,
            ),
        ],
    ),
    (
        "Resilience (router)",
        [
            Panel(
                "Circuit breakers",
                "Per replica, the worst state any router holds: 0 closed, 1 half-open, 2 open "
                "(fleetserve:router_breaker_state).",
                [("max by (replica) (fleetserve:router_breaker_state)", "{{replica}}")],
                "short",
                8,
                extra={"max": 2, "min": 0},
            ),
            Panel(
                "Retries and mid-stream resumes",
                "Further attempts after a failed one: retries before the first token, resumes after it "
                "(fleetserve:router_retries), and retries the retry budget refused.",
                [
                    (f"sum by (kind) (rate(fleetserve:router_retries_total{{{MODEL}}}[{RATE}]))", "{{kind}}"),
                    (
                        f"sum(rate(fleetserve:router_retries_throttled_total{{{MODEL}}}[{RATE}]))",
                        "throttled by the retry budget",
                    ),
                ],
                "reqps",
                8,
            ),
            Panel(
                "Attempts by outcome",
                "Engine calls the routers made: ok, fault (the replica's), backpressure, client error.",
                [
                    (
                        f"sum by (outcome) (rate(fleetserve:router_attempts_total{{{MODEL}}}[{RATE}]))",
                        "{{outcome}}",
                    )
                ],
                "reqps",
                8,
                stack=True,
            ),
            Panel(
                "Shed, limited and degraded",
                "Requests refused by load shedding (by tier), by tenant limits (by limit), and served degraded.",
                [
                    (
                        f"sum by (tier) (rate(fleetserve:shed_requests_total{{{MODEL}}}[{RATE}]))",
                        "shed {{tier}}",
                    ),
                    (
                        f"sum by (limit) (rate(fleetserve:limited_requests_total{{{MODEL}}}[{RATE}]))",
                        "{{limit}}",
                    ),
                    (f"sum(rate(fleetserve:degraded_requests_total{{{MODEL}}}[{RATE}]))", "degraded"),
                ],
                "reqps",
                12,
            ),
            Panel(
                "Router admission queue",
                "Requests waiting in the routers' admission queues by tier (fleetserve:router_queue_waiting) and "
                "the p99 of the wait (fleetserve:router_queue_time_seconds).",
                [
                    (f"sum by (tier) (fleetserve:router_queue_waiting{{{MODEL}}})", "waiting {{tier}}"),
                    (
                        f"histogram_quantile(0.99, sum by (le) "
                        f"(rate(fleetserve:router_queue_time_seconds_bucket{{{MODEL}}}[{RATE}])))",
                        "wait p99 (s)",
                    ),
                ],
                "short",
                12,
            ),
        ],
    ),
    (
        "Capacity and SLOs",
        [
            Panel(
                "Replicas: desired vs actual",
                "What the autoscaler wants (fleetserve:autoscaler_desired_replicas) against the replicas "
                "registered and serving (fleetserve:registry_replicas).",
                [
                    (
                        f"sum by (model_name) (fleetserve:autoscaler_desired_replicas{{{MODEL}}})",
                        "{{model_name}} desired",
                    ),
                    (
                        f'sum by (model_name) (fleetserve:registry_replicas{{state="serving", {MODEL}}})',
                        "{{model_name}} serving",
                    ),
                    (
                        f'sum by (model_name) (fleetserve:registry_replicas{{state="draining", {MODEL}}})',
                        "{{model_name}} draining",
                    ),
                ],
                "short",
                12,
            ),
            Panel(
                "CPU by service",
                "Cores each service uses (process_cpu_seconds_total, summed over a service's worker processes) and "
                "its busiest worker's share of one core (fleetserve:worker_cpu_busy_ratio, services run with "
                "--workers N): a tier whose workers sit near 1 needs more of them.",
                [
                    (f"sum by (service) (rate(process_cpu_seconds_total[{RATE}]))", "{{service}} cores"),
                    ("max by (service) (fleetserve:worker_cpu_busy_ratio)", "{{service}} busiest worker"),
                ],
                "short",
                12,
            ),
            Panel(
                "Error budget burn rate (1h)",
                "Bad fraction over the last hour divided by the budget (infra/prometheus/fleetserve-alerts.yml "
                "recording rules): 1 spends the budget exactly over 30 days; 14.4 pages.",
                [
                    (
                        f"model_name:fleetserve_slo_availability_bad:ratio_rate1h{{{MODEL}}} / 0.001",
                        "{{model_name}} availability",
                    ),
                    (
                        f"model_name:fleetserve_slo_ttft_bad:ratio_rate1h{{{MODEL}}} / 0.01",
                        "{{model_name}} TTFT",
                    ),
                    (
                        f"model_name:fleetserve_slo_tpot_bad:ratio_rate1h{{{MODEL}}} / 0.01",
                        "{{model_name}} TPOT",
                    ),
                ],
                "short",
                12,
            ),
        ],
    ),
]


def _panel(p: Panel, pid: int, x: int, y: int) -> dict:
    defaults: dict = {
        "unit": p.unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10 if p.stack else 0,
            "stacking": {"mode": "normal" if p.stack else "none", "group": "A"},
            "showPoints": "never",
            "spanNulls": False,
        },
        **p.extra,
    }
    return {
        "id": pid,
        "type": "timeseries",
        "title": p.title,
        "description": p.description,
        "datasource": DS,
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
            for i, (expr, legend) in enumerate(p.targets)
        ],
    }


def dashboard() -> dict:
    panels: list[dict] = []
    pid, y = 1, 0
    for title, row in ROWS:
        panels.append(
            {
                "id": pid,
                "type": "row",
                "title": title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        pid, y, x = pid + 1, y + 1, 0
        for p in row:
            if x + p.width > 24:
                x, y = 0, y + 8
            panels.append(_panel(p, pid, x, y))
            pid, x = pid + 1, x + p.width
        y += 8
    return {
        "__inputs": [
            {
                "name": "DS_PROMETHEUS",
                "label": "Prometheus",
                "description": "The Prometheus that scrapes the fleet",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            {"type": "panel", "id": "timeseries", "name": "Time series", "version": ""},
        ],
        "uid": "fleetserve-overview",
        "title": "fleetserve",
        "description": "The fleet's latency (p50/p95/p99 beside the mean), traffic, errors, engines, resilience "
        "and capacity, from its Prometheus metrics (docs/observability.md).",
        "tags": ["fleetserve", "llm", "vllm"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "schemaVersion": 39,
        "version": 1,
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {"selected": False, "text": "${DS_PROMETHEUS}", "value": "${DS_PROMETHEUS}"},
                    "hide": 0,
                },
                {
                    "name": "model",
                    "label": "Model",
                    "type": "query",
                    "datasource": DS,
                    "definition": "label_values(fleetserve:requests_total, model_name)",
                    "query": {
                        "query": "label_values(fleetserve:requests_total, model_name)",
                        "refId": "models",
                    },
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m infra.grafana.dashboard", description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT), help="where to write ('-': stdout)")
    args = p.parse_args(argv)
    if args.out == "-":
        sys.stdout.write(render())
    else:
        Path(args.out).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
