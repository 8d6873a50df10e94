"""What the sim models for a GPU profile, on a virtual clock: the real Scheduler and cost model driven by a closed
loop of clients, no sleeping, so the calibration against measured vLLM numbers is exact and instant.

    python -m services.engine.calibration [--profile h100-llama-1b] [--out docs/benchmarks/sim_calibration.json]
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from dataclasses import asdict, dataclass

from services.engine.cost_model import CostModel
from services.engine.profile import DEFAULT_PROFILE, load_profile
from services.engine.scheduler import Scheduler
from services.engine.sim_request import SimRequest
from services.engine.sim_tokens import OUTPUT_IDS

# DESIGN.md: AsyncLLM in one process on one H100, 128-token random prompts, 256 output tokens, closed loop.
H100_TABLE = {1: (430, 10.0), 32: (8_896, 50.0), 128: (17_174, 88.0), 256: (19_225, 1_596.0)}
H100_PREFIX = {"prompt_tokens": 1700, "cold_ttft_ms": 37.0, "warm_ttft_ms": 21.0}


@dataclass
class LoadResult:
    """One closed-loop run in modelled time."""

    concurrency: int
    requests: int
    output_tokens_per_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    steps: int
    preemptions: int


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


class VirtualEngine:
    """The sim's step loop with time as a number: requests enter the scheduler after their front-end delay,
    each step advances the clock by its modelled GPU time."""

    def __init__(
        self,
        cost: CostModel,
        *,
        num_kv_blocks: int = 32768,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
    ) -> None:
        self.cost = cost
        self.sched = Scheduler(max_num_seqs, max_num_batched_tokens, num_kv_blocks)
        self.now = 0.0
        self.steps = 0
        self._arrivals: list[tuple[float, int, SimRequest]] = []
        self._n = 0
        self.first_token_at: dict[str, float] = {}
        self.submitted_at: dict[str, float] = {}

    def submit(self, req: SimRequest) -> None:
        self.submitted_at[req.request_id] = self.now
        self._n += 1
        at = self.now + self.cost.frontend_ms(req.prompt_tokens)
        heapq.heappush(self._arrivals, (at, self._n, req))

    def step(self) -> list[SimRequest]:
        """Run one step (or jump to the next arrival when idle); the requests that finished."""
        arrivals, sched = self._arrivals, self.sched
        if not sched.has_work() and arrivals:
            self.now = max(self.now, arrivals[0][0])
        while arrivals and arrivals[0][0] <= self.now:
            sched.add(heapq.heappop(arrivals)[2])
        step = sched.schedule()
        if not step.items:
            if not arrivals:
                raise RuntimeError("nothing can run and nothing will arrive")
            self.now = arrivals[0][0]
            return []
        self.now += self.cost.step_ms(step.decode_seqs, step.prefill_tokens)
        self.steps += 1
        _, finished = sched.complete(step)
        for req, _ in step.items:
            if req.outputs == 1 and req.request_id not in self.first_token_at:
                self.first_token_at[req.request_id] = self.now
        return finished


def closed_loop(
    cost: CostModel,
    concurrency: int,
    *,
    requests: int | None = None,
    prompt_tokens: int = 128,
    output_tokens: int = 256,
    seed: int = 0,
    num_kv_blocks: int = 32768,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
) -> LoadResult:
    """c clients, each sending its next request when the last one finished, random-token prompts (no prefix
    hits, as `vllm bench serve --dataset-name random`), ignore_eos. Measured after the ramp-up: output tokens
    of the requests that finished divided by the time from the first request's end to the last's end."""
    requests = requests or max(4 * concurrency, 16)
    rng = random.Random(seed)
    eng = VirtualEngine(
        cost,
        num_kv_blocks=num_kv_blocks,
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
    )
    sent = 0

    def send() -> None:
        nonlocal sent
        ids = [rng.choice(OUTPUT_IDS) for _ in range(prompt_tokens)]
        eng.submit(
            SimRequest(
                f"r{sent}",
                prompt_ids=ids,
                resumed_ids=[],
                digest=sent,
                max_tokens=output_tokens,
                arrival=sent,
            )
        )
        sent += 1

    for _ in range(min(concurrency, requests)):
        send()
    done: list[tuple[float, SimRequest]] = []
    for _ in range(10_000_000):
        if len(done) == requests:
            break
        for req in eng.step():
            done.append((eng.now, req))
            if sent < requests:
                send()
    else:
        raise RuntimeError("closed loop did not finish")
    # Steady state: skip the first c completions (the ramp-up cohort) when there are enough.
    skip = concurrency if requests >= 2 * concurrency else 0
    window = done[skip:]
    t0 = done[skip - 1][0] if skip else 0.0
    tokens = sum(r.outputs for _, r in window)
    ttft = [eng.first_token_at[r.request_id] - eng.submitted_at[r.request_id] for _, r in done]
    tpot = [(t - eng.first_token_at[r.request_id]) / (r.outputs - 1) for t, r in done if r.outputs > 1]
    return LoadResult(
        concurrency=concurrency,
        requests=requests,
        output_tokens_per_s=round(tokens * 1000.0 / (window[-1][0] - t0), 1),
        ttft_p50_ms=round(statistics.median(ttft), 3),
        ttft_p99_ms=round(_pct(ttft, 0.99), 3),
        tpot_p50_ms=round(statistics.median(tpot), 4),
        tpot_p99_ms=round(_pct(tpot, 0.99), 4),
        steps=eng.steps,
        preemptions=eng.sched.preemptions,
    )


def prefix_ttft(cost: CostModel, prompt_tokens: int = 1700, *, seed: int = 0) -> dict[str, float]:
    """TTFT of one prompt sent twice on an idle engine: cold, then warm (its full blocks cached)."""
    rng = random.Random(seed)
    ids = [rng.choice(OUTPUT_IDS) for _ in range(prompt_tokens)]
    eng = VirtualEngine(cost)
    out: dict[str, float] = {}
    for name in ("cold", "warm"):
        req = SimRequest(name, prompt_ids=ids, resumed_ids=[], digest=0, max_tokens=1)
        eng.submit(req)
        for _ in range(1000):
            if eng.step():
                break
        out[f"{name}_ttft_ms"] = round(eng.first_token_at[name] - eng.submitted_at[name], 3)
        out[f"{name}_cached_tokens"] = req.cached_tokens
    return out


def calibrate(profile: str = DEFAULT_PROFILE, concurrencies: tuple[int, ...] = (1, 32, 128, 256)) -> dict:
    """The modelled numbers of a profile next to the H100 table (which only the h100-llama-1b profile targets)."""
    p = load_profile(profile)
    rows = []
    for c in concurrencies:
        r = asdict(closed_loop(p.cost, c, num_kv_blocks=p.num_kv_blocks))
        measured = H100_TABLE.get(c)
        if measured and p.name == DEFAULT_PROFILE:
            r["measured_tokens_per_s"], r["measured_ttft_p50_ms"] = measured
            r["tokens_per_s_ratio"] = round(r["output_tokens_per_s"] / measured[0], 3)
        rows.append(r)
    prefix = prefix_ttft(p.cost, H100_PREFIX["prompt_tokens"])
    if p.name == DEFAULT_PROFILE:
        prefix["measured_cold_ttft_ms"] = H100_PREFIX["cold_ttft_ms"]
        prefix["measured_warm_ttft_ms"] = H100_PREFIX["warm_ttft_ms"]
    return {
        "profile": p.name,
        "description": p.description,
        "calibrated": p.calibrated,
        "cost": asdict(p.cost),
        "workload": "closed loop, random 128-token prompts, 256 output tokens, ignore_eos; virtual clock",
        "closed_loop": rows,
        "prefix_cache": prefix,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default=DEFAULT_PROFILE)
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args(argv)
    result = calibrate(args.profile)
    text = json.dumps(result, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
