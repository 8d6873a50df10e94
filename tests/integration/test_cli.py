"""The newcomer's path: `fleetserve up` in one process, `fleetserve generate` / `status` in others, found through
the state file, then a clean stop on SIGTERM with every service process gone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.docs_commands import LIVE_PAGES, ROOT, live_fleet_lines

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "shared.cli.main"]


def _run(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _run_documented_commands(page: str, env: dict) -> None:
    """Run every command line of the page's shell blocks that calls a live fleet, in order, in one bash (so the
    variables they set carry over): each must exit 0 and print something that is not an error."""
    lines = live_fleet_lines(page)
    assert lines, f"{page}: no command to run"
    script = ["set -eo pipefail"]
    for n, line in enumerate(lines):
        script += [f"echo '@@ {n}'", line]
    # The venv's scripts (fleetserve) on PATH, as after `source .venv/bin/activate`.
    path = f"{Path(sys.executable).parent}:{env['PATH']}"
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env={**env, "PATH": path},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"{page}: {done.stderr}\n{done.stdout}"
    outputs = done.stdout.split("@@ ")[1:]
    assert len(outputs) == len(lines)
    for line, out in zip(lines, outputs, strict=True):
        body = out.partition("\n")[2]
        if line.startswith(("fleetserve", ".venv/bin/fleetserve", "curl")):
            assert body.strip() and '"error"' not in body, f"{page}: {line}\n{body}"


_CLIENT_SCRIPT = """
import asyncio, json, sys, fleetserve.client as fc
assert "site-packages" in fc.__file__, fc.__file__
async def main():
    async with fc.AsyncClient(sys.argv[1], sys.argv[2], model="sim-1b") as c:
        done = await c.complete("hello", max_tokens=4)
        print(json.dumps({"tokens": done.usage.completion_tokens, "models": len(await c.models())}))
