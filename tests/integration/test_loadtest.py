"""`make loadtest` against a real fleet (gateway, router, sim engines on port 0): Locust (headless, then distributed with a master and a
worker) writes its HTML report and CSVs; every scenario over both protocols runs; each request is counted once, so
Locust's Aggregated count is the number of requests the gateway admitted (its usage ledger) and the LLM table's
output tokens are the tokens the ledger charged."""

from __future__ import annotations

import asyncio
import csv
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.docs_commands import ROOT
from tests.integration.test_router import API_KEY, in_process_fleet
from tests.support import assert_eventually

pytestmark = [pytest.mark.slow, pytest.mark.asyncio]

BATCH_ITEMS = 2


async def _locust(
    tmp: Path, fleet, extra: list[str], *, scenarios: str, protocols: str, distributed: bool = False
):
    env = {
        **os.environ,
        "FLEETSERVE_GATEWAY": fleet.gateway.address,
        "FLEETSERVE_GATEWAY_HTTP": fleet.gateway.http_address,
        "FLEETSERVE_API_KEY": API_KEY,
        "FLEETSERVE_SCENARIOS": scenarios,
        "FLEETSERVE_PROTOCOLS": protocols,
        "FLEETSERVE_MAX_TOKENS": "8",
        "FLEETSERVE_PROMPT_TOKENS": "32",
        "FLEETSERVE_BATCH_ITEMS": str(BATCH_ITEMS),
        "FLEETSERVE_SEED": "7",
        "FLEETSERVE_REQUESTS_PER_USER": "3",
    }
    # Each user makes 3 requests and the run ends when all have (not after a time that a loaded machine may not
    # suffice for); --stop-timeout: users finish the request they are in (none is cut off uncounted).
    run = ["--headless", "--stop-timeout", "30", "--html", "report.html", "--csv", "lt", *extra]
    if distributed:
        cmd = [sys.executable, "-m", "loadtest.distributed", "--workers", "1", *run]
        # The master announces the end of its ramp-up without waiting for the workers' reports, as it does after
        # its 1 s wait when a loaded worker has not reported yet: the worker must still run every user it was sent.
        env["LOCUST_WAIT_FOR_WORKERS_REPORT_AFTER_RAMP_UP"] = "0"
    else:
        cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"), *run]
    # In a thread: the fleet's servers run on this test's event loop.
    done = await asyncio.to_thread(
        subprocess.run, cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _rows(path: Path) -> dict[tuple[str, str], dict]:
    with path.open() as f:
        return {(r["Type"], r["Name"]): r for r in csv.DictReader(f)}


def _debug(fleet):
    with sqlite3.connect(fleet.tmp / "gateway.db") as db:
        return db.execute(
            "SELECT status, partial, COUNT(*), SUM(completion_tokens) FROM usage_ledger GROUP BY 1, 2"
        ).fetchall()


def _ledger(fleet) -> tuple[int, int]:
    with sqlite3.connect(fleet.tmp / "gateway.db") as db:
        n, tokens = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(completion_tokens), 0) FROM usage_ledger"
        ).fetchone()
    return n, tokens


async def test_loadtest_reports_every_scenario_once_per_request_with_llm_metrics(tmp_path):
    """All four scenarios over gRPC and HTTP: the report and CSVs are written; Locust's rows are exactly the
    eight (protocol, scenario) pairs plus Aggregated (no second 'ttft' row); the Aggregated count equals the
    requests the gateway admitted (a gRPC batch request is a job of BATCH_ITEMS items) and the LLM table's output
    tokens equal what the gateway's ledger charged; then a distributed run (master + worker) merges the worker's
    TTFT into the master's LLM table."""
    (tmp_path / "fleet").mkdir()
    async with in_process_fleet(tmp_path / "fleet", gateway=True) as fleet:
        await _locust(
            tmp_path,
            fleet,
            ["--users", "8", "--spawn-rate", "8", "--run-time", "120s"],
            scenarios="chat,multiturn,batch,bursty",
            protocols="grpc,http",
        )
        stats = _rows(tmp_path / "lt_stats.csv")
        pairs = {(p, s) for p in ("grpc", "http") for s in ("chat", "multiturn", "batch", "bursty")}
        assert set(stats) == pairs | {("", "Aggregated")}
        total = int(stats[("", "Aggregated")]["Request Count"])
        assert total == sum(int(stats[k]["Request Count"]) for k in pairs) == 8 * 3
        assert int(stats[("", "Aggregated")]["Failure Count"]) == 0
        admitted = total + (BATCH_ITEMS - 1) * int(stats[("grpc", "batch")]["Request Count"])
        # The ledger is written in batches off the gateway's loop: wait for the last rows.
        await assert_eventually(
            lambda: _ledger(fleet)[0] == admitted,
            timeout_s=20,
            message=f"ledger {_ledger(fleet)} vs {admitted} {_debug(fleet)} {[(k, v['Request Count']) for k, v in stats.items()]}",
        )
        llm = _rows(tmp_path / "lt_llm.csv")
        assert int(llm[("", "Aggregated")]["Requests OK"]) == total
        assert int(llm[("", "Aggregated")]["Output tokens"]) == _ledger(fleet)[1]
        assert float(llm[("", "Aggregated")]["Output tokens/s"]) > 0
        assert (
            float(llm[("grpc", "chat")]["TTFT p50 ms"]) > 0
            and float(llm[("http", "multiturn")]["TTFT p99 ms"]) > 0
        )
        assert llm[("grpc", "batch")]["TTFT p50 ms"] == ""  # a job has no first token
        report = (tmp_path / "report.html").read_text()
        assert "LLM metrics (fleetserve)" in report and "Output tokens/s" in report

        for f in tmp_path.glob("lt*"):
            f.unlink()
        await _locust(
            tmp_path,
            fleet,
            ["--users", "2", "--spawn-rate", "2", "--run-time", "120s"],
            scenarios="chat",
            protocols="grpc",
            distributed=True,
        )
        stats = _rows(tmp_path / "lt_stats.csv")
        llm = _rows(tmp_path / "lt_llm.csv")
        n = int(stats[("", "Aggregated")]["Request Count"])
        assert n == 2 * 3 and int(llm[("", "Aggregated")]["Requests OK"]) == n
        assert float(llm[("grpc", "chat")]["TTFT p50 ms"]) > 0
