"""Cost by request type and by replica: a fleet of two replica types (an H100 and an L4 profile, each priced per
GPU-hour in its profile) serves a mix of request types tagged by `feature` (short chats, long-document
summaries, long stories, batch jobs); the metrics service's cost attribution (GetCost: each replica's time x
price split over the requests it served by GPU time) gives each type's and each replica type's share."""

from __future__ import annotations

import asyncio
import random
import time

from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as mpb_grpc
from google.protobuf.json_format import MessageToDict

from fleetserve.client import AsyncClient
from loadtest.experiments import Outcome, progress
from loadtest.fleet import SpawnedFleet
from loadtest.policy_bench import wait_routable
from loadtest.scenarios import words
from shared.channels import open_channel

# feature -> (prompt words, output tokens, share of the streamed requests)
MIX = {"chat": (60, 32, 0.55), "summarize": (1500, 64, 0.25), "story": (40, 384, 0.2)}
DIMENSIONS = (mpb.COST_DIMENSION_FEATURE, mpb.COST_DIMENSION_REPLICA_TYPE)
BATCH_ITEMS = 8


async def _cost(address: str, start: float, end: float) -> mpb.GetCostResponse:
    async with open_channel(address) as ch:
        request = mpb.GetCostRequest(start_unix=start, end_unix=end, group_by=list(DIMENSIONS))
        return await mpb_grpc.MetricsServiceStub(ch).GetCost(request, timeout=10)


async def run(args, name: str) -> Outcome:
    n = 16 if args.quick else args.requests
    rng = random.Random(args.seed)
    features = rng.choices(list(MIX), weights=[m[2] for m in MIX.values()], k=n)
    fleet = SpawnedFleet(1, 1.0, metrics_export_interval_s=1.0)
    async with fleet as state:
        # The fleet's first engine is an H100 (the default profile); an L4 joins it (its own price and speed).
        await fleet.cluster.add_engine(args=["--profile", "l4-llama-1b"])
        await wait_routable(state["router"], 2, "sim-1b")
        progress(f"{name}: {n} requests ({', '.join(sorted(set(features)))}) + 2 batch jobs")
        start = time.time()
        sem = asyncio.Semaphore(args.concurrency)
        async with AsyncClient(state["gateway"], state["api_key"], model="sim-1b") as client:

            async def one(feature: str) -> None:
                prompt_words, out, _ = MIX[feature]
                async with sem:
                    await client.complete(
                        words(rng, prompt_words), max_tokens=out, ignore_eos=True, feature=feature
                    )

            async def batch(i: int) -> None:
                job = await client.submit_batch(
                    [{"custom_id": str(k), "prompt": words(rng, 200)} for k in range(BATCH_ITEMS)],
                    max_tokens=128,
                    feature="batch",
                )
                for _ in range(600):  # bounded: at most 60 s per job
                    got = await client.get_job(job.job_id)
                    if got.job.succeeded + got.job.failed == got.job.total:
                        return
                    await asyncio.sleep(0.1)

            await asyncio.gather(*(one(f) for f in features), batch(0), batch(1))
            end = time.time()
            expected = n + 2 * BATCH_ITEMS
            resp = None
            for _ in range(120):  # spans reach the metrics service within a few export intervals
                resp = await _cost(state["metrics"], start - 1, end + 1)
                if resp.requests >= expected:
                    break
                await asyncio.sleep(0.5)
    by = {
        mpb.CostDimension.Name(b.dimension).removeprefix("COST_DIMENSION_").lower(): b
        for b in resp.breakdowns
    }
    lines = {
        dim: {
            line.key: {
                "cost_usd": round(line.cost_usd, 6),
                "share": round(line.share, 4),
                "requests": line.requests,
                "prompt_tokens": line.prompt_tokens,
                "output_tokens": line.output_tokens,
                "cost_per_request_usd": round(line.cost_per_request, 7),
                "cost_per_1k_tokens_usd": round(line.cost_per_1k_tokens, 7),
            }
            for line in b.lines
        }
        for dim, b in by.items()
    }
    features_rows = lines.get("feature", {})
    dear = (
        max(features_rows, key=lambda k: features_rows[k]["cost_per_request_usd"]) if features_rows else "-"
    )
    record = {
        "settings": {
            "requests": n,
            "batch_jobs": 2,
            "batch_items": BATCH_ITEMS,
            "mix": MIX,
            "concurrency": args.concurrency,
            "speed_factor": 1.0,
        },
        "attributed_requests": resp.requests,
        "expected_requests": expected,
        "total_usd": round(resp.total_usd, 6),
        "attributed_usd": round(resp.attributed_usd, 6),
        "idle_usd": round(resp.idle_usd, 6),
        "gpu_hours": round(resp.gpu_hours, 5),
        "by": lines,
        "replicas": [MessageToDict(r, preserving_proto_field_name=True) for r in resp.replicas],
        "biggest_driver": MessageToDict(resp.biggest_driver, preserving_proto_field_name=True),
        "verdict": (
            f"{resp.requests}/{expected} requests attributed; the dearest request type per request is {dear}"
            + (f" ({features_rows[dear]['cost_per_request_usd']} USD)" if features_rows else "")
            + f"; biggest driver {resp.biggest_driver.key or '-'} ({resp.biggest_driver.share:.0%} of the cost)"
        ),
    }

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, dim in zip(axes, ("feature", "replica_type"), strict=True):
            rows = lines.get(dim, {})
            ax.bar(list(rows), [r["cost_usd"] * 1000 for r in rows.values()])
            ax.set_title(f"cost by {dim.replace('_', ' ')}")
            ax.set_ylabel("milli-USD")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Outcome(record, {"breakdown": plot})
