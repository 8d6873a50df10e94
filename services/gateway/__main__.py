"""`python -m services.gateway`: run the gateway until SIGTERM (with --workers N, a supervisor of N workers)."""

import asyncio
import sys

from services.gateway.config import GatewaySettings
from services.gateway.schema import open_databases
from services.gateway.tenants import TenantStore
from shared.server import run, serve_main
from shared.settings import load_settings
from shared.workers import supervise


def bootstrap_once(settings: GatewaySettings) -> dict:
    """The tenants database is created and bootstrapped here, once, before the workers start (they would race
    to); the workers get no bootstrap key."""

    async def bootstrap() -> None:
        dbs = await open_databases(settings.db_url, settings.db_path, settings.jobs_db_path, pool_size=1)
        try:
            await TenantStore(dbs.accounts).bootstrap(settings.bootstrap_api_key)
        finally:
            await dbs.close()

    asyncio.run(bootstrap())
    return {"bootstrap_api_key": ""}


if __name__ == "__main__":
    settings = load_settings(GatewaySettings)
    if settings.workers > 1:
        extra = {"http_port": settings.http_port} if settings.http_port >= 0 else {}
        sys.exit(supervise("gateway", settings, extra_ports=extra, prepare=bootstrap_once))
    # Imported here: a supervisor (above) need not load the gateway (its workers import it themselves).
    from services.gateway.app import start

    run(lambda: serve_main("gateway", settings, start))
