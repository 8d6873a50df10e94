"""`python -m services.engine`: run an engine replica until SIGTERM (with several vLLM front ends, their
supervisor: services/engine/frontends.py; with --max-requests-per-worker, the supervisor that recycles it:
shared/workers.py)."""

import sys

from services.engine.config import EngineSettings
from services.engine.frontends import supervise
from shared.server import run, serve_main
from shared.settings import load_settings
from shared.workers import supervise as supervise_workers


def main() -> None:
    """Parse the flags and serve (one process), or supervise the replica's front ends."""
    settings = load_settings(EngineSettings)
    if settings.frontend_count > 1:
        sys.exit(supervise(settings, settings.frontend_count))
    if settings.max_requests_per_worker:
        # The replica keeps its own /metrics (its series are its app's, not multiprocess files).
        sys.exit(supervise_workers("engine", settings, worker_metrics=True))
    # Imported here: a supervisor (above) need not load the sim and its tokenizer (~130 MB) for nothing.
    from services.engine.app import start

    run(lambda: serve_main("engine", settings, start))


if __name__ == "__main__":
    main()
