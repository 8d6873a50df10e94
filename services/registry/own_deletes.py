"""A registry's record of its own store deletes, so that a read or a watch echo from before one does not undo it."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class OwnDeletes(Generic[K]):
    """What this registry is deleting from the store (revision not known yet: 0) or deleted at a revision that
    neither its watch nor a read has reached yet: a read of the store from before such a delete still holds the
    thing, and a watch may still echo an earlier write of it."""

    def __init__(self) -> None:
        self._revisions: dict[K, int] = {}

    def deleting(self, key: K) -> None:
        """This registry is deleting key from the store (revision not known yet)."""
        self._revisions[key] = 0

    def deleted(self, key: K, revision: int) -> None:
        """The store delete of key is over: landed at revision, or 0 (no revisions, or it failed: then the store
        may still hold it, and a read showing it is right)."""
        if revision:
            self._revisions[key] = revision
        else:
            self._revisions.pop(key, None)

    def deleted_since(self, key: K, revision: int) -> bool:
        """Whether this registry deleted key after revision (or is deleting it now), so that a record of it read
        or watched at revision is stale."""
        deleted = self._revisions.get(key)
        return deleted is not None and (deleted == 0 or deleted > revision)

    def deletion_seen(self, key: K) -> None:
        """The store's history (the watch) is past a deletion of key: whatever comes of it next is a later write."""
        self._revisions.pop(key, None)

    def forget(self, revision: int) -> None:
        """Drop the deletes landed by revision: every later read of the store is at least that recent."""
        if self._revisions:
            self._revisions = {k: d for k, d in self._revisions.items() if d == 0 or d > revision}
