"""The sim scheduler: batching limits, chunked prefill, paged KV blocks, aborts, priorities and preemption."""

from __future__ import annotations

import itertools

from services.engine.scheduler import BLOCK_SIZE, Scheduler, blocks_for
from services.engine.sim_request import LENGTH, SimRequest

_ids = itertools.count()


def req(
    prompt: int = 10,
    max_tokens: int = 4,
    rank: int = 1,
    rid: str | None = None,
    ids: list[int] | None = None,
    salt: str = "",
) -> SimRequest:
    """A request; its prompt ids are its own (no prefix shared with another request) unless ids are given."""
    n = next(_ids)
    return SimRequest(
        rid or f"r{n}",
        prompt_ids=ids if ids is not None else [n * 10_000 + i for i in range(prompt)],
        resumed_ids=[],
        digest=7,
        max_tokens=max_tokens,
        rank=rank,
        arrival=n,
        cache_salt=salt,
    )


def run_until_idle(s: Scheduler, limit: int = 10_000) -> list[SimRequest]:
    """Step until nothing is left; the requests in the order they finished."""
    done: list[SimRequest] = []
    for _ in range(limit):
        if not s.has_work():
            return done
        done += s.complete(s.schedule())[1]
    raise AssertionError("scheduler did not drain")


def test_admits_at_most_max_num_seqs():
    """A step admits no more sequences than max_num_seqs; the rest wait."""
    s = Scheduler(max_num_seqs=4, max_num_batched_tokens=1000)
    for _ in range(10):
        s.add(req(prompt=10))
    step = s.schedule()
    assert len(step.items) == 4 and len(s.running) == 4 and s.num_waiting == 6
    assert step.prefill_tokens == 40 and step.decode_seqs == 0


def test_step_stays_within_the_token_budget_chunking_the_last_prompt():
    """Prompt tokens scheduled in one step never exceed max_num_batched_tokens; the last admitted prompt is
    cut to fit."""
    s = Scheduler(max_num_seqs=16, max_num_batched_tokens=64)
    reqs = [req(prompt=30) for _ in range(5)]
    for r in reqs:
        s.add(r)
    step = s.schedule()
    assert [n for _, n in step.items] == [30, 30, 4]
    assert step.prefill_tokens == 64


def test_chunked_prefill_splits_a_long_prompt_over_steps():
    """A 5,000-token prompt with a 2,048-token budget prefills in 2048 + 2048 + 904 and emits its first token
    at the end of the third step."""
    s = Scheduler(max_num_batched_tokens=2048)
    r = req(prompt=5000, max_tokens=3)
    s.add(r)
    chunks = []
    for _ in range(3):
        step = s.schedule()
        chunks.append(step.items[0][1])
        emitted, _ = s.complete(step)
        assert emitted == (1 if len(chunks) == 3 else 0)
    assert chunks == [2048, 2048, 904]
    assert r.completion == 1 and r.pending_ids


def test_decode_steps_give_every_running_sequence_one_token():
    """After prefill each step decodes one token per running sequence, priced as decode sequences."""
    s = Scheduler()
    reqs = [req(prompt=8, max_tokens=5) for _ in range(3)]
    for r in reqs:
        s.add(r)
    s.complete(s.schedule())  # prefill, first tokens
    step = s.schedule()
    assert step.decode_seqs == 3 and step.prefill_tokens == 0
    emitted, _ = s.complete(step)
    assert emitted == 3 and all(r.completion == 2 for r in reqs)


def test_decodes_and_new_prefills_share_a_step():
    """Continuous batching: a request arriving mid-generation is prefilled in the same step others decode."""
    s = Scheduler()
    a = req(prompt=8, max_tokens=10)
    s.add(a)
    s.complete(s.schedule())
    b = req(prompt=20)
    s.add(b)
    step = s.schedule()
    assert step.decode_seqs == 1 and step.prefill_tokens == 20


def test_finishes_at_max_tokens_and_frees_its_blocks():
    """A request ends with LENGTH after max_tokens tokens and returns its KV blocks."""
    s = Scheduler()
    r = req(prompt=40, max_tokens=30)
    s.add(r)
    assert run_until_idle(s) == [r]
    assert r.finish_reason == LENGTH and r.completion == 30
    assert s.blocks_used == 0 and not s.running


def test_kv_blocks_track_tokens_in_blocks_of_16():
    """A running request holds ceil(computed tokens / 16) blocks, growing as it decodes."""
    s = Scheduler()
    r = req(prompt=BLOCK_SIZE, max_tokens=100)
    s.add(r)
    s.complete(s.schedule())
    assert s.blocks_used == 1
    s.complete(s.schedule())  # computes token 17
    assert s.blocks_used == 2 == blocks_for(r.num_computed)


def test_a_request_that_cannot_get_blocks_waits():
    """With too few free blocks the next request waits (not admitted) until blocks are freed."""
    s = Scheduler(num_kv_blocks=4)
    a, b = req(prompt=40, max_tokens=2), req(prompt=40, max_tokens=2)
    s.add(a)
    s.add(b)
    step = s.schedule()
    assert [r for r, _ in step.items] == [a] and s.num_waiting == 1
    s.complete(step)
    done = run_until_idle(s)
    assert done == [a, b] and s.blocks_used == 0


