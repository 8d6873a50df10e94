"""Bytes that are not a valid request (corrupt protobuf, invalid UTF-8 in a string field) get INVALID_ARGUMENT
with ErrorInfo MALFORMED_REQUEST on every method of every service (grpc.health and reflection included), never
UNKNOWN, and the service goes on serving."""

from __future__ import annotations

import grpc
import pytest
import pytest_asyncio
from fleetserve.engine.v1 import engine_service_pb2
from fleetserve.inference.v1 import inference_service_pb2
from fleetserve.metrics.v1 import metrics_service_pb2
from fleetserve.registry.v1 import registry_service_pb2
from fleetserve.router.v1 import router_service_pb2
from google.protobuf import descriptor as _descriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.metrics import app as metrics_app
from services.metrics.config import MetricsSettings
from shared.errors import details_of
from tests.integration.test_router import in_process_fleet

pytestmark = pytest.mark.asyncio(loop_scope="module")

# Not protobuf: a field tag of wire type 7, which does not exist.
CORRUPT = b"\xff\xff\xff\xff\x0f"
HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]


def invalid_utf8(message: _descriptor.Descriptor) -> bytes | None:
    """A message whose first string field holds bytes that are not UTF-8 (None: it has no string field)."""
    for f in message.fields:
        if f.type == f.TYPE_STRING:
            assert f.number < 16
            return bytes([f.number << 3 | 2, 2]) + b"\xc3\x28"
    return None


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def servers(tmp_path_factory):
    """(address, services) of every fleetserve server, each with grpc.health."""
    tmp = tmp_path_factory.mktemp("undecodable")
    async with in_process_fleet(tmp, engines=1, gateway=True) as fleet:
        metrics = await metrics_app.start(MetricsSettings(), fleet.telemetry)
        try:
            yield (
                fleet,
                [
                    (
                        fleet.gateway.address,
                        [inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]],
                    ),
                    (fleet.router.address, [router_service_pb2.DESCRIPTOR.services_by_name["RouterService"]]),
                    (
                        fleet.engines["engine-1"].address,
                        [engine_service_pb2.DESCRIPTOR.services_by_name["EngineService"]],
                    ),
                    (
                        fleet.registry.address,
                        [registry_service_pb2.DESCRIPTOR.services_by_name["RegistryService"]],
                    ),
                    (metrics.address, [metrics_service_pb2.DESCRIPTOR.services_by_name["MetricsService"]]),
                ],
            )
        finally:
            await metrics.stop(0.5)


async def _call_raw(channel: grpc.aio.Channel, method: _descriptor.MethodDescriptor, payload: bytes):
    path = f"/{method.containing_service.full_name}/{method.name}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    call_fn = kind(path)  # no serializers: the payload goes out as given
    request = iter([payload]) if method.client_streaming else payload
    call = call_fn(request, timeout=10, metadata=(("authorization", "Bearer not-a-key"),))
    if method.server_streaming:
        async for _ in call:
            pass
    else:
        await call


async def test_every_method_answers_malformed_bytes_with_invalid_argument(servers):
    """Corrupt bytes and invalid UTF-8 on each method of gateway, router, engine, registry, metrics and their
    health service: INVALID_ARGUMENT, ErrorInfo MALFORMED_REQUEST naming the message type."""
    fleet, targets = servers
    seen = 0
    for address, services in targets:
        channel = fleet.channel(address)
        for service in [*services, HEALTH]:
            for method in service.methods:
                for payload in (CORRUPT, invalid_utf8(method.input_type)):
                    if payload is None:
                        continue
                    with pytest.raises(grpc.aio.AioRpcError) as exc:
                        await _call_raw(channel, method, payload)
                    d = details_of(exc.value)
                    where = f"{address} {method.full_name} {payload!r}"
                    assert d.code == grpc.StatusCode.INVALID_ARGUMENT, f"{where}: {d}"
                    assert d.reason == "MALFORMED_REQUEST", where
                    assert method.input_type.full_name in d.message, where
                    seen += 1
        # Still serving after all of that.
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert seen >= 40


async def test_reflection_answers_malformed_bytes_with_invalid_argument(servers):
    """Server reflection (a bidirectional stream) refuses a corrupt request the same way."""
    from grpc_reflection.v1alpha import reflection_pb2

    fleet, targets = servers
    method = reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"].methods_by_name[
        "ServerReflectionInfo"
    ]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await _call_raw(fleet.channel(targets[0][0]), method, CORRUPT)
    assert details_of(exc.value).code == grpc.StatusCode.INVALID_ARGUMENT
