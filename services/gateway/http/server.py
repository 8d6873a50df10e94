"""The OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions (SSE or whole), /v1/models."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator

import structlog
from aiohttp import hdrs, web
from fleetserve.common.v1 import common_pb2
from fleetserve.inference.v1 import inference_service_pb2 as pb
from opentelemetry.propagate import extract

from services.gateway.http.errors import details_of_exception, http_error
from services.gateway.http.openai_api import (
    CHAT,
    COMPLETION,
    Shaper,
    model_dict,
    models_body,
    parse_request,
)
from services.gateway.pipeline import GatewayPipeline, Outcome
from shared.errors import ErrorDetails, FleetError, InvalidArgument, NotFound
from shared.telemetry import new_request_id

log = structlog.get_logger(__name__)

# The request-type tag (GenerateRequest.feature) as a header, for clients and proxies that cannot add to the
# body; it wins over the body's metadata.feature.
FEATURE_HEADER = "X-Fleetserve-Feature"

_SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    # Tells nginx-style proxies in front of us not to buffer the stream either.
    "X-Accel-Buffering": "no",
}


# While a worker hands its HTTP clients to its siblings: a connection with no request for this long is an idle
# client's, closed rather than waited for (a busy client sends its next request within milliseconds).
HAND_OVER_QUIET_S = 1.0

# Request: pin a model version (debugging). Response: the version that served it.
MODEL_VERSION_HEADER = "x-fleetserve-model-version"


def _json(status: int, body: dict, headers: dict[str, str]) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json", headers=headers
    )


def error_response(exc: BaseException | ErrorDetails, headers: dict[str, str]) -> web.Response:
    """The OpenAI-shaped error response for an exception (or parsed details)."""
    d = exc if isinstance(exc, ErrorDetails) else details_of_exception(exc)
    if not isinstance(exc, FleetError | ErrorDetails) and d.reason == "INTERNAL":
        log.error("gateway.http_internal_error", exc_info=exc)
    status, body, extra = http_error(d)
    return _json(status, body, {**headers, **extra})


@web.middleware
async def _openai_shaped_http_errors(request: web.Request, handler) -> web.StreamResponse:
    """aiohttp's own refusals (a path no route matches, a method not allowed, ...) as OpenAI-shaped JSON errors
    rather than its plain-text pages, so that every error a client gets parses the same way."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        error = {
            "message": e.text or e.reason,
            "type": "invalid_request_error" if e.status < 500 else "server_error",
            "param": None,
            "code": e.reason.lower().replace(" ", "_"),
        }
        return _json(e.status, {"error": error}, {})


async def _json_body(request: web.Request) -> object:
    """The parsed JSON body; InvalidArgument for anything that is not JSON text we can read."""
    try:
        return await request.json(loads=json.loads)
    except LookupError as e:  # charset=bogus-42: Python has no such codec
        raise InvalidArgument(
            f"unknown charset {request.charset!r} in Content-Type",
            reason="INVALID_CONTENT_TYPE",
            field_violations=[("Content-Type", "charset must be one Python knows, e.g. utf-8")],
        ) from e
    except RecursionError as e:
        raise InvalidArgument("the request body is JSON nested too deeply", reason="INVALID_JSON") from e
    except ValueError as e:  # not JSON, or bytes that are not text in the charset
        raise InvalidArgument(f"the request body is not valid JSON: {e}", reason="INVALID_JSON") from e


