"""fleetserve.client against a real in-process fleet (gateway, router, sim engines on port 0): streaming, whole
completions, models, feedback and batch jobs from the asyncio and the blocking client; RetryInfo honoured,
client errors not retried, UNAVAILABLE retried with backoff within the deadline, cancellation reaching the
engine."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import pytest
import pytest_asyncio

from fleetserve.client import AsyncClient, Client, FleetServeError, RetryPolicy
from tests.docs_commands import ROOT, code_blocks
from tests.integration.test_router import API_KEY, MODEL, in_process_fleet
from tests.support import assert_eventually

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with in_process_fleet(tmp_path_factory.mktemp("client"), gateway=True) as f:
        yield f


class RecordingAsyncClient(AsyncClient):
    """An AsyncClient that records the waits it makes between attempts (and makes them)."""

    waits: list[float]

    async def _sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(seconds)


def recording(address: str, api_key: str = API_KEY, **kw) -> RecordingAsyncClient:
    client = RecordingAsyncClient(address, api_key, model=MODEL, **kw)
    client.waits = []
    return client


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


async def test_async_stream_yields_chunks_and_fills_in_request_id_usage_and_ttft(fleet):
    """A streamed generate yields chunks as they come; the stream knows its request id, who served it, the
    usage and the time to first token; a chat reply through complete() is whole."""
    async with AsyncClient(fleet.gateway.address, API_KEY, model=MODEL) as client:
        stream = client.generate("hello there", max_tokens=6, seed=3)
        chunks = [c async for c in stream]
        assert len(chunks) >= 2 and chunks[-1].finish_reason
        assert stream.request_id and stream.served_by.model == MODEL and stream.served_by.replica_id
        assert stream.usage.completion_tokens == 6 and stream.finish_reason == "length"
        assert stream.ttft_s is not None and stream.ttft_s > 0
        assert stream.text == "".join(c.text for c in chunks)
        reply = await client.complete(messages=[{"role": "user", "content": "hi"}], max_tokens=4)
        assert reply.usage.completion_tokens == 4 and reply.text and reply.request_id


async def test_blocking_client_completes_lists_models_rates_and_runs_a_batch(fleet):
    """The blocking Client: a whole completion, the model list, feedback on the completion's request id, and
    a batch job submitted, polled to completion with its results."""

    def use() -> tuple:
        with Client(fleet.gateway.address, API_KEY, model=MODEL) as client:
            done = client.complete("Once upon a time", max_tokens=5)
            models = client.models()
            feedback_id = client.feedback(done.request_id, 5, tags=["helpful"])
            job = client.submit_batch(
                [{"custom_id": "a", "prompt": "one"}, {"custom_id": "b", "messages": [("user", "two")]}],
                max_tokens=3,
            )
            deadline = time.monotonic() + 30
            while True:
                got = client.get_job(job.job_id, include_results=True)
                if got.job.succeeded + got.job.failed == got.job.total or time.monotonic() > deadline:
                    return done, models, feedback_id, got
                time.sleep(0.1)

    done, models, feedback_id, got = await asyncio.to_thread(use)
    assert done.usage.completion_tokens == 5 and done.finish_reason == "length"
    assert [(m.name, m.replicas) for m in models] == [(MODEL, 2)]
    assert feedback_id
    assert got.job.succeeded == 2 and [r.custom_id for r in got.results] == ["a", "b"]


async def test_rate_limited_call_waits_the_advised_delay_then_succeeds(fleet):
    """RESOURCE_EXHAUSTED with RetryInfo (a tenant past its rps) is retried after the advised delay, and the
    retry succeeds."""
    tenants = fleet.gateway.tenants
    await tenants.create_tenant("client-rps", tenant_id="client-rps")
    await tenants.set_tenant("client-rps", rps=2)
    key = await tenants.add_key("client-rps")
    async with recording(fleet.gateway.address, key) as client:
        for _ in range(2):
            await client.complete("hello", max_tokens=2)
        assert client.waits == []
        done = await client.complete("hello", max_tokens=2)
        assert done.usage.completion_tokens == 2
        (wait,) = client.waits
        assert 0 < wait <= 0.5 * 1.1  # the advised delay (at most 1/rps) plus at most 10% jitter


async def test_client_errors_are_not_retried_and_say_what_is_wrong(fleet):
    """A bad key and a bad field fail at once (one attempt) with the code, the reason and the violations."""
    async with recording(fleet.gateway.address, "fsk-wrong") as client:
        with pytest.raises(FleetServeError) as exc:
            await client.complete("hello", max_tokens=2)
        assert (exc.value.code, exc.value.reason, exc.value.attempts) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "INVALID_API_KEY",
            1,
        )
    async with recording(fleet.gateway.address) as client:
        with pytest.raises(FleetServeError) as exc:
            await client.complete("hello", max_tokens=2, temperature=5.0)
        assert exc.value.code == grpc.StatusCode.INVALID_ARGUMENT and exc.value.attempts == 1
        assert [f for f, _ in exc.value.details.field_violations] == ["temperature"]
        assert client.waits == []


async def test_unavailable_is_retried_with_backoff_until_attempts_run_out():
    """UNAVAILABLE without advice (nothing listens) is retried max_attempts times with full-jitter backoff
    within [0, base * 2^n], then fails with the number of attempts made."""
    policy = RetryPolicy(max_attempts=3, backoff_base_s=0.01, backoff_max_s=0.05)
    async with recording(closed_port(), retry=policy, timeout_s=10) as client:
        with pytest.raises(FleetServeError) as exc:
            await client.complete("hello", max_tokens=2)
    assert exc.value.code == grpc.StatusCode.UNAVAILABLE and exc.value.attempts == 3
    assert len(client.waits) == 2 and 0 <= client.waits[0] <= 0.01 and 0 <= client.waits[1] <= 0.02


async def test_no_retry_is_made_that_would_end_past_the_deadline():
    """With less time left than the backoff would take, the client gives up at once instead of retrying."""
    policy = RetryPolicy(max_attempts=5, backoff_base_s=5.0, backoff_max_s=5.0)
    started = time.monotonic()
    async with recording(closed_port(), retry=policy, timeout_s=0.5) as client:
        client._rng.uniform = lambda a, b: b  # the longest backoff the policy allows: 5 s > the 0.5 s left
        with pytest.raises(FleetServeError) as exc:
            await client.complete("hello", max_tokens=2)
    assert exc.value.attempts == 1 and client.waits == []
    assert time.monotonic() - started < 5


async def test_cancelling_a_stream_aborts_the_generation_in_the_engine(fleet):
    """cancel() (or leaving `async with`) after the first chunk ends the call, and the engine aborts the
    generation rather than finishing it."""
    before = await fleet.aborted_total()
    async with AsyncClient(fleet.gateway.address, API_KEY, model=MODEL) as client:
        async with client.generate("a long one", max_tokens=4000, ignore_eos=True) as stream:
            async for _ in stream:
                break
    await assert_eventually(lambda: _aborted_more(fleet, before), timeout_s=10)
    await assert_eventually(lambda: _idle(fleet), timeout_s=10)


async def _aborted_more(fleet, before: int) -> bool:
    return await fleet.aborted_total() > before


async def _idle(fleet) -> bool:
    return await fleet.busy_total() == 0


async def test_the_examples_in_docs_client_md_run(fleet, capsys):
    """Every Python example of docs/client.md runs against a fleet (with its address and key put in)."""
    blocks = [b for lang, b in code_blocks((ROOT / "docs" / "client.md").read_text()) if lang == "python"]
    assert len(blocks) >= 4
    for block in blocks:
        code = block.replace("127.0.0.1:50051", fleet.gateway.address).replace("fsk-...", API_KEY)
        # In a thread: the blocking client (and the example's own asyncio.run) must not block this loop.
        await asyncio.to_thread(
            exec, compile(code, "docs/client.md", "exec"), {"__name__": "__doc_example__"}
        )
    out = capsys.readouterr().out
    assert "INVALID_ARGUMENT" in out and MODEL in out
