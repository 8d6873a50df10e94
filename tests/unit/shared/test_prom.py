"""shared/prom.py: the /metrics server, scrape-time values computed on the service's loop, and several worker
processes' instruments merged into one exposition (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from shared import prom


def _scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {
        s.name + str(sorted(s.labels.items())): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_server_serves_default_and_own_registries_on_a_free_port():
    """Port 0 binds a free port; /metrics has the process-wide registry and the service's own."""
    registry = prom.new_registry()
    c = prom.counter("fleetserve:test_requests", "doc", ["code"], registry)
    c.labels("OK").inc(3)
    server = prom.start_metrics_server("127.0.0.1", 0, [registry])
    try:
        assert server.port > 0
        samples = _scrape(server.address)
        assert samples["fleetserve:test_requests_total[('code', 'OK')]"] == 3
        assert not any(k.startswith("fleetserve:test_requests_created") for k in samples)
        assert any(k.startswith("process_cpu_seconds_total") for k in samples)  # the default registry
    finally:
        server.stop()
    with pytest.raises(OSError):
        _scrape(server.address)


def test_colon_names_survive_a_scraper_that_prefers_openmetrics():
    """Prometheus asks for OpenMetrics first; the answer is the text format, with vLLM-style names intact
    (prometheus-client's OpenMetrics encoder would write vllm_x in samples, vllm:x in # TYPE)."""
    registry = prom.new_registry()
    prom.gauge("vllm:test_colon_gauge", "doc", (), registry).set(2)
    server = prom.start_metrics_server("127.0.0.1", 0, [registry])
    try:
        req = urllib.request.Request(
            f"http://{server.address}/metrics",
            headers={"Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read().decode()
            assert r.headers["Content-Type"].startswith("text/plain")
        assert "\nvllm:test_colon_gauge 2.0\n" in body
    finally:
        server.stop()


def test_name_filter_of_a_scrape():
    """?name[]=... (prometheus-client's filter) returns only those series."""
    registry = prom.new_registry()
    prom.gauge("fleetserve:test_keep", "doc", (), registry).set(1)
    prom.gauge("fleetserve:test_drop", "doc", (), registry).set(2)
    server = prom.start_metrics_server("127.0.0.1", 0, [registry])
    try:
        with urllib.request.urlopen(
            f"http://{server.address}/metrics?name[]=fleetserve:test_keep", timeout=5
        ) as r:
            body = r.read().decode()
        assert "fleetserve:test_keep 1.0" in body and "test_drop" not in body and "process_" not in body
    finally:
        server.stop()


def test_a_silent_client_does_not_hold_the_endpoint(monkeypatch):
    """Scrapes are served one at a time; a connection that sends nothing is dropped after the handler's
    timeout, and the next scrape is answered."""
    import socket

    monkeypatch.setattr(prom._QuietHandler, "timeout", 0.5)
    server = prom.start_metrics_server("127.0.0.1", 0, [])
    try:
        with socket.create_connection(("127.0.0.1", server.port)):
            assert any(k.startswith("process_cpu_seconds_total") for k in _scrape(server.address))
    finally:
        server.stop()


def test_negative_port_serves_nothing():
    """--metrics-port -1 turns the endpoint off."""
    assert prom.start_metrics_server("127.0.0.1", -1, []) is None


def test_shared_instruments_are_declared_once():
    """Declaring a default-registry instrument twice gives the same one; other labels are an error."""
    a = prom.gauge("fleetserve:test_shared_gauge", "doc", ["model_name"])
    assert prom.gauge("fleetserve:test_shared_gauge", "doc", ["model_name"]) is a
    with pytest.raises(ValueError, match="another type or labels"):
        prom.gauge("fleetserve:test_shared_gauge", "doc", ["replica"])


async def test_loop_collector_reads_state_on_the_loop():
    """A scrape from another thread computes the families on the loop's thread."""
    seen: list[int] = []

    def families():
        seen.append(threading.get_ident())
        g = GaugeMetricFamily("fleetserve:test_loop_value", "doc")
        g.add_metric([], 7)
        return [g]

    collector = prom.LoopCollector(families)
    got = await asyncio.to_thread(lambda: list(collector.collect()))
    assert [m.samples[0].value for m in got] == [7]
    assert seen == [threading.get_ident()]


async def test_loop_collector_gives_up_on_a_blocked_loop():
    """A loop that does not answer within the timeout leaves the families out instead of hanging the scrape."""
    collector = prom.LoopCollector(
        lambda: [GaugeMetricFamily("fleetserve:test_never", "doc", value=1)], timeout_s=0.2
    )
    result: list = []
    t = threading.Thread(target=lambda: result.append(list(collector.collect())))
    t.start()
    time.sleep(0.6)  # noqa: ASYNC251 - blocks this loop on purpose, longer than the collector waits
    t.join(timeout=5)
    assert result == [[]]
    await asyncio.sleep(0)  # the late call runs now and finds the scrape gone


WORKER = textwrap.dedent(
    """
    import sys
    from shared import prom
    requests = prom.counter("fleetserve:mp_requests", "doc", ["code"])
    ttft = prom.histogram("fleetserve:mp_ttft_seconds", "doc", [], buckets=prom.TTFT_BUCKETS)
    running = prom.gauge("fleetserve:mp_running", "doc", [], multiprocess_mode="livesum")
    n = int(sys.argv[1])
    requests.labels("OK").inc(n)
    for _ in range(n):
        ttft.observe(0.012)
    running.inc(n)
    """
)


def test_worker_processes_merge_into_one_exposition(tmp_path):
    """Two workers writing to the multiprocess directory are served as one: counters and histogram buckets
    summed, live gauges summed until a worker is marked dead."""
    path = prom.prepare_multiprocess(tmp_path / "mp")
    try:
        env = {**os.environ, prom.MULTIPROC_ENV: path}
        pids = []
        for n in (2, 5):
            p = subprocess.run(
                [sys.executable, "-c", WORKER, str(n)], env=env, capture_output=True, timeout=60
            )
            assert p.returncode == 0, p.stderr
        pids = sorted(
            int(f.split("_")[-1].split(".")[0]) for f in os.listdir(path) if f.startswith("gauge_livesum")
        )
        server = prom.start_metrics_server("127.0.0.1", 0, [], multiprocess_dir=path)
        try:
            samples = _scrape(server.address)
            assert samples["fleetserve:mp_requests_total[('code', 'OK')]"] == 7
            assert samples["fleetserve:mp_ttft_seconds_bucket[('le', '0.015')]"] == 7
            assert samples["fleetserve:mp_ttft_seconds_bucket[('le', '0.01')]"] == 0
            assert samples["fleetserve:mp_ttft_seconds_count[]"] == 7
            assert samples["fleetserve:mp_running[]"] == 7
            prom.worker_exited(pids[0])
            samples = _scrape(server.address)
            assert samples["fleetserve:mp_running[]"] in (2, 5)  # one worker's share left
            assert samples["fleetserve:mp_requests_total[('code', 'OK')]"] == 7  # what it counted stays
        finally:
            server.stop()
    finally:
        os.environ.pop(prom.MULTIPROC_ENV, None)
