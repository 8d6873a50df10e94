"""Batch jobs over real servers: SubmitBatch returns at once, GetJob reports progress and results, items run at
batch priority with bounded concurrency, idempotency keys, per-tenant isolation, and a job that survives the
gateway process being killed mid-job (finished items kept, the rest run after the restart)."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
import pytest_asyncio
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as pb_grpc

from services.gateway.app import start as start_gateway
from services.gateway.config import GatewaySettings
from services.gateway.jobs import JobRunner, JobStore, item_requests
from services.gateway.schema import open_databases
from shared.errors import ErrorDetails, details_of
from tests.integration.conftest import running_cluster
from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")

JOB_CONCURRENCY = 2


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    """The in-process fleet, its gateway replaced by one that runs at most JOB_CONCURRENCY items at once."""
    tmp = tmp_path_factory.mktemp("jobs")
    async with in_process_fleet(tmp) as f:
        f.gateway = await start_gateway(
            GatewaySettings(
                router_address=f.router.address,
                db_path=str(tmp / "gateway.db"),
                bootstrap_api_key=API_KEY,
                auth_cache_ttl_s=0.0,
                job_concurrency=JOB_CONCURRENCY,
            ),
            f.telemetry,
        )
        yield f


def auth(key: str = API_KEY):
    return (("authorization", f"Bearer {key}"),)


def stub(fleet) -> pb_grpc.InferenceServiceStub:
    return pb_grpc.InferenceServiceStub(fleet.channel(fleet.gateway.address))


def batch(n: int, max_tokens: int = 8, key: str = "", **kw) -> pb.SubmitBatchRequest:
    items = [pb.BatchItem(custom_id=f"item-{i}", prompt=f"prompt number {i}") for i in range(n)]
    return pb.SubmitBatchRequest(
        model=MODEL, items=items, max_tokens=max_tokens, temperature=0, idempotency_key=key, **kw
    )


async def wait_completed(s: pb_grpc.InferenceServiceStub, job_id: str, key: str = API_KEY, timeout_s=30):
    async def done():
        resp = await s.GetJob(
            pb.GetJobRequest(job_id=job_id, include_results=True), metadata=auth(key), timeout=5
        )
        return resp if resp.job.state == pb.JOB_STATE_COMPLETED else None

    return await assert_eventually(done, timeout_s=timeout_s, interval_s=0.05)


async def test_submit_then_get_job_results(fleet):
    """A job of prompts and a chat item completes; each result has text, usage and its custom_id; the job's
    usage is the sum of its items'."""
    s = stub(fleet)
    req = batch(5, max_tokens=6)
    req.items.add(custom_id="chat", messages=[common_pb2.ChatMessage(role="user", content="hi there")])
    submitted = await s.SubmitBatch(req, metadata=auth(), timeout=5)
    job = submitted.job
    assert job.job_id.startswith("job-") and job.total == 6
    assert job.state in (pb.JOB_STATE_QUEUED, pb.JOB_STATE_RUNNING)
    resp = await wait_completed(s, job.job_id)
    assert (resp.job.succeeded, resp.job.failed) == (6, 0)
    assert [r.index for r in resp.results] == list(range(6))
    assert [r.custom_id for r in resp.results] == [f"item-{i}" for i in range(5)] + ["chat"]
    assert all(r.text and r.usage.completion_tokens > 0 and len(r.request_id) == 32 for r in resp.results)
    assert resp.job.usage.completion_tokens == sum(r.usage.completion_tokens for r in resp.results)
    assert resp.job.usage.prompt_tokens == sum(r.usage.prompt_tokens for r in resp.results)
    assert resp.job.completed_at >= resp.job.created_at > 0


