"""Secrets stay secret: `fleetserve up` keeps the dev API key in 0600 files only (never on a command line, in a
log or in its redirected output), and a hand-started gateway shows the key it generated once, on the terminal,
never in its log. `fleetserve up` also passes the standard OTEL_* variables to every service it starts."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import select
import signal
import stat
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from fleetserve.client import AsyncClient
from tests.otlp_collector import recording_collector
from tests.support import assert_eventually, stop_process

pytestmark = pytest.mark.slow


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _command_lines() -> dict[int, str]:
    """Every process's command line on this machine (what `ps` shows any user)."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return out


def _start_up(data_dir: Path, out: Path, env: dict[str, str]) -> subprocess.Popen:
    """`fleetserve up` as a user runs it with its output redirected to a file."""
    with open(out, "wb") as f:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "shared.cli.main",
                "up",
                "--engines",
                "1",
                "--no-live",
                "--speed-factor",
                "5",
                "--data-dir",
                str(data_dir),
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
        )


async def test_fleetserve_up_keeps_the_key_secret_and_passes_otel_variables_through(tmp_path):
    """The state file, the dev key file and the data directory are readable by their user only; the key is in
    no process's command line, no service log and not in `fleetserve up > up.log`; every service exports to the
    collector named by OTEL_EXPORTER_OTLP_ENDPOINT as OTEL_SERVICE_NAME-<service>, beside the metrics service."""
    data_dir = tmp_path / "home"
    up_log = tmp_path / "up.log"
    async with recording_collector() as (collector, got):
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{collector}",
            "OTEL_SERVICE_NAME": "acme",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        up = _start_up(data_dir, up_log, env)
        try:
            state_path = data_dir / "cluster.json"
            await assert_eventually(
                state_path.exists, timeout_s=120, message=f"no state file; {up_log.read_text()}"
            )
            state = json.loads(state_path.read_text())
            key = state["api_key"]
            assert key.startswith("fsk-")

            assert _mode(state_path) == 0o600
            assert _mode(data_dir / "dev_api_key") == 0o600
            assert _mode(data_dir) == 0o700
            leaking = {pid: line for pid, line in _command_lines().items() if key in line}
            assert not leaking, f"the key is on a command line: {leaking}"

            async with AsyncClient(state["gateway"], key, model="sim-1b") as client:
                done = await client.generate("hello", max_tokens=4).completion()
            assert done.usage.completion_tokens == 4

            want = {"acme-gateway", "acme-router", "acme-engine"}
            await assert_eventually(
                lambda: want <= got.services(), timeout_s=60, message=f"got {got.services()}"
            )
            instances = {r.get("service.instance.id") for r, _ in got.spans}
            assert {"gateway", "router", "engine-1"} <= instances
        finally:
            up.send_signal(signal.SIGINT)
            try:
                code = await asyncio.to_thread(up.wait, 60)
            except subprocess.TimeoutExpired:
                up.kill()
                raise
        assert code == 0, up_log.read_text()

    output = up_log.read_text()
    assert key not in output
    assert "jq -r .api_key" in output, "the redirected output says where the key is"
    for log in (data_dir / "logs").glob("*.log"):
        assert key not in log.read_text(errors="replace"), f"the key is in {log.name}"


# -- a gateway started by hand ----------------------------------------------------------------------------


def _gateway_on_a_terminal(tmp: Path, log: Path, tty_fd: int | None) -> subprocess.Popen:
    """`python -m services.gateway` started by hand: its log (stderr) to a file and, with tty_fd, the pty slave
    as its controlling terminal (what a person's shell gives it)."""

    def take_terminal() -> None:  # in the child, after setsid: make the pty its controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    with open(log, "ab") as f:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.gateway",
                "--router-address",
                "127.0.0.1:9",
                "--db-path",
                str(tmp / "gw.db"),
                "--http-port",
                "-1",
                "--metrics-port",
                "-1",
                "--log-json",
                "--ready-file",
                str(tmp / "ready.json"),
            ],
            stdin=tty_fd if tty_fd is not None else subprocess.DEVNULL,
            stdout=f,
            stderr=f,
            start_new_session=True,
            preexec_fn=take_terminal if tty_fd is not None else None,  # noqa: PLW1509 - a test's child
        )


def _read_terminal(master: int, until: bytes, timeout_s: float) -> bytes:
    """What the process wrote to its terminal, read until `until` appears (bounded by timeout_s)."""
    got = b""
    deadline = time.monotonic() + timeout_s
    while until not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        ready, _, _ = select.select([master], [], [], min(left, 0.5))
        if ready:
            try:
                got += os.read(master, 4096)
            except OSError:
                break
    return got


async def _stop(proc: subprocess.Popen) -> None:
    assert await stop_process(proc, 30), "did not exit within 30 s of SIGTERM"


async def test_a_hand_started_gateway_shows_its_generated_key_on_the_terminal_only(tmp_path):
    """First start on a terminal: the generated dev key is printed there once, and the log holds only its
    prefix; a second start on the same database prints nothing (the key exists, stored hashed); with no
    terminal at all the key is shown nowhere and the log says how to make one."""
    log = tmp_path / "gateway.log"
    master, slave = os.openpty()
    try:
        proc = _gateway_on_a_terminal(tmp_path, log, slave)
        try:
            shown = await asyncio.to_thread(_read_terminal, master, b"shown (not in the log)", 60)
            await assert_eventually((tmp_path / "ready.json").exists, timeout_s=60, message=log.read_text())
        finally:
            await _stop(proc)
    finally:
        os.close(slave)
        os.close(master)
    text = shown.decode(errors="replace")
    key = next((w for w in text.split() if w.startswith("fsk-")), None)
    assert key, f"no key on the terminal: {text!r}"
    events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert key not in log.read_text()
    assert any(e["event"] == "gateway.dev_key_shown" and key.startswith(e["key_prefix"]) for e in events)

    # Restart on the same database: the tenant and its key exist, nothing is generated or shown.
    (tmp_path / "ready.json").unlink()
    master, slave = os.openpty()
    try:
        proc = _gateway_on_a_terminal(tmp_path, log, slave)
        try:
            await assert_eventually((tmp_path / "ready.json").exists, timeout_s=60)
            again = await asyncio.to_thread(_read_terminal, master, b"fsk-", 1.0)
        finally:
            await _stop(proc)
    finally:
        os.close(slave)
        os.close(master)
    assert b"fsk-" not in again

    # No terminal (a service manager started it): the key is shown nowhere, the log says how to get one.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    proc = _gateway_on_a_terminal(fresh, fresh / "gateway.log", None)
    try:
        await assert_eventually((fresh / "ready.json").exists, timeout_s=60)
    finally:
        await _stop(proc)
    events = [
        json.loads(line) for line in (fresh / "gateway.log").read_text().splitlines() if line.startswith("{")
    ]
    (unseen,) = [e for e in events if e["event"] == "gateway.dev_key_not_shown"]
    assert "fleetserve admin key create dev" in unseen["fix"]
    # Only the 8-character key prefix may appear (fsk- and 4 more), never a whole key.
    assert not re.search(r"fsk-[A-Za-z0-9_-]{5,}", (fresh / "gateway.log").read_text())
