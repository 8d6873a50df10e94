"""The autoscaler's control loop: every interval, per model, read the signals (registry: replicas and their load
and cold starts; routers: admission queues; metrics service: arrival rate, TTFT p99, E2E time), decide, log
and export the decision with its reason, have the provisioner start or drain replicas, and report the state to
the registry (which stores it durably)."""

from __future__ import annotations

import asyncio
import time
from collections import deque

import grpc
import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as metrics_pb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc
from opentelemetry import metrics

from services.autoscaler.decider import Decider, Decision
from services.autoscaler.provisioner import DRAIN_QUIET_POLLS, Provisioner
from services.autoscaler.signals import ModelSignals
from services.autoscaler.spec import ModelSpec
from shared import prom

log = structlog.get_logger(__name__)

SERVING = reg_pb.REPLICA_STATE_SERVING
DRAINING = reg_pb.REPLICA_STATE_DRAINING

# Prometheus names agreed with the observability work (NOTES.md): KEDA and the dashboard read the first two.
DESIRED = prom.gauge(
    "fleetserve:autoscaler_desired_replicas", "Replicas the autoscaler wants.", ["model_name"]
)
ACTUAL = prom.gauge(
    "fleetserve:autoscaler_actual_replicas", "Replicas registered and SERVING.", ["model_name"]
)
STARTING = prom.gauge("fleetserve:autoscaler_starting_replicas", "Replicas cold starting.", ["model_name"])
DECISIONS = prom.counter(
    "fleetserve:autoscaler_decisions",
    "Decisions that changed the desired count, by policy, signal and direction.",
    ["model_name", "policy", "signal", "direction"],
)
COLD_STARTS = prom.histogram(
    "fleetserve:autoscaler_cold_start_seconds",
    "Measured cold starts: replica process start to first SERVING registration.",
    ["model_name"],
    buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)


