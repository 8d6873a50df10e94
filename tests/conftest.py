"""Shared fixtures: GPU tests are skipped on machines without a GPU and vLLM; real external servers
(tests/servers.py) are registered for every test; structlog is left as each test found it."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import structlog
from hypothesis import settings

pytest_plugins = ["tests.servers"]

# Property tests draw the same examples on every run (CI must not turn red on a new draw at a commit that passed);
# HYPOTHESIS_PROFILE=explore draws new ones. A failure found exploring is pinned with @example.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

# Sim engines model a cold start (the GPU profile's startup_s, 48 s for the default profile) unless told
# otherwise; tests start engines in-process and as processes (which inherit this) without one. Tests about
# cold starts pass --startup-s / startup_s explicitly, which wins over the environment.
os.environ.setdefault("FLEETSERVE_ENGINE_STARTUP_S", "0")


def _have_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    if _have_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with vLLM installed (run on the GPU machine)")
    for item in items:
        # The marker, not a keyword: keywords hold every directory name up to the root (a checkout named gpu).
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _structlog_as_found():
    """structlog.testing.capture_logs leaves structlog marked configured with its defaults (print to stdout), so
    code that configures it only where nobody has (loadtest.fleet.structlog_to_stderr, the bench's JSON on stdout)
    then printed every later test's log lines among its output: undone after each test."""
    configured = structlog.is_configured()
    yield
    if not configured and structlog.is_configured():
        structlog.reset_defaults()
