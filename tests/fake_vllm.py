"""A fake of vLLM's AsyncLLM for CPU tests (the one thing the house rules let tests fake): DELTA outputs from a
step task, abort, stat-logger records, a prefix cache that publishes vLLM-shaped KV events over real ZMQ, death."""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import msgspec
import zmq

from services.engine.vllm_backend import VllmApi
from shared import tokenizer as fleet_tokenizer

BLOCK = 16


class FakeEngineDeadError(Exception):
    """Stands for vllm.v1.engine.exceptions.EngineDeadError."""


@dataclass
class FakeSamplingParams:
    """The SamplingParams fields the backend sets."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None
    ignore_eos: bool = False
    detokenize: bool = True
    output_kind: Any = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")


def fake_tokens_input(prompt_token_ids: list[int], *, cache_salt: str | None = None) -> dict:
    """vllm.inputs.tokens_input's shape."""
    out: dict[str, Any] = {"type": "token", "prompt_token_ids": prompt_token_ids}
    if cache_salt is not None:
        out["cache_salt"] = cache_salt
    return out


@dataclass
class _Req:
    request_id: str
    prompt: list[int]
    params: FakeSamplingParams
    priority: int
    cached_tokens: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # Index of the front end (FakeClient) that sent it; None for a single-process AsyncLLM.
    owner: int | None = None
    generated: int = 0
    finished: bool = False


def _vllm_hash(parent: bytes | None, tokens: list[int], extra: tuple | None) -> bytes:
    # Deliberately unlike the fleet hash (as vLLM's SHA-256 over pickled tuples is): the backend must recompute.
    return hashlib.sha256(pickle.dumps((parent, tuple(tokens), extra))).digest()