class Autoscaler:
    """One control loop over every configured model."""

    def __init__(
        self,
        specs: list[ModelSpec],
        provisioner: Provisioner,
        registry: grpc.aio.Channel,
        routers: list[grpc.aio.Channel],
        metrics_channel: grpc.aio.Channel | None,
        meter: metrics.Meter,
        *,
        window_s: float = 30.0,
        drain_timeout_s: float = 60.0,
        decisions_kept: int = 10,
        rpc_timeout_s: float = 3.0,
    ) -> None:
        self.specs = {s.model: s for s in specs}
        self.deciders = {s.model: Decider(s) for s in specs}
        self.provisioner = provisioner
        self.registry = reg_grpc.RegistryServiceStub(registry)
        self.routers = [router_grpc.RouterServiceStub(c) for c in routers]
        self.metrics = metrics_grpc.MetricsServiceStub(metrics_channel) if metrics_channel else None
        self.window_s = window_s
        self.drain_timeout_s = drain_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.history: dict[str, deque[reg_pb.ScalingDecision]] = {
            m: deque(maxlen=decisions_kept) for m in self.specs
        }
        self.cold_starts: dict[str, deque[float]] = {m: deque(maxlen=20) for m in self.specs}
        self._measured: set[tuple[str, float]] = set()
        self.last: dict[str, reg_pb.ModelScaling] = {}
        self.ticks = 0
        self._decisions = meter.create_counter(
            "fleetserve.autoscaler.decisions",
            unit="{decision}",
            description="Decisions that changed the desired count, by model, policy, signal and direction.",
        )
        meter.create_observable_gauge(
            "fleetserve.autoscaler.desired_replicas",
            callbacks=[self._observe_desired],
            description="Replicas the autoscaler wants, by model.",
        )

    def _observe_desired(self, _options):
        for model, d in self.deciders.items():
            yield metrics.Observation(d.desired, {"fleetserve.model": model})

    # -- start ---------------------------------------------------------------------------------------

    async def restore(self) -> None:
        """Pick up the desired counts last reported to the registry (the autoscaler's durable state), so a
        restarted autoscaler neither starts from min_replicas nor forgets its recent decisions."""
        try:
            resp = await self.registry.GetScaling(reg_pb.GetScalingRequest(), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            log.warning("autoscaler.restore_failed", code=e.code().name, error=e.details())
            return
        for m in resp.models:
            if m.model in self.deciders:
                spec = self.specs[m.model]
                d = self.deciders[m.model]
                d.desired = min(spec.max_replicas, max(spec.min_replicas, m.desired))
                self.history[m.model].extend(m.decisions)
                self.cold_starts[m.model].extend(m.cold_starts_s)
                log.info("autoscaler.restored", model=m.model, desired=d.desired)

    # -- signals -------------------------------------------------------------------------------------

    async def _replicas(self, model: str) -> list[reg_pb.Replica]:
        resp = await self.registry.ListReplicas(
            reg_pb.ListReplicasRequest(model=model), timeout=self.rpc_timeout_s
        )
        return list(resp.replicas)

    async def _queued(self, model: str) -> int:
        total = 0
        for stub in self.routers:
            try:
                resp = await stub.GetStatus(router_pb.GetStatusRequest(), timeout=self.rpc_timeout_s)
            except grpc.aio.AioRpcError:
                continue  # a router away: the others (and the engines' queues) still count
            for q in resp.queues:
                if q.model == model:
                    total += q.interactive + q.standard + q.batch
        return total

    async def _latency(self, model: str) -> tuple[float, float, float]:
        """(arrival rate, TTFT p99 ms, mean E2E s) over the window, from the metrics service (zeros without)."""
        if self.metrics is None:
            return 0.0, 0.0, 0.0
        try:
            resp = await self.metrics.Query(
                metrics_pb.QueryRequest(model=model, window_s=self.window_s), timeout=self.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as e:
            log.info("autoscaler.metrics_unavailable", code=e.code().name)
            return 0.0, 0.0, 0.0
        for m in resp.models:
            if m.model == model:
                return m.requests / self.window_s, m.ttft_ms.p99, m.e2e_ms.mean / 1000.0
        return 0.0, 0.0, 0.0

    def _measure_cold_starts(self, model: str, replicas: list[reg_pb.Replica]) -> None:
        for r in replicas:
            key = (r.replica_id, r.started_unix)
            if r.started_unix and r.registered_unix and key not in self._measured:
                self._measured.add(key)
                took = r.registered_unix - r.started_unix
                if took >= 0:
                    self.cold_starts[model].append(took)
                    COLD_STARTS.labels(model).observe(took)
                    log.info(
                        "autoscaler.cold_start_measured",
                        model=model,
                        replica_id=r.replica_id,
                        cold_start_s=round(took, 3),
                    )

    async def signals(self, model: str, now: float) -> tuple[ModelSignals, list[reg_pb.Replica]]:
        replicas, queued, (rate, ttft_p99, e2e) = await asyncio.gather(
            self._replicas(model), self._queued(model), self._latency(model)
        )
        self._measure_cold_starts(model, replicas)
        serving = [r for r in replicas if r.state == SERVING]
        registered = {r.replica_id for r in replicas}
        starting = [
            o for o in self.provisioner.owned(model) if not o.draining and o.replica_id not in registered
        ]
        kv = [r.load.kv_blocks_used / r.load.kv_blocks_total for r in serving if r.load.kv_blocks_total]
        s = ModelSignals(
            now=now,
            wall_unix=now,
            serving=len(serving),
            starting=len(starting),
            running=sum(r.load.running for r in serving),
            waiting=sum(r.load.waiting for r in serving),
            queued=queued,
            kv_usage=max(kv, default=0.0),
            output_tokens_per_s=sum(r.load.output_tokens_per_s for r in serving),
            arrival_rate=rate,
            mean_e2e_s=e2e,
            ttft_p99_ms=ttft_p99,
            cold_starts_s=tuple(self.cold_starts[model]),
        )
        return s, replicas

    # -- acting --------------------------------------------------------------------------------------

    async def drain(self, replica_id: str) -> None:
        """Take a replica out of the routable set (registry DRAINING: routers stop choosing it), then wait until
        it reports nothing running or waiting for a few heartbeats in a row, bounded by drain_timeout_s."""
        await self.registry.DeregisterReplica(
            reg_pb.DeregisterReplicaRequest(replica_id=replica_id, drain=True), timeout=self.rpc_timeout_s
        )
        log.info("autoscaler.draining", replica_id=replica_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout_s
        quiet = 0
        last_beat = 0.0
        while loop.time() < deadline:
            resp = await self.registry.ListReplicas(reg_pb.ListReplicasRequest(), timeout=self.rpc_timeout_s)
            rep = next((r for r in resp.replicas if r.replica_id == replica_id), None)
            if rep is None:
                return
            if rep.last_heartbeat_unix != last_beat:  # a fresh load report
                last_beat = rep.last_heartbeat_unix
                quiet = quiet + 1 if rep.load.running + rep.load.waiting == 0 else 0
                if quiet >= DRAIN_QUIET_POLLS:
                    log.info("autoscaler.drained", replica_id=replica_id)
                    return
            await asyncio.sleep(0.2)
        log.warning("autoscaler.drain_timeout", replica_id=replica_id, timeout_s=self.drain_timeout_s)

    async def reconcile(self, model: str, desired: int, replicas: list[reg_pb.Replica]) -> None:
        """Start or drain this provisioner's replicas of model until the active ones number `desired`.
        Scale-down picks replicas still cold starting first (nothing to drain), then the least loaded."""
        active = [o for o in self.provisioner.owned(model) if not o.draining]
        for _ in range(max(0, desired - len(active))):
            await self.provisioner.start(model)
        extra = len(active) - desired
        if extra <= 0:
            return
        load = {r.replica_id: (r.state == SERVING, r.load.running + r.load.waiting) for r in replicas}
        active.sort(key=lambda o: (load.get(o.replica_id, (False, 0)), -o.started_at))
        for o in active[:extra]:
            await self.provisioner.stop(o.replica_id, self.drain)

    # -- one round -----------------------------------------------------------------------------------

    async def tick(self) -> list[Decision]:
        """One decision per model; errors reaching the registry skip that model this round."""
        now = time.time()
        out = []
        for model, decider in self.deciders.items():
            try:
                s, replicas = await self.signals(model, now)
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "autoscaler.registry_unavailable", model=model, code=e.code().name, error=e.details()
                )
                continue
            decider.observe(now, s.arrival_rate)
            d = decider.decide(s)
            out.append(d)
            self._record(d)
            await self.reconcile(model, d.desired, replicas)
            draining = sum(1 for o in self.provisioner.owned(model) if o.draining)
            self.last[model] = self._state(model, s, draining)
            DESIRED.labels(model).set(d.desired)
            ACTUAL.labels(model).set(s.serving)
            STARTING.labels(model).set(s.starting)
        self.ticks += 1
        if self.last:
            try:
                await self.registry.ReportScaling(
                    reg_pb.ReportScalingRequest(models=list(self.last.values())), timeout=self.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as e:
                log.warning("autoscaler.report_failed", code=e.code().name, error=e.details())
        return out

    def _record(self, d: Decision) -> None:
        fields = d.as_dict()
        if d.direction == "hold":
            log.debug("autoscaler.decision", **fields)
            return
        # One structured event per change, with the policy, the signal and the numbers (docs/autoscaling.md).
        log.info("autoscaler.decision", **fields)
        self._decisions.add(
            1,
            {"fleetserve.model": d.model, "policy": d.policy, "signal": d.signal, "direction": d.direction},
        )
        DECISIONS.labels(d.model, d.policy, d.signal, d.direction).inc()
        self.history[d.model].append(
            reg_pb.ScalingDecision(
                at_unix=d.at,
                previous=d.previous,
                desired=d.desired,
                actual=d.actual,
                direction=d.direction,
                policy=d.policy,
                signal=d.signal,
                reason=d.reason,
            )
        )

    def _state(self, model: str, s: ModelSignals, draining: int) -> reg_pb.ModelScaling:
        spec = self.specs[model]
        return reg_pb.ModelScaling(
            model=model,
            desired=self.deciders[model].desired,
            serving=s.serving,
            starting=s.starting,
            draining=draining,
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            policies=list(spec.policies),
            decisions=list(self.history[model]),
            updated_unix=s.now,
            cold_starts_s=list(self.cold_starts[model])[-5:],
            provisioner=self.provisioner.name,
        )
