"""Shared fixtures: GPU tests are skipped on machines without a GPU and vLLM; real external servers
(tests/servers.py) are registered for every test."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest

pytest_plugins = ["tests.servers"]

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
