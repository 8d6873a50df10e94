"""Which model version serves a request: the client's pin, else the traffic table's assignment (feature flag,
experiment arm, rollout split), resolved against the replicas routable now (a version without one falls back,
so a rollout of a version with no replica moves no traffic to it)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from fleetserve.common.v1 import common_pb2
from fleetserve.router.v1 import router_service_pb2 as pb

from services.router.traffic import Assignment
from shared.errors import NotFound

if TYPE_CHECKING:
    from services.router.servicer import RouterServicer


def note(assignment: Assignment) -> bytes:
    """What the router appends to a request's first chunk: served_by.experiment and .arm (protobuf merges a
    message appended to another, so the engine's bytes need no decoding); empty for no experiment."""
    if not assignment.experiment:
        return b""
    served_by = common_pb2.ServedBy(experiment=assignment.experiment, arm=assignment.arm)
    return pb.GenerateResponse(chunk=common_pb2.GenerateChunk(served_by=served_by)).SerializeToString()


def metadata(assignment: Assignment) -> tuple[tuple[str, str], ...]:
    """The router's initial metadata for an assigned request (the gateway reads it when no chunk came); none
    for a request without a version."""
    if not assignment.version:
        return ()
    out = (("x-fleetserve-model-version", assignment.version),)
    if assignment.experiment:
        out += (("x-fleetserve-experiment", assignment.experiment), ("x-fleetserve-arm", assignment.arm))
    return out


def routable_version(router: RouterServicer, model: str, version: str) -> bool:
    """Whether a replica of model at version could take a request now."""
    breakers, outliers = router.breakers, router.outliers
    return any(
        r.model_version == version and breakers.allows(r.replica_id) and not outliers.ejected(r.replica_id)
        for r in router.membership.routable(model)
    )


def known_versions(router: RouterServicer, model: str) -> set[str]:
    return {r.model_version for r in router.membership.replicas(model)}


def assign(router: RouterServicer, request, model: str) -> Assignment:
    """The request's assignment with its version resolved: a pin must name a version of a known replica
    (NotFound otherwise); a rollout's, flag's or arm's version without a routable replica gives way to its
    fallback, or to the rollout's own choice (and then the request counts for no experiment arm)."""
    pinned = request.spec.model_version
    if pinned:
        if router.membership.knows_model(model) and pinned not in known_versions(router, model):
            listed = ", ".join(sorted(known_versions(router, model))) or "none"
            raise NotFound(
                f"version {pinned!r} of model {model!r} is not served; versions now: {listed}",
                reason="MODEL_VERSION_NOT_FOUND",
                metadata={"model": model, "model_version": pinned, "available_versions": listed},
            )
        return Assignment(version=pinned, source="pin")
    routing = request.routing
    a = router.traffic.assign(
        model, routing.tenant_id, routing.user_id, routing.session_id, request.request_id
    )
    return _resolve(router, model, a)


def _resolve(router: RouterServicer, model: str, a: Assignment) -> Assignment:
    if not a.version or routable_version(router, model, a.version):
        return a
    if a.fallback and routable_version(router, model, a.fallback):
        return dataclasses.replace(a, version=a.fallback, fallback="", source=f"{a.source}:fallback")
    if a.base is not None:
        return _resolve(router, model, a.base)
    return a  # nothing better: choose() says which version has no replica
