"""Undecodable requests (corrupt bytes, invalid UTF-8 in a string field) get INVALID_ARGUMENT with ErrorInfo
MALFORMED_REQUEST at every method of a server, ours and grpc's own (health, reflection), instead of UNKNOWN."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable

import grpc

from shared.errors import CHECKS_UNDECODABLE, Undecodable, abort


def safe_deserializer(deserialize: Callable[[bytes], object], type_name: str) -> Callable[[bytes], object]:
    """deserialize, returning an Undecodable instead of raising (gRPC would answer UNKNOWN to the raise)."""

    def decode(data: bytes) -> object:
        try:
            return deserialize(data)
        except Exception as e:  # noqa: BLE001 - DecodeError, or anything a parser raises on hostile bytes
            return Undecodable(type_name, str(e) or type(e).__name__)

    return decode


def _checked_unary(fn):
    """fn answering an Undecodable request with INVALID_ARGUMENT (fn does not check it itself)."""
    if inspect.isasyncgenfunction(fn):

        async def gen(request, context):
            if type(request) is Undecodable:
                await abort(context, request.to_error())
            async for item in fn(request, context):
                yield item

        return gen

    async def unary(request, context):
        if type(request) is Undecodable:
            await abort(context, request.to_error())
        return await fn(request, context)

    return unary


def _checked_sync(fn):
    """A sync handler (gRPC runs it in its thread pool) answering an Undecodable request with INVALID_ARGUMENT."""

    def unary(request, context):
        if type(request) is Undecodable:
            status = request.to_error().to_status()
            context.abort(status.code, status.details, status.trailing_metadata)
        return fn(request, context)

    return unary


def _checked_stream(fn):
    """fn reading a request stream in which an Undecodable message ends the call with INVALID_ARGUMENT."""

    async def checked(requests: AsyncIterator, context) -> AsyncIterator:
        async for r in requests:
            if type(r) is Undecodable:
                await abort(context, r.to_error())
            yield r

    if inspect.isasyncgenfunction(fn):

        async def gen(requests, context):
            async for item in fn(checked(requests, context), context):
                yield item

        return gen

    async def unary(requests, context):
        return await fn(checked(requests, context), context)

    return unary


def _type_name(handler: grpc.RpcMethodHandler, method: str) -> str:
    owner = getattr(handler.request_deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    return descriptor.full_name if descriptor is not None else f"request of {method}"


def guard(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """handler with a deserializer that never raises, and a behaviour that answers what it could not decode."""
    if handler.request_deserializer is None:
        return handler  # raw bytes: nothing to decode
    deserializer = safe_deserializer(handler.request_deserializer, _type_name(handler, method))
    kind = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[(handler.request_streaming, handler.response_streaming)]
    fn = getattr(handler, kind)
    if not (inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)):
        if handler.request_streaming:
            return handler  # a sync request stream (none here): left as gRPC runs it
        fn = _checked_sync(fn)  # e.g. grpc.health's unimplemented List
    elif handler.request_streaming:
        fn = _checked_stream(fn)
    elif not getattr(fn, CHECKS_UNDECODABLE, False):
        fn = _checked_unary(fn)
    return handler._replace(request_deserializer=deserializer, **{kind: fn})


class RequestDecodingGuard(grpc.aio.ServerInterceptor):
    """Applies guard() to every method's handler, once per method (handlers are cached)."""

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._guarded.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._guarded[method] = (handler, guard(handler, method))
        return cached[1]
