"""The router's view of the fleet: replicas from the registry's WatchReplicas stream, and which are routable."""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterable, Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum

import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb

from shared.watching import follow

log = structlog.get_logger(__name__)

SERVING = reg_pb.REPLICA_STATE_SERVING
DRAINING = reg_pb.REPLICA_STATE_DRAINING


@dataclass(frozen=True, slots=True)
class ReplicaInfo:
    """One replica as last reported by the registry (replaced, never mutated, on every update)."""

    replica_id: str
    address: str
    model: str
    backend: str = ""
    state: int = SERVING
    load: common_pb2.ReplicaLoad = field(default_factory=common_pb2.ReplicaLoad)
    last_heartbeat_unix: float = 0.0
    model_version: str = ""
    # Every address the replica's EngineService answers on (its front-end processes); () means address only.
    endpoints: tuple[str, ...] = ()

    @property
    def addresses(self) -> tuple[str, ...]:
        """Where requests for this replica may go: its front ends, or its one address."""
        return self.endpoints or (self.address,)

    @property
    def serving(self) -> bool:
        """Takes new requests (DRAINING replicas finish what they have but get nothing new)."""
        return self.state == SERVING

    @property
    def reported_queue(self) -> int:
        """Requests the replica itself reported running or waiting."""
        return self.load.running + self.load.waiting

    @classmethod
    def from_pb(cls, r: reg_pb.Replica) -> ReplicaInfo:
        load = common_pb2.ReplicaLoad()
        load.CopyFrom(r.load)
        return cls(
            r.replica_id,
            r.address,
            r.model,
            r.backend,
            r.state,
            load,
            r.last_heartbeat_unix,
            r.model_version,
            tuple(r.endpoints) if len(r.endpoints) > 1 else (),
        )


class Change(Enum):
    """What happened to a replica, for listeners (policies, channel pool)."""

    ADDED = "added"
    UPDATED = "updated"
    REMOVED = "removed"


Listener = Callable[[Change, ReplicaInfo], None]


