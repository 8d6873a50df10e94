"""One generation through a router in this process (gateway --embedded-router): RouterServicer.Generate driven
in a ChunkRelay's task, with what it reads of a gRPC ServicerContext given in process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb

from services.router.servicer import RouterServicer
from shared.after_send import describe_after_send
from shared.drain import cancelled_by_caller
from shared.errors import DeadlineExceeded, Unavailable, details_of
from shared.relay import EOF, ChunkRelay

# The servicer's methods without their rpc_boundary (functools.wraps keeps them): in process, a FleetError must
# reach the gateway's pipeline as itself (it maps it to gRPC and HTTP statuses), not as a gRPC abort.
_GENERATE = RouterServicer.Generate.__wrapped__
UNARY = {
    "list_models": RouterServicer.ListModels.__wrapped__,
    "get_status": RouterServicer.GetStatus.__wrapped__,
}


class CallContext:
    """What RouterServicer reads of a grpc.aio.ServicerContext, for a call made in this process: the caller's
    metadata (trace context), its time left, and the initial metadata the router sends (its version and arm),
    kept for the gateway to read when the request fails before a chunk."""

    __slots__ = ("_metadata", "_deadline", "initial_metadata")

    def __init__(self, metadata, deadline: float | None) -> None:
        self._metadata = tuple(metadata or ())
        self._deadline = deadline  # monotonic; None: no deadline
        self.initial_metadata: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    async def send_initial_metadata(self, metadata) -> None:
        self.initial_metadata = tuple(metadata)


def _bare_unavailable(err: grpc.aio.AioRpcError) -> bool:
    """An engine's connection error the router passed on as it is (no google.rpc.Status details)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and not details_of(err).reason


class EmbeddedStream:
    """The router's GenerateResponse bytes for a request (iterate; aclose() ends it), as RouterPool.generate's
    RouterStream gives them, from the router in this process. Its code runs in a ChunkRelay's task: cancel() (a
    drain's cut) and the deadline cancel that task, which is what a caller going away is to the router (it
    cancels its engine call); our reader's task being cancelled (the client went away) does the same through
    aclose()."""

    def __init__(
        self,
        servicer: RouterServicer,
        address: str,
        request: router_pb.GenerateRequest,
        deadline: float,
        metadata,
        attempt: Callable[[str], None] | None,
        sent: Callable[[], None] | None,
        coalesce: bool,
    ) -> None:
        self._servicer = servicer
        self._address = address
        self._request = request
        self._deadline = deadline
        self._context = CallContext(metadata, deadline)
        self._attempt = attempt
        self._sent = sent
        self._coalesce = coalesce
        self._relay: ChunkRelay | None = None
        self._expired = False
        self._created = time.monotonic()
        self._gen = self._run()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen

    @property
    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        """The router's initial metadata: the model version and experiment arm it assigned (or nothing)."""
        return self._context.initial_metadata

    def cancel(self) -> None:
        if self._relay is not None:
            self._relay.stop()

    def progress(self) -> int:
        """Chunks the router has yielded so far (a drain watches it move)."""
        return self._relay.received if self._relay is not None else 0

    def describe(self) -> dict[str, object]:
        """Where this stream is, for a drain that cuts it (as RouterStream.describe)."""
        relay = self._relay
        return {
            "request_id": self._request.request_id,
            "age_s": round(time.monotonic() - self._created, 3),
            "stage": "not_sent" if relay is None else "streaming" if relay.received else "awaiting_router",
            "router": self._address,
            "attempts": 1,
            "chunks": self.progress(),
            "unread": relay.unread if relay is not None else 0,
            "channel": "in_process",
        }

    async def aclose(self) -> None:
        await self._gen.aclose()

    def _expire(self) -> None:
        # The router's own gRPC server would cancel its handler at the caller's deadline: the same here.
        self._expired = True
        self.cancel()

    async def _run(self) -> AsyncIterator[bytes]:
        if self._attempt is not None:
            self._attempt(self._address)
        gen = _GENERATE(self._servicer, self._request, self._context)

        async def read():
            try:
                return await gen.__anext__()
            except StopAsyncIteration:
                return EOF

        loop = asyncio.get_running_loop()
        relay = self._relay = ChunkRelay(read, coalesce=self._coalesce)
        timer = loop.call_at(loop.time() + (self._deadline - time.monotonic()), self._expire)
        try:
            if (sent := self._sent) is not None:
                self._sent = None
                await describe_after_send(sent)  # while the router works, not before it started
            read_next = relay.read
            while (data := await read_next()) is not EOF:
                yield data
        except asyncio.CancelledError:
            if self._expired and not cancelled_by_caller():
                raise DeadlineExceeded("deadline exceeded in the router") from None
            raise
        except grpc.aio.AioRpcError as e:
            if _bare_unavailable(e):
                # The router's gRPC hop gave it a status with details (the gateway's RouterPool); so do we.
                raise Unavailable(
                    f"the replica is unreachable: {e.details()}",
                    reason="REPLICA_UNAVAILABLE",
                    retry_after_s=1.0,
                ) from e
            raise
        finally:
            timer.cancel()
            pump = relay.running
            if pump is not None:
                # Our caller went away (or stopped reading): cancelled in its own task, the router ends its
                # engine call as for a caller gone; wait for that, then close the generator where it stopped.
                relay.stop()
                await asyncio.wait((pump,))
            await gen.aclose()
