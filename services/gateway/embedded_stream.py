"""One generation through a router in this process (gateway --embedded-router): RouterServicer.generate iterated
in the gateway's own task, with what it reads of a gRPC ServicerContext given in process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb

from services.router.servicer import RouterServicer
from shared.errors import DeadlineExceeded, Unavailable, details_of


class CallContext:
    """What RouterServicer reads of a grpc.aio.ServicerContext, for a call made in this process: the caller's
    metadata (trace context), its time left, and the initial metadata the router sends (its version and arm),
    kept for the gateway to read when the request fails before a chunk."""

    __slots__ = ("_metadata", "_deadline", "_on_metadata", "initial_metadata")

    def __init__(
        self, metadata, deadline: float | None, on_metadata: Callable[[], None] | None = None
    ) -> None:
        self._metadata = tuple(metadata or ())
        self._deadline = deadline  # monotonic; None: no deadline
        # Told when the router sends its initial metadata: once its engine call has gone out (EarlyMetadata).
        self._on_metadata = on_metadata
        self.initial_metadata: tuple[tuple[str, str], ...] = ()

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return max(0.0, self._deadline - time.monotonic())

    def send_initial_metadata(self, metadata) -> asyncio.Future:
        """Kept, and told at once: a plain function (a coroutine would run in a task of its own, EarlyMetadata's
        ensure_future), so on_metadata runs in the caller's task, with its context (log context vars)."""
        self.initial_metadata = tuple(metadata)
        if (told := self._on_metadata) is not None:
            self._on_metadata = None
            told()
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


def _bare_unavailable(err: grpc.aio.AioRpcError) -> bool:
    """An engine's connection error the router passed on as it is (no google.rpc.Status details)."""
    return err.code() == grpc.StatusCode.UNAVAILABLE and not details_of(err).reason


class EmbeddedStream:
    """The router's GenerateResponse bytes for a request (iterate; aclose() ends it), as RouterPool.generate's
    RouterStream gives them, from the router in this process. Its code runs in our reader's task, one task
    switch per message fewer than a relay task of its own would cost: our reader being cancelled (the client
    went away) is then exactly the router's caller going away (it cancels its engine call). A drain's cut
    (cancel()) and the deadline cancel that task too, but only while it waits in the router's code, and are
    then told apart from a caller gone (uncancel): the cut ends the iteration with CancelledError (the pipeline
    answers its drain's SHUTTING_DOWN), the deadline with DeadlineExceeded."""

    def __init__(
        self,
        servicer: RouterServicer,
        address: str,
        request: router_pb.GenerateRequest,
        deadline: float,
        metadata,
        attempt: Callable[[str], None] | None,
        sent: Callable[[], None] | None,
    ) -> None:
        self._servicer = servicer
        self._address = address
        self._request = request
        self._deadline = deadline
        # sent() once the router's engine call is on its way (its initial metadata goes out then, in a task of
        # its own): what it does overlaps the engine's work, as after RouterPool's call is sent.
        self._context = CallContext(metadata, deadline, self._tell_sent if sent is not None else None)
        self._attempt = attempt
        self._sent = sent
        self._created = time.monotonic()
        self._chunks = 0
        # The reader's task while it waits in the router's code (what a cut or the deadline cancels).
        self._waiting: asyncio.Task | None = None
        # Why the stream is being ended from outside: "cut" or "deadline" (None: it is not).
        self._ending: str | None = None
        self._gen = self._run()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gen

    @property
    def initial_metadata(self) -> tuple[tuple[str, str], ...]:
        """The router's initial metadata: the model version and experiment arm it assigned (or nothing)."""
        return self._context.initial_metadata

    def cancel(self) -> None:
        """A drain's cut: the router's engine call is cancelled, the iteration raises CancelledError."""
        self._end("cut")

    def progress(self) -> int:
        """Chunks the router has yielded so far (a drain watches it move)."""
        return self._chunks

    def describe(self) -> dict[str, object]:
        """Where this stream is, for a drain that cuts it (as RouterStream.describe)."""
        return {
            "request_id": self._request.request_id,
            "age_s": round(time.monotonic() - self._created, 3),
            "stage": "streaming" if self._chunks else "awaiting_router",
            "router": self._address,
            "attempts": 1,
            "chunks": self._chunks,
            "unread": 0,
            "channel": "in_process",
        }

    async def aclose(self) -> None:
        await self._gen.aclose()

    def _tell_sent(self) -> None:
        sent, self._sent = self._sent, None
        if sent is not None:
            sent()

    def _end(self, why: str) -> None:
        if self._ending is not None:
            return
        self._ending = why
        if self._waiting is not None:
            self._waiting.cancel()  # else the next read ends it, before it enters the router again

    def _ended(self) -> BaseException:
        if self._ending == "deadline":
            # What the router's own gRPC server answers when its handler outlives the caller's deadline.
            return DeadlineExceeded("deadline exceeded in the router")
        return asyncio.CancelledError()

    async def _run(self) -> AsyncIterator[bytes]:
        if self._attempt is not None:
            self._attempt(self._address)
        gen = self._servicer.generate(self._request, self._context)
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        timer = loop.call_at(loop.time() + (self._deadline - time.monotonic()), self._end, "deadline")
        try:
            while True:
                if self._ending is not None:
                    raise self._ended()
                self._waiting = task
                try:
                    data = await gen.__anext__()
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    # Ours alone (a cut, the deadline): the router has ended as for a caller gone; we go on
                    # as the one who ended it. A caller gone as well (two requests): its cancellation stands.
                    if self._ending is not None and task is not None and task.uncancel() == 0:
                        raise self._ended() from None
                    raise
                finally:
                    self._waiting = None
                if self._sent is not None:
                    self._tell_sent()  # a first chunk before the metadata's task ran: sent() first, as promised
                self._chunks += 1
                yield data
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
            # Where our caller stopped (went away, or finished): the router's finally runs here (it cancels its
            # engine call unless the stream had ended).
            await gen.aclose()
