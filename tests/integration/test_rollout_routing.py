"""Traffic splits in a router over real servers in-process: a rollout of a version without replicas moves no
traffic, a feature flag sends its users to their version, an experiment arm's routing policy picks the replica
and the arm rides on served_by, and routers follow the registry's changes."""

from __future__ import annotations

import time

import grpc
import pytest
import pytest_asyncio
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rgrpc

from services.router.attempt import RequestAttempts
from services.router.traffic import Shadow
from tests.integration.test_router import MODEL, generate, in_process_fleet, request, router_spans
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("routing"), engines=2) as f:
        yield f


def rollouts(fleet) -> rgrpc.RolloutServiceStub:
    return rgrpc.RolloutServiceStub(fleet.channel(fleet.registry.address))


def routed(fleet, req):
    req.routing.user_id = req.request_id
    return req


async def served_versions(fleet, n: int, prefix: str) -> list[str]:
    out = []
    for i in range(n):
        chunks = await generate(fleet, routed(fleet, request(max_tokens=2, request_id=f"{prefix}-{i}")))
        out.append(chunks[0].served_by.model_version)
    return out


async def test_a_rollout_to_a_version_without_replicas_moves_no_traffic(fleet):
    """v9 registered once and left: a 100% canary to it is accepted, waits, and every request stays on v1."""
    replica = reg_pb.Replica(replica_id="gone", address="127.0.0.1:9", model=MODEL, model_version="v9")
    reg = fleet.registry_stub()
    await reg.RegisterReplica(reg_pb.RegisterReplicaRequest(replica=replica), timeout=2)
    # The router learns of replicas on one watch stream and of the rollout on another: unless it has seen v9's
    # replica come and go first, the rollout can arrive before the replica's removal, and requests go to it.
    await assert_eventually(lambda: fleet.router.membership.get("gone") is not None, timeout_s=5)
    await fleet.deregister("gone")  # and waits until the router's membership has dropped it
    stub = rollouts(fleet)
    plan = pb.RolloutPlan(
        model=MODEL, baseline_version="v1", candidate_version="v9", strategy=pb.ROLLOUT_STRATEGY_CANARY,
        steps=[100], bake_s=3600,
    )  # fmt: skip
    r = (await stub.StartRollout(pb.StartRolloutRequest(plan=plan), timeout=2)).rollout
    assert r.candidate_replicas == 0 and "no SERVING replica of v9" in r.reason
    await assert_eventually(
        lambda: fleet.router.servicer.traffic.rollouts.get(MODEL) is not None, timeout_s=5
    )
    assert set(await served_versions(fleet, 10, "nine")) == {"v1"}
    (span,) = router_spans(fleet, "nine-0")
    assert span.attributes["fleetserve.traffic"].endswith(":fallback")
    await stub.RollbackRollout(pb.RollbackRolloutRequest(rollout_id=r.rollout_id), timeout=2)


async def test_a_flag_and_an_experiment_arm_steer_their_users(fleet):
    """A flag pins user 'vip' to v1 with round_robin; an experiment splits everyone else between least_load and
    round_robin: the arm is on served_by and the span, and the arm's policy decided."""
    stub = rollouts(fleet)
    flag = pb.FeatureFlag(
        name="vip", model=MODEL, users=["vip"], variant=pb.Variant(routing_policy="round_robin")
    )
    await stub.SetFeatureFlag(pb.SetFeatureFlagRequest(flag=flag), timeout=2)
    spec = pb.ExperimentSpec(
        name="policies", model=MODEL, primary_metric="ttft_ms", samples_per_arm=10,
        population=pb.Population(percent=100),
        arms=[
            pb.Arm(name="control", variant=pb.Variant(routing_policy="least_load")),
            pb.Arm(name="rr", variant=pb.Variant(routing_policy="round_robin")),
        ],
    )  # fmt: skip
    e = (await stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec), timeout=2)).experiment
    traffic = fleet.router.servicer.traffic
    await assert_eventually(lambda: traffic.experiments.get(MODEL) and traffic.flags.get(MODEL), timeout_s=5)
    arms = {}
    for i in range(20):
        chunks = await generate(fleet, routed(fleet, request(max_tokens=2, request_id=f"arm-{i}")))
        (span,) = router_spans(fleet, f"arm-{i}")
        arm = chunks[0].served_by.arm
        assert chunks[0].served_by.experiment == e.experiment_id
        assert span.attributes["fleetserve.arm"] == arm
        assert (
            span.attributes["fleetserve.route.policy"] == {"control": "least_load", "rr": "round_robin"}[arm]
        )
        arms[arm] = arms.get(arm, 0) + 1
    assert set(arms) == {"control", "rr"}
    vip = request(max_tokens=2, request_id="vip-1")
    vip.routing.user_id = "vip"
    chunks = await generate(fleet, vip)
    (span,) = router_spans(fleet, "vip-1")
    assert chunks[0].served_by.experiment == "" and span.attributes["fleetserve.traffic"] == "flag:vip"
    assert span.attributes["fleetserve.route.policy"] == "round_robin"
    await stub.StopExperiment(pb.StopExperimentRequest(experiment_id=e.experiment_id), timeout=2)
    await stub.DeleteFeatureFlag(pb.DeleteFeatureFlagRequest(name="vip"), timeout=2)
    await assert_eventually(
        lambda: not traffic.experiments.get(MODEL) and not traffic.flags.get(MODEL), timeout_s=5
    )


async def test_a_pinned_version_without_replica_is_not_found(fleet):
    """A pin to a version no replica of the model serves is NOT_FOUND MODEL_VERSION_NOT_FOUND at the router."""
    req = request(max_tokens=2, request_id="pin-1")
    req.spec.model_version = "v7"
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await generate(fleet, req)
    assert exc.value.code() == grpc.StatusCode.NOT_FOUND and "v7" in exc.value.details()


async def test_a_shadow_copy_whose_deadline_passed_is_a_failed_copy(fleet):
    """A copy whose call can no longer be set up (the live request's deadline passed before the copy's task ran)
    ends as a shadow error with DEADLINE_EXCEEDED in the report; its task raises nothing and frees its budget."""
    servicer = fleet.router.servicer
    runner = servicer.shadows
    req = request(max_tokens=2, request_id="late-copy")
    run = RequestAttempts(servicer, req, servicer.policy.prepare(req), deadline=time.monotonic() - 1.0)
    shadow = Shadow(rollout_id="late-copy", baseline_version="v1", candidate_version="v1", max_in_flight=2)
    before = set(runner._tasks)
    pair = runner.start(run, shadow, time.monotonic())
    (task,) = set(runner._tasks) - before
    await task  # raised DeadlineExceeded out of the fire-and-forget task before the fix
    pair.live_ended(grpc.StatusCode.OK)
    assert pair.copy.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert runner.in_flight["late-copy"] == 0
    report = runner.stats["late-copy"].report()
    assert (report.shadow_errors, report.pairs, report.skipped) == (1, 0, 0)
    del runner.stats["late-copy"]
