"""The benchmark against a real fleet: JSON shape, every request accounted for, --compare's two records and ratios,
errors reported rather than raised, and --spawn starting and stopping a fleet of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio

from loadtest import bench
from loadtest.fleet import structlog_to_stderr
from shared.cluster import write_state
from shared.telemetry import setup_telemetry

pytestmark = pytest.mark.asyncio(loop_scope="module")

REPO = Path(__file__).resolve().parents[2]
SERVICES = ("registry", "engine", "router", "gateway")
IN_PROCESS = all((REPO / "services" / s / "app.py").exists() for s in SERVICES)

# Small and fast: the sim runs 50x real time, so a whole run takes well under a second of generation.
SPEED = 50.0
SMALL = ["--prompt-tokens", "24", "--max-tokens", "12", "--seed", "7", "--quiet"]
RECORD_KEYS = {
    "mode", "concurrency", "requests", "errors", "error_codes", "duration_s", "output_tokens",
    "output_tokens_per_s", "ttft_ms", "tpot_ms", "e2e_ms",
}  # fmt: skip
PCTS = {"p50", "p95", "p99", "mean"}  # summaries carry the mean beside the percentiles (loadtest/summary.py)


def load(concurrency: int, requests: int) -> list[str]:
    return ["--concurrency", str(concurrency), "--requests", str(requests), *SMALL]


class Fleet:
    """Where the test fleet listens."""

    def __init__(self, gateway: str, api_key: str, engine: str, data_dir: Path) -> None:
        self.gateway, self.api_key, self.engine, self.data_dir = gateway, api_key, engine, data_dir


@contextlib.asynccontextmanager
async def in_process_fleet(tmp: Path):
    """Registry, one fast sim engine, router and gateway in this process, each via its start()."""
    from services.engine.app import start as start_engine
    from services.engine.config import EngineSettings
    from services.gateway.app import start as start_gateway
    from services.gateway.config import GatewaySettings
    from services.registry.app import start as start_registry
    from services.registry.config import RegistrySettings
    from services.router.app import start as start_router
    from services.router.config import RouterSettings

    key = "fsk-bench-test-key"
    apps = []
    try:
        registry = await start_registry(
            RegistrySettings(db_path=str(tmp / "registry.db"), lease_ttl_s=2.0, heartbeat_interval_s=0.2),
            setup_telemetry("registry"),
        )
        apps.append(registry)
        engine = await start_engine(
            EngineSettings(
                registry_address=registry.address, replica_id="engine-1", model="sim-1b", speed_factor=SPEED
            ),
            setup_telemetry("engine"),
        )
        apps.append(engine)
        router = await start_router(
            RouterSettings(registry_address=registry.address), setup_telemetry("router")
        )
        apps.append(router)
        gateway = await start_gateway(
            GatewaySettings(
                router_address=router.address, db_path=str(tmp / "gateway.db"), bootstrap_api_key=key
            ),
            setup_telemetry("gateway"),
        )
        apps.append(gateway)
        yield Fleet(gateway.address, key, engine.address, tmp)
    finally:
        for app in reversed(apps):
            await app.stop(0.5)


@contextlib.asynccontextmanager
async def process_fleet(tmp: Path):
    """The same fleet as separate processes (the launcher `fleetserve up` uses)."""
    from tests.integration.conftest import running_cluster

    async with running_cluster(tmp, engines=1, speed_factor=SPEED) as cluster:
        yield Fleet(cluster.gateway, cluster.api_key, cluster.procs["engine-1"].address, tmp)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench-fleet")
    start = in_process_fleet if IN_PROCESS else process_fleet
    # In-process services log with structlog, whose default writes to stdout, where the bench's JSON goes.
    with structlog_to_stderr():
        async with start(tmp) as f:
            # A state file as `fleetserve up` writes it, for the runs that find the fleet without flags.
            write_state(
                {"gateway": f.gateway, "api_key": f.api_key, "engines": {"engine-1": f.engine}}, tmp / "state"
            )
            yield f


async def bench_main(argv: list[str], capsys, timeout_s: float = 60) -> tuple[int, dict | None, str]:
    """Run bench.main in a worker thread (it owns its event loop; the fleet runs on this one)."""
    capsys.readouterr()
    rc = await asyncio.wait_for(asyncio.to_thread(bench.main, argv), timeout=timeout_s)
    out = capsys.readouterr()
    return rc, (json.loads(out.out) if out.out.strip() else None), out.err


def check_record(rec: dict, mode: str, requests: int, max_tokens: int = 12) -> None:
    assert RECORD_KEYS <= set(rec), f"missing keys: {RECORD_KEYS - set(rec)}"
    assert rec["mode"] == mode
    assert rec["requests"] == requests
    assert rec["errors"] == 0, rec.get("first_error")
    assert rec["error_codes"] == {}
    assert rec["output_tokens"] == requests * max_tokens  # ignore_eos: exact lengths
    assert rec["duration_s"] > 0 and rec["output_tokens_per_s"] > 0
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        pct = rec[metric]
        assert set(pct) == PCTS
        assert 0 < pct["p50"] <= pct["p95"] <= pct["p99"], (metric, pct)
    assert rec["ttft_ms"]["p50"] <= rec["e2e_ms"]["p50"]


async def test_mesh_run_accounts_for_every_request(fleet, capsys):
    """Through the gateway: one JSON object on stdout with all requests done, no errors, exact token counts."""
    rc, rec, err = await bench_main(
        ["--gateway", fleet.gateway, "--api-key", fleet.api_key, *load(8, 40)],
        capsys,
    )
    assert rc == 0, err
    check_record(rec, "mesh", 40)
    assert rec["concurrency"] == 8 and rec["target"] == fleet.gateway


async def test_compare_yields_both_records_and_ratios(fleet, capsys):
    """--compare, finding the fleet through its state file: a direct and a mesh record, and the mesh's ratios."""
    rc, out, err = await bench_main(
        ["--compare", "--data-dir", str(fleet.data_dir / "state"), *load(4, 16)],
        capsys,
    )
    assert rc == 0, err
    assert set(out) == {"direct", "mesh", "ratio"}
    check_record(out["direct"], "direct", 16)
    check_record(out["mesh"], "mesh", 16)
    assert out["direct"]["target"] == fleet.engine and out["mesh"]["target"] == fleet.gateway
    ratio = out["ratio"]
    assert ratio["output_tokens_per_s"] == pytest.approx(
        out["mesh"]["output_tokens_per_s"] / out["direct"]["output_tokens_per_s"], rel=1e-3
    )
    assert ratio["ttft_p50_ms_added"] == pytest.approx(
        out["mesh"]["ttft_ms"]["p50"] - out["direct"]["ttft_ms"]["p50"], abs=1e-2
    )
    assert ratio["ttft_p99_ms_added"] == pytest.approx(
        out["mesh"]["ttft_ms"]["p99"] - out["direct"]["ttft_ms"]["p99"], abs=1e-2
    )


