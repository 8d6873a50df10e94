"""The traffic configuration: rollouts, experiments, feature flags and the versions ever registered per model, as
documents in the registry's store (SQLite or etcd). Writes are compare-and-set on the version last read, so
several registries over one etcd never overwrite each other's decisions; each follows the store's change feed and
publishes whole snapshots to its watchers (routers), coalesced so that a slow watcher only gets the latest."""

from __future__ import annotations

import asyncio
from urllib.parse import quote, unquote

import structlog
from fleetserve.registry.v1 import rollout_service_pb2 as pb
from google.protobuf.message import Message
from prometheus_client.registry import CollectorRegistry

from services.registry import store_follow
from services.registry.own_deletes import OwnDeletes
from services.registry.rollouts import plans
from services.registry.store import Doc, DocChange, DocEvent, RegistryStore, StoreConflict
from shared import prom
from shared.errors import Aborted

log = structlog.get_logger(__name__)

ROLLOUT, EXPERIMENT, FLAG, VERSION = "rollout", "experiment", "flag", "model_version"
_TYPES: dict[str, type[Message]] = {ROLLOUT: pb.Rollout, EXPERIMENT: pb.Experiment, FLAG: pb.FeatureFlag}


def version_key(model: str, version: str) -> str:
    """The document name of a (model, version) pair: both quoted, since model names may hold '/'."""
    return f"{quote(model, safe='')}@{quote(version, safe='')}"


class TrafficWatcher:
    """One WatchTraffic caller: woken on every change; reads the configuration as it is then."""

    def __init__(self) -> None:
        self.changed = asyncio.Event()
        self.changed.set()  # the first thing every watcher gets is the configuration now
        self.closed = False


