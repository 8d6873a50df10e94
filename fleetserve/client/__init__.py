"""fleetserve's Python client: `Client` (blocking) and `AsyncClient` (asyncio) for the gateway's gRPC API, with
streaming, one deadline per call, and retries that honour the server's RetryInfo.

    from fleetserve.client import Client

    with Client("127.0.0.1:50051", api_key="fsk-...", model="sim-1b") as client:
        for chunk in client.generate("Once upon a time", max_tokens=32):
            print(chunk.text, end="", flush=True)
"""

from fleetserve.client.aio import AsyncClient, AsyncStream
from fleetserve.client.errors import ErrorDetails, FleetServeError, details_of
from fleetserve.client.messages import Completion
from fleetserve.client.retry import NO_RETRY, RetryPolicy, full_jitter
from fleetserve.client.sync import Client, Stream

__all__ = [
    "NO_RETRY",
    "AsyncClient",
    "AsyncStream",
    "Client",
    "Completion",
    "ErrorDetails",
    "FleetServeError",
    "RetryPolicy",
    "Stream",
    "details_of",
    "full_jitter",
]
