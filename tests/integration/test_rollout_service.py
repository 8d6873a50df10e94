"""RolloutService over a real registry on port 0: bad plans, experiments and flags refused with INVALID_ARGUMENT
naming the field, state changes answered and streamed to watchers, everything kept across a registry restart."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import grpc
import pytest
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rgrpc
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.trace import TracerProvider

from services.registry.app import start
from services.registry.config import RegistrySettings
from shared.errors import details_of
from shared.telemetry import Telemetry


def telemetry() -> Telemetry:
    tp, mp = TracerProvider(), MeterProvider()
    return Telemetry(tp.get_tracer("t"), mp.get_meter("t"), tp, mp)


@contextlib.asynccontextmanager
async def registry(tmp: Path, port: int = 0):
    app = await start(
        RegistrySettings(
            port=port, db_path=str(tmp / "registry.db"), lease_ttl_s=30, heartbeat_interval_s=1,
            rollout_interval_s=0.1,
        ),
        telemetry(),
    )  # fmt: skip
    channel = grpc.aio.insecure_channel(app.address)
    try:
        yield app, rgrpc.RolloutServiceStub(channel), reg_grpc.RegistryServiceStub(channel)
    finally:
        await channel.close()
        await app.stop(0)


async def register(stub, rid: str, version: str, model: str = "m") -> None:
    replica = reg_pb.Replica(
        replica_id=rid, address=f"127.0.0.1:{len(rid) + 1000}", model=model, model_version=version
    )
    await stub.RegisterReplica(reg_pb.RegisterReplicaRequest(replica=replica), timeout=2)


def gradual(**kw) -> pb.RolloutPlan:
    base = dict(
        model="m", baseline_version="v1", candidate_version="v2", strategy=pb.ROLLOUT_STRATEGY_GRADUAL,
        steps=[10, 100], bake_s=3600,
    )  # fmt: skip
    return pb.RolloutPlan(**{**base, **kw})


async def refused(call) -> dict[str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await call
    d = details_of(exc.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT, d
    return dict(d.field_violations)


async def test_bad_input_is_invalid_argument_naming_the_field(tmp_path):
    """Shares that do not add up, an unknown version, a guardrail on a metric that does not exist, a confidence,
    hold or undecided action out of range, overlapping experiments and a flag that targets nobody: each
    INVALID_ARGUMENT naming its field; nothing is stored."""
    async with registry(tmp_path) as (app, stub, reg):
        await register(reg, "a", "v1")
        await register(reg, "b", "v2")
        got = await refused(
            stub.StartRollout(pb.StartRolloutRequest(plan=gradual(steps=[50, 20])), timeout=2)
        )
        assert "plan.steps[1]" in got
        got = await refused(
            stub.StartRollout(pb.StartRolloutRequest(plan=gradual(candidate_version="v3")), timeout=2)
        )
        assert "unknown version 'v3'" in got["plan.candidate_version"]
        bad_metric = gradual(guardrails=[pb.Guardrail(metric="vibes", limit=1)])
        got = await refused(stub.StartRollout(pb.StartRolloutRequest(plan=bad_metric), timeout=2))
        assert "unknown metric 'vibes'" in got["plan.guardrails[0].metric"]
        # The confidence-sequence plan fields: each out-of-range value named in one refusal, nothing started.
        unsure = gradual(confidence=1.0, max_hold_s=-1, on_undecided=7)
        got = await refused(stub.StartRollout(pb.StartRolloutRequest(plan=unsure), timeout=2))
        assert "[0.5, 1)" in got["plan.confidence"] and "seconds" in got["plan.max_hold_s"]
        assert "unknown action" in got["plan.on_undecided"]
        arms = [
            pb.Arm(name="control", percent=50, variant=pb.Variant(model_version="v1")),
            pb.Arm(name="treatment", percent=40, variant=pb.Variant(model_version="v2")),
        ]
        spec = pb.ExperimentSpec(
            name="x", model="m", arms=arms, population=pb.Population(percent=60), primary_metric="ttft_ms",
            samples_per_arm=100,
        )  # fmt: skip
        got = await refused(stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec), timeout=2))
        assert "add up to 90" in got["spec.arms"]
        spec.arms[1].percent = 50
        await stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec), timeout=2)
        spec.name = "y"
        got = await refused(stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec), timeout=2))
        assert "overlap" in got["spec.population"]
        got = await refused(
            stub.SetFeatureFlag(pb.SetFeatureFlagRequest(flag=pb.FeatureFlag(name="f", model="m")), timeout=2)
        )
        assert "targets nobody" in got["flag"]
        assert not (await stub.ListRollouts(pb.ListRolloutsRequest(), timeout=2)).rollouts
        assert len((await stub.ListExperiments(pb.ListExperimentsRequest(), timeout=2)).experiments) == 1


async def test_lifecycle_is_streamed_to_watchers_and_survives_a_restart(tmp_path):
    """Start, pause and roll back a rollout: each step is answered, a second start for the model is
    FAILED_PRECONDITION while one runs, a watcher sees every state, and a restarted registry has it all."""
    async with registry(tmp_path) as (app, stub, reg):
        await register(reg, "a", "v1")
        await register(reg, "b", "v2")
        watch = stub.WatchTraffic(pb.WatchTrafficRequest(), timeout=30)
        assert not (await watch.read()).rollouts
        r = (await stub.StartRollout(pb.StartRolloutRequest(plan=gradual()), timeout=2)).rollout
        assert (r.state, r.candidate_percent, r.candidate_replicas) == (pb.ROLLOUT_STATE_RUNNING, 10.0, 1)
        seen = await watch.read()
        assert seen.rollouts[0].rollout_id == r.rollout_id
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.StartRollout(pb.StartRolloutRequest(plan=gradual()), timeout=2)
        assert details_of(exc.value).reason == "ROLLOUT_IN_PROGRESS"
        await stub.PauseRollout(pb.PauseRolloutRequest(rollout_id=r.rollout_id), timeout=2)
        assert (await watch.read()).rollouts[0].state == pb.ROLLOUT_STATE_PAUSED
        back = await stub.RollbackRollout(
            pb.RollbackRolloutRequest(rollout_id=r.rollout_id, reason="test"), timeout=2
        )
        assert back.rollout.state == pb.ROLLOUT_STATE_ROLLED_BACK and back.rollout.candidate_percent == 0
        assert (await watch.read()).rollouts[0].state == pb.ROLLOUT_STATE_ROLLED_BACK
        watch.cancel()
        port = app.running.port
    async with registry(tmp_path, port=port) as (_, stub, _):
        again = (await stub.GetRollout(pb.GetRolloutRequest(model="m"), timeout=2)).rollout
        assert again.state == pb.ROLLOUT_STATE_ROLLED_BACK
        assert [e.kind for e in again.events] == ["started", "paused", "rolled_back"]
        assert "rolled back by an operator: test" == again.reason


async def test_a_rollout_of_a_version_without_replicas_waits(tmp_path):
    """A version that registered once but has no replica now is accepted; the rollout says it waits and the
    controller never advances it."""
    async with registry(tmp_path) as (app, stub, reg):
        await register(reg, "a", "v1")
        await register(reg, "b", "v2")
        await reg.DeregisterReplica(reg_pb.DeregisterReplicaRequest(replica_id="b"), timeout=2)
        r = (await stub.StartRollout(pb.StartRolloutRequest(plan=gradual(bake_s=0)), timeout=2)).rollout
        assert r.candidate_replicas == 0 and r.events[-1].kind == "waiting"
        assert "no SERVING replica of v2" in r.reason
        await app.rollouts.controller.tick()
        got = (await stub.GetRollout(pb.GetRolloutRequest(rollout_id=r.rollout_id), timeout=2)).rollout
        assert got.step == 0 and got.state == pb.ROLLOUT_STATE_RUNNING


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "shared.cli.main", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return proc.returncode, out.decode(), err.decode()


async def test_the_cli_starts_steers_and_explains(tmp_path):
    """`fleetserve rollout start` with a bad guardrail metric exits 1 naming the field; a good plan starts,
    `status` shows its traffic and guardrails, `rollback` ends it and `fleetserve status` shows how it ended;
    `experiment create` prints its horizon."""
    async with registry(tmp_path) as (app, stub, reg):
        await register(reg, "a", "v1")
        await register(reg, "b", "v2")
        at = ["--registry", app.address]
        start = [
            "rollout",
            "start",
            "--model",
            "m",
            "--baseline",
            "v1",
            "--candidate",
            "v2",
            "--steps",
            "5,50",
        ]
        code, _, err = await cli(*start, "--guardrail", "vibes<=1", *at)
        assert code == 1 and "INVALID_ARGUMENT" in err and "plan.guardrails[0].metric" in err
        code, out, err = await cli(*start, "--guardrail", "error_rate<=0.02@10", "--json", *at)
        assert code == 0, err
        rid = json.loads(out)["rollout_id"]
        code, out, _ = await cli("rollout", "status", "--model", "m", *at)
        assert code == 0 and f"rollout {rid}" in out and "traffic: 5% to v2 (step 1/2)" in out
        assert "guardrail [insufficient_data] error_rate" in out or "history:" in out
        code, out, _ = await cli("rollout", "rollback", rid, "--reason", "cli test", *at)
        assert code == 0 and "rolled_back" in out and "cli test" in out
        code, out, err = await cli("status", "--json", *at)
        assert code == 0, err
        (shown,) = json.loads(out)["rollouts"]
        assert (shown["rollout_id"], shown["state"], shown["last_event"]) == (
            rid,
            "rolled_back",
            "rolled_back",
        )
        assert "cli test" in shown["reason"] and shown["candidate_version"] == "v2"
        code, out, err = await cli("status", *at)
        assert code == 0 and "rollouts (latest per model)" in out and "rolled_back" in out, err
        code, out, err = await cli(
            "experiment", "create", "speed", "--model", "m", "--arm", "control:version=v1",
            "--arm", "treatment:version=v2", "--metric", "ttft_ms", "--mde", "5", "--std", "30", *at,
        )  # fmt: skip
        assert code == 0, err
        assert "fixed horizon 567 samples per arm" in out
