"""Keeping a local fleet up: a lock so that one launcher owns a state directory, and a supervisor that restarts a
service whose process exited (on its old port, so every peer's address stays right) after an exponential
backoff, counting restarts and remembering the last exit code for the live table and `fleetserve status`."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

LOCK_NAME = "launcher.lock"


class StateDirBusy(RuntimeError):
    """Another launcher holds the state directory."""


class LauncherLock:
    """An exclusive flock on DIR/launcher.lock holding the launcher's pid. The kernel drops it when the process
    dies, however it dies, so a crashed launcher never leaves a stale lock behind."""

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)  # the state dir holds secrets
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirBusy(
                f"{self.path.parent} is in use by another fleetserve launcher (pid {other}); stop it first, "
                "or give this one its own --data-dir / FLEETSERVE_HOME"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> LauncherLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass
class ServiceHealth:
    """What the supervisor knows of one service."""

    restarts: int = 0
    last_exit: int | None = None
    # "up", "restarting" (exited; restart scheduled), or "failed" (its restart failed; retried later).
    state: str = "up"
    next_restart_at: float = 0.0
    # Monotonic time it was last (re)started: a service that stays up this long has its backoff reset.
    started_at: float = 0.0


class Supervisor:
    """Watches the processes of a fleet and restarts the ones that exit. The backoff after the n-th restart in
    a row is base_s * 2^n up to max_s, reset once a service stayed up stable_s. on_change() is called after
    every restart (the launcher rewrites its state file)."""

    def __init__(
        self,
        procs: Callable[[], dict],
        restart: Callable[[str], Awaitable[object]],
        *,
        base_s: float = 0.5,
        max_s: float = 30.0,
        stable_s: float = 30.0,
        poll_s: float = 0.2,
        on_change: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._procs = procs
        self._restart = restart
        self.base_s = base_s
        self.max_s = max_s
        self.stable_s = stable_s
        self.poll_s = poll_s
        self._on_change = on_change
        self._clock = clock
        self.health: dict[str, ServiceHealth] = {}
        self._streak: dict[str, int] = {}
        self.stopping = False

    def info(self, name: str) -> ServiceHealth:
        return self.health.setdefault(name, ServiceHealth(started_at=self._clock()))

    async def run(self) -> None:
        """Until cancelled (or stopping is set): restart what exited."""
        while not self.stopping:
            await self.check()
            await asyncio.sleep(self.poll_s)

    async def check(self) -> None:
        """One pass: schedule a restart for every process that exited, and do the restarts that are due."""
        now = self._clock()
        for name, proc in list(self._procs().items()):
            if self.stopping:
                return
            h = self.info(name)
            if proc.alive:
                if h.state == "up" and now - h.started_at >= self.stable_s:
                    self._streak[name] = 0
                continue
            if h.state == "up":
                h.last_exit = proc.process.returncode
                streak = self._streak.get(name, 0)
                delay = min(self.max_s, self.base_s * 2**streak)
                h.state, h.next_restart_at = "restarting", now + delay
                log.warning(
                    "supervisor.service_exited",
                    name=name,
                    exit_code=h.last_exit,
                    restart_in_s=round(delay, 3),
                    restarts=h.restarts,
                )
            if now >= h.next_restart_at:
                await self._do_restart(name, h)

    async def _do_restart(self, name: str, h: ServiceHealth) -> None:
        self._streak[name] = self._streak.get(name, 0) + 1
        try:
            await self._restart(name)
        except Exception as e:  # a restart that fails is tried again after a longer wait
            delay = min(self.max_s, self.base_s * 2 ** self._streak[name])
            h.state, h.next_restart_at = "failed", self._clock() + delay
            log.error("supervisor.restart_failed", name=name, error=str(e)[:500], retry_in_s=round(delay, 3))
            return
        h.restarts += 1
        h.state, h.started_at = "up", self._clock()
        log.warning("supervisor.service_restarted", name=name, restarts=h.restarts, last_exit=h.last_exit)
        if self._on_change is not None:
            self._on_change()

    def summary(self) -> dict[str, dict]:
        """Per service: restarts, last exit code, state (for the state file and the live table)."""
        return {
            n: {"restarts": h.restarts, "last_exit": h.last_exit, "state": h.state}
            for n, h in sorted(self.health.items())
        }