def test_abort_frees_blocks_and_queue_slots():
    """Removing a running request frees its blocks; removing a waiting one frees its queue slot; again: False."""
    s = Scheduler(max_num_seqs=1)
    a, b = req(prompt=100, max_tokens=50), req(prompt=10)
    s.add(a)
    s.add(b)
    s.complete(s.schedule())
    assert s.blocks_used == blocks_for(100) and s.num_waiting == 1
    assert s.remove(a) and s.blocks_used == 0 and not s.running
    assert s.remove(b) and s.num_waiting == 0
    assert not s.remove(b) and not s.has_work()


def test_higher_priority_is_admitted_first_then_fcfs():
    """Interactive before standard before batch; first come first served within a tier."""
    s = Scheduler(max_num_seqs=1)
    batch, std1, inter, std2 = req(rank=2), req(rank=1), req(rank=0), req(rank=1)
    for r in (batch, std1, inter, std2):
        s.add(r)
    assert run_until_idle(s) == [inter, std1, std2, batch]


def test_preemption_when_blocks_run_out_keeps_outputs_identical():
    """When a decoding request needs a block and none is free, the latest admitted is preempted and later
    recomputed; both still produce exactly the tokens they produce alone."""

    def alone(**kw) -> list[int]:
        s = Scheduler()
        r = req(**kw)
        s.add(r)
        run_until_idle(s)
        return r.pending_ids

    s = Scheduler(num_kv_blocks=6)
    a, b = req(prompt=30, max_tokens=40), req(prompt=30, max_tokens=40)
    s.add(a)
    s.add(b)
    assert run_until_idle(s) == [a, b]
    assert s.preemptions >= 1 and s.blocks_used == 0
    assert a.pending_ids == b.pending_ids == alone(prompt=30, max_tokens=40)


def test_a_shared_prefix_hits_the_cache_and_skips_its_prefill():
    """A second request with the same first 40 tokens takes 2 cached blocks (32 tokens) and prefills only the
    rest; cached_tokens and the hit stats say so."""
    s = Scheduler()
    prefix = list(range(1000, 1040))
    a = req(ids=prefix + [1, 2, 3])
    s.add(a)
    run_until_idle(s)
    b = req(ids=prefix + [4, 5, 6, 7])
    s.add(b)
    step = s.schedule()
    assert step.items == [(b, 44 - 32)] and step.prefill_tokens == 12
    assert (a.cached_tokens, b.cached_tokens) == (0, 32)
    assert (s.pool.stats.queries, s.pool.stats.hits) == (43 + 44, 32)


def test_a_full_hit_still_computes_the_last_token():
    """An identical 32-token prompt hits only its first block: the last token must be computed to sample."""
    s = Scheduler()
    ids = list(range(500, 532))
    s.add(req(ids=ids))
    run_until_idle(s)
    b = req(ids=ids)
    s.add(b)
    assert s.schedule().items == [(b, 16)] and b.cached_tokens == 16


def test_the_cache_salt_isolates_tenants():
    """The same prompt under another tenant's salt gets no hit; under the same salt it does."""
    s = Scheduler()
    ids = list(range(64))
    s.add(req(ids=ids, salt="tenant-a"))
    run_until_idle(s)
    other, same = req(ids=ids, salt="tenant-b"), req(ids=ids, salt="tenant-a")
    s.add(other)
    run_until_idle(s)
    s.add(same)
    run_until_idle(s)
    assert (other.cached_tokens, same.cached_tokens) == (0, 48)


def test_decoded_blocks_are_cached_too():
    """Blocks filled by generated tokens get hashes (as vLLM caches full blocks of outputs)."""
    s = Scheduler()
    r = req(prompt=10, max_tokens=30)
    s.add(r)
    run_until_idle(s)
    # 10 prompt + 30 outputs: the last output's KV is never computed, so 39 tokens -> 2 full blocks.
    assert len(s.pool.cached) == 2 and list(s.pool.cached) == r.block_hashes[:2]


def test_eviction_under_pressure_takes_unreferenced_cached_blocks():
    """With the pool full of a finished request's cached blocks, a new request evicts them (oldest first)."""
    s = Scheduler(num_kv_blocks=4)
    a = req(prompt=64, max_tokens=1)
    s.add(a)
    run_until_idle(s)
    assert len(s.pool.cached) == 4 and s.blocks_used == 0  # all 64 prompt tokens computed: 4 full blocks
    s.pool.take_events()
    b = req(prompt=40, max_tokens=1)
    s.add(b)
    run_until_idle(s)
    removed = [h for kind, *rest in s.pool.take_events() if kind == "removed" for h in rest[0]]
    assert removed and all(h in a.block_hashes for h in removed)


def test_preemption_takes_the_lowest_priority_first():
    """Out of blocks, the batch-tier request is preempted though the interactive one arrived later: the
    victim is the lowest tier first, then the latest arrival."""
    s = Scheduler(num_kv_blocks=7)
    inter, batch = req(prompt=30, max_tokens=40, rank=0), req(prompt=30, max_tokens=40, rank=2)
    s.add(batch)
    s.add(inter)
    for _ in range(200):
        s.complete(s.schedule())
        if s.preemptions:
            break
    assert s.preemptions == 1 and batch.num_preemptions == 1 and inter.num_preemptions == 0
    assert run_until_idle(s)[0] is inter
