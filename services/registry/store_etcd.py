"""The registry's store in etcd: a replica is a key attached to an etcd lease (etcd expires it when its
heartbeats stop), membership changes reach every registry through an etcd watch, and documents are keys
versioned by their mod revision. Several registry processes over one etcd serve the same membership. The etcd
may be a cluster of several members: the store talks to one member at a time and moves to the next when that one
is unreachable, times out or has lost its quorum (leases, keys and watches are the cluster's, so nothing is lost
by moving).

The client is aetcd (https://github.com/martyanov/aetcd): asyncio-native on grpc.aio (the same grpcio the
services use), released in 2026, generated from etcd's v3 protos so it speaks to etcd 3.4 (Debian's) and
later. The alternatives were unmaintained (python-etcd3 and its forks: last release 2020-2023, synchronous,
pinned to protobuf 3), HTTP-gateway clients (etcd3-py, etcd3gw: synchronous, JSON over HTTP) or young
single-author packages. Where aetcd has no call for what we need (put with ignore_lease, a long-lived
keepalive stream) we use its generated stubs directly. aetcd's client connects to one endpoint; moving between
a cluster's members is ours (one client per member, the next one on a member's failure), as etcd's own Go client
does with its endpoint list."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import TypeVar

import aetcd
import aetcd.exceptions
import grpc
import structlog
from aetcd import rpc
from aetcd.rtypes import EventKind
from fleetserve.registry.v1 import registry_service_pb2 as pb

from services.registry.store import (
    Doc,
    DocChange,
    DocEvent,
    RegistryStore,
    ReplicaEvent,
    StoreConflict,
    StoredReplica,
    StoreError,
    validate_doc_key,
)

log = structlog.get_logger(__name__)

# etcd refuses transactions with more operations than --max-txn-ops (default 128).
_MAX_TXN_OPS = 128
_ERRORS = (aetcd.exceptions.ClientError, grpc.aio.AioRpcError, OSError, TimeoutError)
# A member that cannot answer (down, partitioned, without a leader): the next member may.
_MEMBER_DOWN = (
    aetcd.exceptions.ConnectionFailedError,
    aetcd.exceptions.ConnectionTimeoutError,
    OSError,
    TimeoutError,
)
_MEMBER_DOWN_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
T = TypeVar("T")


def parse_endpoints(endpoints: str | Sequence[str]) -> list[str]:
    """host:port endpoints from a comma-separated string or a list; ValueError naming a bad one."""
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out = [e.strip() for e in items if e.strip()]
    if not out:
        raise ValueError("etcd endpoints: give at least one host:port")
    for e in out:
        host, sep, port = e.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {e!r} must be host:port")
    return out


def _member_down(e: BaseException) -> bool:
    if isinstance(e, grpc.aio.AioRpcError):
        return e.code() in _MEMBER_DOWN_CODES
    return isinstance(e, _MEMBER_DOWN)


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with prefix (etcd's range_end for a prefix)."""
    return aetcd.utils.prefix_range_end(prefix)


