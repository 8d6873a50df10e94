"""Shadow traffic: a copy of a sampled live request goes to the candidate version, fire and forget. Its answer is
never served and never waits for or delays the live one (its own task, started after the live request was sent;
its own in-flight budget per rollout, no admission queue, no retries, no hedges); when both answers are complete
they are compared (latency, length, refusal, text similarity) into a per-rollout report. Both sides' TPOT come
from engine clocks: the copy's from its summary, the live answer's from the token times its engine puts on its last
chunk when asked (GenerateRequest.token_times, set for a request with a copy); a busy router's receive times would
read the live side slower.

A copy costs the router's event loop, which the live streams share, as little as it can: the engine is asked for a
summarized stream (GenerateRequest.summarize: the first chunk, then one message with the rest of the text, the
token count and the engine's token times, and an empty message every half second or so for the stall watchdog)
rather than one message per token, and texts are compared by rapidfuzz (C++, ~30 us for 1,000 characters, where
difflib took ~47 ms on the 2-core box, all of it blocking the loop)."""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import structlog
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.router.v1 import router_service_pb2 as pb
from rapidfuzz.distance import Indel

from services.router.attempt import Attempt
from services.router.traffic import Shadow
from shared.errors import FleetError

if TYPE_CHECKING:
    from services.router.attempt import RequestAttempts
    from services.router.servicer import RouterServicer

log = structlog.get_logger(__name__)

# How answers that decline begin (the sim's planted refusal is "I'm sorry, but I can't help with that.").
REFUSAL = re.compile(r"^\s*(i'?m sorry|i am sorry|sorry,|i can(?:'|no)t|i cannot|i won'?t|as an ai\b)", re.I)
# Texts are compared on their beginning: enough to see a different answer, bounded work per pair.
COMPARE_CHARS = 1000
MIN_PAIRS = 5
_OK = grpc.StatusCode.OK


def is_refusal(text: str) -> bool:
    return REFUSAL.match(text) is not None


def similarity(a: str, b: str) -> float:
    """Normalized indel similarity of the two texts' beginnings, 2 x LCS / (len a + len b) (1.0: identical)."""
    a, b = a[:COMPARE_CHARS], b[:COMPARE_CHARS]
    if a == b:
        return 1.0
    return Indel.normalized_similarity(a, b)


@dataclass(slots=True)
class Answer:
    """One side of a pair: its timings from the moment the request arrived, its text and tokens, its status."""

    code: grpc.StatusCode = grpc.StatusCode.CANCELLED
    ttft_ms: float | None = None
    e2e_ms: float = 0.0
    text: str = ""
    tokens: int = 0
    messages: int = 0  # messages the router read of this answer
    # Time per output token from the engine's own clock (its StreamSummary): always for a summarized copy, and
    # for a live stream whose engine sent its token times (GenerateRequest.token_times).
    engine_tpot_ms: float | None = None
    # A live stream: when its last chunk came from the engine (ms after arrival), before any wait downstream.
    engine_end_ms: float | None = None

    @property
    def tpot_ms(self) -> float | None:
        """Time per output token after the first, of the generation itself: the engine's clock when it sent its
        token times (both sides then read alike, however busy the router was), else, for a live answer from an
        engine that does not (an older one), from its first chunk to the engine's last as the router received
        them (e2e when that is unknown)."""
        if self.engine_tpot_ms is not None:
            return self.engine_tpot_ms
        if self.ttft_ms is None or self.tokens < 2:
            return None
        end = self.engine_end_ms if self.engine_end_ms is not None else self.e2e_ms
        return (end - self.ttft_ms) / (self.tokens - 1)


def read_answer(chunks: list[bytes], answer: Answer) -> None:
    """Text, token count and, where the engine sent its token times (the last message's summary), engine TPOT of
    a stream: a relayed live one or a summarized copy (first chunk, progress messages, the summary). Parsed only
    now, off the live path; as the engine's message, which router chunks are byte for byte."""
    texts = []
    answer.messages = len(chunks)
    for data in chunks:
        msg = engine_pb.GenerateResponse.FromString(data)
        chunk = msg.chunk
        if chunk.text:
            texts.append(chunk.text)
        if chunk.HasField("usage"):
            answer.tokens = chunk.usage.completion_tokens
        if msg.HasField("summary") and answer.tokens >= 2:
            s = msg.summary
            answer.engine_tpot_ms = (s.last_token_ms - s.first_token_ms) / (answer.tokens - 1)
    answer.text = "".join(texts)


class _Mean:
    __slots__ = ("n", "total")

    def __init__(self) -> None:
        self.n, self.total = 0, 0.0

    def add(self, v: float | None) -> None:
        if v is not None:
            self.n += 1
            self.total += v

    @property
    def value(self) -> float:
        return self.total / self.n if self.n else 0.0


