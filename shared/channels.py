"""Client channels: the one place channels to fleet services are opened (TLS or plaintext), one reused channel
per peer, and raw-bytes streaming stubs for relaying hops."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import grpc

from shared.tls import Tls

# Keepalive notices a dead peer within seconds instead of waiting on TCP timeouts.
CHANNEL_OPTIONS = (
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # Let our own failover decide; gRPC's transparent retries would hide replica faults.
    ("grpc.enable_retries", 0),
    # gRPC's own reconnect backoff grows to 120 s by default: a registry or replica back after an outage
    # would stay unreachable for minutes. Cap it near our retry cap.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
)


def open_channel(
    target: str, tls: Tls | None = None, options: Iterable[tuple[str, object]] = CHANNEL_OPTIONS
) -> grpc.aio.Channel:
    """An asyncio channel to a fleet service: TLS (and the process's client certificate, for mTLS) when `tls`
    is given, plaintext otherwise. Every hop, exporter, CLI command and load generator opens its channels here."""
    if tls is None:
        return grpc.aio.insecure_channel(target, options=tuple(options))
    return grpc.aio.secure_channel(
        target, tls.channel_credentials(), options=(*options, *tls.channel_options(target))
    )


def open_sync_channel(
    target: str, tls: Tls | None = None, options: Iterable[tuple[str, object]] = CHANNEL_OPTIONS
) -> grpc.Channel:
    """The blocking twin of open_channel (Locust users, threads outside any event loop)."""
    if tls is None:
        return grpc.insecure_channel(target, options=tuple(options))
    return grpc.secure_channel(
        target, tls.channel_credentials(), options=(*options, *tls.channel_options(target))
    )


class ChannelPool:
    """One channel per address, created on first use and reused for every call."""

    def __init__(self, tls: Tls | None = None) -> None:
        self.tls = tls
        self._channels: dict[str, grpc.aio.Channel] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        """The channel to address (created if new)."""
        ch = self._channels.get(address)
        if ch is None:
            ch = open_channel(address, self.tls)
            self._channels[address] = ch
        return ch

    def state(self, address: str) -> str:
        """The connectivity state of the channel to address (READY, CONNECTING, ...; "" when there is none), as
        it is: asking does not connect."""
        ch = self._channels.get(address)
        return ch.get_state(try_to_connect=False).name if ch is not None else ""

    async def discard(self, address: str) -> None:
        """Close and forget the channel to address (a replica that left)."""
        ch = self._channels.pop(address, None)
        if ch is not None:
            await ch.close(grace=None)

    async def close(self) -> None:
        """Close every channel."""
        channels, self._channels = list(self._channels.values()), {}
        for ch in channels:
            await ch.close(grace=None)


def raw_stream(
    channel: grpc.aio.Channel, method: str, request_serializer: Callable[[object], bytes]
) -> grpc.aio.UnaryStreamMultiCallable:
    """A unary-stream stub whose responses come back as undecoded bytes, for hops that relay them."""
    return channel.unary_stream(method, request_serializer=request_serializer, response_deserializer=None)