class FakeAsyncLLM:
    """One token per running request per step (step_s apart); finished outputs for length, stop on the EOS id
    unless ignore_eos, abort. Full prompt blocks enter a prefix cache on admission (BlockStored), evict()
    removes them (BlockRemoved)."""

    def __init__(
        self,
        argv: list[str],
        kv_endpoint: str,
        stat_loggers: list[type],
        *,
        model_dir: str,
        step_s: float = 0.002,
        num_gpu_blocks: int = 1000,
        max_model_len: int = 4096,
        policy: str = "fcfs",
    ) -> None:
        self.argv = argv
        self.step_s = step_s
        self.vllm_config = SimpleNamespace(
            model_config=SimpleNamespace(tokenizer=model_dir, max_model_len=max_model_len),
            cache_config=SimpleNamespace(block_size=BLOCK, num_gpu_blocks=num_gpu_blocks),
            scheduler_config=SimpleNamespace(policy=policy),
        )
        self.loggers = [cls(self.vllm_config, 0) for cls in stat_loggers]
        self.tok = fleet_tokenizer.load(model_dir)
        self.requests: dict[str, _Req] = {}
        self.seen: list[_Req] = []
        self.aborted: list[str] = []
        # Set by a test: a finished generation, when closed, waits for it, so the engine's stream ends (its
        # trailers go out) well after its last chunk.
        self.hold_after_finish: asyncio.Event | None = None
        self.cache: dict[bytes, tuple[bytes | None, list[int]]] = {}
        self.dead = False
        self.stopped = False
        # Stat loggers of each front end's client (add_client), when several share this engine core.
        self.clients: list[list] = []
        self._sched_turn = 0
        self._seq = 0
        # Empty when the replica publishes no KV events (the default without --vllm-kv-events): no socket, as in vLLM.
        self.kv_endpoint = kv_endpoint
        self._pub = zmq.Context.instance().socket(zmq.PUB) if kv_endpoint else None
        if self._pub is not None:
            self._pub.bind(kv_endpoint)
        self._enc = msgspec.msgpack.Encoder()
        self._step_task = asyncio.get_running_loop().create_task(self._steps())

    # -- the AsyncLLM surface the backend uses ----------------------------------------------------

    @property
    def errored(self) -> bool:
        return self.dead

    async def generate(
        self, prompt: dict, params: FakeSamplingParams, request_id: str, *, priority: int = 0, owner=None
    ):
        if self.dead:
            raise FakeEngineDeadError()
        ids = list(prompt["prompt_token_ids"])
        cached = self._admit_blocks(ids, prompt.get("cache_salt"))
        req = _Req(request_id, ids, params, priority, cached, owner=owner)
        self.requests[request_id] = req
        self.seen.append(req)
        try:
            while True:
                out = await req.queue.get()
                if isinstance(out, Exception):
                    raise out
                yield out
                if out.finished:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            await self.abort(request_id)
            raise
        finally:
            if req.finished and request_id not in self.aborted and self.hold_after_finish is not None:
                # The backend closes this generator after the finished output, before its stream ends.
                await self.hold_after_finish.wait()
            self.requests.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        req.finished = True
        self.aborted.append(request_id)
        req.queue.put_nowait(self._output(req, [], "abort"))

    def shutdown(self) -> None:
        self.stopped = True
        self._step_task.cancel()
        if self._pub is not None:
            self._pub.close(linger=0)

    # -- test controls --------------------------------------------------------------------------------

    def kill(self) -> None:
        """The engine-core process died: every stream fails with EngineDeadError, errored turns True."""
        self.dead = True
        for req in list(self.requests.values()):
            req.queue.put_nowait(FakeEngineDeadError())

    def evict(self, vllm_hashes: list[bytes]) -> None:
        for h in vllm_hashes:
            self.cache.pop(h, None)
        self._publish([{"type": "BlockRemoved", "block_hashes": vllm_hashes, "medium": "GPU"}])

    def publish_raw(self, events: list[dict]) -> None:
        self._publish(events)

    # -- internals ------------------------------------------------------------------------------------

    def _admit_blocks(self, ids: list[int], salt: str | None) -> int:
        """Cache the prompt's full blocks as vLLM's block pool would, publishing one BlockStored for the new
        ones; the number of prompt tokens that were cached already."""
        parent: bytes | None = None
        hits = 0
        new_hashes: list[bytes] = []
        new_parent: bytes | None = None
        first_new = None
        extra_keys: list = []
        for i in range(len(ids) // BLOCK):
            chunk = ids[i * BLOCK : (i + 1) * BLOCK]
            extra = (salt,) if (i == 0 and salt) else None
            h = _vllm_hash(parent, chunk, extra)
            if h in self.cache and not new_hashes:
                hits += BLOCK
            else:
                if first_new is None:
                    first_new, new_parent = i, parent
                self.cache[h] = (parent, chunk)
                new_hashes.append(h)
                extra_keys.append(extra)
            parent = h
        if new_hashes:
            start = first_new * BLOCK
            self._publish(
                [
                    {
                        "type": "BlockStored",
                        "block_hashes": new_hashes,
                        "parent_block_hash": new_parent,
                        "token_ids": ids[start : start + len(new_hashes) * BLOCK],
                        "block_size": BLOCK,
                        "lora_id": None,
                        "medium": "GPU",
                        "lora_name": None,
                        "extra_keys": extra_keys,
                    }
                ]
            )
        return hits

    def _publish(self, events: list[dict]) -> None:
        if self._pub is None:
            return
        payload = self._enc.encode([time.time(), events])
        self._pub.send_multipart((b"kv", self._seq.to_bytes(8, "big"), payload))
        self._seq += 1

    def _output(self, req: _Req, ids: list[int], finish: str | None) -> SimpleNamespace:
        text = self.tok.decode(ids) if (ids and req.params.detokenize) else ""
        return SimpleNamespace(
            outputs=[SimpleNamespace(token_ids=ids, text=text, finish_reason=finish)],
            finished=finish is not None,
            num_cached_tokens=req.cached_tokens,
        )

    async def _steps(self) -> None:
        eos = min(self.tok.eos_ids)
        while True:
            await asyncio.sleep(self.step_s)
            if self.dead:
                continue
            live = [r for r in self.requests.values() if not r.finished]
            generated = 0
            for req in live:
                # A word token most of the time; the EOS id every 7th token, which only ignore_eos survives.
                tid = eos if (req.generated + 1) % 7 == 0 else 300 + (len(req.prompt) + req.generated) % 500
                req.generated += 1
                generated += 1
                finish = None
                if tid == eos and not req.params.ignore_eos:
                    finish = "stop"
                elif req.generated >= req.params.max_tokens:
                    finish = "length"
                if finish:
                    req.finished = True
                req.queue.put_nowait(self._output(req, [tid], finish))
            sched = SimpleNamespace(
                num_running_reqs=len(live),
                num_waiting_reqs=0,
                kv_cache_usage=min(1.0, len(self.cache) / self.vllm_config.cache_config.num_gpu_blocks),
                prefix_cache_stats=SimpleNamespace(queries=0, hits=0),
            )
            if self.clients:
                self._record_clients(sched, live)
                continue
            it = SimpleNamespace(num_generation_tokens=generated)
            for lg in self.loggers:
                lg.record(sched, it if generated else None, None, 0)

    def _record_clients(self, sched, live: list[_Req]) -> None:
        """As vLLM's engine core with several front ends: each front end's stat loggers hear the tokens of its
        own requests, and the step's scheduler snapshot goes to one front end only (here, in turn)."""
        self._sched_turn = (self._sched_turn + 1) % len(self.clients)
        for i, loggers in enumerate(self.clients):
            n = sum(1 for r in live if r.owner == i)
            it = SimpleNamespace(num_generation_tokens=n) if n else None
            for lg in loggers:
                lg.record(sched if i == self._sched_turn else None, it, None, 0)

    def add_client(self, stat_loggers: list[type], index: int) -> FakeClient:
        """A front end's AsyncLLM client on this engine core (vLLM's client_index)."""
        while len(self.clients) <= index:
            self.clients.append([])
        self.clients[index] = [cls(self.vllm_config, 0) for cls in stat_loggers]
        return FakeClient(self, index)

    def record_prefix(self, queries: int, hits: int) -> None:
        """One step's prefix-cache stats, as vLLM's scheduler reports them."""
        sched = SimpleNamespace(
            num_running_reqs=0,
            num_waiting_reqs=0,
            kv_cache_usage=0.0,
            prefix_cache_stats=SimpleNamespace(queries=queries, hits=hits),
        )
        for lg in self.loggers:
            lg.record(sched, None, None, 0)


class FakeClient:
    """One front end's AsyncLLM client of a shared FakeAsyncLLM: its requests are tagged with its index, and
    shutting it down leaves the engine core running (the supervisor stops that)."""

    def __init__(self, core: FakeAsyncLLM, index: int) -> None:
        self.core = core
        self.index = index
        self.vllm_config = core.vllm_config

    @property
    def errored(self) -> bool:
        return self.core.dead

    def generate(self, prompt: dict, params: FakeSamplingParams, request_id: str, *, priority: int = 0):
        return self.core.generate(prompt, params, request_id, priority=priority, owner=self.index)

    async def abort(self, request_id: str) -> None:
        req = self.core.requests.get(request_id)
        if req is not None and req.owner == self.index:  # a client aborts only its own requests, as vLLM's
            await self.core.abort(request_id)

    def shutdown(self) -> None:
        pass


def fake_api(model_dir: str | None, engines: list[FakeAsyncLLM] | None = None, **engine_kw) -> VllmApi:
    """A VllmApi whose create_engine builds a FakeAsyncLLM (appended to `engines` for the test to drive) of
    model_dir (None: the engine argv's --model)."""
    cores = engines if engines is not None else []

    def create_engine(argv: list[str], kv_endpoint: str, stat_loggers: list[Any]) -> FakeAsyncLLM:
        llm = FakeAsyncLLM(argv, kv_endpoint, stat_loggers, model_dir=model_dir or _model(argv), **engine_kw)
        if engines is not None:
            engines.append(llm)
        return llm

    def create_client(argv: list[str], kv_endpoint: str, stat_loggers: list[Any], client: dict) -> FakeClient:
        # The first front end's call starts the shared engine core (in a real replica, the supervisor does). A
        # front end in a process of its own (tests/fake_vllm_replica.py) starts one of its own: a non-primary's
        # publishes its KV events on an endpoint beside the primary's, which nobody reads.
        index = client["client_index"]
        if not cores:
            endpoint = kv_endpoint if index == 0 or not kv_endpoint else f"{kv_endpoint}.{index}"
            cores.append(FakeAsyncLLM(argv, endpoint, [], model_dir=model_dir or _model(argv), **engine_kw))
        return cores[0].add_client(stat_loggers, index)

    return VllmApi(
        create_engine=create_engine,
        sampling_params=FakeSamplingParams,
        tokens_input=fake_tokens_input,
        stat_logger_base=object,
        engine_dead_error=FakeEngineDeadError,
        output_kind_delta="DELTA",
        version="fake",
        create_client=create_client,
    )


def _model(argv: list[str]) -> str:
    return argv[argv.index("--model") + 1]


async def first_stored_hashes(generate, events, llm: FakeAsyncLLM, timeout_s: float = 10.0) -> list[int]:
    """The fleet hashes of the first BlockStored batch on `events` (a SubscribeKvEvents iterator past its
    snapshot), generating with `generate(i)` (one short request) until one comes through: the first publishes
    may predate ZMQ's subscription, so the fake's cache is cleared and the prompt sent again."""

    # One task reads the stream: a timed-out wait must not cancel the read itself, as grpc.aio cancels the
    # whole call when a read is cancelled (on a busy box a 0.2 s wait did, and the next read failed CANCELLED).
    batches: asyncio.Queue = asyncio.Queue()

    async def pump() -> None:
        async for item in events:
            batches.put_nowait(item.batch)

    async def until_stored() -> list[int]:
        for i in range(100):
            await generate(i)
            llm.cache.clear()
            try:
                batch = await asyncio.wait_for(batches.get(), 0.2)
            except TimeoutError:
                if reader.done():
                    reader.result()  # the stream ended or failed: say why
                continue
            stored = [h for e in batch.events for h in e.block_stored.block_hashes]
            if stored:
                return stored
        return []

    reader = asyncio.get_running_loop().create_task(pump())
    try:
        return await asyncio.wait_for(until_stored(), timeout_s)
    finally:
        reader.cancel()
