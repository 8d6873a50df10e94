"""`python -m loadtest.bare_hop --port P --upstream HOST:PORT`: the baseline hop for benchmarks, a bare grpc.aio
pass-through that forwards any unary-stream call's raw bytes upstream and the response messages back, with
nothing else (no parsing, spans, logs, limits or routing): what a relaying hop costs at the least."""

from __future__ import annotations

import argparse

import grpc


class Forward(grpc.GenericRpcHandler):
    """Every method: the request bytes go upstream over one shared channel, the response bytes come back."""

    def __init__(self, channel: grpc.aio.Channel, relay: bool = False) -> None:
        self.channel = channel
        self.relay = relay  # read upstream through shared.relay.ChunkRelay (its pump task), as our hops do
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails):
        handler = self.handlers.get(details.method)
        if handler is None:
            method = self.channel.unary_stream(details.method)  # no serializers: bytes in, bytes out

            async def relay(request: bytes, context: grpc.aio.ServicerContext):
                call = method(
                    request, metadata=context.invocation_metadata(), timeout=context.time_remaining()
                )
                async for data in call:
                    yield data

            async def pumped(request: bytes, context: grpc.aio.ServicerContext):
                from shared.relay import ChunkRelay

                call = method(
                    request, metadata=context.invocation_metadata(), timeout=context.time_remaining()
                )
                chunks = ChunkRelay(call.read, cancel=call.cancel)
                try:
                    while (data := await chunks.read()) is not grpc.aio.EOF:
                        yield data
                finally:
                    chunks.close()

            handler = self.handlers[details.method] = grpc.unary_stream_rpc_method_handler(
                pumped if self.relay else relay
            )
        return handler


async def serve(
    port: int, upstream: str, ready_file: str = "", relay: bool = False, ours: bool = False
) -> None:
    from shared.server import wait_for_signal, write_ready_file

    if ours:
        # Everything our services set up around their handlers, and nothing of their handlers: our channel
        # options, our server (its options, interceptor, health, reflection), our logging and heap settings.
        from shared.channels import open_channel
        from shared.server import create_server, settle_heap
        from shared.telemetry import configure_logging

        configure_logging("bare_hop")
        channel = open_channel(upstream)
        handler = Forward(channel, relay)
        running = await create_server([], port=port, extra=[lambda s: s.add_generic_rpc_handlers((handler,))])
        write_ready_file(ready_file, address=running.address)
        async with settle_heap():
            await wait_for_signal()
        await running.server.stop(1)
        await channel.close()
        return
    channel = grpc.aio.insecure_channel(upstream)
    server = grpc.aio.server(handlers=[Forward(channel, relay)])
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    write_ready_file(ready_file, address=f"127.0.0.1:{bound}")
    await wait_for_signal()
    await server.stop(1)
    await channel.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m loadtest.bare_hop", description=__doc__)
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--upstream", required=True)
    p.add_argument("--ready-file", default="")
    p.add_argument("--relay", action="store_true", help="read upstream through ChunkRelay (diagnostic A/B)")
    p.add_argument(
        "--ours",
        action="store_true",
        help="our services' channel, server, logging and heap set-up around the same handler (diagnostic A/B)",
    )
    args = p.parse_args(argv)
    import uvloop

    uvloop.run(serve(args.port, args.upstream, args.ready_file, args.relay, args.ours))


if __name__ == "__main__":
    main()
