"""The sim engine end to end without a network: streaming, determinism, stop strings, aborts, resume, load,
timing against the cost model, and shutdown."""

from __future__ import annotations

import asyncio

import pytest
from fleetserve.common.v1 import common_pb2

from services.engine.backend import EngineBackend, RequestIdInUse
from services.engine.sim import SimEngine
from services.engine.sim_tokens import TOKEN_TEXT, detokenize
from shared.errors import InvalidArgument, ShuttingDown
from tests.support import assert_eventually

FAST = 100.0


@pytest.fixture
async def engine():
    e = SimEngine(speed_factor=FAST)
    await e.start()
    yield e
    await e.shutdown()


def spec(prompt: str = "tell me a story", max_tokens: int = 16, **sampling) -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        model="sim-1b", prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling)
    )


async def collect(engine: SimEngine, request_id: str, s: common_pb2.GenerationSpec, **kw):
    """(token ids, text, last output) of a whole generation."""
    ids, text, last = [], [], None
    async for out in engine.generate(request_id, s, cache_salt="", priority=kw.get("priority", 0)):
        ids += out.token_ids
        text.append(out.text)
        last = out
    return ids, "".join(text), last


def test_sim_engine_implements_the_backend_interface():
    """SimEngine satisfies the EngineBackend protocol."""
    assert isinstance(SimEngine(), EngineBackend)


async def test_streams_tokens_and_finishes_at_max_tokens(engine):
    """A generation streams max_tokens word tokens and ends with LENGTH and usage counts."""
    ids, text, last = await collect(engine, "a", spec(max_tokens=12))
    assert len(ids) == 12 and text == detokenize(ids)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert last.completion_tokens == 12 and last.prompt_tokens == 5 and last.cached_tokens == 0
    assert engine.counters.finished == 1 and engine.counters.output_tokens == 12


async def test_default_max_tokens_is_256(engine):
    """max_tokens 0 means the default of 256 tokens."""
    ids, _, _ = await collect(engine, "d", spec(max_tokens=0))
    assert len(ids) == 256


async def test_same_seed_and_prompt_give_the_same_tokens_whatever_the_concurrency(engine):
    """Output depends on (seed, prompt, position) only: alone or among 30 other requests, same tokens."""
    alone, _, _ = await collect(engine, "alone", spec(max_tokens=40, seed=7))
    others = [
        collect(engine, f"o{i}", spec(prompt=f"other prompt {i} " * (i + 1), max_tokens=20 + i))
        for i in range(30)
    ]
    results = await asyncio.gather(collect(engine, "busy", spec(max_tokens=40, seed=7)), *others)
    assert results[0][0] == alone
    assert (await collect(engine, "seed0", spec(max_tokens=40)))[0] == (
        await collect(engine, "seed0x", spec(max_tokens=40, seed=0))
    )[0], "the default seed is 0"
    assert (await collect(engine, "seed8", spec(max_tokens=40, seed=8)))[0] != alone


async def test_stop_string_ends_generation_and_is_not_returned(engine):
    """A stop string in the output ends it with STOP; the text stops right before the stop string."""
    ids, text, _ = await collect(engine, "free", spec(max_tokens=30))
    word = TOKEN_TEXT[ids[10]]
    cut = text.index(word)
    _, stopped, last = await collect(engine, "stop", spec(max_tokens=30, stop=["zzz-never", word]))
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert stopped == text[:cut]


