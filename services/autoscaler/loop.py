"""The autoscaler's control loop: every interval, per model and per version of it, read the signals (registry:
replicas, their load and cold starts, and the rollout plans that split a model's traffic between versions;
routers: admission queues and admitted-request counters, whose rate is the arrival rate; metrics service: TTFT
p99 and E2E time per version), decide, log and export every decision with its reason, have the provisioner start
or drain replicas of each version, and report the state to the registry (which stores it durably)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import grpc
import structlog
from fleetserve.metrics.v1 import metrics_service_pb2 as metrics_pb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as rpb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rollout_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from opentelemetry import metrics

from services.autoscaler import versions
from services.autoscaler.arrivals import ArrivalMeter, Key
from services.autoscaler.decider import Decision
from services.autoscaler.model_scaler import ModelScaler, version_rates, version_signals
from services.autoscaler.provisioner import DRAIN_QUIET_POLLS, Owned, Provisioner
from services.autoscaler.router_directory import RouterDirectory
from services.autoscaler.signals import ModelSignals
from services.autoscaler.spec import ModelSpec
from shared import prom
from shared.watching import follow

log = structlog.get_logger(__name__)

SERVING = reg_pb.REPLICA_STATE_SERVING
DRAINING = reg_pb.REPLICA_STATE_DRAINING

# Prometheus names agreed with the observability work (NOTES.md): KEDA and the dashboard read the first two.
# Per version: `sum by (model_name)` is the model's.
DESIRED = prom.gauge(
    "fleetserve:autoscaler_desired_replicas",
    "Replicas the autoscaler wants, per model version (sum by model_name: the model's).",
    ["model_name", "version"],
)
ACTUAL = prom.gauge(
    "fleetserve:autoscaler_actual_replicas",
    "Replicas registered and SERVING, per model version.",
    ["model_name", "version"],
)
STARTING = prom.gauge(
    "fleetserve:autoscaler_starting_replicas",
    "Replicas cold starting, per model version.",
    ["model_name", "version"],
)
DECISIONS = prom.counter(
    "fleetserve:autoscaler_decisions",
    "Decisions that changed the desired count, by version, policy, signal and direction.",
    ["model_name", "version", "policy", "signal", "direction"],
)
COLD_STARTS = prom.histogram(
    "fleetserve:autoscaler_cold_start_seconds",
    "Measured cold starts: replica process start to first SERVING registration.",
    ["model_name"],
    buckets=(1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600),
)


@dataclass
class Latency:
    """What the metrics service measured over the window (zeros without it)."""

    completed_rate: float = 0.0
    ttft_p99_ms: float = 0.0
    mean_e2e_s: float = 0.0


@dataclass
class RouterView:
    """What the routers answered this round: queued requests per model, each router's admitted counts."""

    queued: dict[str, int] = field(default_factory=dict)
    counts: dict[str, dict[Key, int]] = field(default_factory=dict)
    # Each router's arrivals_incarnation (a new one: a restarted process whose counters began again at zero).
    incarnations: dict[str, str] = field(default_factory=dict)


