"""Prometheus exposition: bucket layouts, instrument helpers, the /metrics HTTP server every service runs, and
prometheus-client's multiprocess mode for services split over several worker processes."""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import shutil
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import prometheus_client as pc
import structlog
from prometheus_client import multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

log = structlog.get_logger(__name__)

# `_created` series double every counter and histogram for a timestamp nobody graphs (vLLM turns them off too).
pc.disable_created_metrics()

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Buckets: every boundary of vLLM's own histogram (vllm/v1/metrics/loggers.py) so that dashboards and
# quantiles compare with a vLLM server's, plus finer ones where fleet latencies and SLO thresholds sit (vLLM's
# jump from 0.1 s to 0.25 s to 0.5 s is too coarse for a TTFT SLO of 200 or 300 ms).
TTFT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.15, 0.2, 0.25,
    0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
# vLLM's inter-token buckets start at 10 ms; a decode step on an H100 takes 2-7 ms.
TPOT_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
# vLLM's request-latency buckets start at 0.3 s; short completions and queue waits end well before that.
REQUEST_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
    40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip


def new_registry() -> CollectorRegistry:
    """A registry of one service instance's own instruments (several instances may share a test process)."""
    return CollectorRegistry(auto_describe=True)


def counter(name: str, doc: str, labels: Iterable[str] = (), registry: CollectorRegistry | None = None):
    """A counter (exposed as name_total). Without a registry it goes on prometheus-client's default one,
    which every service's /metrics serves; asking again for the same name there returns the same counter."""
    return _instrument(pc.Counter, name, doc, labels, registry)


def gauge(
    name: str,
    doc: str,
    labels: Iterable[str] = (),
    registry: CollectorRegistry | None = None,
    multiprocess_mode: str = "livesum",
):
    """A gauge; multiprocess_mode says how worker processes' values combine (livesum, livemax, ...)."""
    return _instrument(pc.Gauge, name, doc, labels, registry, multiprocess_mode=multiprocess_mode)


def histogram(
    name: str,
    doc: str,
    labels: Iterable[str] = (),
    registry: CollectorRegistry | None = None,
    buckets: Iterable[float] = REQUEST_LATENCY_BUCKETS,
):
    """A histogram with the given bucket upper bounds (+Inf is added)."""
    return _instrument(pc.Histogram, name, doc, labels, registry, buckets=tuple(buckets))


_shared: dict[str, tuple[type, tuple[str, ...], object]] = {}
_shared_lock = threading.Lock()


def _instrument(cls, name, doc, labels, registry, **kwargs):
    labels = tuple(labels)
    if registry is not None:
        return cls(name, doc, labels, registry=registry, **kwargs)
    # Module-level instruments on the default registry may be declared by code imported more than once in a
    # test process (reloads, two services in one process): the second declaration gets the first instrument.
    with _shared_lock:
        found = _shared.get(name)
        if found is None:
            found = _shared[name] = (cls, labels, cls(name, doc, labels, **kwargs))
        elif found[:2] != (cls, labels):
            raise ValueError(f"metric {name} is already declared with another type or labels")
        return found[2]


# -- serving /metrics ---------------------------------------------------------------------------------


class _Combined:
    """Collects several collectors as one (the process-wide default registry plus one service's own)."""

    def __init__(self, parts: Iterable[Collector]) -> None:
        self.parts = tuple(parts)

    def collect(self):
        for part in self.parts:
            yield from part.collect()

    def restricted_registry(self, names: Iterable[str]) -> _Combined:
        """Only the families with one of these sample names (a scrape's ?name[]=... filter)."""
        wanted = set(names)
        return _Combined([_Filtered(self, wanted)])


class _Filtered:
    def __init__(self, inner: Collector, names: set[str]) -> None:
        self.inner, self.names = inner, names

    def collect(self):
        for family in self.inner.collect():
            samples = [s for s in family.samples if s.name in self.names]
            if samples:
                kept = Metric(family.name, family.documentation, family.type, family.unit)
                kept.samples = samples
                yield kept


