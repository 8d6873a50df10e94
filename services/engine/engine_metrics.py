"""An engine replica's Prometheus series under vLLM's own names and labels (`vllm:...`, model_name and engine),
so dashboards and alerts written for vLLM servers work on the fleet's engines, sim or vLLM alike."""

from __future__ import annotations

from collections.abc import Iterable

from fleetserve.common.v1 import common_pb2
from prometheus_client import multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import CollectorRegistry

from services.engine.backend import EngineBackend
from services.engine.load_board import LoadBoard
from shared import prom

LABELS = ("model_name", "engine")
# vLLM's `engine` label numbers the engine cores behind one server; a fleet worker drives exactly one.
ENGINE_INDEX = "0"
# vLLM's finished_reason label values (str(vllm.v1.engine.FinishReason)).
_FINISHED = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
}


def vllm_metrics_registered(registry: CollectorRegistry) -> bool:
    """Whether vLLM's own Prometheus stat logger has put its `vllm:` series on this registry (AsyncLLM does in
    the worker's process when its stats are on): then they are served as they are, and not imitated."""
    return any(m.name.startswith("vllm:") for m in registry.collect())


class EngineMetrics:
    """Per-request histograms and counters, recorded once when a request ends, and the load gauges and
    running totals, read from the backend when Prometheus scrapes (nothing per token or per step)."""

    def __init__(self, registry: CollectorRegistry, backend: EngineBackend, model: str) -> None:
        self.backend = backend
        self.labels = (model, ENGINE_INDEX)
        self.ttft = prom.histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds (from the Generate call to its first chunk).",
            LABELS,
            registry,
            prom.TTFT_BUCKETS,
        ).labels(*self.labels)
        self.tpot = prom.histogram(
            "vllm:request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request.",
            LABELS,
            registry,
            prom.TPOT_BUCKETS,
        ).labels(*self.labels)
        self.e2e = prom.histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds (requests that finished by stop or length).",
            LABELS,
            registry,
            prom.REQUEST_LATENCY_BUCKETS,
        ).labels(*self.labels)
        self.prompt_tokens = prom.counter(
            "vllm:prompt_tokens", "Number of prefill tokens processed.", LABELS, registry
        ).labels(*self.labels)
        self.success = prom.counter(
            "vllm:request_success",
            "Count of successfully processed requests.",
            (*LABELS, "finished_reason"),
            registry,
        )
        registry.register(prom.LoopCollector(self._load_families))

    def finished(
        self,
        *,
        finish_reason: int | None,
        aborted: bool,
        e2e_s: float,
        ttft_s: float | None,
        prompt_tokens: int,
        output_tokens: int,
    ) -> None:
        """Record one request that ended: finish_reason from its last output (None when it had none), aborted
        when it was cut short (caller gone, deadline) after it was admitted."""
        reason = _FINISHED.get(finish_reason) if finish_reason is not None else ("abort" if aborted else None)
        if reason is None:
            return  # refused before it ran: not a processed request
        self.success.labels(*self.labels, reason).inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
            if output_tokens >= 2:
                self.tpot.observe(max(0.0, e2e_s - ttft_s) / (output_tokens - 1))
        if reason in ("stop", "length"):
            self.e2e.observe(e2e_s)
            self.prompt_tokens.inc(prompt_tokens)

    def _load_families(self) -> Iterable[Metric]:
        load = self.backend.load()
        kv = load.kv_blocks_used / load.kv_blocks_total if load.kv_blocks_total else 0.0
        return load_families(
            self.labels,
            running=load.running,
            waiting=load.waiting,
            kv_usage=kv,
            queried_tokens=load.prefix_cache_queried_tokens,
            hit_tokens=load.prefix_cache_hit_tokens,
            output_tokens=self.backend.counters.output_tokens,
        )


def load_families(
    labels: tuple[str, str],
    *,
    running: int,
    waiting: int,
    kv_usage: float,
    queried_tokens: int,
    hit_tokens: int,
    output_tokens: int,
) -> list[Metric]:
    """vLLM's load gauges and running totals of one replica, as Prometheus families."""

    def family(cls, name: str, doc: str, value: float) -> Metric:
        f = cls(name, doc, labels=LABELS)
        f.add_metric(list(labels), value)
        return f

    return [
        family(
            GaugeMetricFamily,
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            running,
        ),
        family(
            GaugeMetricFamily,
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            waiting,
        ),
        family(
            GaugeMetricFamily,
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            kv_usage,
        ),
        family(
            CounterMetricFamily,
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            queried_tokens,
        ),
        family(
            CounterMetricFamily,
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            hit_tokens,
        ),
        family(
            CounterMetricFamily,
            "vllm:generation_tokens",
            "Number of generation tokens processed.",
            output_tokens,
        ),
    ]


class ReplicaCollector:
    """The one /metrics of a replica split over front-end processes, served by their supervisor: every front
    end's series merged from prometheus-client's multiprocess directory (counters and histograms add up), and
    the load families read from the replica's shared load board, which a front end computes only when scraped
    and so cannot leave in the directory. Where the front ends' own series already have a family (vLLM's
    native stat logger records its gauges as it goes), the board's is left out: one series per name."""

    def __init__(self, multiprocess_dir: str, board: LoadBoard, model: str) -> None:
        self._merged = CollectorRegistry()
        multiprocess.MultiProcessCollector(self._merged, path=multiprocess_dir)
        self.board = board
        self.labels = (model, ENGINE_INDEX)

    def collect(self) -> Iterable[Metric]:
        merged = list(self._merged.collect())
        names = {m.name for m in merged}
        t = self.board.totals()
        # As the backend's load(): vLLM reports with each step, so after a burst its counts can be a step stale.
        running = min(t.running, t.live)
        board = load_families(
            self.labels,
            running=running,
            waiting=min(t.waiting, t.live - running),
            kv_usage=t.kv_usage,
            queried_tokens=t.queried_tokens,
            hit_tokens=t.hit_tokens,
            output_tokens=t.output_tokens,
        )
        return merged + [f for f in board if f.name not in names]
