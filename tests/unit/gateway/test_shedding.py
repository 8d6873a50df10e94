"""Load shedding: queue depth per model from the router's status, batch shed first, then standard, never
interactive; degradation to a smaller model or capped max_tokens instead, when configured."""

from __future__ import annotations

import grpc
import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.router.v1 import router_service_pb2 as router_pb

from services.gateway.shedding import BATCH, INTERACTIVE, STANDARD, LoadShedder, queue_depths
from shared.errors import ResourceExhausted


def status(**per_model: tuple[int, int]) -> router_pb.GetStatusResponse:
    """per model: (router queue length, routable replicas each with 2 waiting)."""
    resp = router_pb.GetStatusResponse()
    for model, (queued, replicas) in per_model.items():
        resp.queues.add(model=model, standard=queued)
        for i in range(replicas):
            resp.replicas.add(
                replica_id=f"{model}-{i}", model=model, routable=True, load=common_pb2.ReplicaLoad(waiting=2)
            )
    return resp


def test_queue_depth_is_waiting_requests_per_routable_replica():
    """Router queue plus engine waiting, over routable replicas; waiting with no replica is infinite."""
    depths = queue_depths(status(big=(6, 2), small=(0, 1), gone=(3, 0)))
    assert depths == {"big": 5.0, "small": 2.0, "gone": float("inf")}


def shedder(**kw) -> LoadShedder:
    async def never():
        raise AssertionError

    s = LoadShedder(never, batch_depth=4, standard_depth=8, clock=lambda: 0.0, **kw)
    return s


def test_batch_is_shed_first_then_standard_and_never_interactive():
    """Between the two thresholds only batch is shed; above both, standard too; interactive always passes."""
    s = shedder()
    s.update({"m": 5.0})
    with pytest.raises(ResourceExhausted) as exc:
        s.decide("m", BATCH, 100)
    assert (
        exc.value.reason == "LOAD_SHED" and exc.value.to_status().code == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    assert exc.value.retry_after_s == pytest.approx(5 / 4)
    assert s.decide("m", STANDARD, 100).note == ""
    s.update({"m": 16.0})
    with pytest.raises(ResourceExhausted) as exc:
        s.decide("m", STANDARD, 100)
    assert exc.value.retry_after_s == pytest.approx(2.0)  # deeper queue, longer wait
    assert s.decide("m", INTERACTIVE, 100).note == ""


def test_degrades_to_a_smaller_model_that_has_room():
    """With a smaller model configured and under the threshold, a would-be-shed request is routed there."""
    s = shedder(degrade_models={"big": "small"})
    s.update({"big": 10.0, "small": 1.0})
    d = s.decide("big", STANDARD, 100)
    assert d.model == "small" and "served by small" in d.note


def test_caps_max_tokens_instead_of_shedding():
    """With a max_tokens cap configured, a long request is capped instead of shed; a short one is shed."""
    s = shedder(degrade_max_tokens=32)
    s.update({"m": 10.0})
    d = s.decide("m", BATCH, 500)
    assert (d.model, d.max_tokens) == (None, 32) and "capped at 32" in d.note
    with pytest.raises(ResourceExhausted):
        s.decide("m", BATCH, 16)


def test_stale_load_readings_are_not_acted_on():
    """When the router has not answered for several polls, nothing is shed on old numbers."""
    now = [0.0]

    async def never():
        raise AssertionError

    s = LoadShedder(never, batch_depth=1, poll_s=0.5, clock=lambda: now[0])
    s.update({"m": 100.0})
    now[0] = 10.0
    assert s.decide("m", BATCH, 10).note == ""