async def test_items_run_at_batch_priority_with_bounded_concurrency(fleet):
    """Every stored item request is PRIORITY_BATCH, and the engines never see more than job_concurrency of the
    job's items at once."""
    s = stub(fleet)
    # Items long enough for the 10 ms sampler to see them run: with 40 tokens each, a loaded machine once let every
    # item finish between two samples (peak 0).
    job = (await s.SubmitBatch(batch(8, max_tokens=400), metadata=auth(), timeout=5)).job
    store = fleet.gateway.jobs.store
    assert {r.request.priority for r in await store.pending(job.job_id)} <= {common_pb2.PRIORITY_BATCH}
    peak = 0

    async def sample_until_done():
        nonlocal peak
        peak = max(peak, await fleet.busy_total())
        return (await fleet.gateway.jobs.store.job(job.job_id)).state == pb.JOB_STATE_COMPLETED

    await assert_eventually(sample_until_done, timeout_s=60, interval_s=0.01)
    assert 1 <= peak <= JOB_CONCURRENCY


async def test_idempotency_key_returns_the_same_job(fleet):
    """A retried submit with the same key gets the first job; the same key with another request is refused;
    another tenant's same key is its own job."""
    s = stub(fleet)
    first = (await s.SubmitBatch(batch(2, key="nightly-1"), metadata=auth(), timeout=5)).job
    again = (await s.SubmitBatch(batch(2, key="nightly-1"), metadata=auth(), timeout=5)).job
    assert again.job_id == first.job_id
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.SubmitBatch(batch(3, key="nightly-1"), metadata=auth(), timeout=5)
    d = details_of(exc.value)
    assert (d.code, d.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "IDEMPOTENCY_KEY_REUSED")
    other = await fleet.gateway.tenants.create_tenant("other-co", tenant_id="other-co")
    other_key = await fleet.gateway.tenants.add_key(other.id)
    theirs = (await s.SubmitBatch(batch(2, key="nightly-1"), metadata=auth(other_key), timeout=5)).job
    assert theirs.job_id != first.job_id
    # Tenants see only their own jobs.
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.GetJob(pb.GetJobRequest(job_id=first.job_id), metadata=auth(other_key), timeout=5)
    assert details_of(exc.value).reason == "JOB_NOT_FOUND"
    await wait_completed(s, first.job_id)
    await wait_completed(s, theirs.job_id, key=other_key)


