"""`fleetserve metrics`: TTFT / TPOT / end-to-end percentiles and error rate per model, from the metrics service."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from fleetserve.metrics.v1 import metrics_service_pb2 as pb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from rich.console import Console
from rich.table import Table

from shared.channels import open_channel
from shared.cluster import read_state
from shared.tls import Tls

M = TypeVar("M", bound=Message)


async def query(address: str, model: str, window_s: float, tls: Tls | None = None) -> pb.QueryResponse:
    async with open_channel(address, tls) as ch:
        return await pb_grpc.MetricsServiceStub(ch).Query(
            pb.QueryRequest(model=model, window_s=window_s), timeout=5
        )


def answer(address: str, call: Coroutine[Any, Any, M], as_json: bool) -> tuple[int, M | None]:
    """A command's one call to the metrics service at `address`: (1, None) with the error on stderr when it
    failed, (0, None) once the response is printed as JSON (as_json), else (0, the response) to render."""
    try:
        resp = asyncio.run(call)
    except grpc.aio.AioRpcError as e:
        print(f"error: metrics service at {address}: {e.code().name} {e.details()}", file=sys.stderr)
        return 1, None
    if as_json:
        print(json.dumps(MessageToDict(resp, preserving_proto_field_name=True)))
        return 0, None
    return 0, resp


def run_metrics(args) -> int:
    state = None if args.metrics else read_state()
    address = args.metrics or state["metrics"]
    code, resp = answer(
        address, query(address, args.model or "", args.window, Tls.for_tools(state)), args.json
    )
    if resp is None:
        return code
    t = Table(title=f"requests in the last {args.window:g}s" if args.window else "requests")
    for col in (
        "model",
        "requests",
        "errors",
        "TTFT p50/p95/p99 (mean) ms",
        "TPOT p50/p95/p99 (mean) ms",
        "E2E p50/p99 ms",
    ):
        t.add_column(col)
    for m in resp.models:
        t.add_row(
            m.model,
            str(m.requests),
            f"{m.errors} ({m.error_rate:.1%})",
            f"{m.ttft_ms.p50:.1f} / {m.ttft_ms.p95:.1f} / {m.ttft_ms.p99:.1f} ({m.ttft_ms.mean:.1f})",
            f"{m.tpot_ms.p50:.2f} / {m.tpot_ms.p95:.2f} / {m.tpot_ms.p99:.2f} ({m.tpot_ms.mean:.2f})",
            f"{m.e2e_ms.p50:.0f} / {m.e2e_ms.p99:.0f}",
        )
    Console(width=None if sys.stdout.isatty() else 160).print(t)
    return 0