asyncio.run(main())
"""


def test_up_generate_status_and_clean_stop(tmp_path: Path, installed):
    """From the wheel installed in a fresh venv (`pip install .` of a fresh clone, no protoc step), run outside
    the repository: up prints the gateway and key and writes cluster.json; generate streams text; --json ends with
    usage and ttft_ms; status lists healthy replicas; a wrong key exits 1 with the reason; the client-only wheel's
    AsyncClient streams from the fleet; generate piped into a reader that stops early exits 141 without a traceback; the commands README.md and docs/protocols.md show work against it;
    SIGTERM stops every process."""
    server = installed["server"]
    env = {**server.env, "FLEETSERVE_HOME": str(tmp_path)}
    cli = [server.script("fleetserve")]

    def _run(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(
            cli + args, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path
        )

    up = subprocess.Popen(
        cli + ["up", "--engines", "2", "--no-live", "--speed-factor", "5"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    state_path = tmp_path / "cluster.json"
    try:
        deadline = time.monotonic() + 90
        while not state_path.exists():
            assert up.poll() is None, f"fleetserve up exited early: {up.stdout.read()}"
            assert time.monotonic() < deadline, "cluster did not come up in 90 s"
            time.sleep(0.1)
        state = json.loads(state_path.read_text())
        assert set(state["engines"]) == {"engine-1", "engine-2"}

        plain = _run(["generate", "--max-tokens", "12", "hello"], env)
        assert plain.returncode == 0, plain.stderr
        # Text from the real tokenizer's vocabulary (not one word per token); the --json run counts tokens.
        assert plain.stdout.strip()

        js = _run(["generate", "--json", "--max-tokens", "5", "hello"], env)
        assert js.returncode == 0, js.stderr
        lines = [json.loads(x) for x in js.stdout.splitlines()]
        assert lines[0]["served_by"]["model"] == "sim-1b"
        assert lines[-1]["usage"]["completion_tokens"] == 5
        assert lines[-1]["finish_reason"] == "length"
        assert lines[-1]["ttft_ms"] > 0

        # Piped into a reader that stops early (`| head`): the shell's status for a closed pipe, no traceback.
        piped = subprocess.Popen(
            cli + ["generate", "--max-tokens", "4000", "hello"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert piped.stdout.read(1)
        piped.stdout.close()
        _, err = piped.communicate(timeout=60)
        assert piped.returncode == 128 + signal.SIGPIPE and b"Traceback" not in err, err.decode()

        bad = _run(["generate", "--api-key", "nope", "hello"], env)
        assert bad.returncode == 1
        assert "UNAUTHENTICATED" in bad.stderr and "INVALID_API_KEY" in bad.stderr

        status = _run(["status", "--json"], env)
        assert status.returncode == 0, status.stderr
        status = json.loads(status.stdout)
        rows = status["replicas"]
        assert status["alerts"] == [], "the metrics service answers: no SLO alert fires on a healthy fleet"
        assert {r["replica_id"] for r in rows} == {"engine-1", "engine-2"}
        assert all(r["healthy"] and r["state"] == "serving" for r in rows)
        # The router's view joins the registry's: both replicas known to it, breakers closed.
        assert all(r["breaker"] == "closed" and r["ejected"] is False for r in rows)

        # The two successful generations reach the metrics service as spans within a second or so.
        deadline = time.monotonic() + 20
        while True:
            met = _run(["metrics", "--json"], env)
            assert met.returncode == 0, met.stderr
            models = {m["model"]: m for m in json.loads(met.stdout).get("models", [])}
            if int(models.get("sim-1b", {}).get("requests", 0)) >= 2 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        m = models["sim-1b"]
        assert int(m["requests"]) >= 2 and m["ttft_ms"]["p50"] > 0 and m["tpot_ms"]["p50"] > 0

        client = installed["client"]
        called = subprocess.run(
            [str(client.python), "-c", _CLIENT_SCRIPT, state["gateway"], state["api_key"]],
            cwd=tmp_path,
            env=client.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert called.returncode == 0, called.stderr
        assert json.loads(called.stdout) == {"tokens": 4, "models": 1}

        for page in LIVE_PAGES:
            _run_documented_commands(page, {**os.environ, "FLEETSERVE_HOME": str(tmp_path)})

        pids = [json.loads(p.read_text())["pid"] for p in (tmp_path / "run").glob("*.json")]
        assert len(pids) == 6
    finally:
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    assert up.returncode == 0, out
    assert "stopped cleanly" in out
    assert "fleetserve is up" in out and state["gateway"] in out
    # Piped output is no terminal: it names where the key is, never the key (docs/deployment.md#secrets).
    assert state["api_key"] not in out and "jq -r .api_key" in out
    assert f"http://{state['gateway_http']}/v1" in out
    assert not any(_pid_alive(p) for p in pids)
    assert not state_path.exists()


def test_fleet_does_not_outlive_a_killed_launcher(tmp_path: Path):
    """If `fleetserve up` dies without cleaning up (SIGKILL, a closed terminal), every service notices within
    seconds and shuts itself down gracefully."""
    env = {**os.environ, "FLEETSERVE_HOME": str(tmp_path)}
    up = subprocess.Popen(
        CLI + ["up", "--engines", "1", "--no-live"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "cluster.json").exists():
            assert up.poll() is None and time.monotonic() < deadline, "cluster did not come up"
            time.sleep(0.1)
        pids = [json.loads(p.read_text())["pid"] for p in (tmp_path / "run").glob("*.json")]
        assert len(pids) == 5 and all(_pid_alive(p) for p in pids)
    finally:
        up.kill()
        up.wait(timeout=10)
    deadline = time.monotonic() + 30
    while any(_pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_pid_alive(p) for p in pids), "services outlived their launcher"


def test_up_with_its_output_pipe_closed_still_stops_the_fleet_in_order(tmp_path: Path):
    """`fleetserve up | head` (the reader gone before the fleet is up): the fleet keeps running, and SIGTERM
    still stops every service in order (each logs the SIGTERM, not its launcher's death) with exit 0."""
    env = {**os.environ, "FLEETSERVE_HOME": str(tmp_path)}
    up = subprocess.Popen(CLI + ["up", "--engines", "1", "--no-live"], env=env, stdout=subprocess.PIPE)
    up.stdout.close()  # the reader is gone
    try:
        deadline = time.monotonic() + 90
        while not (tmp_path / "cluster.json").exists():
            assert up.poll() is None, "fleetserve up died when its output pipe closed"
            assert time.monotonic() < deadline, "cluster did not come up"
            time.sleep(0.1)
        time.sleep(1.5)  # a status line or two is written into the closed pipe meanwhile
        assert up.poll() is None, "fleetserve up died when its output pipe closed"
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=60)
    assert up.returncode == 0
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 5
    for log in logs:
        stops = [json.loads(x) for x in log.read_text().splitlines() if '"stopping"' in x or ".stopping" in x]
        assert stops and stops[-1]["reason"] == "SIGTERM", (log.name, stops)
