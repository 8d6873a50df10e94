"""`python -m loadtest.auth_bench`: how long a gateway's authenticate() takes per request at a low request rate
(one request every 1.05 config-poll intervals, a single stream of long generations), without and with the
background refresh of the tenant store (TenantStore.start_refresh), interleaved in one run. Without it the
request-side config-version check is due on every such request: a database round trip through a thread before
the first token. Prints JSON (per run: p50 and p90 in microseconds)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time

from services.gateway.schema import open_accounts
from services.gateway.tenants import TenantStore

KEY = "fsk-bench-key-0123456789"


async def one_run(url: str, refresh: bool, poll_s: float, requests: int) -> list[float]:
    store = TenantStore(await open_accounts(url), cache_ttl_s=5.0, version_poll_s=poll_s)
    await store.authenticate(KEY)
    if refresh:
        store.start_refresh()
    took = []
    try:
        for _ in range(requests):
            await asyncio.sleep(poll_s * 1.05)
            t0 = time.perf_counter()
            if await store.authenticate(KEY) is None:
                raise RuntimeError("the bench key was not found")
            took.append((time.perf_counter() - t0) * 1e6)
    finally:
        await store.close()
    return took


async def bench(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="auth-bench-") as d:
        url = f"sqlite:///{d}/accounts.db"
        setup = TenantStore(await open_accounts(url))
        await setup.bootstrap(KEY)
        await setup.close()
        runs: dict[str, list[list[float]]] = {"off": [], "on": []}
        for rep in range(args.repeats):  # interleaved, the order turned each repeat
            for mode in ("off", "on") if rep % 2 == 0 else ("on", "off"):
                runs[mode].append(await one_run(url, mode == "on", args.poll_s, args.requests))
    return {
        "command": "python -m loadtest.auth_bench " + " ".join(sys.argv[1:]),
        "poll_s": args.poll_s,
        "requests_per_run": args.requests,
        "refresh": {
            mode: {
                "p50_us": [round(statistics.median(r), 1) for r in rs],
                "p90_us": [round(sorted(r)[int(0.9 * (len(r) - 1))], 1) for r in rs],
            }
            for mode, rs in runs.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.auth_bench", description=__doc__)
    p.add_argument("--poll-s", type=float, default=0.2, help="the store's config poll interval")
    p.add_argument("--requests", type=int, default=40, help="requests per run")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    import structlog
    import uvloop

    logging.disable(logging.INFO)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # stdout: the JSON alone

    print(json.dumps(uvloop.run(bench(args)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