class Autoscaler:
    """One control loop over every configured model and its versions."""

    def __init__(
        self,
        specs: list[ModelSpec],
        provisioner: Provisioner,
        registry: grpc.aio.Channel,
        routers: RouterDirectory,
        metrics_channel: grpc.aio.Channel | None,
        meter: metrics.Meter,
        *,
        window_s: float = 30.0,
        drain_timeout_s: float = 60.0,
        start_timeout_s: float = 600.0,
        decisions_kept: int = 10,
        rpc_timeout_s: float = 3.0,
        watch_resubscribe_s: float = 600.0,
        watch_backoff_base_s: float = 0.1,
        watch_backoff_max_s: float = 5.0,
    ) -> None:
        self.specs = {s.model: s for s in specs}
        self.scalers = {s.model: ModelScaler(s) for s in specs}
        self.provisioner = provisioner
        self.registry = reg_grpc.RegistryServiceStub(registry)
        self.rollouts = rollout_grpc.RolloutServiceStub(registry)
        self.routers = routers
        self.metrics = metrics_grpc.MetricsServiceStub(metrics_channel) if metrics_channel else None
        self.window_s = window_s
        self.drain_timeout_s = drain_timeout_s
        self.start_timeout_s = start_timeout_s
        self.rpc_timeout_s = rpc_timeout_s
        self.watch_resubscribe_s = watch_resubscribe_s
        self.watch_backoff_base_s = watch_backoff_base_s
        self.watch_backoff_max_s = watch_backoff_max_s
        self.arrivals = ArrivalMeter(keep_s=max(600.0, 4 * window_s))
        self.traffic: rpb.WatchTrafficResponse | None = None
        # Whether the traffic watch is connected now (shared.watching.Follower), and whether it ever delivered.
        self.connected = False
        self._traffic_seen = asyncio.Event()
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
            description="Decisions that changed the desired count, by model, version, policy, signal and direction.",
        )
        meter.create_observable_gauge(
            "fleetserve.autoscaler.desired_replicas",
            callbacks=[self._observe_desired],
            description="Replicas the autoscaler wants, by model (all its versions).",
        )

    def _observe_desired(self, _options):
        for model, scaler in self.scalers.items():
            yield metrics.Observation(scaler.desired, {"fleetserve.model": model})

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
            scaler = self.scalers.get(m.model)
            if scaler is None:
                continue
            spec = scaler.spec
            # A report from before versions had rows: its count was the spec's version.
            rows = [(v.version, v.desired) for v in m.versions] or [(spec.version, m.desired)]
            for version, desired in rows:
                scaler.decider(version, initial=min(spec.max_replicas, max(0, desired)))
            self.history[m.model].extend(m.decisions)
            self.cold_starts[m.model].extend(m.cold_starts_s)
            log.info("autoscaler.restored", model=m.model, desired=dict(rows))

    # -- signals -------------------------------------------------------------------------------------

    async def _replicas(self, model: str) -> list[reg_pb.Replica]:
        resp = await self.registry.ListReplicas(
            reg_pb.ListReplicasRequest(model=model), timeout=self.rpc_timeout_s
        )
        return list(resp.replicas)

    async def _routers(self) -> RouterView:
        """Every router's admission queues and admitted-request counters (one GetStatus each per round)."""
        view = RouterView()
        routers = await self.routers.routers(self.rpc_timeout_s)
        answers = await asyncio.gather(
            *(s.GetStatus(router_pb.GetStatusRequest(), timeout=self.rpc_timeout_s) for _, s in routers),
            return_exceptions=True,
        )
        for (key, _), resp in zip(routers, answers, strict=True):
            if isinstance(resp, grpc.aio.AioRpcError):
                continue  # a router away: the others (and the engines' queues) still count
            if isinstance(resp, BaseException):
                raise resp
            for q in resp.queues:
                view.queued[q.model] = view.queued.get(q.model, 0) + q.interactive + q.standard + q.batch
            view.counts[key] = {(a.model, a.version): a.requests_total for a in resp.arrivals}
            view.incarnations[key] = resp.arrivals_incarnation
        return view

    async def watch_traffic(self) -> None:
        """Follow the registry's traffic configuration (rollouts, experiments, flags) until cancelled: one
        long-lived WatchTraffic stream, as routers keep, each snapshot replacing the last; when it breaks it
        reconnects with backoff, and the last configuration read stands meanwhile."""

        def open_stream():
            # A long but finite watch, like the routers': every RPC has a deadline, and the resubscribe when it
            # runs out brings a fresh snapshot.
            return self.rollouts.WatchTraffic(rpb.WatchTrafficRequest(), timeout=self.watch_resubscribe_s)

        await follow(
            self,
            open_stream,
            self._apply_traffic,
            "autoscaler.traffic_watch",
            kept=lambda: {"rollouts_kept": len(self.traffic.rollouts) if self.traffic else 0},
            backoff_base_s=self.watch_backoff_base_s,
            backoff_max_s=self.watch_backoff_max_s,
        )

    def _apply_traffic(self, snapshot: rpb.WatchTrafficResponse) -> None:
        self.traffic = snapshot
        self._traffic_seen.set()

    async def _traffic(self) -> rpb.WatchTrafficResponse | None:
        """The latest traffic configuration the watch delivered. Until one has come, a round waits for it (up to
        rpc_timeout_s): planning without it would retire the versions a running rollout still needs."""
        if not self._traffic_seen.is_set():
            try:
                await asyncio.wait_for(self._traffic_seen.wait(), self.rpc_timeout_s)
            except TimeoutError:
                log.info("autoscaler.traffic_unavailable", waited_s=self.rpc_timeout_s)
        return self.traffic

    async def _latency(self, model: str, version: str = "") -> Latency:
        """Requests ended per second, TTFT p99 and mean E2E over the window, from the metrics service (of one
        version when given)."""
        if self.metrics is None:
            return Latency()
        req = metrics_pb.QueryRequest(model=model, window_s=self.window_s, model_version=version)
        try:
            resp = await self.metrics.Query(req, timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as e:
            log.info("autoscaler.metrics_unavailable", code=e.code().name)
            return Latency()
        for m in resp.models:
            if m.model == model:
                return Latency(m.requests / self.window_s, m.ttft_ms.p99, m.e2e_ms.mean / 1000.0)
        return Latency()

    def _arrival_rate(self, model: str, now: float, completed_rate: float) -> tuple[float, str]:
        """The model's arrival rate: the routers' admitted-request counters; while no router has answered
        within the window, the requests the metrics service saw end (it lags by a request's duration)."""
        rate = self.arrivals.rate(model, self.window_s, now=now) if self.routers.any else None
        return (completed_rate, "metrics") if rate is None else (rate, "routers")

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

    def _starting(self, model: str, version: str, reps: list[reg_pb.Replica]) -> list[Owned]:
        """The replicas of model at version this provisioner started that are not in the registry (yet): cold
        starting, or re-registering after a lost lease. Each counts toward the desired count until
        _track_starts stops it."""
        listed = {r.replica_id for r in reps}
        return [
            o for o in self.provisioner.owned(model, version) if not o.draining and o.replica_id not in listed
        ]

    async def _track_starts(self, model: str, replicas: list[reg_pb.Replica], now: float) -> None:
        """Note which of this provisioner's replicas the registry lists; stop one that has stayed out of it for
        start_timeout_s (since it started, or since it was last listed): a replica stuck cold starting must not
        hold its place in the desired count for ever (the next round starts another in its place)."""
        listed = {r.replica_id for r in replicas}
        for o in self.provisioner.owned(model):
            if o.draining:
                continue
            if o.replica_id in listed:
                o.listed_at = now
                continue
            out_for = now - (o.listed_at if o.listed_at is not None else o.started_at)
            if out_for > self.start_timeout_s:
                log.warning(
                    "autoscaler.start_timeout",
                    replica_id=o.replica_id,
                    model=model,
                    version=o.version,
                    out_of_registry_s=round(out_for, 1),
                    ever_listed=o.listed_at is not None,
                    start_timeout_s=self.start_timeout_s,
                )
                await self.provisioner.stop(o.replica_id, self.drain)

    async def reconcile(self, model: str, version: str, desired: int, reps: list[reg_pb.Replica]) -> None:
        """Start or drain replicas of model at version (`reps`: the version's registered replicas) until they
        number `desired`. What counts is every registered replica that is not DRAINING, whoever started it
        (`fleetserve up`'s engines, a previous autoscaler's), and every one this provisioner started that is not
        registered yet (cold starting, bounded by start_timeout_s): a round never starts a replica for one that
        is already coming. Only this provisioner's own are drained: those still cold starting first (nothing to
        drain), then the least loaded."""
        # Those it is draining itself are leaving too, though the registry may list them SERVING for a moment
        # more (the drain's DeregisterReplica runs in a task): counted, they would make the next round stop one
        # more.
        leaving = {o.replica_id for o in self.provisioner.owned(model, version) if o.draining}
        present = [r for r in reps if r.state != DRAINING and r.replica_id not in leaving]
        starting = self._starting(model, version, reps)
        have = len(present) + len(starting)
        own = self.specs[model].versions.get(version)
        for _ in range(max(0, desired - have)):
            await self.provisioner.start(model, version, own.engine_args if own else "")
        extra = have - desired
        if extra <= 0:
            return
        present_ids = {r.replica_id for r in present}
        mine = starting + [
            o
            for o in self.provisioner.owned(model, version)
            if not o.draining and o.replica_id in present_ids
        ]
        load = {r.replica_id: (r.state == SERVING, r.load.running + r.load.waiting) for r in reps}
        mine.sort(key=lambda o: (load.get(o.replica_id, (False, 0)), -o.started_at))
        for o in mine[:extra]:
            await self.provisioner.stop(o.replica_id, self.drain)

    # -- one round -----------------------------------------------------------------------------------

    async def tick(self) -> list[Decision]:
        """One decision per model version; errors reaching the registry skip that model this round."""
        now = time.time()
        view, traffic = await asyncio.gather(self._routers(), self._traffic())
        if view.counts:
            self.arrivals.update(now, view.counts, view.incarnations)
        out = []
        for model, scaler in self.scalers.items():
            try:
                out += await self._scale(scaler, now, view, traffic)
            except grpc.aio.AioRpcError as e:
                log.warning(
                    "autoscaler.registry_unavailable", model=model, code=e.code().name, error=e.details()
                )
        self.provisioner.refresh_targets()
        self.ticks += 1
        if self.last:
            try:
                await self.registry.ReportScaling(
                    reg_pb.ReportScalingRequest(models=list(self.last.values())), timeout=self.rpc_timeout_s
                )
            except grpc.aio.AioRpcError as e:
                log.warning("autoscaler.report_failed", code=e.code().name, error=e.details())
        return out

    async def _scale(
        self, scaler: ModelScaler, now: float, view: RouterView, traffic: rpb.WatchTrafficResponse | None
    ) -> list[Decision]:
        """One model: its arrival rate, the versions its traffic goes to, then a decision per version."""
        spec = scaler.spec
        model = spec.model
        replicas, model_latency = await asyncio.gather(self._replicas(model), self._latency(model))
        self._measure_cold_starts(model, replicas)
        await self._track_starts(model, replicas, now)
        rate, source = self._arrival_rate(model, now, model_latency.completed_rate)
        scaler.observe(now, rate)
        owned = {o.version for o in self.provisioner.owned(model)} | set(scaler.deciders)
        plans = versions.plan(spec, traffic, owned)
        by_version: dict[str, list[reg_pb.Replica]] = {}
        for r in replicas:
            by_version.setdefault(r.model_version or spec.version, []).append(r)
        serving = {v: sum(1 for r in reps if r.state == SERVING) for v, reps in by_version.items()}
        measured = {}
        if source == "routers":
            measured = {v: self.arrivals.rate(model, self.window_s, v, now=now) or 0.0 for v in plans}
        rates = version_rates(plans, rate, measured, serving)
        latency = {v: model_latency for v in plans}
        if len(plans) > 1:
            found = await asyncio.gather(*(self._latency(model, v) for v in plans))
            latency = dict(zip(plans, found, strict=True))
        base = ModelSignals(
            now=now,
            wall_unix=now,
            serving=0,
            queued=view.queued.get(model, 0),
            cold_starts_s=tuple(self.cold_starts[model]),
        )
        decisions, rows = [], []
        for v, vp in sorted(plans.items(), key=lambda kv: (-kv[1].share, kv[0])):
            s = self._version_signals(base, by_version.get(v, []), model, vp, rates[v], rate, latency[v])
            d = scaler.decide(vp, s, serving)
            decisions.append(d)
            self._record(d)
            await self.reconcile(model, v, d.desired, by_version.get(v, []))
            rows.append(self._row(scaler, vp, s, rates[v], serving))
        for vp in plans.values():
            if vp.role == versions.RETIRING and scaler.deciders[vp.version].desired == 0:
                if not self.provisioner.owned(model, vp.version):
                    self._forget(scaler, vp.version)
        self.last[model] = self._state(scaler, now, rows, rate, source)
        return decisions

    def _version_signals(
        self,
        base: ModelSignals,
        reps: list[reg_pb.Replica],
        model: str,
        vp: versions.VersionPlan,
        rate: float,
        model_rate: float,
        latency: Latency,
    ) -> ModelSignals:
        serving = [r for r in reps if r.state == SERVING]
        starting = self._starting(model, vp.version, reps)
        kv = [r.load.kv_blocks_used / r.load.kv_blocks_total for r in serving if r.load.kv_blocks_total]
        return version_signals(
            base,
            rate,
            model_rate,
            vp.share,
            serving=len(serving),
            starting=len(starting),
            running=sum(r.load.running for r in serving),
            waiting=sum(r.load.waiting for r in serving),
            kv_usage=max(kv, default=0.0),
            output_tokens_per_s=sum(r.load.output_tokens_per_s for r in serving),
            ttft_p99_ms=latency.ttft_p99_ms,
            mean_e2e_s=latency.mean_e2e_s,
        )

    def _forget(self, scaler: ModelScaler, version: str) -> None:
        """A retired version whose replicas are all gone: no decider, no gauges."""
        scaler.forget(version)
        for gauge in (DESIRED, ACTUAL, STARTING):
            try:
                gauge.remove(scaler.spec.model, version)
            except KeyError:
                pass
        log.info("autoscaler.version_retired", model=scaler.spec.model, version=version)

    def _record(self, d: Decision) -> None:
        fields = d.as_dict()
        if d.direction == "hold":
            log.debug("autoscaler.decision", **fields)
            return
        # One structured event per change, with the policy, the signal and the numbers (docs/autoscaling.md).
        log.info("autoscaler.decision", **fields)
        self._decisions.add(
            1,
            {
                "fleetserve.model": d.model,
                "fleetserve.model_version": d.version,
                "policy": d.policy,
                "signal": d.signal,
                "direction": d.direction,
            },
        )
        DECISIONS.labels(d.model, d.version, d.policy, d.signal, d.direction).inc()
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
                version=d.version,
            )
        )

    def _row(
        self,
        scaler: ModelScaler,
        vp: versions.VersionPlan,
        s: ModelSignals,
        rate: float,
        serving: dict[str, int],
    ) -> reg_pb.VersionScaling:
        model = scaler.spec.model
        draining = sum(1 for o in self.provisioner.owned(model, vp.version) if o.draining)
        desired = scaler.deciders[vp.version].desired
        b = scaler.bounds(vp, s.now, serving)
        DESIRED.labels(model, vp.version).set(desired)
        ACTUAL.labels(model, vp.version).set(s.serving)
        STARTING.labels(model, vp.version).set(s.starting)
        return reg_pb.VersionScaling(
            version=vp.version,
            role=vp.role,
            share=vp.share,
            desired=desired,
            serving=s.serving,
            starting=s.starting,
            draining=draining,
            min_replicas=b.min_replicas,
            max_replicas=b.max_replicas,
            reason=b.why or vp.why,
            arrival_rate=rate,
        )

    def _state(
        self, scaler: ModelScaler, now: float, rows: list[reg_pb.VersionScaling], rate: float, source: str
    ) -> reg_pb.ModelScaling:
        spec = scaler.spec
        model = spec.model
        return reg_pb.ModelScaling(
            model=model,
            desired=sum(r.desired for r in rows),
            serving=sum(r.serving for r in rows),
            starting=sum(r.starting for r in rows),
            draining=sum(1 for o in self.provisioner.owned(model) if o.draining),
            min_replicas=spec.min_replicas,
            max_replicas=spec.max_replicas,
            policies=list(spec.policies),
            decisions=list(self.history[model]),
            updated_unix=now,
            cold_starts_s=list(self.cold_starts[model])[-5:],
            provisioner=self.provisioner.name,
            versions=rows,
            arrival_rate=rate,
            arrival_source=source,
            available_versions=spec.available_versions,
        )
