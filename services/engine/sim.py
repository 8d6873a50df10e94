"""SimEngine: the simulated backend. An asyncio step loop runs the scheduler and sleeps each step's modelled
GPU time, so routing and scaling see vLLM-like batching, queueing and timing on a CPU."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb

from services.engine.backend import (
    DEFAULT_MAX_TOKENS,
    PRIORITY_RANK,
    BackendInfo,
    Counters,
    StepOutput,
    TokenRate,
    cap_max_tokens,
    check_admissible,
    check_resume_ids,
)
from services.engine.cost_model import CostModel, FrontEnd
from services.engine.kv_events import DEFAULT_MAX_PENDING, KvEventHub, block_removed, block_stored
from services.engine.scheduler import Scheduler
from services.engine.sim_behaviour import Behaviour
from services.engine.sim_request import ABORT, SimRequest
from services.engine.sim_tokens import REFUSAL_IDS, VOCAB_SIZE, prompt_digest, prompt_token_ids
from shared.errors import FleetError, InvalidArgument
from shared.prefix_hash import BLOCK_SIZE

log = structlog.get_logger(__name__)


class PlantedFault(FleetError):
    """A request failed by a version planted to fail (sim_behaviour.Behaviour.error_rate)."""

    code = grpc.StatusCode.INTERNAL
    reason = "PLANTED_FAULT"


@dataclass(slots=True)
class StepTiming:
    """How the step loop kept up with the cost model (real seconds; modelled time is already divided by the
    speed factor)."""

    steps: int = 0
    modelled_s: float = 0.0
    # Steps that started after their scheduled time, and time given up when the loop fell too far behind.
    late_steps: int = 0
    dropped_s: float = 0.0


class SimEngine:
    """EngineBackend on the cost model. Output token i of a request depends only on (seed, prompt tokens, i)."""

    name = "sim"

    def __init__(
        self,
        *,
        seed: int = 0,
        speed_factor: float = 1.0,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        num_kv_blocks: int = 32768,
        max_model_len: int = 4096,
        enable_prefix_caching: bool = True,
        cost: CostModel | None = None,
        throughput_window_s: float = 5.0,
        max_lag_s: float = 0.02,
        kv_events_max_pending: int = DEFAULT_MAX_PENDING,
        behaviour: Behaviour | None = None,
    ) -> None:
        if speed_factor <= 0:
            raise ValueError(f"speed_factor must be > 0; got {speed_factor}")
        self.seed = seed
        self.speed_factor = speed_factor
        self.behaviour = behaviour or Behaviour()
        self.cost = self.behaviour.slowed(cost or CostModel())
        # The front end's queue, in modelled milliseconds since start() (_model_ms).
        self.frontend = FrontEnd(self.cost)
        self.max_model_len = max_model_len
        self.scheduler = Scheduler(
            max_num_seqs,
            max_num_batched_tokens,
            num_kv_blocks,
            enable_prefix_caching=enable_prefix_caching,
        )
        self.kv_events = KvEventHub(max_pending=kv_events_max_pending)
        self.counters = Counters()
        self.timing = StepTiming()
        self.throughput_window_s = throughput_window_s
        # Lateness up to this is caught up (timer granularity, a slow step); beyond it the debt is dropped,
        # since running steps back to back would model a GPU faster than the real one.
        self.max_lag_s = max_lag_s
        self._requests: dict[str, SimRequest] = {}
        self._arrivals = itertools.count()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._failed = False
        self._rate = TokenRate(throughput_window_s, 0.0)
        self._started_at = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        return self._closing

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._started_at = loop.time()
        self._rate = TokenRate(self.throughput_window_s, self._started_at)
        self._task = loop.create_task(self._run(), name="sim-engine.step-loop")

    async def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        for req in list(self._requests.values()):
            self._abort(req)
        self.kv_events.close()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():
                    raise
            self._task = None
        t = self.timing
        log.info(
            "engine.step_loop_stats",
            steps=t.steps,
            modelled_s=round(t.modelled_s, 3),
            late_steps=t.late_steps,
            dropped_s=round(t.dropped_s, 3),
            preemptions=self.scheduler.preemptions,
            requests_finished=self.counters.finished,
            requests_aborted=self.counters.aborted,
            output_tokens=self.counters.output_tokens,
        )

    # -- requests -----------------------------------------------------------------------------------

    def generate(
        self,
        request_id: str,
        spec: common_pb2.GenerationSpec,
        *,
        cache_salt: str = "",
        priority: int = common_pb2.PRIORITY_UNSPECIFIED,
    ) -> AsyncIterator[StepOutput]:
        check_admissible(
            closing=self._closing,
            running=not self._failed and self._task is not None,
            request_id=request_id,
            live=self._requests,
        )
        sampling = spec.sampling
        max_tokens = sampling.max_tokens or DEFAULT_MAX_TOKENS
        resumed = list(spec.resume_token_ids)
        check_resume_ids(resumed, VOCAB_SIZE)
        prompt_ids = prompt_token_ids(spec)
        max_tokens = cap_max_tokens(len(prompt_ids), len(resumed), max_tokens, self.max_model_len)
        if not self.scheduler.fits(len(prompt_ids) + max_tokens):
            raise InvalidArgument(
                "prompt plus max_tokens exceed this replica's KV cache",
                field_violations=[
                    (
                        "spec.sampling.max_tokens",
                        f"prompt ({len(prompt_ids)} tokens) + max_tokens is too long",
                    )
                ],
            )
        seed = sampling.seed if sampling.HasField("seed") else self.seed
        behaviour = self.behaviour
        if behaviour.fails(self.seed, request_id):
            raise PlantedFault(f"request {request_id} failed: this version is planted to fail some requests")
        refused = behaviour.refuses(self.seed, request_id)
        req = SimRequest(
            request_id,
            prompt_ids=prompt_ids,
            resumed_ids=resumed,
            digest=prompt_digest(seed, prompt_ids),
            max_tokens=max_tokens,
            stops=tuple(s for s in sampling.stop if s),
            rank=PRIORITY_RANK.get(priority, 1),
            arrival=next(self._arrivals),
            cache_salt=cache_salt,
            script=REFUSAL_IDS if refused else None,
            end_at=behaviour.output_cap(max_tokens),
        )
        if req.finish_reason is None:
            self._requests[request_id] = req
            # The front end (tokenizing, hashing, IPC to the engine core) delays the request's admission, behind
            # the work already queued there (other requests, the running ones' output tokens).
            now = self._model_ms()
            at = self.frontend.admit(now, len(prompt_ids))
            asyncio.get_running_loop().call_later((at - now) / (1000.0 * self.speed_factor), self._admit, req)
        else:
            self.counters.finished += 1
        return self._stream(req)

    async def _stream(self, req: SimRequest) -> AsyncIterator[StepOutput]:
        loop = asyncio.get_running_loop()
        try:
            while True:
                if not req.pending_ids and req.finish_reason is None:
                    req.waiter = loop.create_future()
                    await req.waiter
                    continue
                out = req.take_output()
                yield out
                if out.finish_reason is not None:
                    return
        finally:
            # The reader went away (cancelled, closed): free the request's blocks and slot now.
            self._abort(req)

    def _model_ms(self) -> float:
        """Modelled milliseconds since start()."""
        return (asyncio.get_running_loop().time() - self._started_at) * 1000.0 * self.speed_factor

    def _admit(self, req: SimRequest) -> None:
        if req.finish_reason is None:
            self.scheduler.add(req)
            self._wake.set()

    def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        return req is not None and self._abort(req)

    def _abort(self, req: SimRequest) -> bool:
        if req.finish_reason is not None:
            return False
        self.scheduler.remove(req)
        self._requests.pop(req.request_id, None)
        req.finish(ABORT)
        self.counters.aborted += 1
        self._wake.set()  # blocks were freed: a waiting request may fit now
        return True

    # -- load ---------------------------------------------------------------------------------------

    def replica_counters(self) -> Counters:
        return self.counters  # one process is the whole replica

    def load(self) -> common_pb2.ReplicaLoad:
        s = self.scheduler
        stats = s.pool.stats
        running = len(s.running)
        return common_pb2.ReplicaLoad(
            running=running,
            # Requests still in the front end count as waiting: they are queued work the router should see.
            waiting=len(self._requests) - running,
            kv_blocks_used=s.blocks_used,
            kv_blocks_total=s.num_kv_blocks,
            prefix_cache_hit_rate=stats.hit_rate,
            output_tokens_per_s=self.output_tokens_per_s(),
            in_flight_tokens=sum(r.tokens_left() for r in self._requests.values()),
            prefix_cache_queried_tokens=stats.queries,
            prefix_cache_hit_tokens=stats.hits,
        )

    def info(self) -> BackendInfo:
        return BackendInfo(BLOCK_SIZE, self.scheduler.num_kv_blocks, self.max_model_len)

    # -- KV events ----------------------------------------------------------------------------------

    def subscribe_kv_events(self, include_snapshot: bool) -> AsyncIterator[engine_pb.KvEventBatch]:
        return self.kv_events.subscribe(include_snapshot, self._snapshot)

    def _snapshot(self) -> list[engine_pb.KvEvent]:
        """Every cached block, as BlockStored events; consecutive links of one chain share an event."""
        events: list[engine_pb.KvEvent] = []
        hashes: list[int] = []
        tokens: list[int] = []
        parent: int | None = None
        for h, b in self.scheduler.pool.cached.items():
            if hashes and b.parent_hash != hashes[-1]:
                events.append(block_stored(hashes, parent, tokens, BLOCK_SIZE))
                hashes, tokens = [], []
            if not hashes:
                parent = b.parent_hash
            hashes.append(h)
            tokens.extend(b.token_ids)
        if hashes:
            events.append(block_stored(hashes, parent, tokens, BLOCK_SIZE))
        return events

    def _publish_kv_events(self) -> None:
        items = self.scheduler.pool.take_events()
        if not items or not self.kv_events.active:
            return
        events = []
        for item in items:
            if item[0] == "stored":
                events.append(block_stored(item[1], item[2], item[3], BLOCK_SIZE))
            elif item[0] == "removed":
                events.append(block_removed(item[1]))
            else:
                events.append(engine_pb.KvEvent(all_blocks_cleared=engine_pb.AllBlocksCleared()))
        self.kv_events.publish(events)

    def output_tokens_per_s(self) -> float:
        """Output tokens per second (real time) over the last throughput window."""
        if self._task is None:
            return 0.0
        return self._rate.rate(asyncio.get_running_loop().time())

    # -- the step loop ------------------------------------------------------------------------------

    async def _run(self) -> None:
        try:
            await self._steps()
        except asyncio.CancelledError:
            raise
        except Exception:
            # A bug in the loop must not leave streams hanging: end them all and refuse new requests.
            log.exception("engine.step_loop_failed")
            self._failed = True
            for req in list(self._requests.values()):
                self._abort(req)

    async def _steps(self) -> None:
        loop = asyncio.get_running_loop()
        sched, cost, timing = self.scheduler, self.cost, self.timing
        scale = 1.0 / (1000.0 * self.speed_factor)
        next_at = loop.time()
        while True:
            if not sched.has_work():
                self._wake.clear()
                await self._wake.wait()
                next_at = loop.time()
                continue
            step = sched.schedule()
            if not step.items:
                # Nothing can run until a request arrives or leaves (only if blocks are short): wait for that.
                self._wake.clear()
                await self._wake.wait()
                next_at = loop.time()
                continue
            # Steps are timed against the loop clock: the time spent scheduling and streaming comes out of the
            # step's sleep instead of adding to it.
            dt = (
                cost.step_ms(step.decode_seqs, step.prefill_tokens, step.context_tokens, step.max_context)
                * scale
            )
            next_at += dt
            delay = next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            else:
                timing.late_steps += 1
                if -delay > self.max_lag_s:
                    timing.dropped_s += -delay
                    next_at = loop.time()
                await asyncio.sleep(0)  # let the streams and RPCs run even when behind
            emitted, finished = sched.complete(step)
            self._publish_kv_events()
            timing.steps += 1
            timing.modelled_s += dt
            if emitted:
                self.counters.output_tokens += emitted
                now = loop.time()
                self.frontend.outputs((now - self._started_at) * 1000.0 * self.speed_factor, emitted)
                self._rate.add(now, emitted)
            if finished:
                self.counters.finished += len(finished)
                requests = self._requests
                for req in finished:
                    requests.pop(req.request_id, None)
