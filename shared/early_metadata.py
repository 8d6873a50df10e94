"""EarlyMetadata: a server stream's initial metadata sent on its own, ahead of the first message."""

from __future__ import annotations

import asyncio

import grpc


class EarlyMetadata:
    """Sends a stream's initial metadata as its own gRPC batch, started once (send), awaited before the first
    message is written (before_first) and settled before the call ends (settle), so the metadata precedes both the
    first message and an error. Why early: a grpc.aio caller asks for the first message only once the metadata has
    come; metadata that arrives ahead has the caller's read under way when the message comes (one wake-up on the
    first token's path instead of two). The gateway and the router both send theirs this way."""

    __slots__ = ("_context", "_sending", "_sent")

    def __init__(self, context: grpc.aio.ServicerContext) -> None:
        self._context = context
        self._sending: asyncio.Future | None = None
        self._sent = False

    @property
    def started(self) -> bool:
        return self._sending is not None or self._sent

    def send(self, metadata: tuple[tuple[str, str], ...]) -> None:
        """Start sending metadata (a task: gRPC's batch set-up runs after the caller's next yield); once only."""
        if not self.started:
            self._sending = asyncio.ensure_future(self._context.send_initial_metadata(metadata))

    async def before_first(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        """Before the first message: the metadata sent (started now with metadata if it was not yet). Kept until
        done, so a cancellation here leaves it to settle()."""
        if self._sent:
            return
        self.send(metadata)
        assert self._sending is not None
        await self._sending
        self._sending = None
        self._sent = True

    async def settle(self, metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        """At the call's end: with metadata given and nothing sent yet (refused before the send), send it now, so
        the error follows it; then wait for a send under way, its failure (a caller gone) retrieved."""
        if metadata is not None:
            self.send(metadata)
        sending = self._sending
        if sending is None:
            return
        await asyncio.wait((sending,))
        self._sending = None
        self._sent = True
        if not sending.cancelled():
            sending.exception()
