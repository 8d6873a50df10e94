"""Stall detection on an injected clock: a replica silent past its threshold is reported once; the threshold
follows its pace (inter-chunk interval while streaming, TTFT while every request waits for a first token); a
replica whose other streams progress is not stalled; a replica that left the fleet is still watched while its
attempts run."""

from __future__ import annotations

from services.router.stalls import StallDetector, StallSettings


class FakeAttempt:
    def __init__(self) -> None:
        self.streaming = False
        self.stalled = None

    def stall(self, reason: str) -> None:
        self.stalled = reason


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def detector(**kw) -> tuple[StallDetector, Clock]:
    clock = Clock()
    return StallDetector(StallSettings(**kw), clock=clock), clock


def stream(d: StallDetector, clock: Clock, replica: str = "r1"):
    a = FakeAttempt()
    w = d.add(replica, a)
    d.answered(w, 0.05)
    a.streaming = True
    return a, w


def tick(d: StallDetector, clock: Clock, dt: float, watch=None, chunks: int = 0):
    clock.t += dt
    if watch is not None:
        watch.chunks += chunks
    return d.check()


def test_streaming_replica_gone_silent_is_stalled_after_its_threshold_once():
    """Chunks every 10 ms, then none: stalled once silence passes max(min_silence, 20 x ITL), reported once."""
    d, clock = detector(min_silence_s=1.0, itl_factor=20.0)
    _, w = stream(d, clock)
    for _ in range(20):
        assert tick(d, clock, 0.1, w, chunks=10) == []
    assert abs(w.itl_s - 0.01) < 1e-9
    assert [tick(d, clock, 0.1, w) for _ in range(10)] == [[]] * 10  # 1.0 s of silence: not yet
    (stalled,) = tick(d, clock, 0.1, w)
    assert stalled[0] is w and stalled[1] > 1.0 and stalled[2] == 1.0
    assert tick(d, clock, 0.1, w) == []  # its silence starts over


def test_slow_pace_raises_the_threshold():
    """A replica emitting a chunk per stream every 200 ms gets 20 x 0.2 = 4 s, not the 1 s floor."""
    d, clock = detector(min_silence_s=1.0, itl_factor=20.0)
    _, w = stream(d, clock)
    for _ in range(20):
        tick(d, clock, 0.2, w, chunks=1)
    assert abs(d.threshold(w) - 4.0) < 1e-6


def test_waiting_for_first_token_uses_the_first_token_threshold():
    """An idle replica sent a request that never answers: silence counts from the request, the limit is
    first_token_s (or ttft_factor x TTFT)."""
    d, clock = detector(first_token_s=2.5, ttft_factor=10.0)
    clock.t += 50  # idle for a long time before: not silence
    a = FakeAttempt()
    w = d.add("r1", a)
    assert [tick(d, clock, 0.5) for _ in range(5)] == [[]] * 5  # 2.5 s
    assert tick(d, clock, 0.1)[0][0] is w


def test_one_slow_request_on_a_progressing_replica_is_not_a_stall():
    """Another stream on the same replica keeps sending: no stall, however long the slow one waits."""
    d, clock = detector()
    slow = FakeAttempt()
    w = d.add("r1", slow)
    _, w2 = stream(d, clock)
    assert w2 is w
    for _ in range(100):
        assert tick(d, clock, 0.1, w, chunks=1) == []


def test_a_removed_replica_is_watched_until_its_attempts_end():
    """The registry dropped the replica (its lease expired while hung): its attempts are still detected."""
    d, clock = detector(min_silence_s=1.0)
    a, w = stream(d, clock)
    d.remove("r1")
    assert [x[0] for x in tick(d, clock, 1.5)] == [w]
    d.discard(w, a)
    assert d.check() == [] and "r1" not in d._watches


def waiting(d: StallDetector, clock: Clock):
    """A request on an idle replica that has not answered yet: the first-token threshold (2.5 s) applies."""
    clock.t += 50
    a = FakeAttempt()
    return a, d.add("r1", a)


def test_a_silent_replica_with_a_long_threshold_is_probed_and_an_unanswered_probe_is_a_hang():
    """Threshold 2.5 s > 0.75 + 1.25: probed once after 0.75 s of silence (not again while the probe is out);
    no answer and no chunk meanwhile: a hang at ~2 s instead of 2.5 s, and the silence starts over."""
    d, clock = detector(first_token_s=2.5, probe_after_s=0.75, probe_timeout_s=1.25)
    _, w = waiting(d, clock)
    assert tick(d, clock, 0.7) == [] and d.probes_due() == []  # 0.7 s of silence: not yet
    tick(d, clock, 0.1)
    assert d.probes_due() == [w] and w.probing
    assert d.probes_due() == []  # one probe at a time
    assert tick(d, clock, 1.25) == []  # 2.05 s: the silence rule alone would wait until 2.5 s
    silence, probe_s = d.probe_unanswered(w)
    assert abs(silence - 2.05) < 1e-9 and abs(probe_s - 1.25) < 1e-9 and not w.probing
    assert d.check() == []  # reported once: its silence starts over


