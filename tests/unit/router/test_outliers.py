"""Outlier detection: ejection on TTFT or error rate far worse than peers', for a while, never too many."""

from __future__ import annotations

from services.router.outliers import OutlierDetector, OutlierSettings


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


def detector(clock: Clock, **kw) -> OutlierDetector:
    settings = dict(min_samples=3, min_peers=2, eject_s=10.0, ttft_min_gap_ms=5.0)
    settings.update(kw)
    return OutlierDetector(OutlierSettings(**settings), clock=clock)


def feed_ttft(d: OutlierDetector, ms: dict[str, float], rounds: int = 3) -> None:
    for _ in range(rounds):
        for rid, v in ms.items():
            d.record_ttft(rid, "m", v)


def test_slow_replica_is_ejected_then_returns_with_a_clean_slate():
    """TTFT 10x the peers' median ejects it for eject_s; afterwards it is back and judged afresh."""
    clock = Clock()
    d = detector(clock)
    feed_ttft(d, {"a": 10, "b": 12, "c": 11, "slow": 120})
    assert d.ejected("slow") and not d.ejected("a")
    ejected, left, reason, ttft, _ = d.status("slow")
    assert ejected and left == 10.0 and reason == "ttft" and ttft > 100
    clock.now += 10.1
    assert not d.ejected("slow")
    assert d.status("slow")[3] == 0.0  # samples reset


def test_second_ejection_lasts_longer():
    """Each further ejection of the same replica lasts one eject_s longer."""
    clock = Clock()
    d = detector(clock)
    feed_ttft(d, {"a": 10, "b": 12, "c": 11, "slow": 120})
    clock.now += 11
    assert not d.ejected("slow")
    feed_ttft(d, {"a": 10, "b": 12, "c": 11, "slow": 120})
    assert d.status("slow")[1] == 20.0


def test_no_ejection_without_enough_peers_or_samples_or_gap():
    """Two replicas (one peer) are never compared; small absolute gaps do not eject; nor do few samples."""
    clock = Clock()
    d = detector(clock)
    feed_ttft(d, {"a": 10, "slow": 120})
    assert not d.ejected("slow")
    d = detector(clock, ttft_min_gap_ms=50)
    feed_ttft(d, {"a": 1, "b": 1, "c": 1, "slow": 20})  # 20x but only 19 ms worse
    assert not d.ejected("slow")
    d = detector(clock)
    feed_ttft(d, {"a": 10, "b": 12, "c": 11, "slow": 120}, rounds=2)
    assert not d.ejected("slow")


def test_error_rate_far_above_peers_ejects():
    """A replica failing most attempts while its peers succeed is ejected with reason error_rate."""
    clock = Clock()
    d = detector(clock, alpha=0.5)
    for _ in range(4):
        for rid in ("a", "b", "c"):
            d.record_result(rid, "m", fault=False)
        d.record_result("bad", "m", fault=True)
    assert d.ejected("bad") and d.status("bad")[2] == "error_rate"


def test_never_more_than_the_allowed_share_is_ejected():
    """With max_ejected_fraction 0.25 of four replicas, only one of two slow replicas is ejected."""
    clock = Clock()
    d = detector(clock, max_ejected_fraction=0.25, min_peers=1)
    feed_ttft(d, {"a": 10, "b": 10, "s1": 200, "s2": 200})
    assert [r for r in ("a", "b", "s1", "s2") if d.ejected(r)] == ["s1"]


def test_disabled_detector_ejects_nothing():
    """With detection off, no sample is even kept."""
    clock = Clock()
    d = OutlierDetector(OutlierSettings(enabled=False), clock=clock)
    feed_ttft(d, {"a": 10, "b": 12, "c": 11, "slow": 1200}, rounds=20)
    assert not d.ejected("slow") and d.status("slow") == (False, 0.0, "", 0.0, 0.0)
