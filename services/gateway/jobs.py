"""Batch jobs: SubmitBatch stores the items in SQLite and returns at once; a background runner generates them
through the gateway pipeline at batch priority (so tenant limits apply), a bounded number at a time, stores each
result as it finishes, and after a restart resumes every unfinished job with the items not yet done."""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb

from services.gateway.pipeline import GatewayPipeline, Outcome
from services.gateway.tenants import Tenant, TenantStore
from services.gateway.validation import to_spec
from shared.errors import ErrorDetails, FleetError, InvalidArgument, NotFound, details_of
from shared.resilience import full_jitter

log = structlog.get_logger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id              TEXT PRIMARY KEY,
    tenant_id       TEXT NOT NULL,
    model           TEXT NOT NULL,
    idempotency_key TEXT,
    request_hash    TEXT NOT NULL,
    total           INTEGER NOT NULL,
    created_at      REAL NOT NULL,
    completed_at    REAL,
    cancelled_at    REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs(tenant_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs(completed_at) WHERE completed_at IS NULL;
CREATE TABLE IF NOT EXISTS job_items (
    job_id            TEXT NOT NULL REFERENCES jobs(id),
    idx               INTEGER NOT NULL,
    request           BLOB NOT NULL,
    custom_id         TEXT NOT NULL,
    result            BLOB,
    ok                INTEGER,
    prompt_tokens     INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens     INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, idx)
);
"""

# Worth another try later: the limit resets or the fleet recovers. Anything else is the item's final result.
RETRYABLE = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})
MAX_REPORTED_VIOLATIONS = 20


def open_db(path: str) -> sqlite3.Connection:
    """The jobs-and-feedback database (WAL, so GetJob reads while the runner writes)."""
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA busy_timeout=2000")
    return db


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


class JobStore:
    """Jobs and their items in SQLite. Every method is one short statement or transaction (called on the loop)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._db.executescript(SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "cancelled_at" not in columns:  # a database from before CancelJob
            self._db.execute("ALTER TABLE jobs ADD COLUMN cancelled_at REAL")

    def find_by_key(self, tenant_id: str, key: str) -> tuple[str, str] | None:
        """(job id, request hash) of the tenant's job with this idempotency key."""
        return self._db.execute(
            "SELECT id, request_hash FROM jobs WHERE tenant_id = ? AND idempotency_key = ?", (tenant_id, key)
        ).fetchone()

    def create(
        self, tenant_id: str, req: pb.SubmitBatchRequest, requests: list[pb.GenerateRequest], digest: str
    ) -> str:
        """Store a job and its items in one transaction; its id. sqlite3.IntegrityError if another submit
        with the same idempotency key won the race."""
        job_id = "job-" + uuid.uuid4().hex
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "INSERT INTO jobs (id, tenant_id, model, idempotency_key, request_hash, total, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    tenant_id,
                    req.model,
                    req.idempotency_key or None,
                    digest,
                    len(requests),
                    time.time(),
                ),
            )
            self._db.executemany(
                "INSERT INTO job_items (job_id, idx, request, custom_id) VALUES (?, ?, ?, ?)",
                (
                    (job_id, i, r.SerializeToString(), item.custom_id)
                    for i, (r, item) in enumerate(zip(requests, req.items, strict=True))
                ),
            )
        return job_id

    def tenant_of(self, job_id: str) -> str | None:
        row = self._db.execute("SELECT tenant_id FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row[0] if row else None

    def job(self, job_id: str) -> pb.Job:
        """The job's progress, computed from its items."""
        model, total, created_at, completed_at, cancelled_at = self._db.execute(
            "SELECT model, total, created_at, completed_at, cancelled_at FROM jobs WHERE id = ?", (job_id,)
        ).fetchone()
        finished, succeeded, prompt, completion, cached = self._db.execute(
            "SELECT COUNT(result), COALESCE(SUM(ok), 0), COALESCE(SUM(prompt_tokens), 0), "
            "COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cached_tokens), 0) "
            "FROM job_items WHERE job_id = ?",
            (job_id,),
        ).fetchone()
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
            succeeded=succeeded,
            failed=finished - succeeded,
            model=model,
            created_at=created_at,
            completed_at=completed_at or 0.0,
            usage=common_pb2.Usage(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached),
        )

    def results(self, job_id: str) -> list[pb.BatchItemResult]:
        rows = self._db.execute(
            "SELECT result FROM job_items WHERE job_id = ? AND result IS NOT NULL ORDER BY idx", (job_id,)
        )
        return [pb.BatchItemResult.FromString(r) for (r,) in rows]

    def pending(self, job_id: str) -> list[PendingItem]:
        rows = self._db.execute(
            "SELECT idx, request, custom_id FROM job_items WHERE job_id = ? AND result IS NULL ORDER BY idx",
            (job_id,),
        )
        return [PendingItem(i, pb.GenerateRequest.FromString(r), c) for i, r, c in rows]

    def finish_item(self, job_id: str, result: pb.BatchItemResult) -> None:
        u = result.usage
        self._db.execute(
            "UPDATE job_items SET result = ?, ok = ?, prompt_tokens = ?, completion_tokens = ?, cached_tokens = ? "
            "WHERE job_id = ? AND idx = ?",
            (
                result.SerializeToString(),
                0 if result.HasField("error") else 1,
                u.prompt_tokens,
                u.completion_tokens,
                u.cached_tokens,
                job_id,
                result.index,
            ),
        )

    def complete(self, job_id: str) -> None:
        self._db.execute(
            "UPDATE jobs SET completed_at = ? WHERE id = ? AND completed_at IS NULL", (time.time(), job_id)
        )

    def cancel(self, job_id: str) -> bool:
        """Mark a job cancelled (and so finished); False when it had completed already."""
        now = time.time()
        cur = self._db.execute(
            "UPDATE jobs SET completed_at = ?, cancelled_at = ? WHERE id = ? AND completed_at IS NULL",
            (now, now, job_id),
        )
        return cur.rowcount > 0

    def unfinished(self) -> list[tuple[str, str]]:
        """(job id, tenant id) of every job not completed, oldest first."""
        return self._db.execute(
            "SELECT id, tenant_id FROM jobs WHERE completed_at IS NULL ORDER BY created_at"
        ).fetchall()


