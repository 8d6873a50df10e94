"""Test helpers: bounded waiting for a condition instead of sleeps, reading a launched service's ready file and log,
and stopping a launched process."""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


async def assert_eventually(
    condition: Callable[[], object], timeout_s: float = 10.0, interval_s: float = 0.02, message: str = ""
):
    """Poll condition (sync or async) until it returns a truthy value, which is returned; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last = None
    while True:
        last = condition()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(message or f"condition not met within {timeout_s}s (last value {last!r})")
        await asyncio.sleep(interval_s)


def ready_address(ready: Path) -> str | None:
    """The address in a service's ready file, or None while it is not (completely) written yet."""
    try:
        return json.loads(ready.read_text())["address"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def log_events(cluster, name: str) -> list[dict]:
    """The JSON log lines of a shared.cluster process (lines that are not JSON skipped)."""
    events = []
    for line in cluster.procs[name].log_file.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            pass
    return events


async def stop_process(proc: subprocess.Popen, timeout_s: float = 30.0) -> bool:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s; whether it exited by itself. The wait runs in
    a thread: the process may be draining against a server on this event loop."""
    proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(proc.wait, timeout_s)
        return True
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
        return False
