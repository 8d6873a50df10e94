"""`fleetserve quality MODEL`: quality signals of every version of a model and, with --baseline and
--candidate, the shift tests of one version against another (the metrics service's GetQuality and
CompareVersions)."""

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


async def fetch(address: str, args) -> pb.GetQualityResponse | pb.CompareVersionsResponse:
    async with open_channel(address, Tls.for_tools()) as ch:
        stub = pb_grpc.MetricsServiceStub(ch)
        if args.candidate is not None:
            return await stub.CompareVersions(
                pb.CompareVersionsRequest(
                    model=args.model,
                    baseline_version=args.baseline or "",
                    candidate_version=args.candidate,
                    window_s=args.window,
                    alpha=args.alpha,
                ),
                timeout=10,
            )
        return await stub.GetQuality(pb.GetQualityRequest(model=args.model, window_s=args.window), timeout=10)


def versions_table(model: str, versions) -> Table:
    t = Table(title=f"quality of {model}")
    for col in (
        "version",
        "requests",
        "errors",
        "refusals",
        "empty",
        "repetitive",
        "safety",
        "output median",
        "rating (n)",
        "TTFT p99",
        "$/1k out",
    ):
        t.add_column(col, justify="left" if col == "version" else "right")
    for v in versions:
        t.add_row(
            v.version or "-",
            str(v.requests),
            f"{v.error_rate:.2%}",
            f"{v.refusal_rate:.1%}",
            f"{v.empty_rate:.1%}",
            f"{v.repetitive_rate:.1%}",
            f"{v.safety_rate:.1%}",
            f"{v.output_tokens_median:.0f}",
            f"{v.feedback_mean:.2f} ({v.feedback_count})" if v.feedback_count else "-",
            f"{v.ttft_ms.p99:.0f} ms" if v.ttft_ms.count else "-",
            f"${v.cost_per_1k_output_tokens:.4f}",
        )
    return t


def tests_table(resp: pb.CompareVersionsResponse) -> Table:
    t = Table(
        title=f"{resp.candidate.version} against {resp.baseline.version or '-'}: "
        + ("[red]SHIFTED[/]" if resp.shifted else "[green]no shift[/]")
    )
    for col in ("signal", "baseline", "candidate", "test", "p-value", "verdict"):
        t.add_column(col)
    for x in resp.tests:
        verdict = "too few samples" if x.insufficient_data else ("[red]shifted[/]" if x.shifted else "same")
        t.add_row(x.signal, f"{x.baseline:.4g}", f"{x.candidate:.4g}", x.test, f"{x.p_value:.3g}", verdict)
    return t


def run_quality(args) -> int:
    address = args.metrics or read_state()["metrics"]
    code, resp = answer(address, fetch(address, args), args.json)
    if resp is None:
        return code
    console = Console(width=None if sys.stdout.isatty() else 160)
    if isinstance(resp, pb.CompareVersionsResponse):
        console.print(versions_table(args.model, [resp.baseline, resp.candidate]))
        console.print(tests_table(resp))
    else:
        console.print(versions_table(args.model, resp.versions))
    return 0
