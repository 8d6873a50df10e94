"""Gateways sharing one database (a SQLite file on one host, PostgreSQL across hosts; every test runs on both):
keys, limits and budgets made on one apply on the others, the usage ledger adds up exactly, a batch job's items
are run by every gateway but each by one, and the items of a gateway that is killed are taken over."""

from __future__ import annotations

import contextlib
import signal
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from services.gateway.db import connect, sqlite_path
from services.gateway.schema import jobs_path_beside
from shared.errors import details_of
from tests.integration.test_gateway_redis import gateway_process
from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
from tests.support import assert_eventually, ready_address

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parents[2]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("shared"), engines=2) as f:
        yield f


@contextlib.asynccontextmanager
async def gateways(fleet, db_url: str, n: int = 2, **overrides):
    """n gateways in this process on one database (fast config polling, no auth cache, quick job scans)."""
    apps = []
    try:
        for _ in range(n):
            settings = {
                "router_address": fleet.router.address,
                "db_url": db_url,
                "bootstrap_api_key": API_KEY,
                "auth_cache_ttl_s": 0.0,
                "config_poll_s": 0.05,
                "budget_refresh_s": 0.0,
                "ledger_flush_interval_s": 0.05,
                "http_port": -1,
                "job_poll_s": 0.1,
                **overrides,
            }
            apps.append(await start_gateway(GatewaySettings(**settings), fleet.telemetry))
        yield apps
    finally:
        for app in apps:
            await app.stop(0.5)


def auth(key: str = API_KEY):
    return (("authorization", f"Bearer {key}"),)


def stub(fleet, app) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(fleet.channel(app.address))


async def generate(fleet, app, key: str, max_tokens: int = 12, prompt: str = "") -> pb.GenerateResponse | str:
    """One generation; its last chunk (with prompt: its whole text)."""
    last, text = None, []
    call = stub(fleet, app).Generate(
        pb.GenerateRequest(
            model=MODEL, prompt=prompt or "a shared budget", max_tokens=max_tokens, temperature=0
        ),
        metadata=auth(key),
        timeout=20,
    )
    async for resp in call:
        last = resp
        text.append(resp.chunk.text)
    return "".join(text) if prompt else last


async def test_keys_limits_and_budgets_made_on_one_gateway_apply_on_every_other(fleet, db_url):
    """A tenant and key created through one gateway authenticate on the other; a token budget is spent by both
    together (refused on both once used; over by at most one request per gateway, whose usage the other could
    not see yet) and the ledger holds every served token exactly once; a key revoked through one is refused by
    the other."""
    async with gateways(fleet, db_url) as (a, b):
        await a.tenants.create_tenant("shared-co", tenant_id="shared-co")
        await a.tenants.set_tenant("shared-co", token_budget=400, budget_period="day")
        key = await a.tenants.add_key("shared-co")
        served, refused, size = 0, set(), 0
        for i in range(60):
            app = (a, b)[i % 2]
            try:
                last = await generate(fleet, app, key)
            except grpc.aio.AioRpcError as e:
                assert details_of(e).reason == "TOKEN_BUDGET_EXHAUSTED"
                refused.add(app.address)
                if len(refused) == 2:
                    break
                continue
            size = last.chunk.usage.prompt_tokens + last.chunk.usage.completion_tokens
            served += size
        assert refused == {a.address, b.address}, "the budget was never exhausted on both gateways"
        # Each gateway sees the other's usage once its ledger row is written, just after the stream ends: a
        # request admitted meanwhile (by either) may pass the budget; a few of them at most, never more.
        assert 400 - size < served <= 400 + 4 * size, (served, size)
        await a.servicer.pipeline.admission.ledger.flush()
        await b.servicer.pipeline.admission.ledger.flush()
        ledger = await a.databases.accounts.fetchval(
            "SELECT SUM(prompt_tokens + completion_tokens) FROM usage_ledger WHERE tenant_id = 'shared-co'"
        )
        assert ledger == served, (ledger, served)
        (info,) = await b.tenants.list_keys("shared-co")
        assert await b.tenants.revoke_key_id(info.key_id)

        async def refused_on_a() -> bool:
            try:
                await generate(fleet, a, key, max_tokens=1)
            except grpc.aio.AioRpcError as e:
                return e.code() == grpc.StatusCode.UNAUTHENTICATED
            return False

        await assert_eventually(refused_on_a, timeout_s=10)


