"""The load of one replica whose front end is spread over processes: each front end writes its own row of a
shared-memory table, any front end reads the replica's whole load from it (no RPC, no lock)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass

import numpy as np

# One row per front end. Scheduler fields are snapshots of the one engine core (vLLM sends each step's stats to
# one front end only), so the freshest row wins; the rest are this front end's own and add up.
_FIELDS = (
    "sched_at",  # time.monotonic() of the last scheduler snapshot this front end received (0: none yet)
    "running",
    "waiting",
    "kv_usage",
    "queried_tokens",
    "hit_tokens",
    "output_tokens_per_s",
    "in_flight_tokens",
    "live",
    "finished",
    "aborted",
    "output_tokens",
)
_COL = {name: i for i, name in enumerate(_FIELDS)}


@dataclass(slots=True)
class ReplicaTotals:
    """One replica's load summed over its front ends (scheduler snapshot from the freshest)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    queried_tokens: int = 0
    hit_tokens: int = 0
    output_tokens_per_s: float = 0.0
    in_flight_tokens: int = 0
    live: int = 0
    finished: int = 0
    aborted: int = 0
    output_tokens: int = 0


class LoadBoard:
    """A (front ends x fields) float64 table in a memory-mapped file (in /dev/shm where there is one). The
    supervisor creates it (path None) and removes it at exit; each front end maps the same path and writes only
    its own row. Float64 stores are single machine words, so a reader sees each field old or new, never torn.
    A plain file rather than multiprocessing.shared_memory: its resource tracker would unlink the block when
    the first attaching process exits (before Python 3.13)."""

    def __init__(self, path: str | None, rows: int) -> None:
        self._owner = path is None
        if path is None:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
            fd, path = tempfile.mkstemp(prefix="fleetserve-load-", suffix=".board", dir=shm)
            os.close(fd)
        self.path = path
        self.rows = rows
        shape = (rows, len(_FIELDS))
        self._table = np.memmap(path, dtype=np.float64, mode="w+" if self._owner else "r+", shape=shape)

    def write(self, row: int, values: ReplicaTotals, sched_at: float) -> None:
        """Write this front end's own row: its values, and when it last heard the scheduler (monotonic s)."""
        r = self._table[row]
        r[:] = (
            sched_at,
            values.running,
            values.waiting,
            values.kv_usage,
            values.queried_tokens,
            values.hit_tokens,
            values.output_tokens_per_s,
            values.in_flight_tokens,
            values.live,
            values.finished,
            values.aborted,
            values.output_tokens,
        )

    def totals(self) -> ReplicaTotals:
        """The replica's load: sums over rows, scheduler snapshot of the freshest row."""
        t = self._table.copy()
        fresh = t[int(np.argmax(t[:, _COL["sched_at"]]))]
        sums = t.sum(axis=0)
        return ReplicaTotals(
            running=int(fresh[_COL["running"]]),
            waiting=int(fresh[_COL["waiting"]]),
            kv_usage=float(fresh[_COL["kv_usage"]]),
            queried_tokens=int(sums[_COL["queried_tokens"]]),
            hit_tokens=int(sums[_COL["hit_tokens"]]),
            output_tokens_per_s=float(sums[_COL["output_tokens_per_s"]]),
            in_flight_tokens=int(sums[_COL["in_flight_tokens"]]),
            live=int(sums[_COL["live"]]),
            finished=int(sums[_COL["finished"]]),
            aborted=int(sums[_COL["aborted"]]),
            output_tokens=int(sums[_COL["output_tokens"]]),
        )

    def close(self) -> None:
        """Unmap (and, for the creator, remove the file)."""
        del self._table
        if self._owner:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
