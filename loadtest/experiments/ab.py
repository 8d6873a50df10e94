"""A/B with a planted difference: a fleet whose engines serve model versions v1 and v2, v2 planted 30% slower per
token (the sim's --sim-behaviour), and v1b, identical to v1 under another name; the registry's experiments (the rollouts engineer's RolloutService) split users
between arms, the routers apply the split, and the fixed-horizon analysis (Welch's t-test, Holm-corrected) judges
the primary metric. First an A/A test (v1 vs v1b: no difference to find), then the A/B (v1 vs v2)."""

from __future__ import annotations

import asyncio
import itertools

import grpc
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rgrpc
from google.protobuf.json_format import MessageToDict

from fleetserve.client import AsyncClient, FleetServeError
from loadtest.experiments import Outcome, progress
from loadtest.fleet import SpawnedFleet
from loadtest.policy_bench import wait_routable

MODEL = "sim-1b"
SLOWDOWN = 1.3


async def _load(
    client: AsyncClient, stop: asyncio.Event, users: itertools.count, arms: dict[str, int]
) -> None:
    """One closed-loop client: each request from a new user, so the sticky split samples many users."""
    while not stop.is_set():
        try:
            done = await client.complete(
                "a/b load", max_tokens=32, ignore_eos=True, user_id=f"u{next(users)}"
            )
            arm = done.served_by.arm or "-"
            arms[arm] = arms.get(arm, 0) + 1
        except FleetServeError:
            arms["failed"] = arms.get("failed", 0) + 1


async def _experiment(
    stub, client: AsyncClient, name: str, treatment: str, samples: int, concurrency: int
) -> dict:
    spec = pb.ExperimentSpec(
        name=name,
        model=MODEL,
        primary_metric="tpot_ms",
        samples_per_arm=samples,
        population=pb.Population(percent=100),
        arms=[
            pb.Arm(name="control", variant=pb.Variant(model_version="v1")),
            pb.Arm(name="treatment", variant=pb.Variant(model_version=treatment)),
        ],
    )
    e = (await stub.CreateExperiment(pb.CreateExperimentRequest(spec=spec), timeout=10)).experiment
    stop, users, arms = asyncio.Event(), itertools.count(), {}
    loaders = [asyncio.create_task(_load(client, stop, users, arms)) for _ in range(concurrency)]
    try:
        for _ in range(1200):  # bounded: at most ~10 minutes at 0.5 s a poll
            got = await stub.GetExperiment(pb.GetExperimentRequest(experiment_id=e.experiment_id), timeout=10)
            if len(got.samples) == 2 and min(got.samples) >= samples:
                break
            await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.gather(*loaders)
    resp = await stub.AnalyzeExperiment(
        pb.AnalyzeExperimentRequest(experiment_id=e.experiment_id), timeout=30
    )
    await stub.StopExperiment(pb.StopExperimentRequest(experiment_id=e.experiment_id), timeout=10)
    first = resp.comparisons[0] if resp.comparisons else None
    return {
        "treatment_version": treatment,
        "requests_by_arm": arms,
        "horizon_reached": resp.horizon_reached,
        "verdict": resp.verdict,
        "primary": MessageToDict(first, preserving_proto_field_name=True) if first else None,
        "significant": bool(first and first.significant),
        "arms": [MessageToDict(a, preserving_proto_field_name=True) for a in resp.arms],
    }


async def run(args, name: str) -> Outcome:
    samples = 20 if args.quick else args.samples_per_arm
    # Half real speed: a TPOT of ~5 ms stands further above the shared CPU's scheduling noise than ~2.4 ms.
    fleet = SpawnedFleet(1, 0.5, extra_args={"engine": ["--sim-behaviour", f"v2:slowdown={SLOWDOWN}"]})
    async with fleet as state:
        # v1b: the same engine as v1 under another name (the A/A's treatment: the registry refuses two arms with
        # the same variant); v2: the planted slowdown.
        await fleet.cluster.add_engine(args=["--model-version", "v1b"])
        await fleet.cluster.add_engine(args=["--model-version", "v2"])
        await wait_routable(state["router"], 3, MODEL)
        async with (
            grpc.aio.insecure_channel(state["registry"]) as ch,
            AsyncClient(state["gateway"], state["api_key"], model=MODEL) as client,
        ):
            stub = rgrpc.RolloutServiceStub(ch)
            progress(f"{name}: A/A (v1 vs v1b, identical engines), {samples} samples per arm")
            aa = await _experiment(stub, client, f"{name}-aa-{args.seed}", "v1b", samples, args.concurrency)
            progress(f"{name}: A/B (v1 vs v2, planted {SLOWDOWN}x TPOT), {samples} samples per arm")
            ab = await _experiment(stub, client, f"{name}-ab-{args.seed}", "v2", samples, args.concurrency)
    record = {
        "settings": {
            "model": MODEL,
            "planted": f"v2:slowdown={SLOWDOWN}",
            "primary_metric": "tpot_ms",
            "samples_per_arm": samples,
            "concurrency": args.concurrency,
        },
        "aa": aa,
        "ab": ab,
        "verdict": (
            f"A/A: {'a difference found (a false positive)' if aa['significant'] else 'no difference found'}; "
            f"A/B: {'the planted slowdown found' if ab['significant'] else 'the planted slowdown NOT found'} "
            f"({ab['verdict']})"
        ),
    }
    return Outcome(record, {})