async def test_a_job_is_run_by_every_gateway_and_each_item_once(fleet, db_url):
    """A job submitted to one gateway is picked up by the other too (each runs at most 2 of the tenant's items
    at once, so the first cannot take them all); every item ends with one result and was started exactly once."""
    async with gateways(fleet, db_url, job_concurrency=8, job_tenant_concurrency=2) as (a, b):
        items = [pb.BatchItem(custom_id=f"i{i}", prompt=f"item {i} of a shared job") for i in range(16)]
        req = pb.SubmitBatchRequest(model=MODEL, items=items, max_tokens=200, temperature=0)
        job = (await stub(fleet, a).SubmitBatch(req, metadata=auth(), timeout=5)).job

        async def completed():
            r = await stub(fleet, b).GetJob(
                pb.GetJobRequest(job_id=job.job_id, include_results=True), metadata=auth(), timeout=5
            )
            return r if r.job.state == pb.JOB_STATE_COMPLETED else None

        resp = await assert_eventually(completed, timeout_s=60, interval_s=0.05)
        assert (resp.job.succeeded, resp.job.failed) == (16, 0)
        assert [r.index for r in resp.results] == list(range(16))
        assert await a.jobs.store.runs(job.job_id) == [1] * 16
        assert a.jobs.finished_items + b.jobs.finished_items == 16
        assert a.jobs.finished_items > 0 and b.jobs.finished_items > 0, "one gateway ran the whole job"


def jobs_url(db_url: str) -> str:
    """Where the jobs table is: the PostgreSQL database itself, or the SQLite file beside the accounts one."""
    path = sqlite_path(db_url)
    return db_url if path is None else f"sqlite:///{jobs_path_beside(path)}"


