"""Coalescing relay (shared/relay.py): merged chunks equal the unmerged ones token for token, a writer that keeps
up gets every chunk alone and at once, an upstream error comes after every chunk read before it, and a resume
from what was relayed loses and repeats nothing, a busy writer's lone chunk waits for its companion. The upstream
is a real grpc.aio server on a loopback port; where the guards of that hold need arrivals timed exactly, a
hand-stepped read (Feed) stands in for the call."""

from __future__ import annotations

import asyncio
import gc
import random
import time

import grpc
import pytest
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

from services.router.resume import ChunkTracker
from shared.relay import MAX_PENDING, ChunkRelay, merge

METHOD = "/test.Relay/Generate"


def chunk(i: int, n: int, text: str | None = None) -> bytes:
    """The i-th of n chunks: served_by on the first, finish and usage on the last, 1-2 token ids each."""
    r = engine_pb.GenerateResponse()
    c = r.chunk
    c.text = f" t{i}" if text is None else text
    c.token_ids.extend([100 + 2 * i] + ([101 + 2 * i] if i % 3 == 0 else []))
    if i == 0:
        c.served_by.replica_id = "r1"
        c.served_by.model = "m"
    if i == n - 1:
        c.finish_reason = common_pb2.FINISH_REASON_LENGTH
        c.usage.prompt_tokens = 5
        c.usage.completion_tokens = n
    return r.SerializeToString()


def parse(data: bytes) -> common_pb2.GenerateChunk:
    return engine_pb.GenerateResponse.FromString(data).chunk


def flatten(messages: list[bytes]) -> tuple[str, list[int], list[str], int, int]:
    """What a client makes of a stream: its text, token ids, served_by replicas, last finish and usage."""
    chunks = [parse(m) for m in messages]
    return (
        "".join(c.text for c in chunks),
        [t for c in chunks for t in c.token_ids],
        [c.served_by.replica_id for c in chunks if c.HasField("served_by")],
        chunks[-1].finish_reason,
        chunks[-1].usage.completion_tokens,
    )


def test_merge_equals_the_chunks_in_order():
    """Any run of consecutive chunks merges to one message a client reads the same as the run: text
    concatenated (empty texts too), ids appended, served_by of the first, finish and usage of the last."""
    rng = random.Random(7)
    n = 40
    texts = ["", " a", "é", "\n", " 🙂", "b"]
    msgs = [chunk(i, n, rng.choice(texts)) for i in range(n)]
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, n), rng.randint(0, 12)))
        groups = [msgs[a:b] for a, b in zip([0, *cuts], [*cuts, n], strict=True)]
        merged = [merge(g) for g in groups]
        assert flatten(merged) == flatten(msgs)
    assert merge([msgs[3]]) is msgs[3]  # one chunk goes on as it is


class Upstream(grpc.GenericRpcHandler):
    """A streaming server the test drives: each call sends what is put in its queue (bytes; an exception ends
    the call with that status; None ends it normally)."""

    def __init__(self) -> None:
        self.queues: asyncio.Queue[asyncio.Queue] = asyncio.Queue()

    def service(self, details):
        if details.method != METHOD:
            return None

        async def generate(request: bytes, context):
            q: asyncio.Queue = asyncio.Queue()
            await self.queues.put(q)
            while (item := await q.get()) is not None:
                if isinstance(item, grpc.StatusCode):
                    await context.abort(item, "upstream failed")
                yield item

        return grpc.unary_stream_rpc_method_handler(generate)


@pytest.fixture
async def upstream():
    handler = Upstream()
    server = grpc.aio.server(handlers=[handler])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = channel.unary_stream(METHOD)
    try:
        yield handler, call
    finally:
        await channel.close()
        await server.stop(0)


async def test_a_writer_that_keeps_up_gets_every_chunk_alone_at_once(upstream):
    """Nothing is held back to batch: with the reader waiting, each chunk is handed on by itself as soon as it
    arrives (the first chunk and light load are never delayed)."""
    handler, stub = upstream
    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    relay = ChunkRelay(call.read)
    try:
        n = 20
        for i in range(n):
            await q.put(chunk(i, n))
            data = await asyncio.wait_for(relay.read(), 10)
            assert data == chunk(i, n)
        await q.put(None)
        assert await asyncio.wait_for(relay.read(), 10) is grpc.aio.EOF
        assert relay.merged == 0
    finally:
        relay.close()
        call.cancel()


