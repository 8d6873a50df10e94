"""The local supervisor: `fleetserve up` restarts a SIGKILLed router on its port within seconds and the fleet
serves again without the rest being restarted; restarts and the last exit code show in the state file and in
`fleetserve status`, a router that is down shows as DOWN; a second launcher on the same state directory is
refused, naming the first one's pid."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.supervisor import LauncherLock, StateDirBusy

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "shared.cli.main"]


def _run(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout)


def _wait_for(what, condition, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while True:
        got = condition()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what} within {timeout_s}s"
        time.sleep(0.05)


def test_a_second_launcher_on_one_state_dir_is_refused_naming_the_first(tmp_path: Path):
    """While one launcher holds the state directory, another (in-process or `fleetserve up`) is refused with
    the holder's pid; once released it is free again."""
    lock = LauncherLock(tmp_path)
    lock.acquire()
    try:
        with pytest.raises(StateDirBusy, match=f"pid {os.getpid()}"):
            LauncherLock(tmp_path).acquire()
        up = _run(["up", "--engines", "1", "--no-live"], {**os.environ, "FLEETSERVE_HOME": str(tmp_path)})
        assert up.returncode == 1
        assert f"another fleetserve launcher (pid {os.getpid()})" in up.stdout + up.stderr
        assert not (tmp_path / "cluster.json").exists()
    finally:
        lock.release()
    with LauncherLock(tmp_path):
        pass


def test_a_killed_router_is_restarted_and_the_fleet_serves_again(tmp_path: Path):
    """SIGKILL the router of a running `fleetserve up`: within a few seconds it is back on the same address
    (restarts 1, last exit -9 in the state file), generate works through the gateway again, `fleetserve
    status` shows it, and no other service was restarted."""
    env = {**os.environ, "FLEETSERVE_HOME": str(tmp_path)}
    up = subprocess.Popen(
        CLI + ["up", "--engines", "1", "--no-live"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    state_file = tmp_path / "cluster.json"
    try:
        _wait_for("the fleet came up", lambda: state_file.exists() or up.poll() is not None, 90)
        assert up.poll() is None, "fleetserve up exited"
        before = json.loads(state_file.read_text())["services"]
        router = before["router"]
        os.kill(router["pid"], signal.SIGKILL)
        killed = time.monotonic()

        def restarted():
            services = json.loads(state_file.read_text()).get("services", {})
            r = services.get("router", {})
            return services if r.get("restarts") == 1 and r.get("pid") != router["pid"] else None

        after = _wait_for("the router restarted", restarted, 30)
        back_in = time.monotonic() - killed
        assert after["router"]["address"] == router["address"]
        assert after["router"]["last_exit"] == -signal.SIGKILL
        gen = _wait_for(
            "a generation through the gateway",
            lambda: (r := _run(["generate", "--max-tokens", "4", "hello"], env)).returncode == 0 and r,
            30,
        )
        assert gen.stdout.strip()
        others = {n: s["pid"] for n, s in before.items() if n != "router"}
        assert {n: after[n]["pid"] for n in others} == others, "other services were restarted"
        assert all(not after[n].get("restarts") for n in others)
        status = json.loads(_run(["status", "--json"], env).stdout)
        by_name = {s["name"]: s for s in status["services"]}
        assert by_name["router"]["healthy"] and by_name["router"]["restarts"] == 1
        assert by_name["router"]["last_exit"] == -signal.SIGKILL
        print(f"supervisor: router back on {router['address']} {back_in:.2f}s after SIGKILL")
        # The backoff is 0.5 s; the rest is the new process starting (about 2 s on a quiet box, 14 s measured on
        # the shared box at load average 15-20): bounded generously, the printed time is the measurement.
        assert back_in < 60
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)


def test_status_shows_a_router_that_is_down_as_down(tmp_path: Path):
    """With the router stopped (the supervisor not running: a bare state file), `fleetserve status` says DOWN
    for it rather than a blank, and its replicas' breaker column says the router is down."""
    state = {
        "registry": "127.0.0.1:1",
        "router": "127.0.0.1:1",
        "services": {"router": {"service": "router", "address": "127.0.0.1:1", "pid": 1}},
    }
    (tmp_path / "cluster.json").write_text(json.dumps(state))
    env = {**os.environ, "FLEETSERVE_HOME": str(tmp_path)}
    out = _run(["status"], env)
    assert out.returncode == 1
    assert "DOWN" in out.stdout and "router" in out.stdout
    assert "registry at 127.0.0.1:1 is DOWN" in out.stdout
