"""`python -m services.router`: run the router until SIGTERM."""

from services.router.app import start
from services.router.config import RouterSettings
from shared.server import run, serve_main
from shared.settings import load_settings

if __name__ == "__main__":
    run(lambda: serve_main("router", load_settings(RouterSettings), start))