async def _all_sent(call: grpc.aio.UnaryStreamCall, relay: ChunkRelay, watch, n: int) -> None:
    """Until the relay has read n chunks (its watch counts them), bounded."""
    for _ in range(1000):
        if watch.chunks >= n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the relay read {watch.chunks} of {n} chunks")


class Watch:
    chunks = 0


async def test_a_lagging_writer_gets_the_pending_chunks_merged_token_for_token(upstream):
    """While the writer is busy, chunks pile up and come out as one message; the stream reads the same as the
    chunks one by one. The relay reads at most MAX_PENDING ahead (flow control holds the rest upstream)."""
    handler, stub = upstream
    n = 2 * MAX_PENDING + 6
    msgs = [chunk(i, n) for i in range(n)]
    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    await q.put(msgs[0])
    first = await asyncio.wait_for(call.read(), 10)  # the first chunk is read directly, as the hops do
    watch = Watch()
    relay = ChunkRelay(call.read, watch)
    try:
        for m in msgs[1:]:
            await q.put(m)
        await q.put(None)
        await _all_sent(call, relay, watch, MAX_PENDING)  # the "writer" was busy all along
        await asyncio.sleep(0.1)
        assert watch.chunks == MAX_PENDING  # no further
        assert relay.received == relay.unread == MAX_PENDING  # read from the call, not taken by the writer
        out = [first, await asyncio.wait_for(relay.read(), 10)]  # the pile, in one message
        assert relay.unread == 0
        assert len(parse(out[1]).token_ids) == len(flatten(msgs[1 : MAX_PENDING + 1])[1])
        while (data := await asyncio.wait_for(relay.read(), 10)) is not grpc.aio.EOF:
            out.append(data)
        assert flatten(out) == flatten(msgs)
        assert relay.merged == n - len(out)
    finally:
        relay.close()
        call.cancel()


async def test_an_upstream_error_comes_after_every_chunk_read_before_it_and_a_resume_loses_nothing(upstream):
    """The upstream fails with chunks still pending for a busy writer: the writer gets them (merged) first,
    then the error; the tracker's resume point is then exactly the tokens relayed, and a second attempt from it
    completes the stream with no token lost or repeated."""
    handler, stub = upstream
    n = 30
    msgs = [chunk(i, n) for i in range(n)]
    tracker = ChunkTracker()
    tracker.next_attempt()
    relayed: list[bytes] = []

    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    await q.put(msgs[0])
    relayed.append(tracker.relay(await asyncio.wait_for(call.read(), 10)))
    watch = Watch()
    relay = ChunkRelay(call.read, watch)
    cut = 17
    try:
        for m in msgs[1:cut]:
            await q.put(m)
        await q.put(grpc.StatusCode.UNAVAILABLE)
        await _all_sent(call, relay, watch, cut - 1)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            while (data := await asyncio.wait_for(relay.read(), 10)) is not grpc.aio.EOF:
                relayed.append(tracker.relay(data))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        relay.close()
        call.cancel()
    assert len(relayed) == 2  # the first chunk, then the 16 pending merged into one
    assert tracker.sent_ids == flatten(msgs[:cut])[1]

    # The resumed attempt: the replica continues after the ids sent (here: the rest of the same stream).
    tracker.next_attempt()
    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    rest = list(msgs[cut:])
    resumed_first = engine_pb.GenerateResponse.FromString(rest[0])
    resumed_first.chunk.served_by.replica_id = "r2"  # a resumed attempt's served_by is dropped by the tracker
    rest[0] = resumed_first.SerializeToString()
    await q.put(rest[0])
    relayed.append(tracker.relay(await asyncio.wait_for(call.read(), 10)))
    relay = ChunkRelay(call.read)
    try:
        for m in rest[1:]:
            await q.put(m)
        await q.put(None)
        while (data := await asyncio.wait_for(relay.read(), 10)) is not grpc.aio.EOF:
            relayed.append(tracker.relay(data))
    finally:
        relay.close()
        call.cancel()
    assert flatten(relayed) == flatten(msgs)  # served_by r1 once, every id once, the last finish and usage
    assert tracker.sent_ids == flatten(msgs)[1]


