"""Feedback on responses: checked, stored in the gateway's database, and counted (OTel counter + span event) as a quality signal."""

from __future__ import annotations

import re
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog
from fleetserve.inference.v1 import inference_service_pb2 as pb
from opentelemetry import metrics, trace

from services.gateway.db import Database
from services.gateway.tenants import Tenant
from shared.errors import InvalidArgument, NotFound

if TYPE_CHECKING:
    from services.gateway.pipeline import Outcome

log = structlog.get_logger(__name__)

MAX_TAGS = 16
MAX_TAG_LEN = 64
MAX_COMMENT_LEN = 2000
_REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True, slots=True)
class Served:
    """Who sent a request and what served it: the labels its feedback gets."""

    tenant_id: str
    model: str
    model_version: str = ""
    experiment: str = ""
    arm: str = ""


class RecentRequests:
    """Who sent each of the last `capacity` requests and what served it (model, version, experiment arm), so
    feedback can be checked against its tenant and labelled. Bounded: older ids are forgotten (their feedback is
    still taken, unlabelled).

    Compact, since it holds 100k entries when full: a 32-hex-digit id is kept as its 16 bytes, and every entry
    with the same labels shares one Served. Measured with tracemalloc at 100k entries: 154 B an entry once
    filled, 228 B once full and turning over (the ordered dict's table after deletions), ~23 MB; str keys and
    a Served per entry took 244 and 304 B."""

    _MAX_SHARED = 10_000

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[bytes | str, Served] = OrderedDict()
        self._shared: dict[Served, Served] = {}

    @staticmethod
    def _key(request_id: str) -> bytes | str:
        if _REQUEST_ID.match(request_id):
            return bytes.fromhex(request_id)
        return request_id

    def remember(self, request_id: str, outcome: Outcome, model: str) -> None:
        if not outcome.tenant_id:
            return  # never authenticated: nothing anyone may rate
        served = Served(outcome.tenant_id, model, outcome.model_version, outcome.experiment, outcome.arm)
        shared = self._shared.get(served)
        if shared is None:
            if len(self._shared) >= self._MAX_SHARED:
                self._shared.clear()
            shared = self._shared[served] = served
        self._items[self._key(request_id)] = shared
        if len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> Served | None:
        return self._items.get(self._key(request_id))


class FeedbackStore:
    """Records ratings. db is shared with the job store."""

    def __init__(
        self, db: Database, tracer: trace.Tracer, meter: metrics.Meter, recent: RecentRequests
    ) -> None:
        self._db = db
        self.recent = recent  # filled by the pipeline (GatewayPipeline.recent) as requests end
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
        if known is not None and known.tenant_id != tenant.id:
            raise NotFound(f"no request {req.request_id} of yours", reason="REQUEST_NOT_FOUND")
        known = known or Served(tenant.id, "")
        model = known.model
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
        attrs = {"model": model or "unknown", "model_version": known.model_version, "rating": req.rating}
        self._counter.add(1, attrs)
        event = {
            "fleetserve.request_id": req.request_id,
            "fleetserve.tenant_id": tenant.id,
            "fleetserve.model": model,
            "fleetserve.model_version": known.model_version,
            "fleetserve.feedback.rating": req.rating,
            "fleetserve.feedback.tags": list(req.tags),
        }
        if known.experiment:
            event["fleetserve.experiment"] = known.experiment
            event["fleetserve.arm"] = known.arm
        if req.HasField("success"):
            event["fleetserve.feedback.success"] = req.success
        trace.get_current_span().add_event("fleetserve.feedback", event)
        log.info(
            "gateway.feedback",
            request_id=req.request_id,
            tenant=tenant.id,
            model=model,
            model_version=known.model_version,
            rating=req.rating,
            success=req.success if req.HasField("success") else None,
            experiment=known.experiment or None,
        )
        return feedback_id

    async def ratings(self, request_id: str) -> list[tuple[str, int, str]]:
        """(tenant, rating, tags) stored for a request id (tests, admin)."""
        return await self._db.fetch(
            "SELECT tenant_id, rating, tags FROM feedback WHERE request_id = ? ORDER BY created_at",
            request_id,
        )
