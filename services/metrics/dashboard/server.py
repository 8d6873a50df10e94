"""The dashboard's HTTP server (aiohttp) on the metrics service's --dashboard-port: the page, its static files
(uPlot served from the repository, no CDN), the data as JSON, and traces by id."""

from __future__ import annotations

import json
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from services.metrics.dashboard.api import Dashboard, trace_document
from services.metrics.spans import SpanStore

STATIC = Path(__file__).parent / "static"
_TRACE_ID = re.compile(r"^[0-9a-fA-F]{32}$")
MAX_WINDOW_S = 86_400.0


def _json(body: dict, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, allow_nan=False, default=str).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _bad(message: str, param: str) -> web.Response:
    return _json({"error": {"message": message, "param": param}}, 400)


class DashboardServer:
    """Routes of the dashboard; start() binds host:port (0 = a free port)."""

    def __init__(
        self, dashboard: Dashboard, spans: SpanStore, clock: Callable[[], float] = time.time
    ) -> None:
        self.dashboard = dashboard
        self.spans = spans
        self._clock = clock
        self.app = web.Application()
        self.app.router.add_get("/", self.index)
        self.app.router.add_get("/api/dashboard", self.data)
        self.app.router.add_get("/api/trace/{trace_id}", self.trace)
        self.app.router.add_static("/static/", STATIC, follow_symlinks=False)
        self._runner: web.AppRunner | None = None
        self.address = ""

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> str:
        """Listen on host:port (0: a free one), over TLS with ssl_context; the address bound."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        await site.start()
        self.address = f"{host}:{self._runner.addresses[0][1]}"  # port 0: the one the OS picked
        return self.address

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def index(self, request: web.Request) -> web.Response:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def data(self, request: web.Request) -> web.Response:
        try:
            window = float(request.query.get("window", "900"))
        except ValueError:
            return _bad("window must be a number of seconds", "window")
        if not 0 < window <= MAX_WINDOW_S:
            return _bad(f"window must be in (0, {MAX_WINDOW_S:g}] seconds", "window")
        model = request.query.get("model", "")
        return _json(self.dashboard.document(window, self._clock(), model))

    async def trace(self, request: web.Request) -> web.Response:
        trace_id = request.match_info["trace_id"]
        if not _TRACE_ID.match(trace_id):
            return _bad("trace_id must be 32 hex digits", "trace_id")
        return _json(trace_document(self.spans.trace(trace_id)))
