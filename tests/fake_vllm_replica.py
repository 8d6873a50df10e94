"""`python -m tests.fake_vllm_replica ENGINE FLAGS`: the engine's own entry point (services/engine/__main__.py;
with --frontends N, the supervisor of services/engine/frontends.py) on the fake vLLM of tests/fake_vllm.py, for
CPU tests of a replica whose front ends are separate processes.

The fake is installed when this module is imported, which the spawn start method repeats in every front end (a
spawned child re-imports the parent's main module), so the supervisor and each front end load it. There is no
engine-core process to share: each front end drives a fake engine core of its own (the primary's publishes the
replica's KV events), enough for what spans front ends outside the engine core: the load board, /metrics, the
registry entry."""

from __future__ import annotations

import contextlib
import dataclasses
from types import SimpleNamespace

from services.engine import vllm_backend

STEP_S = 0.003


@contextlib.contextmanager
def _launch_core(argv: list[str], kv_endpoint: str, count: int):
    """What vLLM's launch_core_engines gives the supervisor: one client config per front end, and the manager of
    the engine-core processes (none here)."""
    yield (
        [{"client_index": k, "client_count": count} for k in range(count)],
        SimpleNamespace(sentinels=lambda: [], shutdown=lambda: None),
    )


def _api() -> vllm_backend.VllmApi:
    from tests.fake_vllm import fake_api

    return dataclasses.replace(fake_api(None, step_s=STEP_S), launch_core=_launch_core)


vllm_backend.load_vllm_api = _api

if __name__ == "__main__":
    from services.engine.__main__ import main

    main()
