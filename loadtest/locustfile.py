"""Locust users that stream Generate through the gateway over gRPC (`make loadtest`); needs the `loadtest` extra.

Target: $FLEETSERVE_GATEWAY / $FLEETSERVE_API_KEY (or --host for the gateway), else the running cluster's state
file. Workload: $FLEETSERVE_MODEL (sim-1b), $FLEETSERVE_PROMPT_TOKENS (128), $FLEETSERVE_MAX_TOKENS (256),
$FLEETSERVE_TIMEOUT_S (300), $FLEETSERVE_SEED (random). Each request is reported as "Generate" with
response_time = end-to-end ms and response_length = output tokens, plus a "ttft" entry with its time to first
token."""

from __future__ import annotations

import itertools
import os
import random
import sys
import time
from pathlib import Path

import grpc
import grpc.experimental.gevent as grpc_gevent
from locust import User, constant, task

try:
    import loadtest  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a plain checkout: locust puts only loadtest/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetserve.inference.v1 import inference_service_pb2 as inference_pb

from loadtest.summary import StreamMeter
from loadtest.workload import Workload
from shared.channels import CHANNEL_OPTIONS
from shared.errors import details_of

# grpc's own threads must cooperate with gevent's greenlets, or one blocked stream stalls every user.
grpc_gevent.init_gevent()

METHOD = "/fleetserve.inference.v1.InferenceService/Generate"

WORKLOAD = Workload(
    model=os.environ.get("FLEETSERVE_MODEL", "sim-1b"),
    prompt_tokens=int(os.environ.get("FLEETSERVE_PROMPT_TOKENS", "128")),
    max_tokens=int(os.environ.get("FLEETSERVE_MAX_TOKENS", "256")),
    seed=int(os.environ.get("FLEETSERVE_SEED") or random.randrange(2**31)),
)
TIMEOUT_S = float(os.environ.get("FLEETSERVE_TIMEOUT_S", "300"))

_indices = itertools.count()  # every request of this process gets its own prompt
_channels: dict[str, grpc.Channel] = {}


class GenerateFailed(Exception):
    """A failed generation, named by status code and reason so Locust's error report groups alike failures."""


def resolve_target(host: str | None) -> tuple[str, str]:
    """(gateway, api key): --host / env vars first, then the running cluster's state file."""
    gateway = host or os.environ.get("FLEETSERVE_GATEWAY", "")
    key = os.environ.get("FLEETSERVE_API_KEY", "")
    if not gateway or not key:
        from shared.cluster import read_state

        state = read_state()
        gateway, key = gateway or state["gateway"], key or state["api_key"]
    return gateway.removeprefix("grpc://").removeprefix("http://"), key


def _channel(address: str) -> grpc.Channel:
    # One channel per gateway for the whole process, shared by every user, like a real client would.
    ch = _channels.get(address)
    if ch is None:
        ch = _channels[address] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
    return ch


class GenerateUser(User):
    """A closed-loop client: stream one generation, then immediately the next."""

    wait_time = constant(0)

    def on_start(self) -> None:
        gateway, key = resolve_target(self.host)
        self.gateway = gateway
        self.metadata = (("authorization", f"Bearer {key}"),)
        self.generate_stream = _channel(gateway).unary_stream(
            METHOD,
            request_serializer=inference_pb.GenerateRequest.SerializeToString,
            response_deserializer=inference_pb.GenerateResponse.FromString,
        )

    @task
    def generate(self) -> None:
        request = WORKLOAD.mesh_request(next(_indices), "locust")
        clock = time.perf_counter
        meter = StreamMeter(clock())
        exc: Exception | None = None
        try:
            for resp in self.generate_stream(request, metadata=self.metadata, timeout=TIMEOUT_S):
                meter.on_chunk(resp.chunk, clock())
            result = meter.result(clock())
        except grpc.RpcError as e:
            d = details_of(e)
            result = meter.failed(clock(), e.code().name, d.reason, d.message)
        if not result.ok:  # an RPC error, or a stream that closed without a normal finish
            exc = GenerateFailed(" ".join(x for x in (result.error, result.reason) if x))
        fire = self.environment.events.request.fire
        fire(
            request_type="grpc",
            name="Generate",
            response_time=result.e2e_s * 1000.0,
            response_length=result.output_tokens,
            exception=exc,
            context={"gateway": self.gateway},
        )
        if exc is None and result.ttft_s is not None:
            fire(
                request_type="grpc",
                name="ttft",
                response_time=result.ttft_s * 1000.0,
                response_length=0,
                exception=None,
                context={"gateway": self.gateway},
            )