class EtcdStore(RegistryStore):
    """Keys under the prefix: `replicas/<id>` (a serialized Replica whose registered_unix is the registration
    time, attached to the replica's lease) and `docs/<kind>/<name>`."""

    external_leases = True

    def __init__(
        self, endpoints: str | Sequence[str], prefix: str = "/fleetserve/", *, timeout_s: float = 5.0
    ) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.prefix = (prefix if prefix.endswith("/") else prefix + "/").encode()
        self.where = f"etcd:{','.join(self.endpoints)}{self.prefix.decode()}"
        self._timeout_s = timeout_s
        self._clients = []
        for e in self.endpoints:
            host, _, port = e.rpartition(":")
            self._clients.append(aetcd.Client(host=host.strip("[]"), port=int(port), timeout=timeout_s))
        self._active = 0
        self.failovers = 0
        self._ttl = 3

    @property
    def endpoint(self) -> str:
        """The member spoken to now."""
        return self.endpoints[self._active]

    def _fail_over(self, index: int, error: BaseException) -> None:
        """Member `index` failed: the next one is used from now on (unless another call moved on already)."""
        if index != self._active or len(self._clients) == 1:
            return
        self._active = (index + 1) % len(self._clients)
        self.failovers += 1
        log.warning(
            "registry.etcd_failover",
            failed=self.endpoints[index],
            now=self.endpoints[self._active],
            error=str(error)[:200],
        )

    async def _call(self, what: str, fn: Callable[[aetcd.Client], Awaitable[T]]) -> T:
        """fn on the current member; a member that is down gives way to the next, each tried once per call.
        (A write whose answer was lost may have been applied before the retry: puts and deletes are idempotent,
        a compare-and-set then reports a conflict, which its callers already handle as a lost race.)"""
        last: BaseException | None = None
        for _ in range(len(self._clients)):
            index = self._active
            try:
                return await fn(self._clients[index])
            except _ERRORS as e:
                if not _member_down(e):
                    raise StoreError(f"etcd {what} failed: {e}") from e
                last = e
                self._fail_over(index, e)
        raise StoreError(
            f"etcd {what} failed on every member ({', '.join(self.endpoints)}): {last}"
        ) from last

    # -- keys ----------------------------------------------------------------------------------------

    def _replica_key(self, replica_id: str) -> bytes:
        return self.prefix + b"replicas/" + replica_id.encode()

    def _doc_key(self, kind: str, name: str = "") -> bytes:
        return self.prefix + b"docs/" + kind.encode() + b"/" + name.encode()

    # -- lifecycle -----------------------------------------------------------------------------------

    async def open(self, lease_ttl_s: float) -> None:
        # etcd leases have whole seconds (and etcd may grant more than asked: its minimum TTL).
        self._ttl = max(1, math.ceil(lease_ttl_s))
        try:
            # Fail at start, naming the endpoints, rather than at the first call; any member will do.
            await self._call("status", lambda c: c.status())
        except StoreError as e:
            raise StoreError(f"etcd at {', '.join(self.endpoints)} is unreachable: {e}") from e

    async def close(self) -> None:
        for c in self._clients:
            await c.close()

    # -- membership ----------------------------------------------------------------------------------

    def _decode(self, kv) -> StoredReplica:
        rep = pb.Replica.FromString(kv.value)
        return StoredReplica(rep, rep.registered_unix, kv.lease, kv.mod_revision)

    async def load_replicas(self) -> tuple[list[StoredReplica], int]:
        resp = await self._call("load", lambda c: c.get_prefix(self.prefix + b"replicas/"))
        return [self._decode(kv) for kv in resp], resp.header.revision

    async def put_replica(self, replica: pb.Replica, registered_at: float) -> StoredReplica:
        rep = pb.Replica()
        rep.CopyFrom(replica)
        rep.registered_unix = registered_at
        lease = await self._call("lease grant", lambda c: c.lease(self._ttl))
        key, value = self._replica_key(rep.replica_id), rep.SerializeToString()
        resp = await self._call("put", lambda c: c.put(key, value, lease=lease))
        return StoredReplica(rep, registered_at, lease.id, resp.header.revision)

    async def set_state(self, stored: StoredReplica, state: int) -> int:
        rep = pb.Replica()
        rep.CopyFrom(stored.replica)
        rep.state = state
        rep.registered_unix = stored.registered_at
        return (await self._put_keeping_lease([(rep, stored.lease)])).get(rep.replica_id, 0)

    async def delete_replicas(self, replica_ids: Iterable[str]) -> int:
        ops = [self._clients[0].transactions.delete(self._replica_key(rid)) for rid in replica_ids]
        revision = 0
        for i in range(0, len(ops), _MAX_TXN_OPS):
            batch = ops[i : i + _MAX_TXN_OPS]
            _, responses = await self._call(
                "delete", lambda c, batch=batch: c.transaction(compare=[], success=batch, failure=[])
            )
            # Each operation's header carries the transaction's revision (the store's, if nothing was deleted).
            revision = max([revision, *(r.response_delete_range.header.revision for r in responses)])
        return revision

    async def save_heartbeats(self, replicas: Iterable[StoredReplica]) -> dict[str, int]:
        items = []
        for s in replicas:
            rep = pb.Replica()
            rep.CopyFrom(s.replica)
            rep.registered_unix = s.registered_at
            items.append((rep, s.lease))
        return await self._put_keeping_lease(items)

    async def _put_keeping_lease(self, items: list[tuple[pb.Replica, int]]) -> dict[str, int]:
        """Overwrite replicas that still exist, attached to their lease; a replica whose key is gone (expired
        or deregistered meanwhile) is not resurrected. Replica id -> its write's revision, for those written.
        One small transaction per replica ("if it still exists, overwrite it"): one transaction for many keys
        would fail as a whole when any one of them has gone."""

        async def put(rep: pb.Replica, lease: int) -> tuple[str, int]:
            key = self._replica_key(rep.replica_id)
            exists = rpc.Compare(
                key=key,
                result=rpc.Compare.CompareResult.GREATER,
                target=rpc.Compare.CompareTarget.VERSION,
                version=0,
            )
            resp = await self._put_if(
                exists, rpc.PutRequest(key=key, value=rep.SerializeToString(), lease=lease)
            )
            return rep.replica_id, resp.header.revision if resp.succeeded else 0

        revisions: dict[str, int] = {}
        for i in range(0, len(items), _MAX_TXN_OPS):  # bounded concurrency: at most this many in flight
            for rid, revision in await asyncio.gather(
                *(put(r, lease) for r, lease in items[i : i + _MAX_TXN_OPS])
            ):
                if revision:
                    revisions[rid] = revision
        return revisions

    async def _put_if(self, compare: rpc.Compare, put: rpc.PutRequest) -> rpc.TxnResponse:
        """One transaction: put if compare holds (resp.succeeded says whether it did)."""
        req = rpc.TxnRequest(compare=[compare], success=[rpc.RequestOp(request_put=put)])

        async def txn(c: aetcd.Client) -> rpc.TxnResponse:
            await c.connect()
            return await c.kvstub.Txn(req, timeout=self._timeout_s)

        return await self._call("put", txn)

    async def keepalive(self, leases: Iterable[int]) -> set[int]:
        ids = [lid for lid in leases if lid]
        if not ids:
            return set()

        async def requests():
            for lid in ids:
                yield rpc.LeaseKeepAliveRequest(ID=lid)

        async def renew(c: aetcd.Client) -> set[int]:
            await c.connect()
            gone: set[int] = set()
            call = c.leasestub.LeaseKeepAlive(requests(), timeout=self._timeout_s)
            try:
                n = 0
                async for resp in call:
                    if resp.TTL <= 0:
                        gone.add(resp.ID)
                    n += 1
                    if n == len(ids):
                        break
            finally:
                call.cancel()
            return gone

        return await self._call("keepalive", renew)

    async def revoke(self, lease: int) -> None:
        """Drop a lease no key uses any more (a replica registered again gets a new one)."""
        if lease:
            await self._call("lease revoke", lambda c: c.revoke_lease(lease))

    async def watch_replicas(self, after_revision: int) -> AsyncIterator[ReplicaEvent]:
        start = self.prefix + b"replicas/"
        async for ev in self._watch(start, after_revision + 1):
            rid = ev.kv.key[len(start) :].decode()
            if ev.kind == EventKind.PUT:
                yield ReplicaEvent(rid, self._decode(ev.kv), ev.kv.mod_revision)
            else:
                yield ReplicaEvent(rid, None, ev.kv.mod_revision)

    async def _watch(self, start: bytes, start_revision: int | None = None):
        """The events of a watch on a prefix, on the current member. A watch that breaks raises
        StoreError after moving to the next member, so that the caller's new watch (from the revision it has)
        goes there."""
        kwargs = {"start_revision": start_revision} if start_revision is not None else {}
        watch = await self._call("watch", lambda c: c.watch(start, range_end=_prefix_end(start), **kwargs))
        index = self._active
        try:
            async for ev in watch:
                yield ev
        except _ERRORS as e:
            if _member_down(e):
                self._fail_over(index, e)
            raise StoreError(f"etcd watch broke: {e}") from e
        finally:
            await watch.cancel()

    # -- documents -----------------------------------------------------------------------------------

    async def get_doc(self, kind: str, name: str) -> Doc | None:
        kv = await self._call("get", lambda c: c.get(self._doc_key(kind, name)))
        return None if kv is None else Doc(name, kv.value, kv.mod_revision)

    async def list_docs(self, kind: str) -> list[Doc]:
        return (await self.load_docs(kind))[0]

    async def load_docs(self, kind: str) -> tuple[list[Doc], int]:
        base = self._doc_key(kind)
        resp = await self._call("list", lambda c: c.get_prefix(base))
        docs = (Doc(kv.key[len(base) :].decode(), kv.value, kv.mod_revision) for kv in resp)
        return sorted(docs, key=lambda d: d.name), resp.header.revision

    async def put_doc(self, kind: str, name: str, value: bytes, *, if_version: int | None = None) -> int:
        validate_doc_key(kind, name)
        key = self._doc_key(kind, name)
        if if_version is None:
            resp = await self._call("put", lambda c: c.put(key, bytes(value)))
            return resp.header.revision
        unchanged = rpc.Compare(
            key=key,
            result=rpc.Compare.CompareResult.EQUAL,
            target=rpc.Compare.CompareTarget.MOD,
            mod_revision=if_version,
        )
        resp = await self._put_if(unchanged, rpc.PutRequest(key=key, value=bytes(value)))
        if not resp.succeeded:
            current = await self.get_doc(kind, name)
            raise StoreConflict(kind, name, if_version, current.version if current else 0)
        return resp.header.revision

    async def delete_doc(self, kind: str, name: str) -> int | None:
        resp = await self._call("delete", lambda c: c.delete(self._doc_key(kind, name)))
        return resp.header.revision if resp else None  # aetcd: None when nothing was deleted

    async def watch_docs(self, kind: str, after_revision: int = 0) -> AsyncIterator[DocEvent]:
        base = self._doc_key(kind)
        async for ev in self._watch(base, after_revision + 1 if after_revision else None):
            name = ev.kv.key[len(base) :].decode()
            if ev.kind == EventKind.PUT:
                yield DocEvent(DocChange.PUT, Doc(name, ev.kv.value, ev.kv.mod_revision))
            else:
                yield DocEvent(DocChange.DELETED, Doc(name, b"", 0))
