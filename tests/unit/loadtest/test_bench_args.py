"""Bench flags: validation, which runs a flag set makes, where targets come from, and exit status 2."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json

import pytest

from loadtest import bench
from tests.support import assert_eventually

STATE = {
    "gateway": "127.0.0.1:7000",
    "api_key": "fsk-state",
    "engines": {"engine-2": "127.0.0.1:7102", "engine-1": "127.0.0.1:7101"},
}


def test_defaults():
    """Defaults: mesh, 32 streams, 256 requests, 128-word prompts, 256 tokens, sim-1b."""
    a = bench.parse_args([])
    assert bench.modes(a) == ["mesh"]
    assert (a.concurrency, a.requests, a.prompt_tokens, a.max_tokens, a.model) == (
        32,
        256,
        128,
        256,
        "sim-1b",
    )
    assert a.seed is None and not a.spawn


def test_modes_for_direct_and_compare():
    """--direct runs the engine only; --compare runs direct first, then the mesh."""
    assert bench.modes(bench.parse_args(["--direct"])) == ["direct"]
    assert bench.modes(bench.parse_args(["--compare"])) == ["direct", "mesh"]


@pytest.mark.parametrize(
    "argv",
    [
        ["--concurrency", "0"],
        ["--requests", "-1"],
        ["--max-tokens", "x"],
        ["--direct", "--compare"],
        ["--engines", "2"],  # only with --spawn
        ["--spawn", "--gateway", "127.0.0.1:1"],
        ["--spawn", "--api-key", "k"],
        ["--ready-timeout", "-1"],
        ["--no-such-flag"],
    ],
)
def test_bad_flags_exit_2(argv, capsys):
    """Bad or conflicting flags make main() return 2 with a message on stderr and nothing on stdout."""
    assert bench.main(argv) == 2
    out = capsys.readouterr()
    assert out.out == "" and "error" in out.err


def test_no_cluster_found_exits_2(tmp_path, monkeypatch, capsys):
    """Without flags and without a cluster state file, main() returns 2 and says how to start one."""
    monkeypatch.setenv("FLEETSERVE_HOME", str(tmp_path))
    monkeypatch.delenv("FLEETSERVE_API_KEY", raising=False)
    assert bench.main(["--requests", "1"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "fleetserve up" in out.err


def test_targets_come_from_the_state_file(tmp_path):
    """Without flags the gateway, key and first engine (by name) come from cluster.json in --data-dir."""
    (tmp_path / "cluster.json").write_text(json.dumps(STATE))
    args = bench.parse_args(["--compare", "--data-dir", str(tmp_path)])
    targets = bench.resolve_targets(args, lambda: bench._read_state(args.data_dir))
    assert targets["mesh"] == bench.Target("mesh", "127.0.0.1:7000", "fsk-state")
    assert targets["direct"] == bench.Target("direct", "127.0.0.1:7101")
    assert list(targets) == ["direct", "mesh"]


def test_flags_and_env_override_the_state_file(monkeypatch):
    """--gateway/--engine win over the state, and $FLEETSERVE_API_KEY over the state's key; with everything
    given the state is never read."""
    monkeypatch.setenv("FLEETSERVE_API_KEY", "fsk-env")
    args = bench.parse_args(["--compare", "--gateway", "h:1", "--engine", "h:2"])

    def no_state() -> dict:
        raise AssertionError("state read although flags gave everything")

    targets = bench.resolve_targets(args, no_state)
    assert targets["mesh"] == bench.Target("mesh", "h:1", "fsk-env")
    assert targets["direct"] == bench.Target("direct", "h:2")


def test_spawned_fleet_key_wins_over_the_environment(monkeypatch):
    """With --spawn the spawned fleet's key is used even if $FLEETSERVE_API_KEY names another cluster's."""
    monkeypatch.setenv("FLEETSERVE_API_KEY", "fsk-other-cluster")
    args = bench.parse_args(["--spawn"])
    targets = bench.resolve_targets(args, lambda: STATE, use_env=False)
    assert targets["mesh"] == bench.Target("mesh", "127.0.0.1:7000", "fsk-state")


def test_state_without_engines_is_a_usage_error(monkeypatch):
    """--direct with no --engine and no engine in the state is a UsageError (exit 2), not a crash."""
    args = bench.parse_args(["--direct"])
    with pytest.raises(bench.UsageError):
        bench.resolve_targets(args, lambda: {"gateway": "h:1", "api_key": "k", "engines": {}})


def test_mesh_target_sends_the_key_and_direct_none():
    """The mesh target authenticates with a bearer key; the engine is called without one."""
    assert bench.Target("mesh", "h:1", "k").metadata == (("authorization", "Bearer k"),)
    assert bench.Target("direct", "h:2").metadata == ()


def test_add_arguments_reuses_the_flags_on_another_parser():
    """The CLI can mount the same flags on its `bench` subcommand."""
    sub = argparse.ArgumentParser(prog="fleetserve bench")
    bench.add_arguments(sub)
    a = sub.parse_args(["--spawn", "--engines", "1", "--compare", "--concurrency", "32", "--requests", "256"])
    assert (a.spawn, a.engines, a.compare, a.concurrency, a.requests) == (True, 1, True, 32, 256)


async def test_main_refuses_to_run_inside_an_event_loop():
    """main() owns its loop; called from async code it says to use a thread instead of hanging the caller."""
    with pytest.raises(RuntimeError, match="to_thread"):
        bench.main(["--requests", "1"])


async def test_progress_goes_to_stderr_only(capsys):
    """Progress lines (done/total, errors, tok/s) are printed to stderr while a run goes; stdout stays empty."""
    from loadtest.summary import RequestResult

    progress = bench.Progress("mesh", total=4, interval_s=0.01)
    progress.add(RequestResult(0.01, 0.1, 10))
    progress.add(RequestResult(None, 0.1, 0, error="UNAVAILABLE"))
    task = asyncio.create_task(progress.report())
    await assert_eventually(lambda: "bench mesh: 2/4 done, 1 errors" in capsys.readouterr().err, timeout_s=5)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert capsys.readouterr().out == ""


async def test_quiet_progress_prints_nothing(capsys):
    """--quiet: the reporter returns at once without printing."""
    await asyncio.wait_for(bench.Progress("direct", total=1, enabled=False, interval_s=0.01).report(), 1)
    assert capsys.readouterr() == ("", "")