def test_a_replica_past_its_threshold_is_not_probed():
    """Streaming at a fast pace with a threshold (0.4 s) under probe_after_s (0.5 s): the silence rule reports it
    first; no probe."""
    d, clock = detector(min_silence_s=0.4, probe_after_s=0.5, probe_streaming_s=0.5, probe_timeout_s=1.25)
    _, w = stream(d, clock)
    tick(d, clock, 0.1, w, chunks=10)
    seen = []
    for _ in range(6):
        seen += tick(d, clock, 0.1, w)
        assert d.probes_due() == []
    assert [x[0] for x in seen] == [w]


def test_a_probe_answered_with_progress_restarts_the_silence_and_without_leaves_it():
    """Counters that moved since the last answer count as progress; unchanged ones do not; a chunk during an
    unanswered probe means the replica is not hung."""
    d, clock = detector(first_token_s=2.5, probe_after_s=0.75, probe_timeout_s=1.25)
    _, w = waiting(d, clock)
    tick(d, clock, 0.8)
    assert d.probes_due() == [w]
    d.probe_answered(w, 100)  # the first answer: nothing to compare with
    assert not w.probing and abs(clock.t - w.quiet_since - 0.8) < 1e-9
    tick(d, clock, 0.8)
    assert d.probes_due() == [w]
    d.probe_answered(w, 100)  # no progress: the silence goes on (1.6 s)
    assert abs(clock.t - w.quiet_since - 1.6) < 1e-9
    tick(d, clock, 0.8)
    assert d.probes_due() == [w]
    d.probe_answered(w, 140)  # progress (working for other routers, a long prefill): not silent any more
    assert w.quiet_since == clock.t
    tick(d, clock, 0.8)
    assert d.probes_due() == [w]
    w.chunks += 1  # a chunk arrived while the probe was out
    assert d.probe_unanswered(w) is None


def test_a_stall_reported_by_its_threshold_is_not_reported_again_by_the_probe_still_out():
    """The silence rule fires while a probe is out (a threshold shorter than the probe): one report only."""
    d, clock = detector(first_token_s=1.0, probe_after_s=0.5, probe_timeout_s=1.25)
    _, w = waiting(d, clock)
    tick(d, clock, 0.6)
    assert d.probes_due() == [w]
    assert [x[0] for x in tick(d, clock, 0.5)] == [w]
    assert d.probe_unanswered(w) is None and not w.probing


def test_a_streaming_replica_is_probed_after_a_few_of_its_intervals_not_after_probe_after_s():
    """Streaming at 10 ms per chunk: probed (and so held out) after probe_streaming_s (0.2 s) of silence, not
    0.5 s; at 40 ms per chunk after 10 x 40 ms; at 100 ms per chunk no later than probe_after_s; a replica
    whose requests all wait for a first token after probe_after_s."""
    d, clock = detector(probe_after_s=0.5, probe_streaming_s=0.2, probe_itl_factor=10.0)
    _, fast = stream(d, clock, "fast")
    for _ in range(10):
        tick(d, clock, 0.1, fast, chunks=10)
    assert abs(d.probe_after(fast) - 0.2) < 1e-9
    assert tick(d, clock, 0.1) == [] and d.probes_due() == []  # 0.1 s of silence: not yet
    tick(d, clock, 0.15)
    assert d.probes_due() == [fast]
    assert abs(d.probe_after(stream(d, clock, "paced")[1]) - 0.2) < 1e-9  # no pace measured yet: the floor
    paced = d._watches["paced"]
    for _ in range(10):
        tick(d, clock, 0.4, paced, chunks=10)  # one stream, a chunk every 40 ms
    assert abs(d.probe_after(paced) - 0.4) < 1e-6
    slow = stream(d, clock, "slow")[1]
    for _ in range(10):
        tick(d, clock, 1.0, slow, chunks=10)  # a chunk every 100 ms
    assert d.probe_after(slow) == 0.5
    waiting_only = d.add("first-token", FakeAttempt())
    assert d.probe_after(waiting_only) == 0.5
