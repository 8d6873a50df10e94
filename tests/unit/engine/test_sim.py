"""The sim engine end to end without a network: streaming, determinism, stop strings, aborts, resume, load,
timing against the cost model, and shutdown."""

from __future__ import annotations

import asyncio

import pytest
from fleetserve.common.v1 import common_pb2

from services.engine.backend import EngineBackend, RequestIdInUse
from services.engine.sim import SimEngine
from services.engine.sim_tokens import TOKEN_TEXT, TOKENIZER, detokenize
from shared.errors import InvalidArgument, ShuttingDown
from shared.prefix_hash import block_hashes
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
    """A generation streams max_tokens tokens whose text is what the tokenizer decodes, and ends with LENGTH and
    usage counts (prompt tokens as the fleet tokenizer counts them, BOS included)."""
    ids, text, last = await collect(engine, "a", spec(max_tokens=12))
    assert len(ids) == 12 and text == detokenize(ids)
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    prompt_tokens = len(TOKENIZER.encode("tell me a story"))
    assert last.completion_tokens == 12 and last.prompt_tokens == prompt_tokens and last.cached_tokens == 0
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


async def test_resume_with_stop_strings_delivers_the_held_back_text(engine):
    """Text held back for stop-string matching when an attempt dies is delivered by the resumed attempt: what
    the client got before the cut plus the resumed stream is the whole text, nothing lost or repeated."""
    never = "\x00no such stop"  # held back: len - 1 characters, never matched
    whole_ids, whole_text, _ = await collect(engine, "whole", spec(max_tokens=24, stop=[never]))
    got_ids, got_text = [], []
    async for out in engine.generate("first", spec(max_tokens=24, stop=[never]), cache_salt="", priority=0):
        got_ids += out.token_ids
        got_text.append(out.text)
        if len(got_ids) >= 8:
            break  # the replica "dies" here: the router has these ids and this text
    s = spec(max_tokens=24, stop=[never])
    s.resume_token_ids.extend(got_ids)
    rest_ids, rest_text, last = await collect(engine, "resumed", s)
    assert got_ids + rest_ids == whole_ids
    assert "".join(got_text) + rest_text == whole_text
    assert last.completion_tokens == 24


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
    assert load.in_flight_tokens > 0 and load.prefix_cache_queried_tokens > 0
    assert load.output_tokens_per_s > 0 and load.prefix_cache_hit_rate == 0.0
    await stream.aclose()


async def test_steps_take_the_modelled_time():
    """Tokens come no faster than the cost model allows: 60 single-stream tokens at speed 10 take a prefill
    step and 59 decode steps of the model's time / 10."""
    e = SimEngine(speed_factor=10.0)
    await e.start()
    try:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        ids, _, _ = await collect(e, "timed", spec(max_tokens=60))
        elapsed = loop.time() - t0
        modelled = e.timing.modelled_s
        prompt = len(TOKENIZER.encode("tell me a story"))
        expected = (59 * e.cost.step_ms(1, 0) + e.cost.step_ms(0, prompt)) / 10_000
        assert modelled == pytest.approx(expected, rel=0.01)
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


async def test_a_cached_prefix_is_reported_and_skips_prefill(engine):
    """The second request with a long shared prefix reports cached tokens and its prefill is cheaper; the load
    report counts queried and hit tokens."""
    prefix = "You are a careful assistant who answers briefly. " * 20
    _, _, first = await collect(engine, "p1", spec(prompt=prefix + "First question?", max_tokens=2))
    steps_before = engine.timing.modelled_s
    _, _, second = await collect(engine, "p2", spec(prompt=prefix + "Second one?", max_tokens=2))
    assert first.cached_tokens == 0 and second.cached_tokens >= 16 * 10
    assert second.cached_tokens % 16 == 0 and second.cached_tokens < second.prompt_tokens
    load = engine.load()
    assert load.prefix_cache_hit_tokens == second.cached_tokens
    assert load.prefix_cache_queried_tokens == first.prompt_tokens + second.prompt_tokens
    assert load.prefix_cache_hit_rate == pytest.approx(
        second.cached_tokens / load.prefix_cache_queried_tokens
    )
    assert engine.timing.modelled_s - steps_before < steps_before  # less GPU time than the cold request


async def test_another_tenants_salt_gets_no_hit(engine):
    """The same prompt under a different cache salt is not served from the cache."""
    prompt = "shared system prompt for every tenant " * 10
    for rid, salt in (("a1", "tenant-a"), ("b1", "tenant-b"), ("a2", "tenant-a")):
        outs = [o async for o in engine.generate(rid, spec(prompt=prompt, max_tokens=1), cache_salt=salt)]
        cached = outs[-1].cached_tokens
        assert (cached > 0) == (rid == "a2"), rid


