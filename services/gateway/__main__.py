"""`python -m services.gateway`: run the gateway until SIGTERM."""

from services.gateway.app import start
from services.gateway.config import GatewaySettings
from shared.server import run, serve_main
from shared.settings import load_settings

if __name__ == "__main__":
    run(lambda: serve_main("gateway", load_settings(GatewaySettings), start))
