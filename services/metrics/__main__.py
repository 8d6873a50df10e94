"""`python -m services.metrics`: run the metrics collector until SIGTERM."""

from services.metrics.app import start
from services.metrics.config import MetricsSettings
from shared.server import run, serve_main
from shared.settings import load_settings

if __name__ == "__main__":
    run(lambda: serve_main("metrics", load_settings(MetricsSettings), start))