def _error_details(exc: BaseException) -> ErrorDetails:
    if isinstance(exc, FleetError):
        return ErrorDetails(exc.code, exc.message, exc.reason, exc.retry_after_s)
    return details_of(exc)


class JobRunner:
    """Accepts jobs and runs them in the background. Per job at most job_concurrency items are generated at once,
    and per tenant at most tenant_concurrency over all its jobs."""

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
        sleep: Callable[[float], object] = asyncio.sleep,
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
        self._sleep = sleep
        self._tasks: dict[str, asyncio.Task] = {}
        self._tenant_slots: dict[str, asyncio.Semaphore] = {}

    # -- the API ------------------------------------------------------------------------------------------

    def submit(self, tenant: Tenant, req: pb.SubmitBatchRequest) -> pb.Job:
        """Validate and store a job, start running it, return it. A repeated idempotency key returns the job the
        first submit created (InvalidArgument when the request differs)."""
        digest = request_hash(req)
        if req.idempotency_key:
            existing = self._existing(tenant.id, req.idempotency_key, digest)
            if existing is not None:
                return existing
        requests = self._validate(req)
        try:
            job_id = self.store.create(tenant.id, req, requests, digest)
        except sqlite3.IntegrityError:
            # Another gateway sharing the database stored the same key between our lookup and insert.
            existing = self._existing(tenant.id, req.idempotency_key, digest)
            if existing is None:
                raise
            return existing
        log.info("gateway.job_submitted", job_id=job_id, tenant=tenant.id, items=len(requests))
        self._launch(job_id, tenant.id)
        return self.store.job(job_id)

    def get(self, tenant: Tenant, job_id: str, include_results: bool) -> pb.GetJobResponse:
        """A job of tenant's; NotFound for another tenant's (not told apart from one that does not exist)."""
        if self.store.tenant_of(job_id) != tenant.id:
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")
        resp = pb.GetJobResponse(job=self.store.job(job_id))
        if include_results:
            resp.results.extend(self.store.results(job_id))
        return resp

    async def cancel(self, tenant: Tenant, job_id: str) -> pb.Job:
        """Cancel a job of tenant's: stored as cancelled first (so a restart does not resume it), then its task
        is cancelled, which aborts the items in flight down to the engine. NotFound for another tenant's job."""
        if self.store.tenant_of(job_id) != tenant.id:
            raise NotFound(f"no job {job_id!r}", reason="JOB_NOT_FOUND")
        if self.store.cancel(job_id):
            task = self._tasks.get(job_id)
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            log.info("gateway.job_cancelled", job_id=job_id, tenant=tenant.id)
        return self.store.job(job_id)

    def resume(self) -> int:
        """Start every unfinished job (after a restart); how many."""
        jobs = self.store.unfinished()
        for job_id, tenant_id in jobs:
            self._launch(job_id, tenant_id)
        if jobs:
            log.info("gateway.jobs_resumed", jobs=len(jobs))
        return len(jobs)

    async def stop(self) -> None:
        """Cancel the running jobs; items in flight stay unfinished in the database and run again on resume."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_idle(self) -> None:
        """Until every job started so far has finished (tests)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)

    # -- running --------------------------------------------------------------------------------------------

    def _existing(self, tenant_id: str, key: str, digest: str) -> pb.Job | None:
        found = self.store.find_by_key(tenant_id, key)
        if found is None:
            return None
        job_id, stored = found
        if stored != digest:
            raise InvalidArgument(
                "idempotency_key was already used for a different batch",
                reason="IDEMPOTENCY_KEY_REUSED",
                field_violations=[("idempotency_key", "already used with a different request")],
            )
        return self.store.job(job_id)

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
        tenant = self.tenants.get_tenant(tenant_id)
        items = iter(self.store.pending(job_id))
        slots = self._tenant_slots.setdefault(tenant_id, asyncio.Semaphore(self.tenant_concurrency))

        async def worker() -> None:
            # Workers share one iterator: each takes the next item when its last one finished.
            for item in items:
                async with slots:
                    result = await self._run_item(tenant, item)
                self.store.finish_item(job_id, result)

        try:
            await asyncio.gather(*(worker() for _ in range(self.job_concurrency)))
        except asyncio.CancelledError:
            log.info("gateway.job_paused", job_id=job_id)
            raise
        except Exception:
            log.exception("gateway.job_failed", job_id=job_id)
            return  # its unfinished items run again on the next resume
        self.store.complete(job_id)
        job = self.store.job(job_id)
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

    async def _run_item(self, tenant: Tenant | None, item: PendingItem) -> pb.BatchItemResult:
        """Generate one item, retrying rate limits and UNAVAILABLE as _retry_delay says; the result, an error
        included."""
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
            texts: list[str] = []
            chunk = None
            stream = self.pipeline.generate(
                item.request,
                authorization=None,
                outcome=outcome,
                timeout_s=None,
                span_name="gateway.BatchItem",
                tenant=tenant,
            )
            try:
                async for data in stream:
                    chunk = pb.GenerateResponse.FromString(data).chunk
                    texts.append(chunk.text)
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
            result.text = "".join(texts)
            if chunk is not None:
                result.finish_reason = chunk.finish_reason
                result.usage.CopyFrom(chunk.usage)
            return result