async def test_a_killed_gateways_items_are_taken_over_by_another(fleet, db_url, tmp_path):
    """SIGKILL a gateway process while it runs a job's items: another gateway on the same database takes them
    over once their leases end and completes the job; each item has one result, only items the dead gateway
    held were started twice, and those continue after the tokens their first run saved with its lease renewals
    (their text is exactly a fresh generation's)."""
    lease = "1.5"
    # Long enough that items are still running at a lease renewal (every lease/3 = 0.5 s), when progress is
    # saved: at 400 tokens an item took 80 ms on a quiet box and all 8 could end before the first renewal.
    tokens = 4000
    flags = (f"--db-url={db_url}", f"--job-lease-s={lease}", "--job-concurrency=2")
    with gateway_process(tmp_path, "doomed", fleet.router.address, *flags) as (proc, ready):
        address = await assert_eventually(
            lambda: ready_address(ready), timeout_s=180, message="gateway not ready"
        )
        s = pb_grpc.InferenceServiceStub(fleet.channel(address))
        items = [pb.BatchItem(custom_id=f"k{i}", prompt=f"takeover item {i}") for i in range(8)]
        req = pb.SubmitBatchRequest(model=MODEL, items=items, max_tokens=tokens, temperature=0)
        job = (await s.SubmitBatch(req, metadata=auth(), timeout=10)).job
        db = await connect(jobs_url(db_url))
        try:

            async def held_by_it() -> set[int]:
                rows = await db.fetch(
                    "SELECT idx FROM job_items WHERE job_id = ? AND result IS NULL AND lease_owner IS NOT NULL",
                    job.job_id,
                )
                done = await db.fetchval(
                    "SELECT COUNT(*) FROM job_items WHERE job_id = ? AND result IS NOT NULL", job.job_id
                )
                return {r[0] for r in rows} if rows and done >= 1 else set()

            seen: dict[int, int] | None = None

            async def progress_saved() -> bool:
                # A save seen within one poll of when it was made (its row changed since the last poll) that leaves
                # at least half of the item's tokens: only a fresh save says where the item is (saves come every
                # lease/3 = 0.5 s, in which an item moves ~2,500 tokens on a quiet box, so an older one can belong
                # to an item about to end: seen twice, the item ended between this check and the kill).
                nonlocal seen
                rows = await db.fetch(
                    "SELECT idx, progress FROM job_items WHERE job_id = ? AND result IS NULL AND progress IS NOT NULL",
                    job.job_id,
                )
                now = {i: len(common_pb2.GenerateChunk.FromString(p).token_ids) for i, p in rows}
                fresh = [] if seen is None else [n for i, n in now.items() if seen.get(i) != n]
                seen = now
                return any(n <= tokens // 2 for n in fresh)

            await assert_eventually(held_by_it, timeout_s=60, interval_s=0.01)
            await assert_eventually(progress_saved, timeout_s=60, interval_s=0.01)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            held = await held_by_it()  # the dead gateway's leases stay until they end and are taken over
            saved = {
                i
                for (i,) in await db.fetch(
                    "SELECT idx FROM job_items WHERE job_id = ? AND result IS NULL AND progress IS NOT NULL",
                    job.job_id,
                )
            }
            async with gateways(fleet, db_url, n=1, job_lease_s=float(lease)) as (b,):
                bs = stub(fleet, b)

                async def completed():
                    r = await bs.GetJob(
                        pb.GetJobRequest(job_id=job.job_id, include_results=True), metadata=auth(), timeout=5
                    )
                    return r if r.job.state == pb.JOB_STATE_COMPLETED else None

                resp = await assert_eventually(completed, timeout_s=60, interval_s=0.05)
                assert saved and b.jobs.resumed_items >= len(saved), (saved, held, b.jobs.resumed_items)
                for r in resp.results:
                    assert r.usage.completion_tokens == tokens
                    if r.index in held:
                        fresh = await generate(
                            fleet, b, API_KEY, max_tokens=tokens, prompt=f"takeover item {r.index}"
                        )
                        assert r.text == fresh, (
                            f"item {r.index}: resumed text differs from a fresh generation"
                        )
            runs = await db.fetch("SELECT idx, runs FROM job_items WHERE job_id = ? ORDER BY idx", job.job_id)
        finally:
            await db.close()
    assert (resp.job.succeeded, resp.job.failed) == (8, 0)
    assert [r.index for r in resp.results] == list(range(8))
    twice = {i for i, n in runs if n == 2}
    assert all(n in (1, 2) for _, n in runs) and twice <= held and twice, runs


async def test_a_rows_usage_is_committed_before_its_last_chunk_and_a_budget_caps_the_last_request(
    fleet, db_url
):
    """--ledger-sync on: the usage row of a request is in the database when its last chunk reaches the client
    (a gateway killed after that loses nothing billed), though the background writer waits 30 s between writes.
    A budget with room for fewer tokens than max_tokens caps the generation there (served_by says so), and
    the budget then refuses on every gateway: used up exactly, not passed."""
    async with gateways(fleet, db_url, ledger_sync="on", ledger_flush_interval_s=30.0) as (a, b):
        await a.tenants.create_tenant("sync-co", tenant_id="sync-co")
        await a.tenants.set_tenant("sync-co", token_budget=100, budget_period="day")
        key = await a.tenants.add_key("sync-co")
        db = a.databases.accounts
        for n, app in enumerate((a, b, a), 1):
            call = stub(fleet, app).Generate(
                pb.GenerateRequest(model=MODEL, prompt="sync me", max_tokens=40, ignore_eos=True),
                metadata=auth(key),
                timeout=20,
            )
            chunks = []
            async for resp in call:
                chunks.append(resp.chunk)
                if resp.chunk.finish_reason:
                    rows = await db.fetchval("SELECT COUNT(*) FROM usage_ledger WHERE tenant_id = 'sync-co'")
                    assert rows == n, "the row was not committed before the last chunk"
            used = await db.fetchval(
                "SELECT SUM(prompt_tokens + completion_tokens) FROM usage_ledger WHERE tenant_id = 'sync-co'"
            )
        last = chunks[-1]
        assert "budget" in chunks[0].served_by.degraded
        assert last.usage.completion_tokens < 40 and used == 100
        for app in (a, b):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generate(fleet, app, key, max_tokens=1)
            assert details_of(refused.value).reason == "TOKEN_BUDGET_EXHAUSTED"