@dataclass
class MetricsServer:
    """A running /metrics endpoint (prometheus-client's WSGI server on a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread
    host: str

    @property
    def port(self) -> int:
        return self.server.server_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving and close the socket (Prometheus sees the target down at its next scrape)."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def exposed(
    registries: Iterable[Collector | None] = (),
    multiprocess_dir: str | None = None,
    include_default: bool = True,
) -> Collector:
    """What a service's /metrics serves: the default registry (unless include_default is false) and the given
    registries of the service's own; in multiprocess mode, every worker's instruments merged from the shared
    directory instead (where each process's instruments, whatever registry they are on, keep their values;
    collectors that compute values at scrape time cannot be merged across processes, so services run as
    workers record as they go)."""
    if multiprocess_dir:
        merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(merged, path=multiprocess_dir)
        return merged
    default = [pc.REGISTRY] if include_default else []
    return _Combined([*default, *(r for r in registries if r is not None)])


# How often the server's thread looks for stop(), which waits for it: socketserver's default 0.5 s held every
# service's exit for 0.3 s on average (measured), in its event loop, and a fleet that stops tier after tier for
# ~1.5 s. At 0.1 s an idle server's thread costs ~0.6 ms of CPU a second (0.1 ms at 0.5 s; measured).
STOP_POLL_S = 0.1


def start_metrics_server(
    host: str,
    port: int,
    registries: Iterable[Collector | None] = (),
    multiprocess_dir: str | None = None,
    include_default: bool = True,
) -> MetricsServer | None:
    """Serve Prometheus text on http://host:port/metrics from a thread (scrapes are answered even while the
    event loop is busy); port 0 picks a free port, a negative port serves nothing (None)."""
    if port < 0:
        return None
    collector = exposed(registries, multiprocess_dir, include_default)
    # Uncompressed: a scrape is ~10-20 KB, and gzip would add ~30% to its CPU cost in the service.
    app = _text_format_only(pc.make_wsgi_app(collector, disable_compression=True))
    # One scrape at a time on the server's own thread (Prometheus scrapes a target serially): a thread per
    # request, as prometheus-client's own server starts, cost ~0.6 ms more CPU per scrape (measured).
    server_cls = _Server6 if ":" in host else _Server
    server = make_server(host, port, app, server_cls, handler_class=_QuietHandler)
    # A thread rather than the event loop: scrapes are answered while the loop is busy, and rendering never
    # adds an await point to the services' loops.
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": STOP_POLL_S}, name="metrics-http", daemon=True
    )
    thread.start()
    return MetricsServer(server, thread, host)


def _text_format_only(app):
    """The WSGI app answering in Prometheus's text format whatever the scraper accepts. prometheus-client's
    OpenMetrics encoder writes a name with a colon (vllm:num_requests_running) as vllm_num_requests_running
    in the samples but not in # HELP / # TYPE (prometheus/client_python#1177), and Prometheus asks for
    OpenMetrics first; the text format keeps vLLM's names as they are."""

    def text_only(environ, start_response):
        environ.pop("HTTP_ACCEPT", None)
        return app(environ, start_response)

    return text_only


class _Server(WSGIServer):
    """wsgiref's server, reporting a failed scrape (a client that timed out or went away) as one log line
    instead of socketserver's traceback on stderr."""

    def handle_error(self, request, client_address) -> None:
        log.info("metrics.scrape_failed", client=f"{client_address[0]}:{client_address[1]}", exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    """No access log line per scrape on stderr (the services' logs are JSON lines); a client that connects and
    sends nothing is dropped after `timeout` seconds instead of holding the one server thread."""

    timeout = 10

    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


# -- several worker processes per service ----------------------------------------------------------------


def prepare_multiprocess(path: str | os.PathLike) -> str:
    """Make `path` an empty directory and point PROMETHEUS_MULTIPROC_DIR at it, so worker processes started
    afterwards (which inherit the environment) write their instruments there. Call it in the supervising
    process before any worker starts, and before a worker imports prometheus_client: the library picks its
    value storage once, at import."""
    p = Path(path)
    shutil.rmtree(p, ignore_errors=True)
    p.mkdir(parents=True)
    os.environ[MULTIPROC_ENV] = str(p)
    return str(p)


def multiprocess_dir() -> str | None:
    """The shared directory of this service's worker processes, when it runs several (else None)."""
    return os.environ.get(MULTIPROC_ENV) or None


def worker_exited(pid: int) -> None:
    """Forget a dead worker's live gauges (its counters and histograms stay in the totals, as they should)."""
    path = multiprocess_dir()
    if path:
        multiprocess.mark_process_dead(pid, path)


# -- values computed at scrape time -------------------------------------------------------------------------


class LoopCollector:
    """Metric families computed when Prometheus scrapes, by a function that reads a service's live state. The
    scrape runs on the /metrics server's thread, while that state belongs to the service's event loop (dicts
    that change as requests come and go), so the function runs on the loop and the scrape waits for it (at
    most timeout_s; a loop that does not answer in time leaves these families out of that scrape). Construct it
    on the loop's thread."""

    def __init__(
        self,
        families: Callable[[], Iterable[Metric]],
        loop: asyncio.AbstractEventLoop | None = None,
        timeout_s: float = 2.0,
    ) -> None:
        self.families = families
        self.loop = loop or asyncio.get_running_loop()
        self.timeout_s = timeout_s
        self._loop_thread = threading.get_ident()

    def collect(self) -> Iterable[Metric]:
        if threading.get_ident() == self._loop_thread:
            return list(self.families())
        done: concurrent.futures.Future[list[Metric]] = concurrent.futures.Future()

        def run() -> None:
            if done.set_running_or_notify_cancel():
                try:
                    done.set_result(list(self.families()))
                except Exception as e:  # noqa: BLE001 - handed to the scrape's thread, which logs it
                    done.set_exception(e)

        try:
            self.loop.call_soon_threadsafe(run)
            return done.result(timeout=self.timeout_s)
        except RuntimeError:  # the loop is closed: the service is stopping
            return []
        except concurrent.futures.TimeoutError:
            done.cancel()
            log.warning("metrics.scrape_timeout", timeout_s=self.timeout_s)
            return []