async def test_a_call_that_breaks_after_its_finish_chunk_ends_as_a_whole_one(upstream):
    """Every chunk, the last with its finish reason, then the call fails before its status (its connection lost
    just then): the reader gets every chunk and then EOF, as from a call that ended normally; a hop would
    otherwise take its upstream for down and resume a finished generation."""
    handler, stub = upstream
    n = 6
    msgs = [chunk(i, n) for i in range(n)]
    call = stub(b"")
    relay = ChunkRelay(call.read)
    relayed: list[bytes] = []
    try:
        q = await asyncio.wait_for(handler.queues.get(), 10)
        for m in msgs:
            await q.put(m)
        await q.put(grpc.StatusCode.UNAVAILABLE)
        while (data := await asyncio.wait_for(relay.read(), 10)) is not grpc.aio.EOF:
            relayed.append(data)
    finally:
        relay.close()
        call.cancel()
    assert flatten(relayed) == flatten(msgs)
    assert relay.ended_at > 0
    assert (await call.code()) == grpc.StatusCode.UNAVAILABLE  # it did fail: the relay took it for an end


async def test_a_cancelled_upstream_call_reaches_the_reader_as_cancellation(upstream):
    """A stall watchdog or drain cancels the upstream call: the reader gets CancelledError (as from a direct
    read), while its own task is not being cancelled, so the hop can tell it from its caller leaving."""
    handler, stub = upstream
    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    await q.put(chunk(0, 3))
    await asyncio.wait_for(call.read(), 10)
    relay = ChunkRelay(call.read)
    try:
        reading = asyncio.ensure_future(relay.read())
        await asyncio.sleep(0.05)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(reading, 10)
        assert asyncio.current_task().cancelling() == 0
    finally:
        relay.close()


async def test_close_cancels_the_call_and_leaves_the_pending_read_to_complete(upstream):
    """The hop's caller went away (its task was cancelled while waiting on the relay): close() cancels the call,
    never the relay's task, whose read then completes by itself (grpc.aio leaks a batch whose awaiting task is
    cancelled, grpc/grpc#43360; loadtest/cancel_leak.py measures it)."""
    handler, stub = upstream
    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    relay = ChunkRelay(call.read, cancel=call.cancel)
    await q.put(chunk(0, 3))
    assert await asyncio.wait_for(relay.read(), 10) == chunk(0, 3)
    consumer = asyncio.ensure_future(relay.read())
    await asyncio.sleep(0.05)
    consumer.cancel()  # as grpc.aio cancels a handler whose client left
    with pytest.raises(asyncio.CancelledError):
        await consumer
    pump = relay._task
    assert not pump.done()  # still in the call's read: nobody cancelled it
    relay.close()
    relay.close()  # idempotent
    await asyncio.wait_for(asyncio.shield(pump), 10)
    assert not pump.cancelled() and call.cancelled()


async def test_without_coalescing_every_chunk_comes_alone(upstream):
    """coalesce=False (--no-coalesce): the chunks that piled up come out one message each, in order."""
    handler, stub = upstream
    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    watch = Watch()
    relay = ChunkRelay(call.read, watch, coalesce=False, cancel=call.cancel)
    try:
        n = 10
        for i in range(n):
            await q.put(chunk(i, n))
        await q.put(None)
        await _all_sent(call, relay, watch, n)
        out = []
        while (data := await asyncio.wait_for(relay.read(), 10)) is not grpc.aio.EOF:
            out.append(data)
        assert out == [chunk(i, n) for i in range(n)] and relay.merged == 0
    finally:
        relay.close()