class ShadowStats:
    """The comparisons of one shadow rollout."""

    def __init__(self, shadow: Shadow, model: str) -> None:
        self.shadow = shadow
        self.model = model
        self.pairs = self.skipped = self.shadow_errors = self.live_errors = self.identical = 0
        self.copies = 0
        self.m = {k: _Mean() for k in ("lt", "st", "lp", "sp", "lo", "so", "lr", "sr", "sim", "lm", "sm")}

    def add(self, live: Answer, shadow: Answer) -> None:
        self.copies += 1
        if shadow.code != _OK:
            self.shadow_errors += 1
        if live.code != _OK:
            self.live_errors += 1
        if live.code != _OK or shadow.code != _OK:
            return
        self.pairs += 1
        m = self.m
        m["lt"].add(live.ttft_ms)
        m["st"].add(shadow.ttft_ms)
        m["lp"].add(live.tpot_ms)
        m["sp"].add(shadow.tpot_ms)
        m["lo"].add(live.tokens)
        m["so"].add(shadow.tokens)
        m["lm"].add(live.messages)
        m["sm"].add(shadow.messages)
        m["lr"].add(float(is_refusal(live.text)))
        m["sr"].add(float(is_refusal(shadow.text)))
        sim = similarity(live.text, shadow.text)
        m["sim"].add(sim)
        self.identical += sim == 1.0

    def report(self) -> pb.ShadowReport:
        m, s = self.m, self.shadow
        r = pb.ShadowReport(
            rollout_id=s.rollout_id,
            model=self.model,
            baseline_version=s.baseline_version,
            candidate_version=s.candidate_version,
            pairs=self.pairs,
            skipped=self.skipped,
            shadow_errors=self.shadow_errors,
            live_errors=self.live_errors,
            live_ttft_ms=m["lt"].value,
            shadow_ttft_ms=m["st"].value,
            live_tpot_ms=m["lp"].value,
            shadow_tpot_ms=m["sp"].value,
            live_output_tokens=m["lo"].value,
            shadow_output_tokens=m["so"].value,
            live_refusal_rate=m["lr"].value,
            shadow_refusal_rate=m["sr"].value,
            mean_similarity=m["sim"].value,
            identical_rate=self.identical / self.pairs if self.pairs else 0.0,
            live_messages=m["lm"].value,
            shadow_messages=m["sm"].value,
        )
        r.differences.extend(differences(r, self.copies))
        return r


def _ratio_line(what: str, shadow: float, live: float, unit: str) -> str | None:
    if live <= 0 or shadow <= 0:
        return None
    ratio = shadow / live
    if 0.8 <= ratio <= 1.25:
        return None
    return f"shadow {what} {ratio:.2f}x live ({shadow:.4g} vs {live:.4g}{unit})"


def differences(r: pb.ShadowReport, copies: int) -> list[str]:
    """What differs enough to say: latency or length beyond +-20%, refusals or errors beyond 2 points, texts
    that are not the same answer."""
    out: list[str] = []
    if copies and r.shadow_errors / copies > r.live_errors / copies + 0.02:
        out.append(f"shadow failed {r.shadow_errors} of {copies} copies ({r.shadow_errors / copies:.1%})")
    if r.pairs >= MIN_PAIRS:
        for line in (
            _ratio_line("TTFT", r.shadow_ttft_ms, r.live_ttft_ms, " ms"),
            _ratio_line("TPOT", r.shadow_tpot_ms, r.live_tpot_ms, " ms"),
            _ratio_line("output length", r.shadow_output_tokens, r.live_output_tokens, " tokens"),
        ):
            if line:
                out.append(line)
        if abs(r.shadow_refusal_rate - r.live_refusal_rate) > 0.02:
            out.append(
                f"shadow refuses {r.shadow_refusal_rate:.1%} of answers (live {r.live_refusal_rate:.1%})"
            )
        if r.mean_similarity < 0.95:
            out.append(
                f"answers differ: mean text similarity {r.mean_similarity:.2f}, {r.identical_rate:.0%} identical"
            )
    if r.skipped:
        out.append(f"{r.skipped} copies skipped: the shadow budget was full")
    return out