async def test_in_flight_tokens_count_prompt_left_and_outputs_to_go():
    """in_flight_tokens is the prompt not yet prefilled plus the outputs still to generate, over all requests."""
    e = SimEngine(speed_factor=0.001)  # so slow that nothing is computed during the test
    await e.start()
    try:
        streams = [e.generate(f"f{i}", spec(max_tokens=50), cache_salt="") for i in range(3)]
        prompt = len(TOKENIZER.encode("tell me a story"))
        load = e.load()
        assert load.waiting == 3 and load.running == 0
        assert load.in_flight_tokens == 3 * (prompt + 50)
        for s in streams:
            await s.aclose()
    finally:
        await e.shutdown()


async def test_max_model_len_bounds_prompts_and_generations():
    """A prompt as long as the context is refused; a generation stops at the context length (LENGTH)."""
    e = SimEngine(speed_factor=FAST, max_model_len=64)
    await e.start()
    try:
        with pytest.raises(InvalidArgument):
            e.generate("long", spec(prompt="word " * 100), cache_salt="")
        ids, _, last = await collect(e, "capped", spec(max_tokens=1000))
        assert last.prompt_tokens + len(ids) == 64
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert e.info().max_model_len == 64 and e.info().block_size == 16
    finally:
        await e.shutdown()


async def test_kv_events_report_stored_then_removed_blocks_with_fleet_hashes():
    """A subscriber gets BlockStored with the request's salted chain hashes, then BlockRemoved when another
    request's blocks evict them; seq numbers run 1, 2, 3... and a snapshot comes first when asked."""
    e = SimEngine(speed_factor=FAST, num_kv_blocks=12)
    await e.start()
    try:
        stream = e.subscribe_kv_events(include_snapshot=True)
        snap = await anext(stream)
        assert snap.snapshot and snap.seq == 1 and not snap.events
        prompt_a = "alpha beta gamma delta " * 12
        await collect_salted(e, "a", spec(prompt=prompt_a, max_tokens=1), "t1")
        ids_a = TOKENIZER.encode(prompt_a)
        want = block_hashes(ids_a, "t1")
        stored = await anext(stream)
        assert stored.seq == 2 and not stored.snapshot
        ev = stored.events[0].block_stored
        assert list(ev.block_hashes) == want and not ev.HasField("parent_block_hash")
        assert list(ev.token_ids) == ids_a[: 16 * len(want)] and ev.block_size == 16
        # A different prompt (177 tokens: 12 blocks with its output) needs every block: it evicts a's.
        await collect_salted(e, "b", spec(prompt="zeta eta theta iota " * 25, max_tokens=1), "t1")
        removed: set[int] = set()
        for _ in range(10):
            batch = await asyncio.wait_for(anext(stream), 5)
            removed |= {
                h
                for ev in batch.events
                if ev.HasField("block_removed")
                for h in ev.block_removed.block_hashes
            }
            if removed >= set(want):
                break
        assert removed >= set(want)
        # A new subscriber's snapshot lists exactly what is cached now.
        snap2 = await anext(e.subscribe_kv_events(include_snapshot=True))
        listed = {h for ev in snap2.events for h in ev.block_stored.block_hashes}
        assert snap2.snapshot and listed == set(e.scheduler.pool.cached)
    finally:
        await e.shutdown()


async def collect_salted(engine: SimEngine, rid: str, s: common_pb2.GenerationSpec, salt: str):
    return [o async for o in engine.generate(rid, s, cache_salt=salt)]


async def test_a_slow_kv_subscriber_sees_a_gap_not_unbounded_memory():
    """A subscriber that does not read keeps at most max_pending batches; the oldest are dropped (a seq gap)."""
    e = SimEngine(speed_factor=FAST, kv_events_max_pending=2)
    await e.start()
    try:
        stream = e.subscribe_kv_events(include_snapshot=False)
        reader = asyncio.ensure_future(anext(stream))  # registered, then not read while requests run
        await asyncio.sleep(0)
        for i in range(5):
            await collect_salted(e, f"g{i}", spec(prompt=f"{i} " * 40 + "distinct", max_tokens=1), "")
        first = await reader
        rest = [await anext(stream) for _ in range(2)]
        assert first.seq == 1 and [b.seq for b in rest] == [4, 5]
    finally:
        await e.shutdown()