async def test_a_failed_or_abandoned_stream_leaves_no_relay_in_a_reference_cycle(upstream):
    """A relay whose call failed (the error handed to the reader) or whose reader left (close(), the call
    cancelled) is freed by reference counting: no reference cycle through the relay waits for a full collection
    (the services' periodic gc.collect(2) pauses the event loop for what it finds)."""
    handler, stub = upstream

    async def failed() -> None:
        call = stub(b"")
        q = await asyncio.wait_for(handler.queues.get(), 10)
        relay = ChunkRelay(call.read, cancel=call.cancel)
        await q.put(chunk(0, 3))
        await q.put(grpc.StatusCode.UNAVAILABLE)
        try:
            # asyncio.timeout, not wait_for: wait_for's task and the error it keeps would make a cycle of their own.
            with pytest.raises(grpc.aio.AioRpcError):
                async with asyncio.timeout(10):
                    while await relay.read() is not grpc.aio.EOF:
                        pass
        finally:
            relay.close()

    async def abandoned() -> None:
        call = stub(b"")
        q = await asyncio.wait_for(handler.queues.get(), 10)
        relay = ChunkRelay(call.read, cancel=call.cancel)
        await q.put(chunk(0, 3))
        assert await asyncio.wait_for(relay.read(), 10) == chunk(0, 3)
        relay.close()
        await asyncio.wait_for(asyncio.shield(relay._task), 10)

    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for flow in (failed, abandoned):
            await flow()
            await asyncio.sleep(0.05)  # the pumps' and calls' last callbacks
            gc.collect()
            cyclic = [o for o in gc.garbage if isinstance(o, ChunkRelay)]
            gc.garbage.clear()
            assert not cyclic, f"{flow.__name__}: {len(cyclic)} relay(s) in reference cycles"
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()


async def test_first_chunk_reaches_its_reader_before_the_next_read_starts():
    """A reader waiting for the first chunk gets it before the relay asks upstream for the next message (setting
    up that read is not on the first token's path); later chunks are read at once, as before."""
    loop = asyncio.get_running_loop()
    pending: list[asyncio.Future] = []

    def read() -> asyncio.Future:
        pending.append(loop.create_future())
        return pending[-1]

    relay = ChunkRelay(read)
    seen: list[tuple[object, int]] = []

    async def reader() -> None:
        while (data := await relay.read()) is not grpc.aio.EOF:
            seen.append((data, len(pending)))  # reads started when the reader got data

    task = asyncio.create_task(reader())
    for _ in range(3):
        await asyncio.sleep(0)
    assert len(pending) == 1
    loop.call_soon(pending[0].set_result, b"first")
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen == [(b"first", 1)]
    assert len(pending) == 2  # and then the next read started
    loop.call_soon(pending[1].set_result, b"second")
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen[1] == (b"second", 3)  # read ahead of the reader from the second chunk on
    pending[2].set_result(grpc.aio.EOF)
    await asyncio.wait_for(task, 5)
    relay.close()


class Feed:
    """An upstream the test steps by hand: read() returns a future; send() completes the oldest one."""

    def __init__(self) -> None:
        self.reads: list[asyncio.Future] = []
        self.sent = 0

    def read(self) -> asyncio.Future:
        self.reads.append(asyncio.get_running_loop().create_future())
        return self.reads[-1]

    async def send(self, data: object) -> None:
        for _ in range(500):  # bounded: the relay asks for the next message within a few loop turns
            if len(self.reads) > self.sent:
                break
            await asyncio.sleep(0.001)
        self.reads[self.sent].set_result(data)
        self.sent += 1
        for _ in range(3):
            await asyncio.sleep(0)  # the pump takes it


@pytest.fixture
def slow_hold(monkeypatch):
    """Hold thresholds on a scale a loaded test box cannot blur: a writer turn of 0.05 s or more is busy, and a
    hold may last up to 10 s (it lasts what the turn did)."""
    import shared.relay

    monkeypatch.setattr(shared.relay, "HOLD_AFTER_S", 0.05)
    monkeypatch.setattr(shared.relay, "HOLD_MAX_S", 10.0)


async def _busy_turn(feed: Feed, relay: ChunkRelay, first: bytes, turn_s: float, then: bytes) -> asyncio.Task:
    """The writer takes `first`, is busy for turn_s while `then` arrives (right after the first), then asks for
    the next message: the read, as a task, and how long the writer's turn was."""
    await feed.send(first)
    assert await asyncio.wait_for(relay.read(), 5) == first
    await feed.send(then)
    await asyncio.sleep(turn_s)
    return asyncio.create_task(relay.read())


