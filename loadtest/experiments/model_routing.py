"""Small/large model routing: the same labelled tasks (easy ones, and hard ones that need the large model; not
every hard one carries the signs the router's rule looks for, and some easy ones look hard) sent three ways: all
to the small model, all to the large one, and to the alias that routes each request (the router's difficulty
rule). Cost: each request's GPU time on the replica type that served it at that type's price (the metrics
service's price model, at full use: independent of how idle each pool was during a short run); the window's
attributed cost (idle time included) and the metrics service's routing savings are kept too. Quality proxy: the share
of tasks served by a model able to do them (a hard task needs the large model), measured from which model
served each request (served_by)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from fleetserve.metrics.v1 import metrics_service_pb2 as mpb
from fleetserve.metrics.v1 import metrics_service_pb2_grpc as mpb_grpc

from fleetserve.client import AsyncClient
from loadtest.experiments import Outcome, progress
from loadtest.fleet import SpawnedFleet
from loadtest.policy_bench import wait_routable
from loadtest.scenarios import words
from services.metrics.cost import PriceBook
from shared.channels import open_channel

SMALL, LARGE, ALIAS = "sim-1b", "sim-8b", "auto"
PROFILES = {SMALL: "h100-llama-1b", LARGE: "h100-llama-8b"}
PRICES = PriceBook()
ARMS = {"all-small": SMALL, "all-large": LARGE, "routed": ALIAS}


@dataclass(frozen=True)
class Task:
    prompt: str
    max_tokens: int
    hard: bool  # the label: only the large model does it well


def tasks(n: int, rng: random.Random, hard_share: float = 0.3) -> list[Task]:
    """Labelled tasks. Easy: short questions (20% are long documents to summarise: they look hard to a length
    rule). Hard: 70% ask to prove or reason step by step, 15% are long analyses, 15% carry no visible sign."""
    out = []
    for _ in range(n):
        if rng.random() < hard_share:
            kind = rng.random()
            if kind < 0.7:
                prompt = f"{rng.choice(('Prove that', 'Explain step by step why'))} {words(rng, 40)}"
            elif kind < 0.85:
                prompt = f"Analyse this contract: {words(rng, 1300)}"
            else:
                prompt = f"Which is right: {words(rng, 50)}"
            out.append(Task(prompt, rng.choice((128, 256)), True))
        else:
            prompt = (
                f"Summarise: {words(rng, 1300)}"
                if rng.random() < 0.2
                else f"Quick question: {words(rng, 30)}"
            )
            out.append(Task(prompt, rng.choice((32, 64)), False))
    return out


async def _attributed(metrics: str, start: float, end: float, expected: int) -> mpb.GetCostResponse:
    async with open_channel(metrics) as ch:
        stub = mpb_grpc.MetricsServiceStub(ch)
        resp = None
        for _ in range(120):  # spans reach the metrics service within a few export intervals
            resp = await stub.GetCost(mpb.GetCostRequest(start_unix=start, end_unix=end), timeout=10)
            if resp.requests >= expected:
                break
            await asyncio.sleep(0.5)
        return resp


async def _send(
    client: AsyncClient, work: list[Task], model: str, concurrency: int
) -> list[tuple[Task, str, float]]:
    """Every task to `model`, `concurrency` at a time: (task, the model that served it, the work's cost at full
    use: its GPU time on that model's replica type x the type's price, the metrics service's own price model)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(task: Task) -> tuple[Task, str, float]:
        async with sem:
            done = await client.complete(
                task.prompt, model=model, max_tokens=task.max_tokens, ignore_eos=True
            )
            u = done.usage
            price = PRICES.price(PROFILES[done.served_by.model])
            usd = (
                price.weight_ms(u.prompt_tokens, u.cached_tokens, u.completion_tokens) * price.usd_per_gpu_ms
            )
            return task, done.served_by.model, usd

    return list(await asyncio.gather(*(one(t) for t in work)))


async def run(args, name: str) -> Outcome:
    n = 10 if args.quick else args.requests
    work = tasks(n, random.Random(args.seed))
    fleet = SpawnedFleet(
        1,
        1.0,
        metrics_export_interval_s=1.0,
        extra_args={"router": ["--model-aliases", f"{ALIAS}={SMALL}|{LARGE}"]},
    )
    arms: dict[str, dict] = {}
    async with fleet as state:
        await fleet.cluster.add_engine(model=LARGE, args=["--profile", PROFILES[LARGE]])
        await wait_routable(state["router"], 1, LARGE)
        await wait_routable(state["router"], 1, SMALL)
        async with AsyncClient(state["gateway"], state["api_key"]) as client:
            for arm, model in ARMS.items():
                progress(f"{name}: {arm} ({n} tasks)")
                start = time.time()
                served = await _send(client, work, model, args.concurrency)
                end = time.time()
                cost = await _attributed(state["metrics"], start - 0.5, end + 0.5, n)
                hard = [m for t, m, _ in served if t.hard]
                easy = [m for t, m, _ in served if not t.hard]
                adequate = sum(1 for t, m, _ in served if not t.hard or m == LARGE)
                arms[arm] = {
                    "requests": len(served),
                    "to_large": sum(1 for _, m, _ in served if m == LARGE),
                    "hard_served_by_large": f"{sum(m == LARGE for m in hard)}/{len(hard)}",
                    "easy_served_by_large": f"{sum(m == LARGE for m in easy)}/{len(easy)}",
                    "quality_proxy": round(adequate / len(served), 4),
                    "cost_at_full_use_usd": round(sum(usd for _, _, usd in served), 7),
                    "window_cost_usd": round(cost.attributed_usd, 6),
                    "attributed_requests": cost.requests,
                    "routing_savings": [
                        {
                            "saved_usd": round(x.saved_usd, 7),
                            "saved_at_full_use_usd": round(x.saved_at_full_use_usd, 7),
                            "small_requests": x.small_requests,
                            "large_requests": x.large_requests,
                            "basis": x.basis,
                        }
                        for x in cost.routing_savings
                    ],
                }
                await asyncio.sleep(1.0)  # the next arm's window starts after this one's last span
    large = arms["all-large"]["cost_at_full_use_usd"]
    for a in arms.values():
        a["cost_vs_all_large"] = round(a["cost_at_full_use_usd"] / large, 3) if large else None
    r = arms["routed"]
    record = {
        "settings": {
            "tasks_per_arm": n,
            "hard_share": 0.3,
            "concurrency": args.concurrency,
            "small": f"{SMALL} (h100-llama-1b)",
            "large": f"{LARGE} (h100-llama-8b)",
            "rule": "router defaults: prompt > 1024 tokens, output > 512, or a keyword -> large",
        },
        "arms": arms,
        "verdict": (
            f"routing cost {r['cost_vs_all_large']}x of all-large ({(1 - (r['cost_vs_all_large'] or 0)):.0%} saved) "
            f"at a quality proxy of {r['quality_proxy']:.0%} (all-large {arms['all-large']['quality_proxy']:.0%}, "
            f"all-small {arms['all-small']['quality_proxy']:.0%} at {arms['all-small']['cost_vs_all_large']}x)"
        ),
    }

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        for arm, a in arms.items():
            ax.scatter(a["cost_vs_all_large"], a["quality_proxy"], s=60)
            ax.annotate(
                arm, (a["cost_vs_all_large"], a["quality_proxy"]), textcoords="offset points", xytext=(6, 4)
            )
        ax.set_xlabel("cost vs all-large")
        ax.set_ylabel("quality proxy (tasks served adequately)")
        ax.set_xlim(0, 1.2)
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Outcome(record, {"cost-quality": plot})
