"""`python -m services.engine`: run an engine replica until SIGTERM (with several vLLM front ends, their
supervisor: services/engine/frontends.py)."""

import sys

from services.engine.app import start
from services.engine.config import EngineSettings
from services.engine.frontends import supervise
from shared.server import run, serve_main
from shared.settings import load_settings


def main() -> None:
    """Parse the flags and serve (one process), or supervise the replica's front ends."""
    settings = load_settings(EngineSettings)
    if settings.frontend_count > 1:
        sys.exit(supervise(settings, settings.frontend_count))
    run(lambda: serve_main("engine", settings, start))


if __name__ == "__main__":
    main()
