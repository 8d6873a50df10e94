"""`python -m services.registry`: run the registry until SIGTERM."""

from services.registry.app import start
from services.registry.config import RegistrySettings
from shared.server import run, serve_main
from shared.settings import load_settings

if __name__ == "__main__":
    run(lambda: serve_main("registry", load_settings(RegistrySettings), start))