class ShadowPair:
    """One live request and its shadow copy. The live side hands over its chunks when it ends; the shadow side
    runs in its own task; whichever finishes second compares."""

    __slots__ = ("runner", "shadow", "arrived", "live", "live_chunks", "copy", "skipped", "_done")

    def __init__(self, runner: ShadowRunner, shadow: Shadow, arrived: float) -> None:
        self.runner = runner
        self.shadow = shadow
        self.arrived = arrived
        self.live = Answer()
        self.live_chunks: list[bytes] = []
        self.copy = Answer()
        self.skipped = False  # the candidate had no replica to take the copy: nothing to compare
        self._done = 0

    def live_first(self) -> None:
        self.live.ttft_ms = (time.monotonic() - self.arrived) * 1000.0

    def live_upstream_end(self, at: float) -> None:
        """The live stream's last chunk came from the engine at `at` (monotonic): the live TPOT is timed to it,
        as the copy's is on the engine, so a slow reader downstream (gateway, client) does not count."""
        if at:
            self.live.engine_end_ms = (at - self.arrived) * 1000.0

    def live_ended(self, code: grpc.StatusCode) -> None:
        """The live request is over (any way): its result joins the pair."""
        self.live.code = code
        self.live.e2e_ms = (time.monotonic() - self.arrived) * 1000.0
        self._side_done()

    async def run_copy(self, run: RequestAttempts) -> None:
        """Send the copy and read its summarized stream: the first chunk (the copy's TTFT), progress messages,
        the summary. Runs as a task created after the live call's: the live request goes out first."""
        runner, shadow = self.runner, self.shadow
        chunks: list[bytes] = []
        attempt = None
        try:
            router = runner.router
            try:
                replica = router.choose(run.routed, set(), version=shadow.candidate_version)
            except FleetError:
                self.skipped = True
                runner.stats[shadow.rollout_id].skipped += 1
                return
            copy = engine_pb.GenerateRequest()
            copy.CopyFrom(run.engine_request)
            copy.request_id = f"{run.request.request_id}.shadow"
            copy.spec.model_version = shadow.candidate_version
            copy.priority = common_pb2.PRIORITY_BATCH  # never ahead of live work on a shared replica
            copy.summarize = True
            copy.summary_progress_ms = runner.progress_ms
            attempt = Attempt.start(router, replica, copy, run.deadline, run.metadata)
            data = await attempt.first_chunk()
            if data is not grpc.aio.EOF:
                self.copy.ttft_ms = (time.monotonic() - self.arrived) * 1000.0
                # The breaker and outlier detection see the replica answer; the stall watchdog sees its
                # progress messages but does not count it as a token stream (it sends none).
                attempt.answered(streaming=False)
                read = attempt.relay.read
                while data is not grpc.aio.EOF:
                    chunks.append(data)
                    data = await read()
                attempt.finished()
            self.copy.code = _OK
        except grpc.aio.AioRpcError as e:
            self.copy.code = e.code()
        except FleetError as e:
            # The call could not be set up (the live request's deadline passed before this task ran): a failed
            # copy like any other, not an exception out of a task nobody awaits.
            self.copy.code = e.code
        except asyncio.CancelledError:
            self.copy.code = grpc.StatusCode.CANCELLED
            raise
        finally:
            self.copy.e2e_ms = (time.monotonic() - self.arrived) * 1000.0
            if attempt is not None:
                attempt.close()
            runner.in_flight[shadow.rollout_id] -= 1
            read_answer(chunks, self.copy)
            self._side_done()

    def _side_done(self) -> None:
        self._done += 1
        if self._done == 2 and not self.skipped:
            read_answer(self.live_chunks, self.live)
            self.live_chunks = []
            self.runner.compared(self, self.live, self.copy)


class ShadowRunner:
    """Starts shadow copies within each rollout's budget and keeps each rollout's comparison."""

    def __init__(self, router: RouterServicer, progress_ms: int = 500) -> None:
        self.router = router
        self.progress_ms = progress_ms  # summarized copies' progress messages, for the stall watchdog
        self.in_flight: Counter[str] = Counter()
        self.stats: dict[str, ShadowStats] = {}
        self._tasks: set[asyncio.Task] = set()

    def _stats(self, shadow: Shadow, model: str) -> ShadowStats:
        st = self.stats.get(shadow.rollout_id)
        if st is None:
            st = self.stats[shadow.rollout_id] = ShadowStats(shadow, model)
        return st

    def start(self, run: RequestAttempts, shadow: Shadow, arrived: float) -> ShadowPair | None:
        """Start the copy (called after the live attempt started: its task runs after the live call's send);
        None when the budget is full."""
        stats = self._stats(shadow, run.model)
        if self.in_flight[shadow.rollout_id] >= shadow.max_in_flight:
            stats.skipped += 1
            return None
        self.in_flight[shadow.rollout_id] += 1
        pair = ShadowPair(self, shadow, arrived)
        task = asyncio.get_running_loop().create_task(pair.run_copy(run), name="router.shadow")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pair

    def compared(self, pair: ShadowPair, live: Answer, copy: Answer) -> None:
        self._stats(pair.shadow, "").add(live, copy)
        log.debug(
            "router.shadow_compared",
            rollout_id=pair.shadow.rollout_id,
            live_code=live.code.name,
            shadow_code=copy.code.name,
            live_tokens=live.tokens,
            shadow_tokens=copy.tokens,
        )

    def reports(self) -> list[pb.ShadowReport]:
        return [self.stats[k].report() for k in sorted(self.stats)]

    async def close(self) -> None:
        """Cancel copies still running (shutdown): nobody waits for their answers."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
