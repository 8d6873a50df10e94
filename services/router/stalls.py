"""Hung replicas: a replica whose streams all stop (a stuck kernel, an NCCL or driver hang, a frozen host) sends
no error and keeps its connections open, so nothing fails; the router notices the silence instead.

Each replica's attempts count the chunks they relay (one integer increment per chunk: the only per-token cost);
a watchdog looks every check interval. A replica with work in flight and no chunk from any of its streams for
longer than its threshold is stalled: max(min_silence_s, itl_factor x its recent inter-chunk interval) while it
has streams under way, max(first_token_s, ttft_factor x its recent TTFT) while every request on it still waits
for its first token. One slow request on a replica whose other streams progress is not a stall.

Those thresholds follow the replica's pace, so they can be long (a slow first token, a slow replica). A replica
silent for probe_after_s whose threshold has not passed yet is asked for its progress counters (EngineService
GetLoad: output tokens, requests finished and aborted; sooner for a replica that was streaming, after a few of
its inter-chunk intervals), and new requests avoid it meanwhile (when another replica can take them): no answer within probe_timeout_s while still silent is a hang (a frozen process answers
nothing), whatever its pace; an answer whose counters moved is progress (its silence starts over); an answer
without progress leaves the threshold to decide (a live front end over a stuck kernel)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class StallSettings:
    """When a silent replica counts as hung."""

    enabled: bool = True
    check_interval_s: float = 0.1
    min_silence_s: float = 1.0
    itl_factor: float = 20.0
    first_token_s: float = 2.5
    ttft_factor: float = 10.0
    # Progress probes bound detection when the thresholds above are long: a hang is then seen within about
    # probe_after_s + probe_timeout_s (+ one check interval) of the last chunk.
    probe_after_s: float = 0.5
    probe_timeout_s: float = 1.25
    # A streaming replica is probed (and held out) sooner: after max(probe_streaming_s, probe_itl_factor x its
    # inter-chunk interval), if that is under probe_after_s. Requests routed to a replica in the moments after it
    # froze wait out its detection (the TTFT tail of a hang), so the sooner it is held out, the fewer of them; a
    # replica that streams at its pace is not silent that long.
    probe_streaming_s: float = 0.2
    probe_itl_factor: float = 10.0


class Watched(Protocol):
    """An attempt as the detector sees it: whether it has answered, and how to end it as stalled."""

    streaming: bool

    def stall(self, reason: str) -> None: ...


class ReplicaWatch:
    """One replica's progress: chunks relayed (attempts increment `chunks`), its attempts in flight, and its
    recent pace (EWMA of the interval between a stream's chunks, and of TTFT)."""

    __slots__ = (
        "replica_id",
        "chunks",
        "seen",
        "quiet_since",
        "last_tick",
        "itl_s",
        "ttft_s",
        "attempts",
        "streaming",
        "removed",
        "probing",
        "probed_at",
        "probe_chunks",
        "progress",
    )

    def __init__(self, replica_id: str, now: float) -> None:
        self.replica_id = replica_id
        self.chunks = 0
        self.seen = 0
        self.quiet_since = now
        self.last_tick = now
        self.itl_s = 0.0
        self.ttft_s = 0.0
        self.attempts: set[Watched] = set()
        self.streaming = 0  # attempts that have answered
        self.removed = False  # the replica left the fleet; dropped once its last attempt ends
        self.probing = False  # a progress probe is in flight
        self.probed_at = 0.0  # when the last probe was sent
        self.probe_chunks = 0  # chunks counted when it was sent
        self.progress = -1  # the replica's progress counters (sum) at its last answer; -1: none yet


class StallDetector:
    """The router's view of which replicas have gone silent."""

    _ALPHA = 0.2

    def __init__(
        self, settings: StallSettings | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings or StallSettings()
        self._clock = clock
        self._watches: dict[str, ReplicaWatch] = {}

    def add(self, replica_id: str, attempt: Watched) -> ReplicaWatch:
        """An attempt started on the replica; the silence of an idle replica is counted from now."""
        watch = self._watches.get(replica_id)
        now = self._clock()
        if watch is None:
            watch = self._watches[replica_id] = ReplicaWatch(replica_id, now)
        watch.removed = False
        if not watch.attempts:
            watch.quiet_since = watch.last_tick = now
            watch.seen = watch.chunks
        watch.attempts.add(attempt)
        return watch

    def answered(self, watch: ReplicaWatch, ttft_s: float) -> None:
        """An attempt's first chunk came after ttft_s."""
        watch.streaming += 1
        watch.ttft_s = (
            ttft_s if watch.ttft_s == 0 else (1 - self._ALPHA) * watch.ttft_s + self._ALPHA * ttft_s
        )

    def discard(self, watch: ReplicaWatch, attempt: Watched) -> None:
        """The attempt ended."""
        if attempt in watch.attempts:
            watch.attempts.discard(attempt)
            if attempt.streaming:
                watch.streaming -= 1
        if watch.removed and not watch.attempts and self._watches.get(watch.replica_id) is watch:
            del self._watches[watch.replica_id]

    def remove(self, replica_id: str) -> None:
        """The replica left the fleet. Its attempts still in flight are still watched: a hung replica's lease
        often expires before its silence is noticed, and its streams must not hang with it."""
        watch = self._watches.get(replica_id)
        if watch is None:
            return
        if watch.attempts:
            watch.removed = True
        else:
            del self._watches[replica_id]

    def threshold(self, watch: ReplicaWatch) -> float:
        """Seconds of silence after which this replica counts as hung."""
        s = self.settings
        if watch.streaming:
            return max(s.min_silence_s, s.itl_factor * watch.itl_s)
        return max(s.first_token_s, s.ttft_factor * watch.ttft_s)

    def probe_after(self, watch: ReplicaWatch) -> float:
        """Seconds of silence after which this replica is probed."""
        s = self.settings
        if watch.streaming:
            return min(s.probe_after_s, max(s.probe_streaming_s, s.probe_itl_factor * watch.itl_s))
        return s.probe_after_s

    def probes_due(self) -> list[ReplicaWatch]:
        """Replicas to ask for their progress now: work in flight, silent for probe_after (but not yet for
        their threshold), no probe in flight and none sent during the last probe_after. Each is marked as
        probing (probe_answered or probe_unanswered ends it)."""
        now = self._clock()
        due = []
        for watch in self._watches.values():
            if not watch.attempts or watch.probing:
                continue
            after = self.probe_after(watch)
            if (
                now - watch.quiet_since < after
                or now - watch.probed_at < after
                or now - watch.quiet_since > self.threshold(watch)
            ):
                continue
            watch.probing = True
            watch.probed_at = now
            watch.probe_chunks = watch.chunks
            due.append(watch)
        return due

    def probe_answered(self, watch: ReplicaWatch, progress: int) -> None:
        """The replica answered its probe: alive. Counters that moved since its last answer are progress (its
        silence starts over, as for a chunk); unchanged ones leave the silence to the threshold."""
        watch.probing = False
        if watch.progress >= 0 and progress != watch.progress:
            watch.quiet_since = self._clock()
        watch.progress = progress

    def probe_unanswered(self, watch: ReplicaWatch) -> tuple[float, float] | None:
        """The probe got no answer within probe_timeout_s. (silence, probe time) when that is a hang: the replica
        has work in flight and sent no chunk meanwhile; its silence then starts over (reported once)."""
        watch.probing = False
        if not watch.attempts or watch.chunks != watch.probe_chunks:
            return None
        now = self._clock()
        silence = now - watch.quiet_since
        watch.quiet_since = now
        return silence, now - watch.probed_at

    def check(self) -> list[tuple[ReplicaWatch, float, float]]:
        """(watch, silence, threshold) of every replica stalled now; their silence starts over (each stall is
        reported once, and the attempts it ends are then gone)."""
        now = self._clock()
        stalled = []
        for watch in self._watches.values():
            if not watch.attempts:
                continue
            delta = watch.chunks - watch.seen
            if delta > 0:
                if watch.streaming:
                    # Per stream, chunks came every (interval x streams / chunks) seconds.
                    itl = (now - watch.last_tick) * watch.streaming / delta
                    a = self._ALPHA
                    watch.itl_s = itl if watch.itl_s == 0 else (1 - a) * watch.itl_s + a * itl
                watch.seen = watch.chunks
                watch.quiet_since = now
            else:
                silence = now - watch.quiet_since
                limit = self.threshold(watch)
                if silence > limit:
                    stalled.append((watch, silence, limit))
                    watch.quiet_since = now
                    watch.probe_chunks = -1  # a probe still out must not report this stall again
            watch.last_tick = now
        return stalled
