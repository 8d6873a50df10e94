"""The Grafana dashboard: generated from infra/grafana/dashboard.py, importable JSON (a data-source input, unique
panel ids, panels on a 24-column grid), and the panels the operators asked for. That every query runs in a real
Prometheus against the fleet's real metric names is checked in tests/integration/test_prometheus.py."""

from __future__ import annotations

import json

from infra.grafana import dashboard


def _doc() -> dict:
    return json.loads(dashboard.DEFAULT_OUT.read_text())


def test_committed_dashboard_is_what_the_generator_writes():
    """infra/grafana/fleetserve.json is the generator's output."""
    assert dashboard.DEFAULT_OUT.read_text() == dashboard.render()


def test_dashboard_is_importable():
    """Grafana's import needs a data-source input, unique ids and every panel inside the 24-column grid."""
    doc = _doc()
    assert [i["pluginId"] for i in doc["__inputs"]] == ["prometheus"]
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for p in doc["panels"]:
        pos = p["gridPos"]
        assert pos["x"] + pos["w"] <= 24
        for t in p.get("targets", []):
            assert t["expr"] and t["refId"] and t["datasource"]["uid"] == "${datasource}"


def test_panels_cover_what_operators_look_at():
    """TTFT and TPOT with p50/p95/p99 and the mean; throughput; errors by status; running/waiting; KV use per
    replica; prefix hits; breakers; retries and resumes; shed and limited; desired vs actual replicas; CPU by service."""
    exprs = " ".join(t["expr"] for p in _doc()["panels"] for t in p.get("targets", []))
    for needle in (
        "histogram_quantile(0.99, sum by (le) (rate(fleetserve:time_to_first_token_seconds_bucket",
        "histogram_quantile(0.5, sum by (le) (rate(fleetserve:request_time_per_output_token_seconds_bucket",
        "rate(fleetserve:time_to_first_token_seconds_sum",
        "sum by (code) (rate(fleetserve:requests_total",
        "fleetserve:generation_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "max by (replica) (vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_hits_total",
        "fleetserve:router_breaker_state",
        "sum by (kind) (rate(fleetserve:router_retries_total",
        "fleetserve:shed_requests_total",
        "fleetserve:limited_requests_total",
        "fleetserve:autoscaler_desired_replicas",
        'fleetserve:registry_replicas{state="serving"',
        "sum by (service) (rate(process_cpu_seconds_total",
        "max by (service) (fleetserve:worker_cpu_busy_ratio)",
    ):
        assert needle in exprs, needle