async def test_invalid_items_fail_the_submit_with_field_violations(fleet):
    """Bad items are refused at submit with BadRequest violations naming the item; no key is UNAUTHENTICATED."""
    s = stub(fleet)
    req = batch(3)
    req.items[1].prompt = ""
    req.temperature = 5
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.SubmitBatch(req, metadata=auth(), timeout=5)
    d = details_of(exc.value)
    assert d.code == grpc.StatusCode.INVALID_ARGUMENT
    assert {f for f, _ in d.field_violations} == {"items[1].prompt", "temperature"}
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.SubmitBatch(batch(1), timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_item_errors_are_results_not_job_failures(fleet):
    """An item the fleet refuses (unknown model) finishes with its error; the job still completes."""
    s = stub(fleet)
    req = batch(2)
    req.model = "gpt-none"
    job = (await s.SubmitBatch(req, metadata=auth(), timeout=5)).job
    resp = await wait_completed(s, job.job_id)
    assert (resp.job.succeeded, resp.job.failed) == (0, 2)
    assert {(r.error.code, r.error.reason) for r in resp.results} == {("NOT_FOUND", "MODEL_NOT_FOUND")}


async def test_items_count_against_the_tenants_rate_limit(fleet):
    """A tenant limited to 2 requests/s runs a 5-item job through the same limiter as its other requests: items
    over the limit wait out the advised delay and are retried, so the job completes, and takes the time the
    limit allows, not less."""
    tenants = fleet.gateway.tenants
    await tenants.create_tenant("batch-limited", tenant_id="batch-limited")
    await tenants.set_tenant("batch-limited", rps=2)
    key = await tenants.add_key("batch-limited")
    s = stub(fleet)
    job = (await s.SubmitBatch(batch(5, max_tokens=2), metadata=auth(key), timeout=5)).job
    resp = await wait_completed(s, job.job_id, key=key, timeout_s=30)
    assert (resp.job.succeeded, resp.job.failed) == (5, 0)
    # 5 admissions at 2/s: at least ~1.5 s between the first and the last, whatever the burst allowance.
    assert resp.job.completed_at - resp.job.created_at >= 1.0


async def test_cancel_stops_a_running_job_and_aborts_its_items(fleet):
    """CancelJob marks the job CANCELLED, aborts its items in flight in the engine, never starts the rest, keeps
    finished results, and is not undone by a later GetJob or a second cancel; another tenant cannot cancel it."""
    s = stub(fleet)
    aborted_before = await fleet.aborted_total()
    job = (await s.SubmitBatch(batch(6, max_tokens=3000), metadata=auth(), timeout=5)).job
    await assert_eventually(lambda: fleet.busy_total(), timeout_s=10)  # items are generating
    other = await fleet.gateway.tenants.create_tenant("cancel-rival", tenant_id="cancel-rival")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await s.CancelJob(
            pb.CancelJobRequest(job_id=job.job_id),
            metadata=auth(await fleet.gateway.tenants.add_key(other.id)),
            timeout=5,
        )
    assert details_of(exc.value).reason == "JOB_NOT_FOUND"
    cancelled = (await s.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=auth(), timeout=5)).job
    assert cancelled.state == pb.JOB_STATE_CANCELLED and cancelled.completed_at > 0
    assert cancelled.succeeded + cancelled.failed < cancelled.total

    async def aborted_and_idle() -> bool:
        return await fleet.aborted_total() >= aborted_before + 1 and await fleet.busy_total() == 0

    await assert_eventually(aborted_and_idle, timeout_s=10)
    again = (await s.CancelJob(pb.CancelJobRequest(job_id=job.job_id), metadata=auth(), timeout=5)).job
    later = (await s.GetJob(pb.GetJobRequest(job_id=job.job_id), metadata=auth(), timeout=5)).job
    assert again == cancelled and later == cancelled
    # No gateway will run it again: it is finished, and no item of it is claimable.
    assert await fleet.gateway.jobs.store.finished([job.job_id]) == {job.job_id}
    assert job.job_id not in {j for j, _ in await fleet.gateway.jobs.store.claimable()}


async def test_retry_policy_sits_out_short_limits_and_counts_failures():
    """A short advised wait on RESOURCE_EXHAUSTED costs no attempt (only time, up to max_wait_s); UNAVAILABLE
    and limits advising a long wait, or none, or a zero wait, count against attempts; other errors are final."""
    runner = JobRunner(None, None, None, attempts=3, max_wait_s=10.0, backoff_max_s=30.0)  # type: ignore[arg-type]
    limited = ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", "RATE_LIMITED", 2.0)
    assert runner._retry_delay(limited, failures=2, waited_s=0.0) == (2.0, False)
    assert runner._retry_delay(limited, failures=0, waited_s=9.0) is None  # 11 s would pass max_wait_s
    budget = ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "spent", "BUDGET_EXHAUSTED", 86_400.0)
    assert runner._retry_delay(budget, failures=0, waited_s=0.0) == (30.0, True)
    assert runner._retry_delay(budget, failures=2, waited_s=0.0) is None
    down = ErrorDetails(grpc.StatusCode.UNAVAILABLE, "down", "NO_HEALTHY_REPLICA", 1.0)
    assert runner._retry_delay(down, failures=1, waited_s=0.0) == (1.0, True)
    assert runner._retry_delay(down, failures=2, waited_s=0.0) is None
    at_once = ErrorDetails(grpc.StatusCode.RESOURCE_EXHAUSTED, "full", "QUEUE_FULL", 0.0)
    delay, counted = runner._retry_delay(at_once, failures=0, waited_s=0.0)  # type: ignore[misc]
    assert counted and 0 <= delay <= 30.0  # a zero advice costs an attempt (no free retries without end)
    assert runner._retry_delay(at_once, failures=2, waited_s=0.0) is None
    bad = ErrorDetails(grpc.StatusCode.NOT_FOUND, "no model", "MODEL_NOT_FOUND")
    assert runner._retry_delay(bad, failures=0, waited_s=0.0) is None