async def test_a_busy_writer_holds_a_lone_chunk_until_its_companion_comes_and_sends_both_as_one(slow_hold):
    """A writer whose last turn was long (a saturated hop) does not send a lone pending chunk at once when the
    upstream's pace says the next one is due within that turn: it waits for it and sends both in one message,
    as soon as the second has come (not after the whole wait)."""
    feed = Feed()
    relay = ChunkRelay(feed.read)
    n = 4
    try:
        read = await _busy_turn(feed, relay, chunk(0, n), 1.0, chunk(1, n))  # gap ~0: the next is due now
        await asyncio.sleep(0.2)
        assert not read.done()  # held
        started = time.monotonic()
        await feed.send(chunk(2, n))
        data = await asyncio.wait_for(read, 5)
        assert data == merge([chunk(1, n), chunk(2, n)])
        assert time.monotonic() - started < 0.5  # released by the companion, not by the 1 s wait
        assert relay.merged == 1
    finally:
        relay.close()


async def test_over_a_real_call_a_busy_writer_gets_a_lone_chunk_and_its_companion_as_one_message(
    upstream, slow_hold
):
    """The same hold with the chunks coming over a real gRPC call (the loopback server above): after a long turn
    the writer's lone chunk waits for the next, and the two go out merged, token for token."""
    handler, stub = upstream
    n = 4
    msgs = [chunk(i, n) for i in range(n)]
    call = stub(b"")
    q = await asyncio.wait_for(handler.queues.get(), 10)
    watch = Watch()
    relay = ChunkRelay(call.read, watch, cancel=call.cancel)
    try:
        await q.put(msgs[0])
        assert await asyncio.wait_for(relay.read(), 10) == msgs[0]
        await q.put(msgs[1])  # right behind the first: the next is due at once
        await _all_sent(call, relay, watch, 2)
        await asyncio.sleep(1.0)  # the writer's turn
        read = asyncio.create_task(relay.read())
        await asyncio.sleep(0.2)
        assert not read.done()  # held
        await q.put(msgs[2])
        assert await asyncio.wait_for(read, 5) == merge(msgs[1:3])
        await q.put(msgs[3])
        await q.put(None)
        rest = []
        while (data := await asyncio.wait_for(relay.read(), 10)) is not grpc.aio.EOF:
            rest.append(data)
        assert flatten([msgs[0], merge(msgs[1:3]), *rest]) == flatten(msgs) and relay.merged == 1
    finally:
        relay.close()


async def test_a_held_chunk_goes_alone_after_at_most_the_writers_last_turn(slow_hold):
    """No companion within the wait: the chunk goes out alone once the wait (the writer's last turn) is over."""
    feed = Feed()
    relay = ChunkRelay(feed.read)
    n = 4
    try:
        started = time.monotonic()
        read = await _busy_turn(feed, relay, chunk(0, n), 0.6, chunk(1, n))
        assert await asyncio.wait_for(read, 5) == chunk(1, n)
        # held for about the turn: asked at ~0.6 s, handed on at ~1.2 s (a loaded box only adds)
        assert 1.0 < time.monotonic() - started < 5
    finally:
        relay.close()


async def test_a_busy_writer_does_not_hold_a_finish_or_a_chunk_of_a_slower_upstream(slow_hold):
    """Nothing is held that no companion will join: the stream's finish, or a chunk whose upstream's last gap
    between chunks (an engine's time per token) is longer than the wait would be. The wait would be 0.6 s; each
    comes at once."""
    n = 2
    feed = Feed()
    relay = ChunkRelay(feed.read)
    try:
        read = await _busy_turn(feed, relay, chunk(0, n), 0.6, chunk(1, n))  # chunk 1 of 2: the finish
        asked = time.monotonic()
        assert await asyncio.wait_for(read, 5) == chunk(1, n)
        assert time.monotonic() - asked < 0.3
    finally:
        relay.close()
    n = 4
    feed = Feed()
    relay = ChunkRelay(feed.read)
    try:
        await feed.send(chunk(0, n))
        await asyncio.sleep(2.5)  # the writer takes chunk 0 late (a first chunk is never held)
        assert await asyncio.wait_for(relay.read(), 5) == chunk(0, n)
        await feed.send(chunk(1, n))  # 2.5 s after chunk 0: the next is due in 2.5 s, beyond a 0.6 s wait
        await asyncio.sleep(0.6)
        asked = time.monotonic()
        assert await asyncio.wait_for(relay.read(), 5) == chunk(1, n)
        assert time.monotonic() - asked < 0.3
    finally:
        relay.close()
