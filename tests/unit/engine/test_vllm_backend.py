"""The vllm backend against a fake AsyncLLM: tokenization, streaming, resume, abort, load, KV-event translation
(over real ZMQ), priority and engine death."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from fleetserve.common.v1 import common_pb2

from services.engine.backend import EngineBackend, RequestIdInUse
from services.engine.vllm_backend import VllmBackend, engine_argv
from services.engine.vllm_kv_events import KvEventTranslator, salt_of
from shared import tokenizer as fleet_tokenizer
from shared.errors import InvalidArgument, ShuttingDown, Unavailable
from shared.prefix_hash import block_hashes, hash_block
from tests.fake_vllm import FakeAsyncLLM, fake_api
from tests.support import assert_eventually

pytest.importorskip("zmq", reason="the vllm backend reads KV events with pyzmq (pip install -e .[vllm])")
pytest.importorskip(
    "msgspec", reason="the vllm backend decodes KV events with msgspec (pip install -e .[vllm])"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    from infra.models.generate import main as generate

    out = tmp_path_factory.mktemp("model") / "tiny"
    generate([str(out), "--size", "tiny"])
    return str(out)


@contextlib.asynccontextmanager
async def backend(model_dir: str, **engine_kw):
    engines: list[FakeAsyncLLM] = []
    b = VllmBackend(
        engine_argv("--model m", max_num_seqs=8, max_num_batched_tokens=64),
        api=fake_api(model_dir, engines, **engine_kw),
        replica_id="t",
        health_poll_s=0.01,
    )
    await b.start()
    try:
        yield b, engines[0]
    finally:
        await b.shutdown()


def spec(prompt: str = "hello there", max_tokens: int = 8, **sampling) -> common_pb2.GenerationSpec:
    return common_pb2.GenerationSpec(
        prompt=prompt, sampling=common_pb2.SamplingParams(max_tokens=max_tokens, **sampling)
    )


async def subscribed(sub, llm: FakeAsyncLLM) -> None:
    """Publish cache-clears until one comes through: ZMQ drops what a PUB socket sends before the SUB's
    subscription reaches it (vLLM's engine start gives it seconds; a test gives it none)."""
    reader = asyncio.create_task(anext(sub))
    try:
        for _ in range(500):
            llm.publish_raw([{"type": "AllBlocksCleared"}])
            done, _ = await asyncio.wait({reader}, timeout=0.01)
            if done:
                assert reader.result().events[0].HasField("all_blocks_cleared")
                return
        raise AssertionError("the KV-event reader never received a batch")
    finally:
        reader.cancel()


async def collect(stream) -> list:
    return [out async for out in stream]


def test_engine_argv_puts_replica_limits_first_so_vllm_args_win():
    """The replica's batch limits are defaults that --vllm-args can override (argparse keeps the last)."""
    argv = engine_argv("--model /m --max-num-seqs 64", max_num_seqs=256, max_num_batched_tokens=2048)
    assert argv[:4] == ["--max-num-seqs", "256", "--max-num-batched-tokens", "2048"]
    assert argv[4:] == ["--model", "/m", "--max-num-seqs", "64"]


async def test_is_an_engine_backend_with_info_from_vllm_config(model_dir):
    """The backend satisfies the EngineBackend protocol and reports vLLM's KV geometry."""
    async with backend(model_dir, num_gpu_blocks=777, max_model_len=2048) as (b, _):
        assert isinstance(b, EngineBackend)
        info = b.info()
        assert (info.block_size, info.kv_blocks_total, info.max_model_len) == (16, 777, 2048)


async def test_prompt_is_tokenized_by_the_fleet_tokenizer_and_streamed_as_deltas(model_dir):
    """vLLM gets the fleet tokenizer's ids, the tenant's salt and DELTA outputs; the stream carries every token
    once, completion counts them, and the last output says LENGTH."""
    tok = fleet_tokenizer.load(model_dir)
    async with backend(model_dir) as (b, llm):
        outs = await collect(
            b.generate("r1", spec("the quick brown fox", 12, ignore_eos=True), cache_salt="acme")
        )
        req = llm.seen[0]
        assert req.prompt == tok.encode("the quick brown fox")
        assert req.params.output_kind == "DELTA" and req.params.max_tokens == 12 and req.params.ignore_eos
        assert sum(len(o.token_ids) for o in outs) == 12
        assert [o.finish_reason for o in outs[:-1]] == [None] * (len(outs) - 1)
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert outs[-1].completion_tokens == 12 and outs[-1].prompt_tokens == len(req.prompt)
        assert "".join(o.text for o in outs) == tok.decode([t for o in outs for t in o.token_ids])
        assert b.counters.finished == 1 and b.counters.output_tokens == 12
        assert b.load().in_flight_tokens == 0


async def test_chat_is_rendered_with_the_fleet_template(model_dir):
    """Chat messages reach vLLM as encode_chat's ids (the same template vLLM's tokenizer_config holds)."""
    tok = fleet_tokenizer.load(model_dir)
    msgs = [common_pb2.ChatMessage(role="user", content="hi")]
    s = common_pb2.GenerationSpec(messages=msgs, sampling=common_pb2.SamplingParams(max_tokens=2))
    async with backend(model_dir) as (b, llm):
        await collect(b.generate("c1", s))
        assert llm.seen[0].prompt == tok.encode_chat(msgs)


async def test_eos_stops_unless_ignore_eos(model_dir):
    """A sampled EOS ends the request with STOP (the fake emits EOS as the 7th token)."""
    async with backend(model_dir) as (b, _):
        outs = await collect(b.generate("e1", spec(max_tokens=50)))
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_STOP
        assert outs[-1].completion_tokens == 7


async def test_resume_appends_tokens_and_bounds_the_whole_generation(model_dir):
    """Resumed tokens extend the prompt; max_tokens covers them too and completion counts them."""
    tok = fleet_tokenizer.load(model_dir)
    async with backend(model_dir) as (b, llm):
        s = spec("resume me", 10, ignore_eos=True)
        s.resume_token_ids.extend([400, 401, 402])
        outs = await collect(b.generate("r2", s))
        assert llm.seen[0].prompt == tok.encode("resume me") + [400, 401, 402]
        assert llm.seen[0].params.max_tokens == 7
        assert sum(len(o.token_ids) for o in outs) == 7 and outs[-1].completion_tokens == 10
        # Resumed after the last token: finished at once, vLLM not asked.
        done = spec("x", 3)
        done.resume_token_ids.extend([5, 6, 7])
        outs = await collect(b.generate("r3", done))
        assert [(o.finish_reason, o.completion_tokens) for o in outs] == [
            (common_pb2.FINISH_REASON_LENGTH, 3)
        ]
        assert len(llm.seen) == 1


async def test_bad_requests_are_refused_up_front(model_dir):
    """Out-of-vocabulary resume ids, prompts that cannot fit, reused ids, a closing engine: typed errors."""
    async with backend(model_dir, max_model_len=64) as (b, _):
        bad = spec()
        bad.resume_token_ids.append(10**6)
        with pytest.raises(InvalidArgument):
            b.generate("b1", bad)
        with pytest.raises(InvalidArgument):
            b.generate("b2", spec("word " * 80, 8))
        stream = b.generate("b3", spec(max_tokens=10))
        with pytest.raises(RequestIdInUse):
            b.generate("b3", spec())
        await collect(stream)
    with pytest.raises(ShuttingDown):
        b.generate("b4", spec())


async def test_max_tokens_is_capped_at_the_context_length_as_in_the_sim(model_dir):
    """A prompt that fits but leaves less room than max_tokens (the default included) is generated up to
    max_model_len with finish reason LENGTH, not refused: the sim and vLLM backends answer alike."""
    tok = fleet_tokenizer.load(model_dir)
    async with backend(model_dir, max_model_len=64) as (b, llm):
        prompt = "word " * 40
        n = len(tok.encode(prompt))
        assert 16 < n < 64 - 8
        outs = await collect(b.generate("cap", spec(prompt, 0, ignore_eos=True)))
        assert llm.seen[0].params.max_tokens == 64 - n
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert outs[-1].completion_tokens == 64 - n


async def test_abort_ends_the_stream_with_abort_once(model_dir):
    """abort() is True once for a live request, vLLM aborts it, and the stream ends with ABORT."""
    async with backend(model_dir, step_s=0.005) as (b, llm):
        stream = b.generate("a1", spec(max_tokens=1000, ignore_eos=True))
        first = await anext(stream)
        assert first.finish_reason is None
        assert b.abort("a1") is True
        assert b.abort("a1") is False
        rest = await collect(stream)
        assert rest[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert llm.aborted == ["a1"]
        assert b.counters.aborted == 1 and b.counters.finished == 0
        assert b.abort("unknown") is False


async def test_closing_the_stream_aborts_in_vllm(model_dir):
    """A reader that goes away (the servicer's stream cancelled) aborts the request in vLLM."""
    async with backend(model_dir, step_s=0.005) as (b, llm):
        stream = b.generate("x1", spec(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        await stream.aclose()
        assert llm.aborted == ["x1"]
        assert b.counters.aborted == 1
        assert b.load().in_flight_tokens == 0 and b.load().running == 0


async def test_cancelled_reader_aborts_in_vllm(model_dir):
    """Cancelling the task that reads the stream (a gRPC caller gone) aborts the request in vLLM."""
    async with backend(model_dir, step_s=0.005) as (b, llm):
        started = asyncio.Event()

        async def read():
            async for _ in b.generate("x2", spec(max_tokens=1000, ignore_eos=True)):
                started.set()

        task = asyncio.create_task(read())
        await asyncio.wait_for(started.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert llm.aborted == ["x2"]
        assert b.counters.aborted == 1


async def test_load_comes_from_the_stat_logger(model_dir):
    """Running, KV usage and tokens/s follow what vLLM's stat logger records; prefix counters accumulate."""
    async with backend(model_dir, step_s=0.002) as (b, llm):
        streams = [b.generate(f"l{i}", spec(f"prompt {i}", 2000, ignore_eos=True)) for i in range(3)]
        for s in streams:
            await anext(s)
        load = await assert_eventually(lambda: (lo := b.load()).running == 3 and lo, timeout_s=5)
        assert load.output_tokens_per_s > 0
        assert load.in_flight_tokens > 0
        assert load.kv_blocks_total == 1000
        llm.record_prefix(queries=100, hits=25)
        llm.record_prefix(queries=100, hits=75)
        load = b.load()
        assert (load.prefix_cache_queried_tokens, load.prefix_cache_hit_tokens) == (200, 100)
        assert load.prefix_cache_hit_rate == pytest.approx(0.5)
        for s in streams:
            await s.aclose()
        assert b.load().running == 0


async def test_priority_is_passed_only_under_vllms_priority_policy(model_dir):
    """Interactive is served first under --scheduling-policy priority; under fcfs vLLM gets 0 for all."""
    async with backend(model_dir, policy="priority") as (b, llm):
        await collect(b.generate("p1", spec(max_tokens=1), priority=common_pb2.PRIORITY_INTERACTIVE))
        await collect(b.generate("p2", spec(max_tokens=1), priority=common_pb2.PRIORITY_BATCH))
        assert [r.priority for r in llm.seen] == [0, 2]
    async with backend(model_dir) as (b, llm):
        await collect(b.generate("p3", spec(max_tokens=1), priority=common_pb2.PRIORITY_BATCH))
        assert llm.seen[0].priority == 0


async def test_kv_events_carry_fleet_hashes_recomputed_from_tokens_and_salt(model_dir):
    """vLLM's stored/removed blocks arrive (over its ZMQ publisher) as fleet hashes that equal what a router
    computes from the same prompt and salt; a later subscriber's snapshot lists what is cached."""
    tok = fleet_tokenizer.load(model_dir)
    prompt = "one two three four five six seven eight nine ten " * 6
    ids = tok.encode(prompt)
    assert len(ids) >= 48
    async with backend(model_dir) as (b, llm):
        sub = b.subscribe_kv_events(include_snapshot=False)
        await subscribed(sub, llm)
        await collect(b.generate("k1", spec(prompt, 1), cache_salt="tenant-a"))
        batch = await asyncio.wait_for(anext(sub), 5)
        stored = batch.events[0].block_stored
        want = block_hashes(ids, "tenant-a")
        assert list(stored.block_hashes) == want
        assert not stored.HasField("parent_block_hash")
        assert list(stored.token_ids) == ids[: len(want) * 16] and stored.block_size == 16
        assert want != block_hashes(ids, "tenant-b")  # salts keep tenants apart

        # A second request sharing the first two blocks stores only its own tail, chained to the shared parent.
        ids2 = ids[:32] + tok.encode(" completely different words follow here now", add_bos=False) * 3
        prompt2 = tok.decode(ids2)
        assert tok.encode(prompt2)[:32] == ids[:32]
        await collect(b.generate("k2", spec(prompt2, 1), cache_salt="tenant-a"))
        batch = await asyncio.wait_for(anext(sub), 5)
        tail = batch.events[0].block_stored
        full2 = block_hashes(tok.encode(prompt2), "tenant-a")
        assert tail.parent_block_hash == full2[1] and list(tail.block_hashes) == full2[2:]

        # Eviction: vLLM's hashes in, fleet hashes out.
        vllm_first = next(h for h, (parent, _) in llm.cache.items() if parent is None)
        llm.evict([vllm_first])
        batch = await asyncio.wait_for(anext(sub), 5)
        assert list(batch.events[0].block_removed.block_hashes) == [want[0]]

        snap = await asyncio.wait_for(anext(b.subscribe_kv_events(include_snapshot=True)), 5)
        assert snap.snapshot
        cached = {h for e in snap.events for h in e.block_stored.block_hashes}
        assert cached == (set(want) | set(full2)) - {want[0]}
        await sub.aclose()


def test_translator_skips_partial_and_orphan_blocks_and_clears():
    """Partial blocks and blocks whose parent was never seen cannot be fleet-hashed and are counted; a cleared
    cache empties the index."""
    t = KvEventTranslator(16)
    toks = list(range(100, 132))
    evs = t.translate(
        [
            {"type": "BlockStored", "block_hashes": [b"p"], "parent_block_hash": None, "token_ids": toks[:5],
             "block_size": 5},
            {"type": "BlockStored", "block_hashes": [b"o"], "parent_block_hash": b"?", "token_ids": toks[:16],
             "block_size": 16},
            {"type": "BlockStored", "block_hashes": [b"a", b"b"], "parent_block_hash": None, "token_ids": toks,
             "block_size": 16, "extra_keys": [None, None]},
        ]
    )  # fmt: skip
    assert len(evs) == 1 and list(evs[0].block_stored.block_hashes) == block_hashes(toks)
    assert (t.stats.partial_blocks, t.stats.orphan_blocks, len(t)) == (1, 1, 2)
    evs = t.translate([{"type": "AllBlocksCleared"}])
    assert evs[0].HasField("all_blocks_cleared") and len(t) == 0
    assert t.translate([{"type": "BlockRemoved", "block_hashes": [b"a"]}]) == []


def test_salt_comes_from_the_first_blocks_extra_keys():
    """vLLM carries the cache salt in the first block's extra keys; no keys means no salt."""
    assert salt_of([("tenant",), None]) == "tenant"
    assert salt_of([None]) == "" and salt_of(None) == ""
    assert hash_block(None, [1] * 16, "tenant") != hash_block(None, [1] * 16, "")


async def test_engine_death_is_detected_idle_and_mid_stream(model_dir):
    """A dead engine core fails live streams with UNAVAILABLE (ENGINE_DEAD), sets `dead`, refuses new work."""
    async with backend(model_dir, step_s=0.005) as (b, llm):
        stream = b.generate("d1", spec(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        llm.kill()
        with pytest.raises(Unavailable) as e:
            await collect(stream)
        assert e.value.reason == "ENGINE_DEAD"
        await asyncio.wait_for(b.dead.wait(), 5)
        with pytest.raises(Unavailable):
            b.generate("d2", spec())
    async with backend(model_dir) as (b, llm):
        llm.dead = True  # idle replica: only the watchdog can notice
        await asyncio.wait_for(b.dead.wait(), 5)


async def test_shutdown_aborts_live_streams(model_dir):
    """Shutdown aborts what is running (the stream ends with ABORT) and stops vLLM."""
    async with backend(model_dir, step_s=0.005) as (b, llm):
        stream = b.generate("s1", spec(max_tokens=1000, ignore_eos=True))
        await anext(stream)
        reader = asyncio.create_task(collect(stream))
        await b.shutdown()
        outs = await asyncio.wait_for(reader, 5)
        assert outs[-1].finish_reason == common_pb2.FINISH_REASON_ABORT
        assert llm.stopped
