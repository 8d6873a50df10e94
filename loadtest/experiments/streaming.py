"""Streaming vs whole response: how long a user waits for the first visible token when the reply streams (SSE)
and when it arrives whole, over the same OpenAI-compatible HTTP API, one request at a time, interleaved."""

from __future__ import annotations

import time

import aiohttp

from loadtest.experiments import Outcome, progress
from loadtest.fleet import SpawnedFleet
from loadtest.scenarios import SseMeter
from loadtest.summary import percentiles
from loadtest.workload import Workload


async def _one(session: aiohttp.ClientSession, url: str, body: dict, stream: bool) -> tuple[float, float]:
    """(seconds to the first visible token, seconds to the end) of one request."""
    start = time.perf_counter()
    async with session.post(url, json={**body, "stream": stream}) as resp:
        resp.raise_for_status()
        if not stream:
            await resp.json()
            end = time.perf_counter() - start
            return end, end  # nothing is visible until the whole reply is
        meter = SseMeter(start)
        async for line in resp.content:
            meter.on_line(line.strip(), time.perf_counter())
        result = meter.result(time.perf_counter())
        if not result.ok:
            raise RuntimeError(f"stream failed: {result.error} {result.message}")
        return result.ttft_s, result.e2e_s


async def run(args, name: str) -> Outcome:
    n = 6 if args.quick else args.requests
    max_tokens = 32 if args.quick else args.max_tokens
    workload = Workload(prompt_tokens=128, max_tokens=max_tokens, seed=args.seed)
    first: dict[str, list[float]] = {"streamed": [], "whole": []}
    end: dict[str, list[float]] = {"streamed": [], "whole": []}
    async with SpawnedFleet(1, args.speed_factor) as state:
        url = f"http://{state['gateway_http']}/v1/chat/completions"
        headers = {"Authorization": f"Bearer {state['api_key']}"}
        async with aiohttp.ClientSession(headers=headers) as session:
            for i in range(n + 1):  # the first pair warms the path up and is not counted
                body = {
                    "model": workload.model,
                    "messages": [{"role": "user", "content": workload.prompt(i)}],
                    "max_tokens": max_tokens,
                    "ignore_eos": True,
                }
                order = ("streamed", "whole") if i % 2 else ("whole", "streamed")
                for mode in order:
                    f, e = await _one(session, url, body, mode == "streamed")
                    if i:
                        first[mode].append(f)
                        end[mode].append(e)
                if i and i % 10 == 0:
                    progress(f"{name}: {i}/{n} pairs")
    s, w = percentiles(first["streamed"]), percentiles(first["whole"])
    record = {
        "settings": {
            "requests_per_mode": n,
            "max_tokens": max_tokens,
            "prompt_tokens": 128,
            "speed_factor": args.speed_factor,
            "concurrency": 1,
        },
        "first_visible_token_ms": {"streamed": s, "whole": w},
        "end_to_end_ms": {"streamed": percentiles(end["streamed"]), "whole": percentiles(end["whole"])},
        "whole_over_streamed_p50": round(w["p50"] / s["p50"], 1) if s["p50"] else None,
    }
    record["verdict"] = (
        f"streaming shows the first token after {s['p50']} ms (p50) instead of {w['p50']} ms for the whole "
        f"reply: {record['whole_over_streamed_p50']}x sooner, with the same end-to-end time"
    )

    def plot(path):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.boxplot([[x * 1000 for x in first["streamed"]], [x * 1000 for x in first["whole"]]])
        ax.set_xticks([1, 2], ["streamed (SSE)", "whole response"])
        ax.set_ylabel("time to first visible token (ms)")
        ax.set_title(f"{n} requests each, {max_tokens} output tokens")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    return Outcome(record, {"first-token": plot})