async def test_direct_run_through_the_cli(fleet, capsys):
    """`fleetserve bench --direct` reaches the same code: one engine, no gateway, all requests served."""
    from shared.cli.main import main as cli_main

    capsys.readouterr()
    argv = ["bench", "--direct", "--engine", fleet.engine, *load(3, 7)]
    rc = await asyncio.wait_for(asyncio.to_thread(cli_main, argv), timeout=60)
    out = capsys.readouterr()
    assert rc == 0, out.err
    check_record(json.loads(out.out), "direct", 7)


async def test_request_errors_are_reported_not_raised(fleet, capsys):
    """A wrong API key fails every request; the run still completes (exit 0) and counts them by code and reason."""
    rc, rec, err = await bench_main(
        ["--gateway", fleet.gateway, "--api-key", "fsk-wrong", *load(2, 5)],
        capsys,
    )
    assert rc == 0, err
    assert rec["requests"] == 5 and rec["errors"] == 5
    assert rec["error_codes"] == {"UNAUTHENTICATED": 5}
    assert rec["error_reasons"] == {"INVALID_API_KEY": 5}
    assert rec["output_tokens"] == 0 and rec["ttft_ms"]["p50"] is None


async def test_module_run_prints_only_json_on_stdout(fleet):
    """`python -m loadtest.bench`: stdout is exactly one JSON object; progress and logs go to stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.bench", "--gateway", fleet.gateway, "--api-key", fleet.api_key,
        "--concurrency", "4", "--requests", "8", "--prompt-tokens", "8", "--max-tokens", "12",
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode == 0, err.decode()
    check_record(json.loads(out), "mesh", 8)


@pytest.mark.slow
async def test_spawn_starts_and_stops_its_own_fleet(capsys, monkeypatch):
    """--spawn (what `make bench` runs): a fresh fleet of processes, a --compare run on it with the fleet's own
    key (not another cluster's from the environment), then a clean stop."""
    monkeypatch.setenv("FLEETSERVE_API_KEY", "fsk-some-other-cluster")
    rc, out, err = await bench_main(
        ["--spawn", "--engines", "1", "--speed-factor", str(SPEED), "--compare", *load(4, 8)],
        capsys,
        timeout_s=150,
    )
    assert rc == 0, err
    check_record(out["direct"], "direct", 8)
    check_record(out["mesh"], "mesh", 8)
    assert "stopping the fleet" in err and "non-zero exits" not in err