class Membership:
    """Replicas by id, kept current from registry watch events; knows which are routable now.

    A replica is routable when the registry says SERVING and the router has not put it in a cooldown
    after a failure. The last known membership is kept while the registry is unreachable."""

    def __init__(
        self,
        cooldown_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        forget_model_after_s: float = 600.0,
    ) -> None:
        self.cooldown_s = cooldown_s
        self.forget_model_after_s = forget_model_after_s
        self._clock = clock
        self._replicas: dict[str, ReplicaInfo] = {}
        # Per-model index: choosing a replica looks at one model's replicas, not the whole fleet.
        self._by_model: dict[str, dict[str, ReplicaInfo]] = {}
        self._unroutable_until: dict[str, float] = {}
        # Models served since start: a request for one of these with no replica now is "try again later", not
        # "no such model", until it has had none for forget_model_after_s (then it was decommissioned, not
        # restarting). Expected models (those that wake from zero) are never forgotten.
        self._seen_models: set[str] = set()
        self._expected: set[str] = set()
        self._gone_since: dict[str, float] = {}  # model -> when its last replica left (clock)
        self._listeners: list[Listener] = []
        self.ready = asyncio.Event()
        self.connected = False

    # -- events --------------------------------------------------------------------------------------

    def subscribe(self, listener: Listener) -> None:
        """Call listener(change, replica) on every change applied from now on."""
        self._listeners.append(listener)

    def apply(self, event: reg_pb.WatchReplicasResponse) -> list[tuple[Change, ReplicaInfo]]:
        """Apply one watch event; returns (and tells listeners) what changed."""
        kind = event.type
        changes: list[tuple[Change, ReplicaInfo]] = []
        if kind == reg_pb.WATCH_EVENT_TYPE_SNAPSHOT:
            fresh = {r.replica_id: ReplicaInfo.from_pb(r) for r in event.replicas}
            for rid, old in list(self._replicas.items()):
                if rid not in fresh:
                    self._remove(rid)
                    changes.append((Change.REMOVED, old))
            for rep in fresh.values():
                changes.append(self._upsert(rep))
            self.ready.set()
        elif kind in (reg_pb.WATCH_EVENT_TYPE_ADDED, reg_pb.WATCH_EVENT_TYPE_UPDATED):
            for r in event.replicas:
                rep = ReplicaInfo.from_pb(r)
                if kind == reg_pb.WATCH_EVENT_TYPE_ADDED:
                    # Re-added by the registry (re-registered): give it a fresh chance at once.
                    self._unroutable_until.pop(rep.replica_id, None)
                changes.append(self._upsert(rep))
        elif kind == reg_pb.WATCH_EVENT_TYPE_REMOVED:
            for r in event.replicas:
                old = self._replicas.get(r.replica_id)
                if old is not None:
                    self._remove(r.replica_id)
                    changes.append((Change.REMOVED, old))
        else:
            log.warning("router.watch_event_unknown", type=int(kind))
        for change, rep in changes:
            for listener in self._listeners:
                listener(change, rep)
        return changes

    def _upsert(self, rep: ReplicaInfo) -> tuple[Change, ReplicaInfo]:
        old = self._replicas.get(rep.replica_id)
        change = Change.ADDED if old is None else Change.UPDATED
        if old is not None and old.model != rep.model:
            self._unindex(old)
        self._replicas[rep.replica_id] = rep
        self._by_model.setdefault(rep.model, {})[rep.replica_id] = rep
        if rep.model:
            self._seen_models.add(rep.model)
            self._gone_since.pop(rep.model, None)
        return change, rep

    def _remove(self, replica_id: str) -> None:
        old = self._replicas.pop(replica_id, None)
        if old is not None:
            self._unindex(old)
        self._unroutable_until.pop(replica_id, None)

    def _unindex(self, rep: ReplicaInfo) -> None:
        same_model = self._by_model.get(rep.model)
        if same_model is not None:
            same_model.pop(rep.replica_id, None)
            if not same_model:
                del self._by_model[rep.model]
                self._gone_since[rep.model] = self._clock()

    # -- failures ------------------------------------------------------------------------------------

    def mark_unroutable(self, replica_id: str, cooldown_s: float | None = None) -> float | None:
        """Keep a replica out of rotation for a cooldown (it failed before streaming anything, or it is silent
        and being probed); a longer cooldown already running is kept. Until when this call keeps it out (None:
        an unknown replica, or the longer cooldown kept)."""
        if replica_id not in self._replicas:
            return None
        until = self._clock() + (self.cooldown_s if cooldown_s is None else cooldown_s)
        if until <= self._unroutable_until.get(replica_id, -math.inf):
            return None
        self._unroutable_until[replica_id] = until
        return until

    def lift_unroutable(self, replica_id: str, until: float) -> None:
        """End the cooldown that mark_unroutable returned `until` for, unless another one has replaced it."""
        if self._unroutable_until.get(replica_id) == until:
            del self._unroutable_until[replica_id]

    def is_routable(self, replica: ReplicaInfo) -> bool:
        """SERVING and not cooling down after a failure."""
        if not replica.serving:
            return False
        until = self._unroutable_until.get(replica.replica_id)
        if until is None:
            return True
        if self._clock() >= until:
            del self._unroutable_until[replica.replica_id]
            return True
        return False

    # -- queries -------------------------------------------------------------------------------------

    def get(self, replica_id: str) -> ReplicaInfo | None:
        return self._replicas.get(replica_id)

    def replicas(self, model: str | None = None) -> list[ReplicaInfo]:
        """Every known replica (DRAINING and cooling-down ones included), of one model or all, by id."""
        pool = self._replicas if model is None else self._by_model.get(model, {})
        return [pool[k] for k in sorted(pool)]

    def routable(self, model: str, exclude: frozenset[str] | set[str] = frozenset()) -> list[ReplicaInfo]:
        """Replicas of model that may take a new request now, minus those in exclude."""
        same_model = self._by_model.get(model)
        if not same_model:
            return []
        return [r for r in same_model.values() if r.replica_id not in exclude and self.is_routable(r)]

    def expect(self, models) -> None:
        """Know these models before any replica serves them (models that scale from zero), for good."""
        self._expected.update(models)
        self._seen_models.update(models)

    def knows_model(self, model: str) -> bool:
        """Whether model is expected, or a replica has served it and it has not been without one for
        forget_model_after_s."""
        if model not in self._seen_models:
            return False
        gone = self._gone_since.get(model)
        if gone is None or model in self._expected or self._clock() - gone < self.forget_model_after_s:
            return True
        # Decommissioned: from now on "no such model" (NOT_FOUND), as for a model never served.
        self._seen_models.discard(model)
        del self._gone_since[model]
        log.info("router.model_forgotten", model=model, without_replica_s=round(self._clock() - gone, 1))
        return False

    def known_models(self) -> frozenset[str]:
        """The models knows_model() is true for."""
        return frozenset(m for m in list(self._seen_models) if self.knows_model(m))

    def models(self) -> dict[str, int]:
        """Model -> number of SERVING replicas, for models with at least one."""
        counts: dict[str, int] = {}
        for r in self._replicas.values():
            if r.serving:
                counts[r.model] = counts.get(r.model, 0) + 1
        return dict(sorted(counts.items()))

    # -- the watch loop ------------------------------------------------------------------------------

    async def watch(
        self,
        open_stream: Callable[[], AsyncIterable[reg_pb.WatchReplicasResponse]],
        backoff_base_s: float = 0.1,
        backoff_max_s: float = 5.0,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """Apply events from open_stream() until cancelled; when the stream breaks or ends, reconnect after
        a full-jitter exponential backoff (reset once events flow again), keeping the last membership."""
        await follow(
            self,
            open_stream,
            self.apply,
            "router.watch",
            kept=lambda: {"replicas_kept": len(self._replicas)},
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
            rng=rng,
            sleep=sleep,
        )