class OpenAIServer:
    """The aiohttp application over a GatewayPipeline, and its listening site."""

    def __init__(
        self,
        pipeline: GatewayPipeline,
        *,
        max_body_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self.pipeline = pipeline
        # aiohttp refuses bigger bodies (413) before reading them in full.
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[_openai_shaped_http_errors])
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_get("/v1/models/{model}", self.get_model)
        self.app.router.add_route("*", "/{tail:.*}", self.not_found)
        self.app.on_response_prepare.append(self._close_when_handing_over)
        self.runner: web.AppRunner | None = None
        self.handing_over = False
        self._last_response = 0.0  # monotonic: when the last response (while handing over) started
        self.port = 0
        self.host = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(
        self, host: str, port: int, reuse_port: bool = False, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        """Listen on host:port (0: a free port), over TLS with ssl_context. handler_cancellation: a client that
        disconnects cancels its handler, which cancels the router call and so the engine's work, also before
        the first token."""
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        # reuse_port: one of several gateway workers sharing the port (shared/workers.py).
        site = web.TCPSite(self.runner, host, port, reuse_port=reuse_port or None, ssl_context=ssl_context)
        await site.start()
        self.host, self.port = host, self.runner.addresses[0][1]
        log.info("gateway.http_started", address=self.address)

    async def hand_over(self) -> None:
        """Send clients to the sibling workers sharing our port (this one drains): stop listening now, so the
        kernel gives new connections to them, and answer every request from here on with Connection: close, so
        a keep-alive client's next request opens one. Requests in flight, and those arriving on connections
        opened before, are still served."""
        self.handing_over = True
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()  # closes the listening socket only; open connections go on
        connections = len(self.runner.server.connections) if self.runner and self.runner.server else 0
        log.info("gateway.http_handing_over", address=self.address, connections=connections)

    async def _close_when_handing_over(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.handing_over:
            # aiohttp has worked out the headers by now (keep-alive among them): force_close() alone would close
            # the connection after this response without telling the client, which would reuse it.
            response.force_close()
            response.headers[hdrs.CONNECTION] = "close"
            self._last_response = time.monotonic()

    async def let_clients_go(self, until: float, quiet_s: float = HAND_OVER_QUIET_S) -> None:
        """While handing over: wait until every connection is closed (each closes after its next response),
        or none has started a response for quiet_s (those left are idle clients'), or `until` (monotonic).
        Closing a keep-alive connection at once could cut a request its client is sending on it just then (an
        HTTP/1.1 server cannot say GOAWAY, and clients do not retry a POST), so the busy ones go this way."""
        if self.runner is None or self.runner.server is None:
            return
        server = self.runner.server
        started = time.monotonic()
        while server.connections and (now := time.monotonic()) < until:
            if now - max(started, self._last_response) >= quiet_s:
                break
            await asyncio.sleep(0.02)
        log.info(
            "gateway.http_handed_over",
            waited_s=round(time.monotonic() - started, 3),
            idle_connections_closed=len(server.connections),
        )

    async def stop(self, grace_s: float) -> None:
        """Stop accepting, give in-flight requests grace_s to finish, then close them."""
        if self.runner is None:
            return
        # aiohttp takes the grace period at construction; ours is known only now.
        self.runner._shutdown_timeout = grace_s
        await self.runner.cleanup()
        self.runner = None

    # -- handlers ------------------------------------------------------------------------------------------

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, CHAT)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, COMPLETION)

    async def list_models(self, request: web.Request) -> web.Response:
        headers = {"x-request-id": new_request_id()}
        try:
            models = await self.pipeline.list_models(request.headers.get("Authorization"), None)
        except Exception as e:  # noqa: BLE001 - turned into an HTTP error in one place
            return error_response(e, headers)
        return _json(200, models_body(models), headers)

    async def get_model(self, request: web.Request) -> web.Response:
        headers = {"x-request-id": new_request_id()}
        name = request.match_info["model"]
        try:
            models = await self.pipeline.list_models(request.headers.get("Authorization"), None)
            if not any(m.name == name for m in models.models):
                raise NotFound(f"model {name!r} is not served now", reason="MODEL_NOT_FOUND")
        except Exception as e:  # noqa: BLE001 - turned into an HTTP error in one place
            return error_response(e, headers)
        return _json(200, model_dict(name), headers)

    async def not_found(self, request: web.Request) -> web.Response:
        return error_response(
            NotFound(f"no route {request.method} {request.path}", reason="ROUTE_NOT_FOUND"), {}
        )

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        request_id = new_request_id()
        headers = {"x-request-id": request_id}
        try:
            body = await _json_body(request)
            greq, opts = parse_request(body, kind)
            if FEATURE_HEADER in request.headers:
                greq.feature = request.headers[FEATURE_HEADER]
            greq.model_version = request.headers.get(
                MODEL_VERSION_HEADER, ""
            )  # a pin, checked by the pipeline
        except web.HTTPRequestEntityTooLarge as e:
            return _json(
                413,
                {
                    "error": {
                        "message": e.text,
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "request_too_large",
                    }
                },
                headers,
            )
        except FleetError as e:
            return error_response(e, headers)

        outcome = Outcome(request_id=request_id)
        stream = self.pipeline.generate(
            greq,
            authorization=request.headers.get("Authorization"),
            outcome=outcome,
            timeout_s=None,
            parent=extract(request.headers),
            span_name="gateway.http.ChatCompletions" if kind == CHAT else "gateway.http.Completions",
        )
        try:
            # Nothing is sent before the first chunk: errors before it (auth, limits, validation, routing) get
            # their own HTTP status rather than a 200 with an error event.
            try:
                first = await anext(stream)
            except StopAsyncIteration:
                first = b""
            except Exception as e:  # noqa: BLE001 - turned into an HTTP error in one place
                return error_response(e, headers)
            # Parsed once, here: the first chunk's text goes out in the first event.
            chunk = pb.GenerateResponse.FromString(first).chunk
            if chunk.served_by.model_version:
                headers[MODEL_VERSION_HEADER] = chunk.served_by.model_version
            shaper = Shaper(kind, request_id, greq.model, opts.include_usage)
            if opts.stream:
                return await self._stream(request, shaper, chunk, stream, headers, outcome)
            return await self._whole(shaper, chunk, stream, headers, outcome)
        finally:
            if outcome.finished:
                self.pipeline.finish_later(stream, request_id)
            else:
                await stream.aclose()

    async def _stream(
        self,
        request: web.Request,
        shaper: Shaper,
        chunk: common_pb2.GenerateChunk,
        stream: AsyncIterator[bytes],
        headers: dict[str, str],
        outcome: Outcome,
    ) -> web.StreamResponse:
        """The SSE response. The client gets its last events and the end of the body with the chunk that
        carries the finish reason (outcome.finished), not after every hop has sent its trailers and done its
        accounting (~2 ms at one stream): its keep-alive connection is free for its next request at once, and
        the pipeline reads the rest (finish_later)."""
        # Each event goes to the socket with its own write (aiohttp writes to the transport at once, and sets
        # TCP_NODELAY), so no token waits for the next one or for Nagle's algorithm.
        resp = web.StreamResponse(status=200, headers={**_SSE_HEADERS, **headers})
        await resp.prepare(request)
        write = resp.write
        try:
            await write(shaper.delta(chunk.text, first=True))
            try:
                while not outcome.finished:
                    data = await anext(stream, None)
                    if data is None:
                        break
                    chunk = pb.GenerateResponse.FromString(data).chunk
                    if chunk.text:
                        await write(shaper.delta(chunk.text))
            except ConnectionResetError:
                raise
            except Exception as e:  # noqa: BLE001 - after the headers, an error can only be an event
                await write(shaper.error_event(http_error(details_of_exception(e))[1]))
                await resp.write_eof()
                return resp
            await write(shaper.final(chunk.finish_reason, chunk.usage if chunk.HasField("usage") else None))
            await resp.write_eof()
        except ConnectionResetError:
            # The client went away mid-stream: _generate's finally closes the pipeline's stream, which cancels
            # the router call and so the engine's work.
            pass
        return resp

    async def _whole(
        self,
        shaper: Shaper,
        chunk: common_pb2.GenerateChunk,
        stream: AsyncIterator[bytes],
        headers: dict[str, str],
        outcome: Outcome,
    ) -> web.Response:
        """The whole answer as one JSON body, sent with the chunk that carries the finish reason
        (outcome.finished: the request is settled), as _stream ends its body; the call's status and the
        end-of-request work are finish_later's, for both. (A call that breaks after that chunk ends as EOF in
        the relay below, shared.relay.ChunkRelay, so neither body sees it as an error.)"""
        served_by = chunk.served_by.model_version
        texts = [chunk.text]
        try:
            while not outcome.finished:
                data = await anext(stream, None)
                if data is None:
                    break
                chunk = pb.GenerateResponse.FromString(data).chunk
                texts.append(chunk.text)
        except Exception as e:  # noqa: BLE001 - turned into an HTTP error in one place
            return error_response(e, headers)
        usage = chunk.usage if chunk.HasField("usage") else None
        return _json(200, shaper.body("".join(texts), chunk.finish_reason, usage, served_by), headers)