class TrafficState:
    """Everything routers need to split traffic, cached from the store with each document's version."""

    def __init__(self, store: RegistryStore, metrics_registry: CollectorRegistry | None = None) -> None:
        self.store = store
        # On the registry instance's own collector registry (its /metrics), so that two registries in one process
        # (tests) never count each other's breaks.
        registry = metrics_registry or prom.new_registry()
        self.watch_breaks = prom.counter(
            "fleetserve:registry_traffic_watch_breaks",
            "Breaks of the shared store's watch of traffic documents, by kind (rollout, experiment, flag, "
            "model_version): once per break, however many retries it takes to watch again.",
            ("kind",),
            registry,
        )
        # A break is one increment however long it lasts: this says whether each kind is being followed now, so
        # that a registry cut off for an hour is visible (and alerted on) too.
        self.watch_up = prom.gauge(
            "fleetserve:registry_traffic_watch_up",
            "1 while the shared store's watch of traffic documents of this kind is established and applying "
            "changes, 0 from a break (or start) until a fresh read and reconcile precede the next watch.",
            ("kind",),
            registry,
        )
        for kind in (*_TYPES, VERSION):
            # Every kind's series exists from the start (breaks at 0, up at 0 until follow() first reads): a first
            # break is then an increase() in Prometheus, not a series appearing at 1 (which increase() cannot see).
            self.watch_breaks.labels(kind=kind)
            self.watch_up.labels(kind=kind).set(0)
        self.rollouts: dict[str, pb.Rollout] = {}
        self.experiments: dict[str, pb.Experiment] = {}
        self.flags: dict[str, pb.FeatureFlag] = {}
        # model -> versions any replica of it ever registered with.
        self.versions: dict[str, set[str]] = {}
        self._doc_versions: dict[tuple[str, str], int] = {}
        # Per kind (each has its own watch and reads): documents this registry is deleting, or deleted at a
        # revision that kind's watch has not passed yet: a read or a watch echo from before still holds them.
        self.deletes: dict[str, OwnDeletes[str]] = {kind: OwnDeletes() for kind in _TYPES}
        self._watchers: set[TrafficWatcher] = set()

    def _table(self, kind: str) -> dict:
        return {ROLLOUT: self.rollouts, EXPERIMENT: self.experiments, FLAG: self.flags}[kind]

    async def load(self) -> None:
        """Read every document (at start)."""
        for kind, cls in _TYPES.items():
            for doc in await self.store.list_docs(kind):
                self._table(kind)[doc.name] = cls.FromString(doc.value)
                self._doc_versions[(kind, doc.name)] = doc.version
        for doc in await self.store.list_docs(VERSION):
            self._add_version(doc.name)

    async def follow(self, backoff_base_s: float = 0.1, backoff_max_s: float = 5.0) -> None:
        """Apply the store's changes (another registry's writes, with etcd) until cancelled. Each kind has its own
        watch: one that breaks (etcd member gone, network blip, compaction) is watched again with full-jitter
        backoff, after reconciling with a fresh read, so a kind's failure neither stops the others nor loses a
        write made while its watch was down."""
        await asyncio.gather(
            *(self._follow(kind, backoff_base_s, backoff_max_s) for kind in (*_TYPES, VERSION))
        )

    async def _follow(self, kind: str, backoff_base_s: float, backoff_max_s: float) -> None:
        await store_follow.follow(
            lambda: self.store.load_docs(kind),
            lambda docs, revision: self._reconcile(kind, docs, revision),
            lambda revision: self.store.watch_docs(kind, after_revision=revision),
            lambda ev: self._apply(kind, ev),
            breaks=self.watch_breaks.labels(kind=kind),
            up=self.watch_up.labels(kind=kind),
            event="registry.traffic_watch",
            fields={"kind": kind},
            backoff_base_s=backoff_base_s,
            backoff_max_s=backoff_max_s,
        )

    def _apply(self, kind: str, ev: DocEvent) -> None:
        """One change from the watch."""
        name = ev.doc.name
        if kind == VERSION:
            self._add_version(name)
            return
        known, deletes = self._doc_versions.get((kind, name), 0), self.deletes[kind]
        if ev.change is DocChange.DELETED:
            deletes.deletion_seen(name)
            self._table(kind).pop(name, None)
            self._doc_versions.pop((kind, name), None)
        else:
            # The watch is at this write's revision (etcd: a version is one; SQLite keeps no landed deletes).
            deletes.forget(ev.doc.version)
            if ev.doc.version <= known or self._deleted_since(kind, ev.doc):
                return  # our own writes come back too, already applied; or a write from before our delete of it
            self._table(kind)[name] = _TYPES[kind].FromString(ev.doc.value)
            self._doc_versions[(kind, name)] = ev.doc.version
        self.publish()

    def _reconcile(self, kind: str, docs: list[Doc], revision: int) -> int:
        """Make memory match a fresh read of kind taken at revision: apply what is newer, drop what is gone;
        publish once if anything changed. How many documents changed."""
        if kind == VERSION:  # versions are only ever added
            before = sum(len(v) for v in self.versions.values())
            for doc in docs:
                self._add_version(doc.name)
            changed = sum(len(v) for v in self.versions.values()) - before
            return changed  # routers' view does not include versions: nothing to publish
        self.deletes[kind].forget(revision)  # every later read or watch event of kind is past it
        table, fresh, changed = self._table(kind), {d.name: d for d in docs}, 0
        for name in list(table):
            known = self._doc_versions.get((kind, name), 0)
            # Absent from the read and not written here after it (a write of ours that raced the read has a
            # later revision): deleted meanwhile. Without revisions (SQLite) this process is the only writer.
            if name not in fresh and (revision == 0 or known <= revision):
                table.pop(name, None)
                self._doc_versions.pop((kind, name), None)
                changed += 1
        for name, doc in fresh.items():
            if doc.version > self._doc_versions.get((kind, name), 0) and not self._deleted_since(kind, doc):
                table[name] = _TYPES[kind].FromString(doc.value)
                self._doc_versions[(kind, name)] = doc.version
                changed += 1
        if changed:
            self.publish()
        return changed

    def _deleted_since(self, kind: str, doc: Doc) -> bool:
        """Whether doc (read or watched) is older than this registry's delete of it, in flight or landed: applying
        it would put back, and publish to routers, what is gone."""
        return self.deletes[kind].deleted_since(doc.name, doc.version)

    def _add_version(self, name: str) -> None:
        model, _, version = name.partition("@")
        self.versions.setdefault(unquote(model), set()).add(unquote(version))

    # -- writes ---------------------------------------------------------------------------------------------

    async def saw_version(self, model: str, version: str) -> None:
        """Remember that a replica of model registered with version (durably, once)."""
        if not model or version in self.versions.get(model, ()):
            return
        await self.store.put_doc(VERSION, version_key(model, version), b"")
        self.versions.setdefault(model, set()).add(version)

    async def _put(self, kind: str, name: str, message: Message, publish: bool = True) -> None:
        """Write if nobody else wrote since we read (Aborted, with the stored one reloaded, if someone did)."""
        try:
            version = await self.store.put_doc(
                kind, name, message.SerializeToString(), if_version=self._doc_versions.get((kind, name), 0)
            )
        except StoreConflict:
            await self.reload(kind, name)
            raise Aborted(
                f"{kind} {name} was changed concurrently (another registry?); read it again and retry",
                reason="CONCURRENT_CHANGE",
                metadata={"kind": kind, "name": name},
            ) from None
        self._table(kind)[name] = message
        self._doc_versions[(kind, name)] = version
        if publish:
            self.publish()

    async def reload(self, kind: str, name: str) -> None:
        doc = await self.store.get_doc(kind, name)
        if doc is None:
            self._table(kind).pop(name, None)
            self._doc_versions.pop((kind, name), None)
        else:
            self._table(kind)[name] = _TYPES[kind].FromString(doc.value)
            self._doc_versions[(kind, name)] = doc.version
        self.publish()

    async def save_rollout(self, r: pb.Rollout, publish: bool = True) -> None:
        """Store r (durably first), then tell the watchers when routers' view changes."""
        await self._put(ROLLOUT, r.rollout_id, r, publish)

    async def save_experiment(self, e: pb.Experiment) -> None:
        await self._put(EXPERIMENT, e.experiment_id, e)

    async def save_flag(self, f: pb.FeatureFlag) -> None:
        await self._put(FLAG, f.name, f)

    async def delete_flag(self, name: str) -> bool:
        """Delete flag name (durably first); whether the store held it."""
        deletes = self.deletes[FLAG]
        deletes.deleting(name)
        revision = None
        try:
            revision = await self.store.delete_doc(FLAG, name)
        finally:
            # A failed delete, or one without a revision (SQLite, or nothing to delete), is forgotten at once.
            deletes.deleted(name, revision or 0)
        self.flags.pop(name, None)
        self._doc_versions.pop((FLAG, name), None)
        if revision is not None:
            self.publish()
        return revision is not None

    # -- queries --------------------------------------------------------------------------------------------

    def rollouts_newest_first(self, model: str = "") -> list[pb.Rollout]:
        rs = [r for r in self.rollouts.values() if not model or r.plan.model == model]
        return sorted(rs, key=lambda r: (r.started_at_unix, r.rollout_id), reverse=True)

    def latest_rollout(self, model: str) -> pb.Rollout | None:
        rs = self.rollouts_newest_first(model)
        return rs[0] if rs else None

    def active_rollouts(self) -> list[pb.Rollout]:
        return [r for r in self.rollouts.values() if r.state in plans.ACTIVE]

    def running_experiments(self, model: str = "") -> list[pb.Experiment]:
        return [
            e
            for e in self.experiments.values()
            if e.state == pb.EXPERIMENT_STATE_RUNNING and (not model or e.spec.model == model)
        ]

    def experiments_newest_first(self, model: str = "") -> list[pb.Experiment]:
        es = [e for e in self.experiments.values() if not model or e.spec.model == model]
        return sorted(es, key=lambda e: (e.created_at_unix, e.experiment_id), reverse=True)

    def find_experiment(self, id_or_name: str) -> pb.Experiment | None:
        """By id, else the running experiment of that name, else the newest of that name."""
        e = self.experiments.get(id_or_name)
        if e is not None:
            return e
        named = [x for x in self.experiments_newest_first() if x.spec.name == id_or_name]
        running = [x for x in named if x.state == pb.EXPERIMENT_STATE_RUNNING]
        return (running or named or [None])[0]

    def snapshot(self) -> pb.WatchTrafficResponse:
        """What routers apply: each model's latest rollout, running experiments, enabled flags."""
        latest: dict[str, pb.Rollout] = {}
        for r in self.rollouts_newest_first():
            latest.setdefault(r.plan.model, r)
        return pb.WatchTrafficResponse(
            rollouts=[latest[m] for m in sorted(latest)],
            experiments=sorted(self.running_experiments(), key=lambda e: e.experiment_id),
            flags=[self.flags[n] for n in sorted(self.flags) if not self.flags[n].disabled],
        )

    # -- watchers -------------------------------------------------------------------------------------------

    def watch(self) -> TrafficWatcher:
        w = TrafficWatcher()
        self._watchers.add(w)
        return w

    def unwatch(self, w: TrafficWatcher) -> None:
        self._watchers.discard(w)

    @property
    def watcher_count(self) -> int:
        return len(self._watchers)

    def publish(self) -> None:
        for w in self._watchers:
            w.changed.set()

    def close_watchers(self) -> None:
        for w in self._watchers:
            w.closed = True
            w.changed.set()
        self._watchers.clear()

    async def next_snapshot(self, w: TrafficWatcher) -> bytes | None:
        """The configuration once it changed since the watcher's last read (serialized); None once closed."""
        await w.changed.wait()
        w.changed.clear()
        if w.closed:
            return None
        return self.snapshot().SerializeToString()