async def test_stop_string_spanning_two_tokens_is_caught(engine):
    """A stop string made of the end of one token and the start of the next is found; none of it is sent."""
    ids, text, _ = await collect(engine, "free", spec(max_tokens=30))
    t5, t6 = TOKEN_TEXT[ids[5]], TOKEN_TEXT[ids[6]]
    stop = t5[-2:] + t6[:3]
    cut = text.index(stop)
    outs = []
    async for out in engine.generate("span", spec(max_tokens=30, stop=[stop]), cache_salt="", priority=0):
        outs.append(out)
    assert outs[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    assert "".join(o.text for o in outs) == text[:cut]
    assert outs[-1].completion_tokens <= 7


async def test_abort_ends_the_stream_and_frees_blocks_once(engine):
    """abort() frees the request's KV blocks and slot at once, ends its stream with ABORT, and is idempotent."""
    stream = engine.generate("long", spec(max_tokens=100_000), cache_salt="", priority=0)
    first = await anext(stream)
    assert first.token_ids and engine.load().kv_blocks_used > 0
    assert engine.abort("long") is True
    assert engine.abort("long") is False
    load = engine.load()
    assert load.running == 0 and load.waiting == 0 and load.kv_blocks_used == 0
    rest = [out async for out in stream]
    assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert engine.counters.aborted == 1 and engine.counters.finished == 0


async def test_closing_the_stream_early_aborts_the_request(engine):
    """A reader that stops reading (the RPC was cancelled) aborts the request in the engine."""
    stream = engine.generate("gone", spec(max_tokens=100_000), cache_salt="", priority=0)
    await anext(stream)
    await stream.aclose()
    assert engine.counters.aborted == 1 and engine.load().running == 0


async def test_cancelled_reader_aborts_the_request(engine):
    """Cancelling the task that reads a stream (a deadline) aborts the request."""

    async def read():
        async for _ in engine.generate("cancel", spec(max_tokens=100_000), cache_salt="", priority=0):
            pass

    task = asyncio.create_task(read())
    await assert_eventually(lambda: engine.load().running == 1, timeout_s=5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.counters.aborted == 1 and engine.load().running == 0


async def test_aborting_a_waiting_request_frees_its_queue_slot():
    """A request still waiting for a slot is removed from the queue by abort."""
    e = SimEngine(speed_factor=FAST, max_num_seqs=1)
    await e.start()
    try:
        running = e.generate("r", spec(max_tokens=100_000), cache_salt="", priority=0)
        await anext(running)
        waiting = e.generate("w", spec(), cache_salt="", priority=0)
        assert e.load().waiting == 1
        assert e.abort("w") and e.load().waiting == 0
        assert [o.finish_reason for o in [o async for o in waiting]] == [common_pb2.FINISH_REASON_ABORT]
        await running.aclose()
    finally:
        await e.shutdown()


async def test_interactive_requests_are_served_before_batch():
    """With one slot busy, a later interactive request starts before an earlier batch request."""
    e = SimEngine(speed_factor=FAST, max_num_seqs=1)
    await e.start()
    order: list[str] = []

    async def run(rid: str, priority: int, max_tokens: int = 3):
        async for out in e.generate(rid, spec(max_tokens=max_tokens), cache_salt="", priority=priority):
            if out.token_ids and rid not in order:
                order.append(rid)

    try:
        first = asyncio.create_task(run("first", common_pb2.PRIORITY_STANDARD, 100_000))
        await assert_eventually(lambda: order == ["first"], timeout_s=5)
        batch = asyncio.create_task(run("batch", common_pb2.PRIORITY_BATCH))
        await assert_eventually(lambda: e.load().waiting == 1, timeout_s=5)
        interactive = asyncio.create_task(run("inter", common_pb2.PRIORITY_INTERACTIVE))
        await assert_eventually(lambda: e.load().waiting == 2, timeout_s=5)
        assert e.abort("first")
        await asyncio.wait_for(asyncio.gather(first, batch, interactive), 10)
        assert order == ["first", "inter", "batch"]
    finally:
        await e.shutdown()


async def test_resume_continues_with_identical_tokens(engine):
    """Resuming with the first tokens of a generation streams exactly the rest of it; usage counts them all."""
    ids, text, _ = await collect(engine, "orig", spec(max_tokens=20))
    s = spec(max_tokens=20)
    s.resume_token_ids.extend(ids[:8])
    rest, rest_text, last = await collect(engine, "resumed", s)
    assert rest == ids[8:] and detokenize(ids[:8]) + rest_text == text
    assert last.completion_tokens == 20 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH


async def test_a_request_id_in_use_is_refused(engine):
    """A second live request with the same id is refused."""
    stream = engine.generate("dup", spec(max_tokens=100_000), cache_salt="", priority=0)
    with pytest.raises(RequestIdInUse):
        engine.generate("dup", spec(), cache_salt="", priority=0)
    await stream.aclose()


async def test_a_request_larger_than_the_kv_cache_is_invalid():
    """Prompt + max_tokens that could never fit in the KV cache is rejected up front, not queued forever."""
    e = SimEngine(num_kv_blocks=2)
    await e.start()
    try:
        with pytest.raises(InvalidArgument):
            e.generate("big", spec(max_tokens=100), cache_salt="", priority=0)
        assert e.load().waiting == 0
    finally:
        await e.shutdown()


async def test_load_reports_running_kv_and_throughput(engine):
    """load() reports running requests, KV blocks in use and output tokens/s over the recent window."""
    stream = engine.generate("l", spec(max_tokens=100_000), cache_salt="", priority=0)
    for _ in range(5):
        await anext(stream)
    load = engine.load()
    assert load.running == 1 and load.kv_blocks_used >= 1 and load.kv_blocks_total == 32768
    assert load.output_tokens_per_s > 0 and load.prefix_cache_hit_rate == 0.0
    await stream.aclose()


async def test_steps_take_the_modelled_time():
    """Tokens come no faster than the cost model allows: 60 single-stream tokens at speed 10 take >= 60 steps
    of 2.343 ms / 10."""
    e = SimEngine(speed_factor=10.0)
    await e.start()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ids, _, _ = await collect(e, "timed", spec(max_tokens=60))
        elapsed = loop.time() - t0
        modelled = e.timing.modelled_s
        assert modelled == pytest.approx(59 * 0.0002343 + e.cost.step_ms(0, 5) / 10_000, rel=0.01)
        assert elapsed >= modelled * 0.95
    finally:
        await e.shutdown()


async def test_idle_engine_does_not_step(engine):
    """With no requests the step loop waits for work instead of polling."""
    await collect(engine, "x", spec(max_tokens=3))
    steps = engine.timing.steps
    await asyncio.sleep(0.05)
    assert engine.timing.steps == steps


async def test_shutdown_aborts_streams_and_refuses_new_requests():
    """shutdown() ends every live stream with ABORT and later requests get ShuttingDown."""
    e = SimEngine(speed_factor=FAST)
    await e.start()
    stream = e.generate("s", spec(max_tokens=100_000), cache_salt="", priority=0)
    await anext(stream)
    await e.shutdown()
    assert [o async for o in stream][-1].finish_reason == common_pb2.FINISH_REASON_ABORT
    assert e.counters.aborted == 1
    with pytest.raises(ShuttingDown):
        e.generate("late", spec(), cache_salt="", priority=0)
