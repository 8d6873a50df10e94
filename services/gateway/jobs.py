"""Batch jobs: SubmitBatch stores the items in the gateway's database and returns at once; background runners in
every gateway sharing that database claim items under leases, generate them through the gateway pipeline at
batch priority (so tenant limits apply), a bounded number at a time, and store each result as it finishes. A
gateway that stops or dies leaves its unfinished items to the others (or to its next start) once their leases
end, and an item is never run by two gateways at once: a runner that cannot renew a lease stops the item."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb

from services.gateway.db import Database, DatabaseError, IntegrityError
from services.gateway.pipeline import GatewayPipeline, Outcome
from services.gateway.tenants import Tenant, TenantStore
from services.gateway.validation import to_spec
from shared.errors import ErrorDetails, FleetError, InvalidArgument, NotFound, details_of
from shared.resilience import full_jitter

log = structlog.get_logger(__name__)

# Worth another try later: the limit resets or the fleet recovers. Anything else is the item's final result.
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
MAX_REPORTED_VIOLATIONS = 20


def request_hash(req: pb.SubmitBatchRequest) -> str:
    """What a retried submit must match to be the same request: everything but its idempotency key."""
    copy = pb.SubmitBatchRequest()
    copy.CopyFrom(req)
    copy.idempotency_key = ""
    return hashlib.sha256(copy.SerializeToString(deterministic=True)).hexdigest()


def item_requests(req: pb.SubmitBatchRequest) -> list[pb.GenerateRequest]:
    """One GenerateRequest per item, at batch priority."""
    out = []
    for item in req.items:
        g = pb.GenerateRequest(
            model=req.model,
            prompt=item.prompt,
            messages=item.messages,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            priority=common_pb2.PRIORITY_BATCH,
            feature=req.feature,
        )
        if req.HasField("seed"):
            g.seed = req.seed
        out.append(g)
    return out


@dataclass(frozen=True)
class PendingItem:
    """An item still to generate."""

    index: int
    request: pb.GenerateRequest
    custom_id: str
    # What an earlier run generated before its gateway died (token ids and text), saved with its lease renewals.
    progress: common_pb2.GenerateChunk | None = None


@dataclass
class Progress:
    """An item's output so far: token ids and text pieces, and how many of the ids are saved."""

    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    saved: int = 0

    @classmethod
    def of(cls, chunk: common_pb2.GenerateChunk | None) -> Progress:
        if chunk is None:
            return cls()
        return cls(list(chunk.token_ids), [chunk.text], len(chunk.token_ids))

    def add(self, chunk: common_pb2.GenerateChunk) -> None:
        self.ids.extend(chunk.token_ids)
        self.texts.append(chunk.text)

    def chunk(self) -> common_pb2.GenerateChunk:
        return common_pb2.GenerateChunk(token_ids=self.ids, text="".join(self.texts))


