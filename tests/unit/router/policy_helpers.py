"""Builders for the routing-policy unit tests: replicas with load reports and router requests."""

from __future__ import annotations

import uuid

from fleetserve.common.v1 import common_pb2
from fleetserve.router.v1 import router_service_pb2 as router_pb

from services.router.membership import ReplicaInfo

SYSTEM = (
    "You are a careful assistant for the fleet operations team. Answer briefly, cite the runbook section, "
    "and never guess a number you were not given. " * 6
)


def rep(rid: str, model: str = "m", *, running: int = 0, waiting: int = 0, tokens: int = 0, kv=(0, 0)):
    """A replica with a load report."""
    return ReplicaInfo(
        rid,
        f"127.0.0.1:{sum(map(ord, rid)) % 1000 + 1000}",
        model,
        load=common_pb2.ReplicaLoad(
            running=running,
            waiting=waiting,
            in_flight_tokens=tokens,
            kv_blocks_used=kv[0],
            kv_blocks_total=kv[1],
        ),
    )


def fleet(n: int, model: str = "m") -> list[ReplicaInfo]:
    return [rep(f"r{i}", model) for i in range(n)]


def chat(
    *turns: str,
    tenant: str = "t1",
    session: str = "",
    model: str = "m",
    system: str = SYSTEM,
    max_tokens: int = 64,
) -> router_pb.GenerateRequest:
    """A chat request: the system prompt, then user/assistant turns alternating (ending with a user turn)."""
    messages = [common_pb2.ChatMessage(role="system", content=system)]
    for i, text in enumerate(turns):
        messages.append(common_pb2.ChatMessage(role="user" if i % 2 == 0 else "assistant", content=text))
    return router_pb.GenerateRequest(
        request_id=f"req-{uuid.uuid4().hex[:12]}",
        spec=common_pb2.GenerationSpec(
            model=model, messages=messages, sampling=common_pb2.SamplingParams(max_tokens=max_tokens)
        ),
        routing=router_pb.RoutingContext(tenant_id=tenant, session_id=session),
    )


def prompt(text: str, *, tenant: str = "t1", session: str = "", model: str = "m", max_tokens: int = 64):
    """A plain-prompt request."""
    return router_pb.GenerateRequest(
        request_id="req-p",
        spec=common_pb2.GenerationSpec(
            model=model, prompt=text, sampling=common_pb2.SamplingParams(max_tokens=max_tokens)
        ),
        routing=router_pb.RoutingContext(tenant_id=tenant, session_id=session),
    )
