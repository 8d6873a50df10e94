"""Feedback on responses: checked, stored in the gateway's database, and counted (OTel counter + span event) as a quality signal."""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict

import structlog
from fleetserve.inference.v1 import inference_service_pb2 as pb
from opentelemetry import metrics, trace

from services.gateway.db import Database
from services.gateway.tenants import Tenant
from shared.errors import InvalidArgument, NotFound

log = structlog.get_logger(__name__)

MAX_TAGS = 16
MAX_TAG_LEN = 64
MAX_COMMENT_LEN = 2000
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


class RecentRequests:
    """Who sent each of the last `capacity` requests and to which model, so feedback can be checked against its
    tenant and labelled with its model. Bounded: older ids are forgotten (their feedback is still taken).

    Compact, since it holds 100k entries when full: a 32-hex-digit id is kept as its 16 bytes, and every entry
    of one (tenant, model) shares one tuple (~170 B an entry instead of ~270)."""

    _MAX_PAIRS = 10_000

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes | str, tuple[str, str]] = OrderedDict()
        self._pairs: dict[tuple[str, str], tuple[str, str]] = {}

    @staticmethod
    def _key(request_id: str) -> bytes | str:
        if _REQUEST_ID.match(request_id):
            return bytes.fromhex(request_id)
        return request_id

    def remember(self, request_id: str, tenant_id: str, model: str) -> None:
        if not tenant_id:
            return  # never authenticated: nothing anyone may rate
        pair = (tenant_id, model)
        shared = self._pairs.get(pair)
        if shared is None:
            if len(self._pairs) >= self._MAX_PAIRS:
                self._pairs.clear()
            shared = self._pairs[pair] = pair
        self._items[self._key(request_id)] = shared
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> tuple[str, str] | None:
        return self._items.get(self._key(request_id))


class FeedbackStore:
    """Records ratings. db is shared with the job store."""

    def __init__(self, db: Database, tracer: trace.Tracer, meter: metrics.Meter) -> None:
        self._db = db
        self.recent = RecentRequests()
        self._tracer = tracer
        self._counter = meter.create_counter(
            "fleetserve.gateway.feedback",
            unit="{rating}",
            description="Feedback ratings (1 bad .. 5 good) by model and rating.",
        )

    async def record(self, tenant: Tenant, req: pb.FeedbackRequest) -> str:
        """Store a rating by tenant; its feedback id. InvalidArgument for bad fields, NotFound for a request id
        known to belong to another tenant (not told apart from one that never existed)."""
        violations = []
        if not _REQUEST_ID.match(req.request_id):
            violations.append(("request_id", "must be the 32 hex digits of a response's x-request-id"))
        if not 1 <= req.rating <= 5:
            violations.append(("rating", f"must be 1 (bad) to 5 (good); got {req.rating}"))
        if len(req.tags) > MAX_TAGS:
            violations.append(("tags", f"at most {MAX_TAGS} tags; got {len(req.tags)}"))
        for i, tag in enumerate(req.tags):
            if not tag or len(tag) > MAX_TAG_LEN:
                violations.append((f"tags[{i}]", f"must be 1 to {MAX_TAG_LEN} characters"))
        if len(req.comment) > MAX_COMMENT_LEN:
            violations.append(("comment", f"at most {MAX_COMMENT_LEN} characters"))
        if violations:
            raise InvalidArgument(
                f"invalid feedback: {', '.join(f for f, _ in violations)}", field_violations=violations
            )
        known = self.recent.get(req.request_id)
        if known is not None and known[0] != tenant.id:
            raise NotFound(f"no request {req.request_id} of yours", reason="REQUEST_NOT_FOUND")
        model = known[1] if known else ""
        feedback_id = uuid.uuid4().hex
        await self._db.execute(
            "INSERT INTO feedback (id, request_id, tenant_id, model, rating, tags, comment, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            feedback_id,
            req.request_id,
            tenant.id,
            model,
            req.rating,
            ",".join(req.tags),
            req.comment,
            time.time(),
        )
        attrs = {"model": model or "unknown", "rating": req.rating}
        self._counter.add(1, attrs)
        span = trace.get_current_span()
        span.add_event(
            "fleetserve.feedback",
            {
                "fleetserve.request_id": req.request_id,
                "fleetserve.tenant_id": tenant.id,
                "fleetserve.model": model,
                "fleetserve.feedback.rating": req.rating,
                "fleetserve.feedback.tags": list(req.tags),
            },
        )
        log.info(
            "gateway.feedback", request_id=req.request_id, tenant=tenant.id, model=model, rating=req.rating
        )
        return feedback_id

    async def ratings(self, request_id: str) -> list[tuple[str, int, str]]:
        """(tenant, rating, tags) stored for a request id (tests, admin)."""
        return await self._db.fetch(
            "SELECT tenant_id, rating, tags FROM feedback WHERE request_id = ? ORDER BY created_at",
            request_id,
        )