def runner_id() -> str:
    """This gateway process's name as a lease owner: unique across hosts, restarts and pid reuse."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class JobStore:
    """Jobs and their items in the database (SQLite or PostgreSQL); every method is one statement or one short
    transaction. Items are run under leases: claim() takes one for a runner, renew() extends a runner's,
    finish_item() stores a result only while its runner still holds the lease."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self._clock = clock

    async def find_by_key(self, tenant_id: str, key: str) -> tuple[str, str] | None:
        """(job id, request hash) of the tenant's job with this idempotency key."""
        return await self.db.fetchrow(
            "SELECT id, request_hash FROM jobs WHERE tenant_id = ? AND idempotency_key = ?", tenant_id, key
        )

    async def create(
        self, tenant_id: str, req: pb.SubmitBatchRequest, requests: list[pb.GenerateRequest], digest: str
    ) -> str:
        """Store a job and its items in one transaction; its id. IntegrityError if another submit with the
        same idempotency key won the race."""
        job_id = "job-" + uuid.uuid4().hex
        async with self.db.transaction() as tx:
            await tx.execute(
                "INSERT INTO jobs (id, tenant_id, model, idempotency_key, request_hash, total, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                job_id,
                tenant_id,
                req.model,
                req.idempotency_key or None,
                digest,
                len(requests),
                self._clock(),
            )
            await tx.executemany(
                "INSERT INTO job_items (job_id, idx, request, custom_id) VALUES (?, ?, ?, ?)",
                [
                    (job_id, i, r.SerializeToString(), item.custom_id)
                    for i, (r, item) in enumerate(zip(requests, req.items, strict=True))
                ],
            )
        return job_id

    async def tenant_of(self, job_id: str) -> str | None:
        return await self.db.fetchval("SELECT tenant_id FROM jobs WHERE id = ?", job_id)

    async def job(self, job_id: str) -> pb.Job:
        """The job's progress, computed from its items."""
        model, total, created_at, completed_at, cancelled_at = await self.db.fetchrow(
            "SELECT model, total, created_at, completed_at, cancelled_at FROM jobs WHERE id = ?", job_id
        )
        finished, succeeded, prompt, completion, cached = await self.db.fetchrow(
            "SELECT COUNT(result), COALESCE(SUM(ok), 0), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cached_tokens), 0) "
            "FROM job_items WHERE job_id = ?",
            job_id,
        )
        if cancelled_at is not None:
            state = pb.JOB_STATE_CANCELLED
        elif completed_at is not None:
            state = pb.JOB_STATE_COMPLETED
        else:
            state = pb.JOB_STATE_RUNNING if finished else pb.JOB_STATE_QUEUED
        return pb.Job(
            job_id=job_id,
            state=state,
            total=total,
            succeeded=int(succeeded),
            failed=int(finished) - int(succeeded),
            model=model,
            created_at=created_at,
            completed_at=completed_at or 0.0,
            usage=common_pb2.Usage(
                prompt_tokens=int(prompt), completion_tokens=int(completion), cached_tokens=int(cached)
            ),
        )

    async def results(self, job_id: str) -> list[pb.BatchItemResult]:
        rows = await self.db.fetch(
            "SELECT result FROM job_items WHERE job_id = ? AND result IS NOT NULL ORDER BY idx", job_id
        )
        return [pb.BatchItemResult.FromString(r) for (r,) in rows]

    async def pending(self, job_id: str) -> list[PendingItem]:
        """Items without a result, leased or not (tests, admin)."""
        rows = await self.db.fetch(
            "SELECT idx, request, custom_id FROM job_items WHERE job_id = ? AND result IS NULL ORDER BY idx",
            job_id,
        )
        return [PendingItem(i, pb.GenerateRequest.FromString(r), c) for i, r, c in rows]

    async def claim(self, job_id: str, owner: str, lease_s: float, max_running: int) -> PendingItem | None:
        """Lease the job's next unleased item (or one whose lease ended: its runner is gone) to owner for
        lease_s; None when none is free, the job is finished, or max_running of its items are leased already
        (over every gateway). The job's row is locked meanwhile, so concurrent claimers queue."""
        now = self._clock()
        async with self.db.transaction() as tx:
            job = await tx.fetchrow("SELECT completed_at FROM jobs WHERE id = ?" + self.db.for_update, job_id)
            if job is None or job[0] is not None:
                return None
            running = await tx.fetchval(
                "SELECT COUNT(*) FROM job_items WHERE job_id = ? AND result IS NULL AND lease_until > ?",
                job_id,
                now,
            )
            if running >= max_running:
                return None
            row = await tx.fetchrow(
                "SELECT idx, request, custom_id, progress FROM job_items WHERE job_id = ? AND result IS NULL "
                "AND (lease_until IS NULL OR lease_until <= ?) ORDER BY idx LIMIT 1",
                job_id,
                now,
            )
            if row is None:
                return None
            await tx.execute(
                "UPDATE job_items SET lease_owner = ?, lease_until = ?, runs = runs + 1 "
                "WHERE job_id = ? AND idx = ?",
                owner,
                now + lease_s,
                job_id,
                row[0],
            )
        progress = common_pb2.GenerateChunk.FromString(row[3]) if row[3] else None
        return PendingItem(row[0], pb.GenerateRequest.FromString(row[1]), row[2], progress)

    async def save_progress(self, owner: str, items: list[tuple[str, int, bytes]]) -> None:
        """Store (job id, index, GenerateChunk bytes) of items owner still holds: the tokens generated so far."""
        await self.db.executemany(
            "UPDATE job_items SET progress = ? WHERE job_id = ? AND idx = ? AND lease_owner = ? AND result IS NULL",
            [(data, job_id, idx, owner) for job_id, idx, data in items],
        )

    async def renew(self, owner: str, lease_s: float) -> set[tuple[str, int]]:
        """Extend every lease owner holds on an unfinished item; the (job id, index) of each."""
        rows = await self.db.fetch(
            "UPDATE job_items SET lease_until = ? WHERE lease_owner = ? AND result IS NULL "
            "RETURNING job_id, idx",
            self._clock() + lease_s,
            owner,
        )
        return {(j, i) for j, i in rows}

    async def release(self, owner: str) -> int:
        """Give up owner's leases (a gateway stopping): its unfinished items are free to claim at once."""
        return await self.db.execute(
            "UPDATE job_items SET lease_owner = NULL, lease_until = NULL "
            "WHERE lease_owner = ? AND result IS NULL",
            owner,
        )

    async def finish_item(self, job_id: str, result: pb.BatchItemResult, owner: str) -> bool:
        """Store an item's result if owner still holds its lease; False when the lease was lost (the result is
        dropped: another runner has the item)."""
        u = result.usage
        changed = await self.db.execute(
            "UPDATE job_items SET result = ?, ok = ?, prompt_tokens = ?, completion_tokens = ?, "
            "cached_tokens = ?, lease_owner = NULL, lease_until = NULL, progress = NULL "
            "WHERE job_id = ? AND idx = ? AND lease_owner = ? AND result IS NULL",
            result.SerializeToString(),
            0 if result.HasField("error") else 1,
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
            job_id,
            result.index,
            owner,
        )
        return changed > 0

    async def complete(self, job_id: str) -> bool:
        """Mark the job completed if every item has a result; whether this call did."""
        changed = await self.db.execute(
            "UPDATE jobs SET completed_at = ? WHERE id = ? AND completed_at IS NULL "
            "AND NOT EXISTS (SELECT 1 FROM job_items WHERE job_id = ? AND result IS NULL)",
            self._clock(),
            job_id,
            job_id,
        )
        return changed > 0

    async def cancel(self, job_id: str) -> bool:
        """Mark a job cancelled (and so finished); False when it had completed already."""
        now = self._clock()
        changed = await self.db.execute(
            "UPDATE jobs SET completed_at = ?, cancelled_at = ? WHERE id = ? AND completed_at IS NULL",
            now,
            now,
            job_id,
        )
        return changed > 0

    async def finished(self, job_ids: list[str]) -> set[str]:
        """Which of job_ids are finished (completed or cancelled, possibly by another gateway)."""
        if not job_ids:
            return set()
        marks = ", ".join("?" for _ in job_ids)
        rows = await self.db.fetch(
            f"SELECT id FROM jobs WHERE id IN ({marks}) AND completed_at IS NOT NULL", *job_ids
        )
        return {r[0] for r in rows}

    async def claimable(self) -> list[tuple[str, str]]:
        """(job id, tenant id) of every unfinished job with an item free to claim now, oldest first."""
        return await self.db.fetch(
            "SELECT j.id, j.tenant_id FROM jobs j WHERE j.completed_at IS NULL AND EXISTS ("
            "SELECT 1 FROM job_items i WHERE i.job_id = j.id AND i.result IS NULL "
            "AND (i.lease_until IS NULL OR i.lease_until <= ?)) ORDER BY j.created_at",
            self._clock(),
        )

    async def done_but_open(self) -> list[str]:
        """Unfinished jobs whose every item has a result (their runner died before marking them completed)."""
        rows = await self.db.fetch(
            "SELECT j.id FROM jobs j WHERE j.completed_at IS NULL AND NOT EXISTS ("
            "SELECT 1 FROM job_items i WHERE i.job_id = j.id AND i.result IS NULL)"
        )
        return [r[0] for r in rows]

    async def runs(self, job_id: str) -> list[int]:
        """How many times each item was started, by index (1 everywhere unless a runner died or lost it)."""
        rows = await self.db.fetch("SELECT runs FROM job_items WHERE job_id = ? ORDER BY idx", job_id)
        return [r[0] for r in rows]


