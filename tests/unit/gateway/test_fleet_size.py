"""The fleet size the Redis limits' fallback divides by: configured, else gateways seen in the database's presence
table and Redis's (minus those the database says left), else the conservative default."""

from __future__ import annotations

from services.gateway.presence import FleetSize, Presence


def reading(alive=(), departed=()) -> Presence:
    return Presence(frozenset(alive), frozenset(departed))


def test_nothing_read_is_the_default_not_one():
    """Before any presence round N is the default (2), and says so."""
    fleet = FleetSize()
    fleet.recount()
    assert (fleet(), fleet.source, fleet.seen) == (2, "default", None)


def test_configured_wins_over_what_is_seen():
    """--limits-fallback-gateways is N whatever the presence leases say."""
    fleet = FleetSize(configured=5)
    fleet.read_database(reading(alive={"a", "b"}))
    fleet.recount()
    assert (fleet(), fleet.source) == (5, "configured")


def test_database_and_redis_are_united_and_the_database_says_who_left():
    """A gateway counts once if both know it; one only Redis saw (another database) still counts; one that left
    by the database's word does not, although Redis's last reading names it."""
    fleet = FleetSize()
    fleet.redis = frozenset({"a", "b", "c", "elsewhere"})
    fleet.read_database(reading(alive={"a", "b", "new"}, departed={"c"}))
    fleet.recount()
    assert (fleet(), fleet.source) == (4, "seen")  # a, b, new, elsewhere


def test_redis_alone_is_the_count_last_seen():
    """Without a presence table (or before its first reading) N is Redis's last reading."""
    fleet = FleetSize()
    fleet.redis = frozenset({"a", "b", "c"})
    fleet.recount()
    assert fleet() == 3


def test_a_first_database_reading_alone_is_no_proof_of_a_small_fleet():
    """Redis never read: one database reading naming only this gateway may predate the rows of gateways that
    started in the same second, so N stays the default until a second reading; one naming more counts at once."""
    fleet = FleetSize()
    fleet.read_database(reading(alive={"me"}))
    fleet.recount()
    assert (fleet(), fleet.source) == (2, "default")
    fleet.read_database(reading(alive={"me"}))
    fleet.recount()
    assert (fleet(), fleet.source) == (1, "seen")
    other = FleetSize()
    other.read_database(reading(alive={"me", "a", "b"}))
    other.recount()
    assert (other(), other.source) == (3, "seen")
