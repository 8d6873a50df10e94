"""Shared fixtures: GPU tests are skipped on machines without a GPU and vLLM."""

from __future__ import annotations

import importlib.util
import shutil

import pytest


def _have_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None and importlib.util.find_spec("vllm") is not None


def pytest_collection_modifyitems(config, items):
    if _have_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with vLLM installed (run on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