def _error_details(exc: BaseException) -> ErrorDetails:
    if isinstance(exc, FleetError):
        return ErrorDetails(exc.code, exc.message, exc.reason, exc.retry_after_s)
    return details_of(exc)


class JobRunner:
    """Accepts jobs and runs their items in the background, with every other gateway on the same database. Per
    job at most job_concurrency items run at once (over all gateways), and per tenant at most
    tenant_concurrency in this gateway. A scan every poll_s picks up jobs with free items (submitted elsewhere,
    or left by a gateway that stopped or died); leases are renewed every lease_s / 3."""

    def __init__(
        self,
        store: JobStore,
        pipeline: GatewayPipeline,
        tenants: TenantStore,
        *,
        job_concurrency: int = 4,
        tenant_concurrency: int = 8,
        max_items: int = 10_000,
        attempts: int = 5,
        max_wait_s: float = 3600.0,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        lease_s: float = 15.0,
        poll_s: float = 1.0,
        owner: str | None = None,
        sleep: Callable[[float], object] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.pipeline = pipeline
        self.tenants = tenants
        self.job_concurrency = job_concurrency
        self.tenant_concurrency = tenant_concurrency
        self.max_items = max_items
        self.attempts = attempts
        self.max_wait_s = max_wait_s
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.owner = owner or runner_id()
        self._sleep = sleep
        self._clock = clock
        self._tasks: dict[str, asyncio.Task] = {}
        # The task running each item this gateway holds a lease on, by (job id, index).
        self._items: dict[tuple[str, int], asyncio.Task] = {}
        # What each of them has generated so far, and how many of its tokens are saved in the database.
        self._progress: dict[tuple[str, int], Progress] = {}
        self._tenant_slots: dict[str, asyncio.Semaphore] = {}
        self._background: list[asyncio.Task] = []
        self._renewed_at = clock()
        # Item results this gateway stored, and items it continued after an earlier run's saved tokens (tests).
        self.finished_items = 0
        self.resumed_items = 0

    # -- the API ------------------------------------------------------------------------------------------

    async def submit(self, tenant: Tenant, req: pb.SubmitBatchRequest) -> pb.Job:
        """Validate and store a job, start running it, return it. A repeated idempotency key returns the job the
        first submit created (InvalidArgument when the request differs)."""
        digest = request_hash(req)
        if req.idempotency_key:
            existing = await self._existing(tenant.id, req.idempotency_key, digest)
            if existing is not None:
                return existing
        requests = self._validate(req)
        try:
            job_id = await self.store.create(tenant.id, req, requests, digest)
        except IntegrityError:
            # Another gateway sharing the database stored the same key between our lookup and insert.
            existing = await self._existing(tenant.id, req.idempotency_key, digest)
            if existing is None:
                raise
            return existing
        log.info("gateway.job_submitted", job_id=job_id, tenant=tenant.id, items=len(requests))
        self._launch(job_id, tenant.id)
        return await self.store.job(job_id)

    async def get(self, tenant: Tenant, job_id: str, include_results: bool) -> pb.GetJobResponse:
        """A job of tenant's; NotFound for another tenant's (not told apart from one that does not exist)."""
        if await self.store.tenant_of(job_id) != tenant.id:
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")
        resp = pb.GetJobResponse(job=await self.store.job(job_id))
        if include_results:
            resp.results.extend(await self.store.results(job_id))
        return resp

    async def cancel(self, tenant: Tenant, job_id: str) -> pb.Job:
        """Cancel a job of tenant's: stored as cancelled first (so no gateway starts its items again), then its
        task here is cancelled, which aborts the items in flight down to the engine (other gateways see it at
        their next scan). NotFound for another tenant's job."""
        if await self.store.tenant_of(job_id) != tenant.id:
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")
        if await self.store.cancel(job_id):
            await self._stop_job(job_id)
            log.info("gateway.job_cancelled", job_id=job_id, tenant=tenant.id)
        return await self.store.job(job_id)

    def start(self) -> None:
        """Start scanning for jobs to run (those left unfinished included) and renewing leases."""
        self._background = [
            asyncio.create_task(self._every(self.poll_s, self.scan), name="jobs.scan"),
            asyncio.create_task(self._every(self.lease_s / 3, self.renew), name="jobs.renew"),
        ]

    async def stop(self) -> None:
        """Stop scanning and cancel the running jobs, then give up the leases: the unfinished items run again
        on another gateway (or this one's next start) at once."""
        for t in self._background:
            t.cancel()
        progress = dict(self._progress)  # the workers drop theirs as they stop
        tasks = [*self._background, *self._tasks.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            # What the stopped items generated, so that whoever runs them next continues after it.
            grown = [
                (j, i, p.chunk().SerializeToString())
                for (j, i), p in progress.items()
                if len(p.ids) > p.saved
            ]
            if grown:
                await self.store.save_progress(self.owner, grown)
            released = await self.store.release(self.owner)
        except DatabaseError:
            log.exception("gateway.job_leases_not_released")  # they end by themselves after lease_s
        else:
            if released:
                log.info("gateway.job_leases_released", items=released)

    async def wait_idle(self) -> None:
        """Until every job started so far has finished (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    # -- background -----------------------------------------------------------------------------------------

    async def _every(self, interval_s: float, fn: Callable[[], object]) -> None:
        while True:
            try:
                await fn()  # type: ignore[misc]
            except DatabaseError as e:
                log.warning("gateway.jobs_db_unavailable", task=fn.__name__, error=str(e))
            except Exception:  # a bad row must not stop the runner from scanning
                log.exception("gateway.jobs_background_error", task=fn.__name__)
            await asyncio.sleep(interval_s)

    async def scan(self) -> None:
        """Start the jobs that have free items, stop the ones finished elsewhere (cancelled on another gateway),
        and mark completed the jobs whose runner died after their last item."""
        for job_id, tenant_id in await self.store.claimable():
            self._launch(job_id, tenant_id)
        for job_id in await self.store.finished(list(self._tasks)):
            await self._stop_job(job_id)
        for job_id in await self.store.done_but_open():
            if await self.store.complete(job_id):
                log.info("gateway.job_completed", job_id=job_id, by="scan")

    async def renew(self) -> None:
        """Extend this gateway's leases. An item whose lease was lost (taken over after a stall) is stopped at
        once; when renewing has failed for most of a lease, every item is stopped before the lease can end, so
        that no other gateway ever runs an item this one still runs."""
        # Only items running before the renewal was sent are judged by it: an item claimed while it was under
        # way (its claim committed after the renewal read the leases) is not in `held` yet, and stopping it as
        # "lost" would orphan it, its lease still ours and renewed by every later round, run by nobody.
        judged = list(self._items)
        try:
            held = await self.store.renew(self.owner, self.lease_s)
        except DatabaseError:
            if self._clock() - self._renewed_at > self.lease_s * 2 / 3:
                for key in list(self._items):
                    self._stop_item(key, "lease_unrenewable")
            raise
        self._renewed_at = self._clock()
        for key in judged:
            if key not in held:
                self._stop_item(key, "lease_lost")
        # With the lease: what the items generated since, so that another gateway taking one over (this one
        # died) continues after it rather than generating it all again.
        grown = [(key, p) for key, p in self._progress.items() if key in held and len(p.ids) > p.saved]
        if grown:
            await self.store.save_progress(
                self.owner, [(j, i, p.chunk().SerializeToString()) for (j, i), p in grown]
            )
            for _, p in grown:
                p.saved = len(p.ids)

    def _stop_item(self, key: tuple[str, int], why: str) -> None:
        task = self._items.pop(key, None)
        if task is not None and not task.done():
            log.warning("gateway.job_item_stopped", job_id=key[0], index=key[1], reason=why)
            task.cancel()

    async def _stop_job(self, job_id: str) -> None:
        task = self._tasks.get(job_id)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # -- running --------------------------------------------------------------------------------------------

    async def _existing(self, tenant_id: str, key: str, digest: str) -> pb.Job | None:
        found = await self.store.find_by_key(tenant_id, key)
        if found is None:
            return None
        job_id, stored = found
        if stored != digest:
            raise InvalidArgument(
                "idempotency_key was already used for a different batch",
                reason="IDEMPOTENCY_KEY_REUSED",
                field_violations=[("idempotency_key", "already used with a different request")],
            )
        return await self.store.job(job_id)

    def _validate(self, req: pb.SubmitBatchRequest) -> list[pb.GenerateRequest]:
        """Every item's request, checked as the pipeline will check it, so a bad item fails the submit rather
        than the job; InvalidArgument lists the violations (item fields prefixed items[i])."""
        violations: list[tuple[str, str]] = []
        if not req.items:
            violations.append(("items", "required: at least one item"))
        elif len(req.items) > self.max_items:
            violations.append(("items", f"at most {self.max_items} items; got {len(req.items)}"))
        requests = item_requests(req)
        if not violations:
            for i, r in enumerate(requests):
                try:
                    to_spec(
                        r,
                        default_max_tokens=self.pipeline.default_max_tokens,
                        max_tokens_limit=self.pipeline.max_tokens_limit,
                    )
                except InvalidArgument as e:
                    for field, description in e.field_violations:
                        prefix = (
                            ""
                            if field in ("model", "max_tokens", "temperature", "top_p", "stop")
                            else f"items[{i}]."
                        )
                        violations.append((prefix + field, description))
                if len(violations) >= MAX_REPORTED_VIOLATIONS:
                    break
        if violations:
            unique = list(dict.fromkeys(violations))
            raise InvalidArgument(
                f"invalid batch: {', '.join(f for f, _ in unique)}", field_violations=unique
            )
        return requests

    def _launch(self, job_id: str, tenant_id: str) -> None:
        if job_id in self._tasks:
            return
        task = asyncio.create_task(self._run_job(job_id, tenant_id), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda _t: self._tasks.pop(job_id, None))

    async def _run_job(self, job_id: str, tenant_id: str) -> None:
        """Claim and run the job's items until none is free here; then complete the job if it is done."""
        tenant = await self.tenants.get_tenant(tenant_id)
        slots = self._tenant_slots.setdefault(tenant_id, asyncio.Semaphore(self.tenant_concurrency))

        async def worker() -> None:
            while True:
                async with slots:
                    item = await self.store.claim(job_id, self.owner, self.lease_s, self.job_concurrency)
                    if item is None:
                        return
                    key = (job_id, item.index)
                    progress = self._progress[key] = Progress.of(item.progress)
                    if progress.ids:
                        self.resumed_items += 1
                        log.info(
                            "gateway.job_item_resumed",
                            job_id=job_id,
                            index=item.index,
                            tokens=len(progress.ids),
                        )
                    run = asyncio.create_task(
                        self._run_item(tenant, item, progress), name=f"job-item-{job_id}-{item.index}"
                    )
                    self._items[key] = run
                    try:
                        result = await run
                    except asyncio.CancelledError:
                        if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                            run.cancel()
                            raise  # the job is stopping
                        continue  # only the item was stopped: its lease is gone, another runner has it
                    finally:
                        if self._items.get(key) is run:
                            del self._items[key]
                        if self._progress.get(key) is progress:
                            del self._progress[key]
                if await self.store.finish_item(job_id, result, self.owner):
                    self.finished_items += 1
                else:
                    log.warning("gateway.job_item_result_dropped", job_id=job_id, index=item.index)

        try:
            await asyncio.gather(*(worker() for _ in range(self.job_concurrency)))
        except asyncio.CancelledError:
            log.info("gateway.job_paused", job_id=job_id)
            raise
        except Exception:
            log.exception("gateway.job_failed", job_id=job_id)
            return  # its unfinished items are claimed again once their leases end
        if await self.store.complete(job_id):
            job = await self.store.job(job_id)
            log.info("gateway.job_completed", job_id=job_id, succeeded=job.succeeded, failed=job.failed)

    def _retry_delay(self, d: ErrorDetails, failures: int, waited_s: float) -> tuple[float, bool] | None:
        """(delay, counts as a failure) before retrying an item after error d, or None to give up. A short
        advised wait on RESOURCE_EXHAUSTED (a rate limit, or batch shed under load) is what a batch job should sit
        out: it costs no attempt, only time, up to max_wait_s in all. UNAVAILABLE, and limits that advise a long
        wait or none (a spent budget), count against `attempts`."""
        if d.code not in RETRYABLE:
            return None
        # A zero advice (retry at once) is not a short wait: sat out for free, it would retry without bound.
        short_limit = (
            d.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            and d.retry_after_s is not None
            and 0 < d.retry_after_s <= self.backoff_max_s
        )
        if short_limit:
            delay = d.retry_after_s or 0.0
            return (delay, False) if waited_s + delay <= self.max_wait_s else None
        if failures + 1 >= self.attempts:
            return None
        delay = d.retry_after_s
        if not delay:
            delay = full_jitter(failures, self.backoff_base_s, self.backoff_max_s)
        return min(delay, self.backoff_max_s), True

    async def _run_item(
        self, tenant: Tenant | None, item: PendingItem, progress: Progress | None = None
    ) -> pb.BatchItemResult:
        """Generate one item, retrying rate limits and UNAVAILABLE as _retry_delay says; the result, an error
        included. Every attempt continues after what progress holds (an earlier run's saved tokens, then this
        run's): nothing generated is generated again."""
        progress = progress if progress is not None else Progress()
        result = pb.BatchItemResult(index=item.index, custom_id=item.custom_id)
        if tenant is None:
            result.error.CopyFrom(
                pb.ItemError(
                    code="PERMISSION_DENIED", reason="TENANT_GONE", message="the tenant no longer exists"
                )
            )
            return result
        failures, waited_s = 0, 0.0
        while True:
            outcome = Outcome(request_id=uuid.uuid4().hex)
            result.request_id = outcome.request_id
            chunk = None
            request = item.request
            if progress.ids:
                request = pb.GenerateRequest()
                request.CopyFrom(item.request)
                request.resume_token_ids.extend(progress.ids)
            stream = self.pipeline.generate(
                request,
                authorization=None,
                outcome=outcome,
                timeout_s=None,
                span_name="gateway.BatchItem",
                tenant=tenant,
                # Not remembered for Feedback: a large batch would push clients' requests out of the bounded
                # index (its items' ids may still be rated, unlabelled).
                rateable=False,
            )
            try:
                async for data in stream:
                    chunk = pb.GenerateResponse.FromString(data).chunk
                    progress.add(chunk)
            except (FleetError, grpc.aio.AioRpcError) as e:
                d = _error_details(e)
                retry = self._retry_delay(d, failures, waited_s)
                if retry is None:
                    result.error.CopyFrom(pb.ItemError(code=d.code.name, reason=d.reason, message=d.message))
                    return result
                delay, failed = retry
                failures += failed
                waited_s += delay
                await self._sleep(delay)
                continue
            except Exception:
                log.exception("gateway.job_item_internal_error", request_id=outcome.request_id)
                result.error.CopyFrom(
                    pb.ItemError(code="INTERNAL", reason="INTERNAL", message="internal error")
                )
                return result
            finally:
                await stream.aclose()
            result.text = "".join(progress.texts)
            if chunk is not None:
                result.finish_reason = chunk.finish_reason
                result.usage.CopyFrom(chunk.usage)
            return result
