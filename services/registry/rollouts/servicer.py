"""fleetserve.registry.v1.RolloutService: rollouts (start, status, pause, resume, promote, roll back), A/B
experiments (create, status, analyze, stop), feature flags, and the WatchTraffic stream routers follow."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Collection

import grpc
import structlog
from fleetserve.registry.v1 import rollout_service_pb2 as pb

from services.registry.rollouts import experiments, flags, plans
from services.registry.rollouts.controller import RolloutController
from services.registry.rollouts.metrics_source import MetricsServiceSource
from services.registry.rollouts.stats import Summary
from services.registry.rollouts.traffic import TrafficState
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable, rpc_boundary

log = structlog.get_logger(__name__)


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


class RolloutServicer:
    """Every change is written to the store before it is answered or published to routers."""

    def __init__(
        self,
        traffic: TrafficState,
        controller: RolloutController,
        metrics: MetricsServiceSource | None,
        policies: Collection[str],
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.traffic = traffic
        self.controller = controller
        self.metrics = metrics
        self.policies = frozenset(policies)
        self._clock = clock

    # -- rollouts -------------------------------------------------------------------------------------------

    def _rollout(self, rollout_id: str) -> pb.Rollout:
        if not rollout_id:
            raise InvalidArgument("rollout_id is required", field_violations=[("rollout_id", "required")])
        r = self.traffic.rollouts.get(rollout_id)
        if r is None:
            raise NotFound(
                f"no rollout {rollout_id!r}", reason="ROLLOUT_NOT_FOUND", metadata={"rollout_id": rollout_id}
            )
        return r

    async def _changed(self, r: pb.Rollout) -> pb.Rollout:
        """Store and publish r, count and log its last event."""
        await self.traffic.save_rollout(r)
        self.controller.announce(r)
        return r

    @rpc_boundary
    async def StartRollout(self, request: pb.StartRolloutRequest, context) -> pb.StartRolloutResponse:
        plan = request.plan
        plans.validate(plan, self.traffic.versions)
        for other in self.traffic.active_rollouts():
            if other.plan.model == plan.model:
                raise FailedPrecondition(
                    f"rollout {other.rollout_id} of {plan.model!r} is {plans.state_name(other.state)}: promote or "
                    "roll it back first",
                    reason="ROLLOUT_IN_PROGRESS",
                    metadata={"rollout_id": other.rollout_id, "model": plan.model},
                )
        now = self._clock()
        r = plans.start(plan, _new_id("ro"), now)
        r.candidate_replicas = self.controller.candidate_replicas(r)
        await self._changed(r)
        if r.candidate_replicas == 0 and plan.strategy != plans.SHADOW:
            plans.record(r, "waiting", now, f"no SERVING replica of {plan.candidate_version}: traffic stays on "
                         f"{plan.baseline_version}")  # fmt: skip
            await self._changed(r)
        return pb.StartRolloutResponse(rollout=r)

    @rpc_boundary
    async def GetRollout(self, request: pb.GetRolloutRequest, context) -> pb.GetRolloutResponse:
        if request.rollout_id:
            return pb.GetRolloutResponse(rollout=self._rollout(request.rollout_id))
        if not request.model:
            raise InvalidArgument(
                "give rollout_id or model", field_violations=[("rollout_id", "required (or model)")]
            )
        r = self.traffic.latest_rollout(request.model)
        if r is None:
            raise NotFound(f"no rollout of model {request.model!r}", reason="ROLLOUT_NOT_FOUND")
        return pb.GetRolloutResponse(rollout=r)

    @rpc_boundary
    async def ListRollouts(self, request: pb.ListRolloutsRequest, context) -> pb.ListRolloutsResponse:
        return pb.ListRolloutsResponse(rollouts=self.traffic.rollouts_newest_first(request.model))

    @rpc_boundary
    async def PauseRollout(self, request: pb.PauseRolloutRequest, context) -> pb.PauseRolloutResponse:
        r = self._rollout(request.rollout_id)
        plans.pause(r, self._clock())
        return pb.PauseRolloutResponse(rollout=await self._changed(r))

    @rpc_boundary
    async def ResumeRollout(self, request: pb.ResumeRolloutRequest, context) -> pb.ResumeRolloutResponse:
        r = self._rollout(request.rollout_id)
        plans.resume(r, self._clock())
        return pb.ResumeRolloutResponse(rollout=await self._changed(r))

    @rpc_boundary
    async def PromoteRollout(self, request: pb.PromoteRolloutRequest, context) -> pb.PromoteRolloutResponse:
        r = self._rollout(request.rollout_id)
        plans.promote(r, self._clock(), "promoted by an operator")
        return pb.PromoteRolloutResponse(rollout=await self._changed(r))

    @rpc_boundary
    async def RollbackRollout(
        self, request: pb.RollbackRolloutRequest, context
    ) -> pb.RollbackRolloutResponse:
        r = self._rollout(request.rollout_id)
        latest = self.traffic.latest_rollout(r.plan.model)
        if r.state == plans.PROMOTED and latest is not None and latest.rollout_id != r.rollout_id:
            raise FailedPrecondition(
                f"rollout {latest.rollout_id} came after {r.rollout_id} and governs {r.plan.model!r} now",
                reason="ROLLOUT_SUPERSEDED",
                metadata={"rollout_id": r.rollout_id, "latest": latest.rollout_id},
            )
        plans.rollback(r, self._clock(), f"rolled back by an operator: {request.reason or 'no reason given'}")
        return pb.RollbackRolloutResponse(rollout=await self._changed(r))

    # -- experiments ----------------------------------------------------------------------------------------

    def _experiment(self, id_or_name: str) -> pb.Experiment:
        if not id_or_name:
            raise InvalidArgument(
                "experiment_id is required", field_violations=[("experiment_id", "required")]
            )
        e = self.traffic.find_experiment(id_or_name)
        if e is None:
            raise NotFound(f"no experiment {id_or_name!r}", reason="EXPERIMENT_NOT_FOUND")
        return e

    @rpc_boundary
    async def CreateExperiment(
        self, request: pb.CreateExperimentRequest, context
    ) -> pb.CreateExperimentResponse:
        spec = pb.ExperimentSpec()
        spec.CopyFrom(request.spec)
        running = self.traffic.running_experiments()
        # In a thread: sizing the horizon is statsmodels work that must not stall heartbeats.
        await asyncio.to_thread(experiments.validate, spec, self.traffic.versions, self.policies, running)
        spec.population.offset_percent = experiments.place(spec, running)
        e = pb.Experiment(
            experiment_id=_new_id("exp"),
            spec=spec,
            state=experiments.RUNNING,
            samples_per_arm=await asyncio.to_thread(experiments.horizon, spec),
            created_at_unix=self._clock(),
        )
        await self.traffic.save_experiment(e)
        log.info(
            "registry.experiment_created",
            experiment_id=e.experiment_id,
            name=spec.name,
            model=spec.model,
            arms=[a.name for a in spec.arms],
            primary_metric=spec.primary_metric,
            samples_per_arm=e.samples_per_arm,
            population=f"{spec.population.offset_percent:g}-{spec.population.offset_percent + spec.population.percent:g}%",
        )
        return pb.CreateExperimentResponse(experiment=e)

    async def _arm_samples(self, e: pb.Experiment, limit: int):
        """Per arm, in arm order: (metric -> Summary, requests)."""
        if self.metrics is None:
            raise FailedPrecondition(
                "the registry has no metrics service to read outcomes from (--metrics-address)",
                reason="NO_METRICS_SERVICE",
            )
        try:
            got = {a.arm: a for a in await self.metrics.arms(e.experiment_id, limit)}
        except grpc.aio.AioRpcError as err:
            raise Unavailable(
                f"the metrics service did not answer: {err.code().name}",
                reason="METRICS_UNAVAILABLE",
                retry_after_s=1.0,
            ) from err
        out = []
        for arm in e.spec.arms:
            a = got.get(arm.name)
            summaries = {m.metric: Summary(m.count, m.mean, m.std) for m in a.metrics} if a else {}
            out.append((summaries, a.requests if a else 0))
        return out

    @rpc_boundary
    async def GetExperiment(self, request: pb.GetExperimentRequest, context) -> pb.GetExperimentResponse:
        e = self._experiment(request.experiment_id)
        resp = pb.GetExperimentResponse(experiment=e)
        if self.metrics is not None:
            for summaries, _ in await self._arm_samples(e, 0):
                s = summaries.get(e.spec.primary_metric)
                resp.samples.append(s.count if s else 0)
        return resp

    @rpc_boundary
    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context
    ) -> pb.ListExperimentsResponse:
        return pb.ListExperimentsResponse(experiments=self.traffic.experiments_newest_first(request.model))

    @rpc_boundary
    async def AnalyzeExperiment(
        self, request: pb.AnalyzeExperimentRequest, context
    ) -> pb.AnalyzeExperimentResponse:
        e = self._experiment(request.experiment_id)
        arms = await self._arm_samples(e, e.samples_per_arm)
        # In a thread: the tests are scipy/statsmodels work that must not stall heartbeats and watches.
        resp = await asyncio.to_thread(
            experiments.analyze, e, [a for a, _ in arms], [n for _, n in arms], request.peek
        )
        log.info(
            "registry.experiment_analyzed",
            experiment_id=e.experiment_id,
            horizon_reached=resp.horizon_reached,
            peek=resp.peek,
            verdict=resp.verdict,
        )
        return resp

    @rpc_boundary
    async def StopExperiment(self, request: pb.StopExperimentRequest, context) -> pb.StopExperimentResponse:
        e = self._experiment(request.experiment_id)
        if e.state != experiments.RUNNING:
            raise FailedPrecondition(
                f"experiment {e.experiment_id} is already stopped", reason="EXPERIMENT_STATE"
            )
        e.state = experiments.STOPPED
        e.stopped_at_unix = self._clock()
        await self.traffic.save_experiment(e)
        log.info("registry.experiment_stopped", experiment_id=e.experiment_id, name=e.spec.name)
        return pb.StopExperimentResponse(experiment=e)

    # -- feature flags ---------------------------------------------------------------------------------------

    @rpc_boundary
    async def SetFeatureFlag(self, request: pb.SetFeatureFlagRequest, context) -> pb.SetFeatureFlagResponse:
        flags.validate(request.flag, self.traffic.versions, self.policies)
        await self.traffic.save_flag(request.flag)
        log.info(
            "registry.flag_set",
            name=request.flag.name,
            model=request.flag.model,
            disabled=request.flag.disabled,
        )
        return pb.SetFeatureFlagResponse(flag=request.flag)

    @rpc_boundary
    async def DeleteFeatureFlag(
        self, request: pb.DeleteFeatureFlagRequest, context
    ) -> pb.DeleteFeatureFlagResponse:
        found = await self.traffic.delete_flag(request.name)
        log.info("registry.flag_deleted", name=request.name, found=found)
        return pb.DeleteFeatureFlagResponse(found=found)

    @rpc_boundary
    async def ListFeatureFlags(
        self, request: pb.ListFeatureFlagsRequest, context
    ) -> pb.ListFeatureFlagsResponse:
        return pb.ListFeatureFlagsResponse(flags=[self.traffic.flags[n] for n in sorted(self.traffic.flags)])

    # -- the watch -------------------------------------------------------------------------------------------

    @rpc_boundary
    async def WatchTraffic(self, request: pb.WatchTrafficRequest, context):
        # Yields serialized WatchTrafficResponse bytes (relay_bytes): the whole configuration after each change.
        watcher = self.traffic.watch()
        log.info("registry.traffic_watch_started", watchers=self.traffic.watcher_count)
        sent = 0
        try:
            while True:
                data = await self.traffic.next_snapshot(watcher)
                if data is None:
                    return
                yield data
                sent += 1
        finally:
            self.traffic.unwatch(watcher)
            log.info("registry.traffic_watch_ended", snapshots=sent)
