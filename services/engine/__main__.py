"""`python -m services.engine`: run an engine replica until SIGTERM."""

from services.engine.app import start
from services.engine.config import EngineSettings
from shared.server import run, serve_main
from shared.settings import load_settings

if __name__ == "__main__":
    run(lambda: serve_main("engine", load_settings(EngineSettings), start))
