"""Outlier ejection: a replica whose time to first token or error rate is far worse than its peers' (same model)
is taken out of rotation for a while, as Envoy's outlier detection does, never more than a share of a pool."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class OutlierSettings:
    """Thresholds of outlier detection."""

    enabled: bool = True
    # Smoothing of the per-replica averages (weight of the newest sample).
    alpha: float = 0.2
    # Samples a replica (and each peer it is compared with) needs before it can be judged.
    min_samples: int = 10
    # Peers (other replicas of the model with enough samples) needed for a comparison.
    min_peers: int = 2
    # Ejected when its TTFT average exceeds factor x the peers' median and by at least min_gap_ms.
    ttft_factor: float = 3.0
    ttft_min_gap_ms: float = 50.0
    # Ejected when its error-rate average exceeds the peers' median by this much (0..1).
    error_rate_gap: float = 0.5
    # First ejection lasts eject_s; each further one of the same replica lasts one eject_s longer (up to 10x).
    eject_s: float = 30.0
    # Never more than this share of a model's replicas ejected at once (rounded down).
    max_ejected_fraction: float = 0.5


class _Stats:
    __slots__ = ("model", "ttft_ms", "ttft_n", "err", "err_n", "until", "reason", "times")

    def __init__(self, model: str) -> None:
        self.model = model
        self.ttft_ms = 0.0
        self.ttft_n = 0
        self.err = 0.0
        self.err_n = 0
        self.until = 0.0
        self.reason = ""
        self.times = 0

    def reset_samples(self) -> None:
        self.ttft_ms = self.err = 0.0
        self.ttft_n = self.err_n = 0


class OutlierDetector:
    """Per-replica TTFT and error-rate averages (EWMA) and ejections; judged on every new sample against the
    same model's other replicas (a few per model, so a median over them is cheap)."""

    def __init__(
        self,
        settings: OutlierSettings,
        clock: Callable[[], float] = time.monotonic,
        on_eject: Callable[[str, str], None] | None = None,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._on_eject = on_eject
        self._stats: dict[str, _Stats] = {}

    def _get(self, replica_id: str, model: str) -> _Stats:
        st = self._stats.get(replica_id)
        if st is None:
            st = self._stats[replica_id] = _Stats(model)
        return st

    def record_ttft(self, replica_id: str, model: str, ttft_ms: float) -> None:
        if not self.settings.enabled:
            return
        st = self._get(replica_id, model)
        a = self.settings.alpha
        st.ttft_ms = ttft_ms if st.ttft_n == 0 else (1 - a) * st.ttft_ms + a * ttft_ms
        st.ttft_n += 1
        self._judge(replica_id, st)

    def record_result(self, replica_id: str, model: str, fault: bool) -> None:
        if not self.settings.enabled:
            return
        st = self._get(replica_id, model)
        a = self.settings.alpha
        x = 1.0 if fault else 0.0
        st.err = x if st.err_n == 0 else (1 - a) * st.err + a * x
        st.err_n += 1
        self._judge(replica_id, st)

    def ejected(self, replica_id: str) -> bool:
        st = self._stats.get(replica_id)
        if st is None or not st.until:
            return False
        if self._clock() < st.until:
            return True
        # Back in rotation with a clean slate: it is judged again on fresh samples.
        st.until = 0.0
        st.reason = ""
        st.reset_samples()
        log.info("router.replica_returned", replica=replica_id)
        return False

    def status(self, replica_id: str) -> tuple[bool, float, str, float, float]:
        """(ejected, seconds left, reason, TTFT average ms, error-rate average)."""
        st = self._stats.get(replica_id)
        if st is None:
            return False, 0.0, "", 0.0, 0.0
        out = self.ejected(replica_id)
        left = max(0.0, st.until - self._clock()) if out else 0.0
        return out, left, st.reason, st.ttft_ms, st.err

    def remove(self, replica_id: str) -> None:
        self._stats.pop(replica_id, None)

    def _judge(self, replica_id: str, st: _Stats) -> None:
        s = self.settings
        if st.until:
            return
        same_model = [(rid, o) for rid, o in self._stats.items() if o.model == st.model]
        peers = [o for rid, o in same_model if rid != replica_id and not self.ejected(rid)]
        reason = ""
        if st.ttft_n >= s.min_samples:
            ttfts = [o.ttft_ms for o in peers if o.ttft_n >= s.min_samples]
            if len(ttfts) >= s.min_peers:
                median = statistics.median(ttfts)
                if st.ttft_ms > s.ttft_factor * median and st.ttft_ms - median >= s.ttft_min_gap_ms:
                    reason = "ttft"
        if not reason and st.err_n >= s.min_samples:
            errs = [o.err for o in peers if o.err_n >= s.min_samples]
            if len(errs) >= s.min_peers and st.err > statistics.median(errs) + s.error_rate_gap:
                reason = "error_rate"
        if not reason:
            return
        ejected_now = sum(1 for rid, _ in same_model if self.ejected(rid))
        if ejected_now + 1 > int(len(same_model) * s.max_ejected_fraction):
            return  # the pool cannot spare another replica
        st.times += 1
        st.until = self._clock() + s.eject_s * min(st.times, 10)
        st.reason = reason
        log.warning(
            "router.replica_ejected",
            replica=replica_id,
            reason=reason,
            ttft_ewma_ms=round(st.ttft_ms, 3),
            error_rate_ewma=round(st.err, 3),
            eject_s=s.eject_s * min(st.times, 10),
        )
        if self._on_eject is not None:
            self._on_eject(replica_id, reason)
