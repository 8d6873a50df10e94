"""VllmBackend: the EngineBackend on vLLM's AsyncLLM (one GPU per worker). Prompts are tokenized by the fleet's
tokenizer so prefix hashes agree fleet-wide; load comes from a vLLM stat logger, KV events from vLLM's ZMQ
publisher; a dead engine core turns the replica NOT_SERVING."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from services.engine.kv_events import KvEventHub
from services.engine.load_board import LoadBoard, ReplicaTotals
from services.engine.vllm_kv_events import KvEventTranslator, ZmqKvEventReader
from shared import tokenizer as fleet_tokenizer
from shared.errors import InvalidArgument, KvEventsOff, Unavailable
from shared.prefix_hash import BLOCK_SIZE

log = structlog.get_logger(__name__)

STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH
ABORT = common_pb2.FINISH_REASON_ABORT
# vLLM's finish reasons; "error" is not here: it is a failed request, not a finished one.
_FINISH = {"stop": STOP, "length": LENGTH, "abort": ABORT, "repetition": STOP}
KV_TOPIC = "kv"


@dataclass(frozen=True)
class VllmApi:
    """The vLLM surface this backend touches, gathered in one place so CPU tests can supply a fake AsyncLLM."""

    # (engine argv, KV-event endpoint, stat logger factories) -> a started AsyncLLM.
    create_engine: Callable[[list[str], str, list[Any]], Any]
    sampling_params: Callable[..., Any]
    tokens_input: Callable[..., Any]
    stat_logger_base: type
    engine_dead_error: type[BaseException]
    output_kind_delta: Any
    version: str
    # Several front-end processes on one engine core (vLLM's multi-API-server mode), None where unsupported:
    # (engine argv, KV-event endpoint, front-end count) -> a context manager that starts the engine core and
    # yields (one client config per front end, the engine-core process manager); the engine core finishes
    # starting when the context exits, as vllm serve --api-server-count N does with launch_core_engines.
    launch_core: Callable[[list[str], str, int], Any] | None = None
    # (engine argv, KV-event endpoint, stat logger factories, client config) -> a started AsyncLLM client.
    create_client: Callable[[list[str], str, list[Any], dict], Any] | None = None


def engine_argv(vllm_args: str, *, max_num_seqs: int, max_num_batched_tokens: int) -> list[str]:
    """vLLM's flags: the replica's batch limits first (so the sim and vLLM schedule alike), then --vllm-args,
    whose flags win (argparse keeps the last)."""
    return [
        "--max-num-seqs",
        str(max_num_seqs),
        "--max-num-batched-tokens",
        str(max_num_batched_tokens),
        *shlex.split(vllm_args),
    ]


def load_vllm_api() -> VllmApi:
    """The real vLLM 0.25 API (imported here, so the rest of the engine runs without vLLM installed)."""
    import dataclasses

    # vLLM forks its engine-core process by default; this process already runs gRPC threads (the OTLP
    # exporter's channel), which a forked child can deadlock on. Spawn starts it clean.
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

    import vllm
    from vllm.config.kv_events import KVEventsConfig
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind, SamplingParams
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError
    from vllm.v1.metrics.loggers import StatLoggerBase

    def engine_args(argv: list[str], kv_endpoint: str, **private: int) -> Any:
        parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="--vllm-args"))
        args = AsyncEngineArgs.from_cli_args(parser.parse_args(argv))
        if args.block_size not in (None, BLOCK_SIZE):
            raise ValueError(
                f"--block-size must be {BLOCK_SIZE}: fleet prefix hashes cover {BLOCK_SIZE}-token blocks"
            )
        args = dataclasses.replace(
            args,
            enable_prefix_caching=True,
            block_size=BLOCK_SIZE,
            # Our stat logger is the only consumer; vLLM's periodic log lines are not wanted.
            disable_log_stats=True,
        )
        if kv_endpoint:  # empty: this replica publishes no KV events (the default; on with --vllm-kv-events)
            args = dataclasses.replace(
                args,
                kv_events_config=KVEventsConfig(
                    enable_kv_cache_events=True, publisher="zmq", endpoint=kv_endpoint, topic=KV_TOPIC
                ),
            )
        # vLLM's private front-end count and rank (vllm serve sets them the same way for its API servers).
        for name, value in private.items():
            setattr(args, name, value)
        return args

    def create_engine(argv: list[str], kv_endpoint: str, stat_loggers: list[Any]) -> Any:
        return AsyncLLM.from_engine_args(engine_args(argv, kv_endpoint), stat_loggers=stat_loggers)

    @contextlib.contextmanager
    def launch_core(argv: list[str], kv_endpoint: str, count: int):
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.utils import get_engine_zmq_addresses, launch_core_engines
        from vllm.v1.executor import Executor

        args = engine_args(argv, kv_endpoint, _api_process_count=count, _api_process_rank=-1)
        vllm_config = args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER)
        # One engine core (no data parallelism here): its client sockets are ipc paths, known before any bind.
        addresses = get_engine_zmq_addresses(vllm_config, count)
        with launch_core_engines(vllm_config, Executor.get_class(vllm_config), True, addresses, count) as (
            manager,
            _coordinator,
            addresses,
            _tensors,
        ):
            yield (
                [
                    {"input_address": i, "output_address": o, "client_count": count, "client_index": k}
                    for k, (i, o) in enumerate(zip(addresses.inputs, addresses.outputs, strict=True))
                ],
                manager,
            )

    def create_client(argv: list[str], kv_endpoint: str, stat_loggers: list[Any], client: dict) -> Any:
        from vllm.usage.usage_lib import UsageContext

        count, index = client["client_count"], client["client_index"]
        args = engine_args(argv, kv_endpoint, _api_process_count=count, _api_process_rank=index)
        return AsyncLLM.from_vllm_config(
            args.create_engine_config(usage_context=UsageContext.OPENAI_API_SERVER),
            stat_loggers=stat_loggers,
            # As create_engine's disable_log_stats: our stat logger is the only consumer.
            disable_log_stats=True,
            client_addresses={k: client[k] for k in ("input_address", "output_address")},
            client_count=count,
            client_index=index,
        )

    return VllmApi(
        create_engine=create_engine,
        sampling_params=SamplingParams,
        tokens_input=tokens_input,
        stat_logger_base=StatLoggerBase,
        engine_dead_error=EngineDeadError,
        output_kind_delta=RequestOutputKind.DELTA,
        version=vllm.__version__,
        launch_core=launch_core,
        create_client=create_client,
    )


class LoadStats:
    """What vLLM's stat logger reports, kept for load(): updated once per engine step on the event loop."""

    def __init__(self, window_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.running = 0
        self.waiting = 0
        self.kv_usage = 0.0
        self.queried_tokens = 0
        self.hit_tokens = 0
        self.records = 0
        # Called after each record (a front end of several writes its row of the load board at once).
        self.on_record: Callable[[], None] | None = None
        # When the last scheduler snapshot came (0: never): with several front ends only one gets each step's.
        self.sched_at = 0.0
        self._rate = TokenRate(window_s, clock())

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        self.records += 1
        if scheduler_stats is not None:
            self.sched_at = time.monotonic()
            self.running = scheduler_stats.num_running_reqs
            self.waiting = scheduler_stats.num_waiting_reqs
            self.kv_usage = scheduler_stats.kv_cache_usage
            pc = scheduler_stats.prefix_cache_stats
            if pc is not None:
                # Counts since the previous step's stats (vLLM resets them each time it reports).
                self.queried_tokens += pc.queries
                self.hit_tokens += pc.hits
        if iteration_stats is not None and iteration_stats.num_generation_tokens:
            self._rate.add(self.clock(), iteration_stats.num_generation_tokens)
        if self.on_record is not None:
            self.on_record()

    def output_tokens_per_s(self) -> float:
        return self._rate.rate(self.clock())


def stat_logger_factory(base: type, stats: LoadStats) -> type:
    """A vLLM StatLoggerBase subclass that feeds `stats` (vLLM builds one per engine core: a class is a factory)."""

    class FleetStatLogger(base):  # type: ignore[misc, valid-type]
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0) -> None:
            stats.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return FleetStatLogger


