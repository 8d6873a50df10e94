"""A registry's record of its own store deletes: which reads it makes stale, and when it forgets them."""

from __future__ import annotations

from services.registry.own_deletes import OwnDeletes


def test_a_delete_here_makes_reads_from_before_it_stale_until_a_later_revision_is_seen():
    """A delete in flight makes every read stale; once landed, only reads older than it; once the watch or a read
    is past its revision it is forgotten, and a failed delete (revision 0) is forgotten at once."""
    d: OwnDeletes[str] = OwnDeletes()
    d.deleting("r1")
    assert d.deleted_since("r1", 10**9) and not d.deleted_since("r2", 0)
    d.forget(10**9)  # its revision is not known yet: kept
    d.deleted("r1", 7)
    assert d.deleted_since("r1", 6) and not d.deleted_since("r1", 7)
    d.forget(6)
    assert d.deleted_since("r1", 6)
    d.forget(7)
    assert not d.deleted_since("r1", 6)
    d.deleting("r2")
    d.deleted("r2", 0)
    assert not d.deleted_since("r2", 0)
