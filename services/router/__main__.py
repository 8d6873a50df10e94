"""`python -m services.router`: run the router until SIGTERM (with --workers N, a supervisor of N workers)."""

import sys

from services.router.config import RouterSettings
from shared.server import run, serve_main
from shared.settings import load_settings
from shared.workers import supervise

if __name__ == "__main__":
    settings = load_settings(RouterSettings)
    if settings.workers > 1:
        sys.exit(supervise("router", settings))
    # Imported here: a supervisor (above) need not load the router (its workers import it themselves).
    from services.router.app import start

    run(lambda: serve_main("router", settings, start))
