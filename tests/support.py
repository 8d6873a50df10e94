"""Test helpers: bounded waiting for a condition instead of sleeps, and reading a launched service's ready file."""

from __future__ import annotations

import asyncio
import inspect
import json
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
