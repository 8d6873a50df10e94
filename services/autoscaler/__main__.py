"""`python -m services.autoscaler`: run the autoscaler until SIGTERM."""

from services.autoscaler.app import start
from services.autoscaler.config import AutoscalerSettings
from shared.server import run, serve_main
from shared.settings import load_settings

if __name__ == "__main__":
    run(lambda: serve_main("autoscaler", load_settings(AutoscalerSettings), start))
