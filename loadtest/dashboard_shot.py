"""Headless Chromium against the metrics service's dashboard: the rendered DOM (tests read the charts' point
counts from it) and a screenshot. `python -m loadtest.dashboard_shot --out docs/dashboard.png` starts a fleet,
loads it (two models behind an alias, two tenants, a burst of planted errors so alerts show), and saves the
screenshot; `make dashboard-png` runs that."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from shared.channels import open_channel

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# The dashboard's charts (their element ids; each says how many points it drew in data-points).
CHARTS = ("ttft", "tpot", "throughput", "errors", "replicas", "kv", "cost")
# Debian's chromium, with nothing that reaches out of the machine.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


def browser() -> str | None:
    """The headless browser on PATH, or None."""
    return next((b for b in map(shutil.which, BROWSERS) if b), None)


async def chromium(
    url: str, *, screenshot: Path | None = None, budget_ms: int = 6000, size=(1400, 1900)
) -> str:
    """Load url, let its scripts run for budget_ms of virtual time, and return the DOM (or write a screenshot
    and return ""). RuntimeError with chromium's output when it fails."""
    exe = browser()
    if exe is None:
        raise RuntimeError(f"no headless browser found (looked for {', '.join(BROWSERS)})")
    with tempfile.TemporaryDirectory(prefix="fleetserve-chromium-") as profile:
        what = [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
        proc = await asyncio.create_subprocess_exec(
            exe,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            f"--window-size={size[0]},{size[1]}",
            *what,
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 120)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise RuntimeError("chromium did not finish within 120 s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode}: {err.decode(errors='replace')[-2000:]}")
    return out.decode(errors="replace")


def chart_points(dom: str) -> dict[str, int]:
    """Points each chart of a rendered dashboard page drew, by chart id (read from the DOM)."""
    return {k: int(v) for k, v in re.findall(r'id="(\w+)"[^>]*data-points="(\d+)"', dom)}


async def _load(cluster, stop: asyncio.Event) -> None:
    """Mixed traffic until stop: two tenants' keys, the routing alias and both models, 1 in 40 requests with a
    deadline too short (planted errors: the SLO panel shows burn-rate alerts)."""
    import grpc
    from fleetserve.inference.v1 import inference_service_pb2 as pb
    from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

    counter = itertools.count(1)
    async with open_channel(cluster.gateway) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)

        async def worker(w: int) -> None:
            while not stop.is_set():
                n = next(counter)
                model, prompt = [
                    ("auto", "hi " * 20),
                    ("auto", "explain why, step by step " * 8),
                    ("sim-1b", "x"),
                ][n % 3]
                planted = n % 40 == 0
                try:
                    async for _ in stub.Generate(
                        pb.GenerateRequest(
                            model=model,
                            prompt=prompt,
                            max_tokens=200 if planted else 24 + n % 40,
                            ignore_eos=True,
                            feature=("chat", "summarize", "code")[w % 3],
                        ),
                        metadata=(("authorization", f"Bearer {cluster.api_key}"),),
                        timeout=0.05 if planted else 30,
                    ):
                        pass
                except grpc.aio.AioRpcError:
                    pass

        await asyncio.gather(*(worker(w) for w in range(8)))


async def shoot(out: Path, seconds: float) -> None:
    from shared.cluster import Cluster, ClusterConfig

    alias = "auto=sim-1b|sim-8b"
    with tempfile.TemporaryDirectory(prefix="fleetserve-shot-") as tmp:
        cluster = Cluster(
            ClusterConfig(
                data_dir=Path(tmp),
                engines=2,
                speed_factor=2.0,
                metrics_export_interval_s=1.0,
                extra_args={
                    "router": ["--model-aliases", alias],
                    "metrics": ["--model-aliases", alias, "--slo-time-scale", "120"],
                },
            )
        )
        await cluster.start()
        try:
            await cluster.add_engine("sim-8b", ["--profile", "h100-llama-8b"])
            stop = asyncio.Event()
            load = asyncio.create_task(_load(cluster, stop))
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                print(f"loading the fleet: {time.monotonic() - started:.0f}/{seconds:.0f} s", file=sys.stderr)
                await asyncio.sleep(min(10.0, seconds))
            url = f"http://{cluster.state()['dashboard']}/?refresh=1000"
            # The page as the screenshot will show it must have drawn every chart (as the Chromium test checks).
            points = chart_points(await chromium(url, size=(1400, 1500)))
            if set(points) != set(CHARTS) or min(points.values()) < 2:
                raise RuntimeError(f"the dashboard's charts are not filled: points per chart {points}")
            await chromium(url, screenshot=out, size=(1400, 1500))
            stop.set()
            await load
        finally:
            await cluster.stop()
    print(f"wrote {out}; points per chart {points}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.dashboard_shot", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"), help="PNG to write")
    parser.add_argument(
        "--seconds", type=float, default=60.0, help="load the fleet this long first (default 60)"
    )
    args = parser.parse_args(argv)
    asyncio.run(shoot(args.out.resolve(), args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