async def test_an_item_claimed_while_a_renewal_is_under_way_is_not_taken_for_lost(tmp_path):
    """The renewal's answer lists the leases it extended; an item whose claim committed after the renewal read
    them is absent from it without being lost. Stopping it would leave it leased to this live gateway (every
    later renewal extends it) and run by nobody: its job would never complete (a fresh-clone run, 15 of 16)."""
    dbs = await open_databases("", str(tmp_path / "gateway.db"))
    try:
        req = pb.SubmitBatchRequest(model=MODEL, items=[pb.BatchItem(prompt="a"), pb.BatchItem(prompt="b")])
        store = JobStore(dbs.jobs)
        job_id = await store.create("t", req, item_requests(req), "digest")
        runner = JobRunner(store, None, None, lease_s=30.0)  # type: ignore[arg-type]
        running = asyncio.create_task(asyncio.sleep(60))  # stands in for the item's run
        real_renew = store.renew

        async def renew_then_claim(owner: str, lease_s: float):
            held = await real_renew(owner, lease_s)
            # The interleaving: before the renewal's answer is back, a worker's claim of item 0 commits.
            item = await store.claim(job_id, owner, lease_s, 4)
            runner._items[(job_id, item.index)] = running
            return held

        store.renew = renew_then_claim  # type: ignore[method-assign]
        await runner.renew()
        await asyncio.sleep(0)
        assert not running.cancelled() and (job_id, 0) in runner._items
        store.renew = real_renew  # type: ignore[method-assign]
        assert await store.renew(runner.owner, 30.0) == {(job_id, 0)}  # the lease is this runner's, and kept
        running.cancel()
    finally:
        await dbs.close()


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="function")
async def test_job_survives_a_gateway_crash_and_resumes(tmp_path):
    """SIGKILL the gateway process mid-job and start it again on the same data: items finished before the crash
    keep their results (same request ids), the rest run, and the job completes with every item once."""
    # Short leases: the killed gateway's item is free to run again within 2 s.
    extra = {"gateway": ["--job-concurrency", "1", "--job-lease-s", "2"]}
    async with running_cluster(tmp_path, engines=1, speed_factor=1.0, extra_args=extra) as cluster:
        items = 6
        async with grpc.aio.insecure_channel(cluster.gateway) as ch:
            s = pb_grpc.InferenceServiceStub(ch)
            # ~100 tokens at the sim's real speed is ~0.25 s per item: the crash lands mid-job.
            job = (
                await s.SubmitBatch(batch(items, max_tokens=100), metadata=auth(cluster.api_key), timeout=5)
            ).job

            async def some_done():
                r = await s.GetJob(
                    pb.GetJobRequest(job_id=job.job_id, include_results=True),
                    metadata=auth(cluster.api_key),
                    timeout=5,
                )
                return r if 2 <= r.job.succeeded < items else None

            before = await assert_eventually(some_done, timeout_s=30, interval_s=0.02)
        cluster.signal("gateway", signal.SIGKILL)
        assert await cluster.wait_exit("gateway", 10) == -signal.SIGKILL
        # The same flags the launcher started it with (its extra args are appended by _spawn).
        await cluster._spawn(
            "gateway",
            "gateway",
            [
                "--router-address",
                cluster.router,
                "--db-path",
                str(tmp_path / "gateway.db"),
            ],
            env={"FLEETSERVE_GATEWAY_BOOTSTRAP_API_KEY": cluster.api_key},
        )
        async with grpc.aio.insecure_channel(cluster.gateway) as ch:
            resp = await wait_completed(pb_grpc.InferenceServiceStub(ch), job.job_id, cluster.api_key, 60)
    assert (resp.job.succeeded, resp.job.failed, resp.job.total) == (items, 0, items)
    assert [r.index for r in resp.results] == list(range(items))
    kept = {r.index: r.request_id for r in before.results}
    assert {r.index: r.request_id for r in resp.results if r.index in kept} == kept
    assert len({r.request_id for r in resp.results}) == items