class _Request:
    """A request this replica is generating: what load() and abort() need."""

    __slots__ = ("request_id", "prompt_tokens", "completion", "owed", "first", "done")

    def __init__(self, request_id: str, prompt_tokens: int, completion: int, owed: int) -> None:
        self.request_id = request_id
        self.prompt_tokens = prompt_tokens
        self.completion = completion  # resumed tokens count
        # Tokens of work still ahead (prompt until the first token, then outputs to go), for in_flight_tokens.
        self.owed = owed
        self.first = True
        self.done = False


class VllmBackend:
    """EngineBackend on AsyncLLM. Per token this process does only what vLLM's own front end does (DELTA outputs,
    coalesced by vLLM when the reader lags; detokenized by vLLM unless --no-vllm-detokenize); everything else
    happens once per request or once per engine step."""

    name = "vllm"

    def __init__(
        self,
        argv: Sequence[str],
        *,
        api: VllmApi | None = None,
        detokenize: bool = True,
        replica_id: str = "engine",
        health_poll_s: float = 0.5,
        client: dict | None = None,
        kv_endpoint: str = "",
        kv_events: bool = True,
        board: LoadBoard | None = None,
        board_row: int = 0,
        board_interval_s: float = 0.05,
    ) -> None:
        self.argv = list(argv)
        self._api = api
        # Front-end mode (one of several processes on one engine core): vLLM's client config from the supervisor,
        # the KV-event endpoint the engine core publishes on, whether this front end reads them (the primary
        # does), and the shared table where each front end writes its load and any reads the replica's.
        self.client = client
        self.kv_endpoint = kv_endpoint
        self.kv_events = kv_events
        self.board = board
        self.board_row = board_row
        self.board_interval_s = board_interval_s
        self._board_task: asyncio.Task | None = None
        self.detokenize = detokenize
        self.replica_id = replica_id
        self.health_poll_s = health_poll_s
        self.counters = Counters()
        self.stats = LoadStats()
        self.translator = KvEventTranslator(BLOCK_SIZE)
        self.hub = KvEventHub()
        # Set once the engine core is dead: the app turns the replica NOT_SERVING and leaves the registry.
        self.dead = asyncio.Event()
        self.llm: Any = None
        self.tokenizer: fleet_tokenizer.FleetTokenizer | None = None
        self._requests: dict[str, _Request] = {}
        self._in_flight = 0
        self._closing = False
        self._priority_policy = False
        self._info = BackendInfo(BLOCK_SIZE, 0, 0)
        self._kv_reader: ZmqKvEventReader | None = None
        self._kv_path = ""
        self._watchdog: asyncio.Task | None = None
        self._aborts: set[asyncio.Task] = set()

    @property
    def api(self) -> VllmApi:
        if self._api is None:
            self._api = load_vllm_api()
        return self._api

    @property
    def shutting_down(self) -> bool:
        return self._closing

    # -- lifecycle ----------------------------------------------------------------------------------

    async def start(self) -> None:
        api = self.api
        # Alone on its engine core (no endpoint given), this process picks the endpoint unless events are off.
        endpoint = self.kv_endpoint or (self._new_kv_endpoint() if self.kv_events else "")
        logger_cls = stat_logger_factory(api.stat_logger_base, self.stats)
        started = time.monotonic()
        # Blocks the loop while the engine core starts (~35-50 s on an H100): nothing else runs yet, and
        # AsyncLLM wants to be built on the loop that will drive it.
        if self.client is not None:
            if api.create_client is None:
                raise ValueError("this vLLM API cannot run several front ends on one engine core")
            self.llm = api.create_client(self.argv, endpoint, [logger_cls], self.client)
        else:
            self.llm = api.create_engine(self.argv, endpoint, [logger_cls])
        start_s = time.monotonic() - started
        cfg = self.llm.vllm_config
        tok_dir = Path(cfg.model_config.tokenizer)
        if not (tok_dir / "tokenizer.json").is_file():
            raise ValueError(
                f"the vllm backend needs a local model directory with tokenizer.json (got {tok_dir}): prompts are "
                "tokenized by the fleet's tokenizer so that prefix hashes agree"
            )
        self.tokenizer = fleet_tokenizer.load(str(tok_dir))
        self._priority_policy = cfg.scheduler_config.policy == "priority"
        self._info = BackendInfo(
            block_size=cfg.cache_config.block_size,
            kv_blocks_total=cfg.cache_config.num_gpu_blocks or 0,
            max_model_len=cfg.model_config.max_model_len,
        )
        if self.kv_events and endpoint:
            self._kv_reader = ZmqKvEventReader(endpoint, self.translator, self._publish_kv, topic=KV_TOPIC)
            self._kv_reader.start()
        loop = asyncio.get_running_loop()
        self._watchdog = loop.create_task(self._watch(), name="engine.vllm_watchdog")
        if self.board is not None:
            # Each step's stats reach one front end: its row is written at once, the rest of it periodically.
            self.stats.on_record = self._write_row
            self._board_task = loop.create_task(self._publish_load(), name="engine.load_board")
        log.info(
            "engine.vllm_started",
            start_s=round(start_s, 3),
            frontend=None if self.client is None else self.client["client_index"],
            vllm_version=api.version,
            model=str(tok_dir),
            kv_blocks_total=self._info.kv_blocks_total,
            max_model_len=self._info.max_model_len,
            priority_scheduling=self._priority_policy,
            kv_events=endpoint,
        )

    async def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        for req in list(self._requests.values()):
            self.abort(req.request_id)
        if self._aborts:
            await asyncio.gather(*self._aborts, return_exceptions=True)
        for task in (self._watchdog, self._board_task):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._kv_reader is not None:
            await self._kv_reader.stop()
        self.hub.close()
        if self.llm is not None:
            self.llm.shutdown()
        if self._kv_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._kv_path)
        log.info(
            "engine.vllm_stopped",
            requests_finished=self.counters.finished,
            requests_aborted=self.counters.aborted,
            output_tokens=self.counters.output_tokens,
            kv_event_batches=self.translator.stats.batches,
            kv_partial_blocks=self.translator.stats.partial_blocks,
            kv_orphan_blocks=self.translator.stats.orphan_blocks,
            kv_seq_gaps=self.translator.stats.seq_gaps,
        )

    def _new_kv_endpoint(self) -> str:
        # The engine-core process binds this socket; an ipc path per worker needs no free port.
        fd, self._kv_path = tempfile.mkstemp(prefix=f"fleetserve-kv-{self.replica_id}-", suffix=".sock")
        os.close(fd)
        os.unlink(self._kv_path)
        return f"ipc://{self._kv_path}"

    async def _watch(self) -> None:
        """vLLM marks itself errored when its engine-core process dies; streams learn it from EngineDeadError,
        an idle replica from this poll."""
        while not self.dead.is_set():
            if self.llm.errored:
                self._died("engine core is not running")
                return
            await asyncio.sleep(self.health_poll_s)

    def mark_dead(self, why: str) -> None:
        """The engine core died where this process cannot see it (the supervisor saw its process exit)."""
        self._died(why)

    def _died(self, why: str) -> None:
        if self.dead.is_set():
            return
        log.error("engine.vllm_dead", reason=why, requests_live=len(self._requests))
        self.dead.set()

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
            running=not self.dead.is_set() and self.llm is not None and self.tokenizer is not None,
            request_id=request_id,
            live=self._requests,
        )
        tok = self.tokenizer
        sampling = spec.sampling
        max_tokens = sampling.max_tokens or DEFAULT_MAX_TOKENS
        resumed = list(spec.resume_token_ids)
        check_resume_ids(resumed, tok.vocab_size)
        prompt_ids = tok.encode_spec(spec)
        if self._info.max_model_len:
            max_tokens = cap_max_tokens(len(prompt_ids), len(resumed), max_tokens, self._info.max_model_len)
        req = _Request(request_id, len(prompt_ids), len(resumed), len(prompt_ids) + max_tokens)
        prompt_ids += resumed
        left = max_tokens - len(resumed)
        if left <= 0:
            # An attempt resumed after its last token: nothing left to generate.
            self.counters.finished += 1
            return self._finished_stream(req)
        api = self.api
        stops = [s for s in sampling.stop if s]
        try:
            params = api.sampling_params(
                max_tokens=left,
                temperature=sampling.temperature,
                top_p=sampling.top_p or 1.0,
                seed=sampling.seed if sampling.HasField("seed") else None,
                stop=stops or None,
                ignore_eos=sampling.ignore_eos,
                # Stop strings are matched on text: they need it even when text is otherwise not wanted.
                detokenize=self.detokenize or bool(stops),
                output_kind=api.output_kind_delta,
            )
        except ValueError as e:
            raise InvalidArgument(f"invalid sampling parameters: {e}") from None
        prompt = api.tokens_input(prompt_ids, cache_salt=cache_salt or None)
        prio = PRIORITY_RANK.get(priority, 1) if self._priority_policy else 0
        self._requests[request_id] = req
        self._in_flight += req.owed
        return self._stream(req, prompt, params, prio)

    async def _finished_stream(self, req: _Request) -> AsyncIterator[StepOutput]:
        yield StepOutput([], "", LENGTH, req.prompt_tokens, 0, req.completion)

    async def _stream(
        self, req: _Request, prompt: Any, params: Any, priority: int
    ) -> AsyncIterator[StepOutput]:
        counters = self.counters
        gen = self.llm.generate(prompt, params, req.request_id, priority=priority)
        try:
            async for out in gen:
                c = out.outputs[0]
                ids = c.token_ids
                n = len(ids)
                req.completion += n
                counters.output_tokens += n
                done = n + (req.prompt_tokens if req.first else 0)
                req.first = False
                req.owed -= done
                self._in_flight -= done
                finish = None
                if out.finished:
                    finish = _FINISH.get(c.finish_reason)
                    if finish is None:
                        raise Unavailable(
                            f"vLLM failed the request ({c.finish_reason})",
                            reason="ENGINE_ERROR",
                            retry_after_s=0.5,
                        )
                    req.done = True
                    if finish == ABORT:
                        pass  # counted by abort()
                    else:
                        counters.finished += 1
                yield StepOutput(
                    ids if isinstance(ids, list) else list(ids),
                    c.text,
                    finish,
                    req.prompt_tokens,
                    out.num_cached_tokens or 0,
                    req.completion,
                )
                if finish is not None:
                    return
            # vLLM ends a stream only after a finished output; anything else is an engine failure.
            raise Unavailable("vLLM ended the stream early", reason="ENGINE_ERROR", retry_after_s=0.5)
        except self.api.engine_dead_error:
            self._died("EngineDeadError")
            raise Unavailable(
                "this engine replica's vLLM engine died", reason="ENGINE_DEAD", retry_after_s=0.5
            ) from None
        except ValueError as e:  # vLLM's request validation
            raise InvalidArgument(f"vLLM refused the request: {e}") from None
        finally:
            self._requests.pop(req.request_id, None)
            self._in_flight -= req.owed
            req.owed = 0
            if not req.done:
                # The reader went away (cancelled, closed) or the request failed: vLLM aborts it when its
                # generator is cancelled or closed; this counts it.
                req.done = True
                counters.aborted += 1
            await gen.aclose()

    def abort(self, request_id: str) -> bool:
        req = self._requests.get(request_id)
        if req is None or req.done or self.llm is None:
            return False
        req.done = True
        self.counters.aborted += 1
        # vLLM ends the request's stream with a final "abort" output and frees its blocks in the engine core.
        task = asyncio.get_running_loop().create_task(self.llm.abort(request_id))
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        return True

    # -- load, info, KV events ------------------------------------------------------------------------

    def _own(self) -> ReplicaTotals:
        """This front end's own load (the whole replica's when it is the only one)."""
        s, c = self.stats, self.counters
        return ReplicaTotals(
            running=s.running,
            waiting=s.waiting,
            kv_usage=s.kv_usage,
            queried_tokens=s.queried_tokens,
            hit_tokens=s.hit_tokens,
            output_tokens_per_s=s.output_tokens_per_s(),
            in_flight_tokens=max(0, self._in_flight),
            live=len(self._requests),
            finished=c.finished,
            aborted=c.aborted,
            output_tokens=c.output_tokens,
        )

    def _totals(self) -> ReplicaTotals:
        """The replica's load: this front end's, or every front end's from the shared board."""
        own = self._own()
        if self.board is None:
            return own
        self.board.write(self.board_row, own, self.stats.sched_at)
        return self.board.totals()

    def _write_row(self) -> None:
        self.board.write(self.board_row, self._own(), self.stats.sched_at)

    async def _publish_load(self) -> None:
        """Keep this front end's row of the board current (the primary reads it for heartbeats and GetLoad)."""
        while True:
            self._write_row()
            await asyncio.sleep(self.board_interval_s)

    def replica_counters(self) -> Counters:
        t = self._totals()
        return Counters(finished=t.finished, aborted=t.aborted, output_tokens=t.output_tokens)

    def load(self) -> common_pb2.ReplicaLoad:
        t = self._totals()
        total = self._info.kv_blocks_total
        # vLLM reports with each step; after the last step of a burst its counts can be one step stale.
        running = min(t.running, t.live)
        waiting = min(t.waiting, t.live - running)
        return common_pb2.ReplicaLoad(
            running=running,
            waiting=waiting,
            kv_blocks_used=min(total, round(t.kv_usage * total)),
            kv_blocks_total=total,
            prefix_cache_hit_rate=t.hit_tokens / t.queried_tokens if t.queried_tokens else 0.0,
            output_tokens_per_s=t.output_tokens_per_s,
            in_flight_tokens=t.in_flight_tokens,
            prefix_cache_queried_tokens=t.queried_tokens,
            prefix_cache_hit_tokens=t.hit_tokens,
        )

    def info(self) -> BackendInfo:
        return self._info

    def subscribe_kv_events(self, include_snapshot: bool) -> AsyncIterator[engine_pb.KvEventBatch]:
        if self._kv_reader is None:
            # Said at once: an empty stream that never sends would leave a kv_aware router guessing.
            raise KvEventsOff(
                f"replica {self.replica_id!r} publishes no KV events: start its engine with --vllm-kv-events "
                "(kv_aware routers score it by load alone meanwhile)",
                metadata={"replica_id": self.replica_id, "flag": "--vllm-kv-events"},
            )
        return self.hub.subscribe(include_snapshot, self.translator.snapshot)

    def _publish_kv(self, events: list[engine_pb.KvEvent], ts: float) -> None:
        self.hub.publish(events, ts)
