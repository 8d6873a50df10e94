"""`fleetserve cost`: what the fleet cost over a window, by tenant, model, version, request type, length class,
tier and replica type, the biggest cost driver, and what model routing saved."""

from __future__ import annotations

import sys

from fleetserve.metrics.v1 import metrics_service_pb2 as pb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as pb_grpc
from rich.console import Console
from rich.table import Table

from shared.channels import open_channel
from shared.cli.metrics import answer
from shared.cluster import read_state
from shared.tls import Tls

DIMENSIONS = {
    name.removeprefix("COST_DIMENSION_").lower(): value
    for name, value in pb.CostDimension.items()
    if value != pb.COST_DIMENSION_UNSPECIFIED
}


def dimension_name(value: int) -> str:
    return pb.CostDimension.Name(value).removeprefix("COST_DIMENSION_").lower()


def parse_dimensions(text: str) -> list[int]:
    """ "tenant,feature" -> dimension values; SystemExit naming the known ones on a bad name."""
    out = []
    for name in filter(None, (s.strip() for s in text.split(","))):
        if name not in DIMENSIONS:
            raise SystemExit(f"unknown dimension {name!r}; known: {', '.join(DIMENSIONS)}")
        out.append(DIMENSIONS[name])
    return out


async def get_cost(address: str, request: pb.GetCostRequest, tls: Tls | None = None) -> pb.GetCostResponse:
    async with open_channel(address, tls) as ch:
        return await pb_grpc.MetricsServiceStub(ch).GetCost(request, timeout=10)


def usd(x: float) -> str:
    return f"${x:,.4f}" if abs(x) < 100 else f"${x:,.2f}"


def render(resp: pb.GetCostResponse, console: Console, top: int) -> None:
    hours = (resp.end_unix - resp.start_unix) / 3600
    console.print(
        f"[bold]{usd(resp.total_usd)}[/] over {hours:.2f} h: {resp.gpu_hours:.3f} GPU-hours; "
        f"{usd(resp.attributed_usd)} attributed to {resp.requests} requests ({resp.tokens} tokens), "
        f"{usd(resp.idle_usd)} idle; {usd(resp.cost_per_1k_tokens)} per 1k tokens, "
        f"{usd(resp.cost_per_request)} per request"
    )
    if resp.biggest_driver.key:
        d = resp.biggest_driver
        console.print(
            f"biggest cost driver: {dimension_name(resp.biggest_driver_dimension)} [bold]{d.key}[/] "
            f"({usd(d.cost_usd)}, {d.share:.0%} of the attributed cost, {usd(d.cost_per_1k_tokens)} per 1k tokens)"
        )
    for bd in resp.breakdowns:
        t = Table(title=f"by {dimension_name(bd.dimension)}")
        for col in ("", "cost", "share", "requests", "tokens in/out", "per 1k tokens", "per request"):
            t.add_column(col, justify="left" if not col else "right")
        for line in bd.lines[:top]:
            t.add_row(
                line.key,
                usd(line.cost_usd),
                f"{line.share:.1%}",
                str(line.requests),
                f"{line.prompt_tokens}/{line.output_tokens}",
                usd(line.cost_per_1k_tokens),
                usd(line.cost_per_request),
            )
        if len(bd.lines) > top:
            t.caption = f"{len(bd.lines) - top} more"
        console.print(t)
    for s in resp.routing_savings:
        console.print(
            f"model routing [bold]{s.alias}[/] ({s.small_requests} to {s.small_model}, {s.large_requests} to "
            f"{s.large_model}): cost {usd(s.actual_usd)}, all on {s.large_model} {usd(s.all_large_usd)} "
            f"({s.basis}): saved [bold]{usd(s.saved_usd)}[/] in this window, "
            f"{usd(s.saved_at_full_use_usd)} at full use (list price)"
        )


def run_cost(args) -> int:
    address = args.metrics or read_state()["metrics"]
    request = pb.GetCostRequest(
        window_s=args.window,
        start_unix=args.since or 0.0,
        end_unix=args.until or 0.0,
        group_by=parse_dimensions(args.by),
    )
    code, resp = answer(address, get_cost(address, request, Tls.for_tools()), args.json)
    if resp is None:
        return code
    render(resp, Console(width=None if sys.stdout.isatty() else 160), args.top)
    return 0
