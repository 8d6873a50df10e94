"""Locust users for the fleet (`make loadtest`): scenarios chat, multiturn, batch and bursty, over gRPC and the
OpenAI-compatible HTTP API. Each request is one Locust request (type grpc|http, name = scenario; response time =
end to end, response length = output tokens); TTFT, TPOT and output tokens/s are kept beside Locust's stats
(loadtest/llm_stats.py, merged from workers in distributed mode) and written to <csv prefix>_llm.csv and a table
appended to the HTML report.

Selection: FLEETSERVE_SCENARIOS (chat,multiturn,batch,bursty; default chat) x FLEETSERVE_PROTOCOLS (grpc,http;
default grpc). Target: --host (grpc://host:port or http://host:port) / $FLEETSERVE_GATEWAY /
$FLEETSERVE_GATEWAY_HTTP / $FLEETSERVE_API_KEY, else the running cluster's state file. Workload:
$FLEETSERVE_MODEL (sim-1b), $FLEETSERVE_PROMPT_TOKENS (128), $FLEETSERVE_MAX_TOKENS (64), $FLEETSERVE_BATCH_ITEMS
(4), $FLEETSERVE_TIMEOUT_S (300), $FLEETSERVE_SEED (random)."""

from __future__ import annotations

import csv
import itertools
import json
import os
import random
import sys
import time
from pathlib import Path

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent
import requests
from locust import User, constant, events, task
from locust import stats as locust_stats
from locust.exception import StopUser
from locust.runners import STATE_RUNNING, WorkerRunner

try:
    import loadtest  # noqa: F401  (installed with `pip install -e .`)
except ImportError:  # run from a plain checkout: locust puts only loadtest/ on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleetserve.inference.v1 import inference_service_pb2 as pb

from fleetserve.client import details_of
from loadtest.llm_stats import LlmStats
from loadtest.scenarios import (
    Conversation,
    SseMeter,
    burst_wait,
    chat_messages,
    http_chat_body,
    selected,
)
from loadtest.summary import RequestResult, StreamMeter
from shared.channels import open_sync_channel
from shared.tls import Tls, scheme

# grpc's own threads must cooperate with gevent's greenlets, or one blocked stream stalls every user.
grpc_gevent.init_gevent()

MODEL = os.environ.get("FLEETSERVE_MODEL", "sim-1b")
PROMPT_TOKENS = int(os.environ.get("FLEETSERVE_PROMPT_TOKENS", "128"))
MAX_TOKENS = int(os.environ.get("FLEETSERVE_MAX_TOKENS", "64"))
BATCH_ITEMS = int(os.environ.get("FLEETSERVE_BATCH_ITEMS", "4"))
TIMEOUT_S = float(os.environ.get("FLEETSERVE_TIMEOUT_S", "300"))
SEED = int(os.environ.get("FLEETSERVE_SEED") or random.randrange(2**31))
# Each user stops after this many requests (0: no limit), and the run ends when every user has: a fixed amount
# of work whatever the machine's speed (tests); --run-time still bounds it.
REQUESTS_PER_USER = int(os.environ.get("FLEETSERVE_REQUESTS_PER_USER", "0"))
SELECTED = set(selected(os.environ))

LLM = LlmStats()
_seq = itertools.count()  # every user of this process gets its own random stream
_channels: dict[str, grpc.Channel] = {}


class RequestFailed(Exception):
    """A failed request, named by status and reason so Locust's error report groups alike failures."""


def targets(host: str | None) -> tuple[str, str, str, Tls | None]:
    """(gRPC gateway, HTTP gateway URL, API key, TLS): --host / env vars first, then the running cluster's state
    file (a `fleetserve up --tls` fleet: https and its CA; FLEETSERVE_TLS_CA for another)."""
    grpc_gw = os.environ.get("FLEETSERVE_GATEWAY", "")
    http_gw = os.environ.get("FLEETSERVE_GATEWAY_HTTP", "")
    if host:
        if host.startswith(("http://", "https://")):
            http_gw = host
        else:
            grpc_gw = host.removeprefix("grpc://")
    key = os.environ.get("FLEETSERVE_API_KEY", "")
    state = None
    if not (grpc_gw and http_gw and key):
        from shared.cluster import read_state

        state = read_state()
        grpc_gw, http_gw, key = (
            grpc_gw or state["gateway"],
            http_gw or state["gateway_http"],
            key or state["api_key"],
        )
    tls = Tls.for_tools(state)
    if "://" not in http_gw:
        http_gw = f"{scheme(tls)}://{http_gw}"
    return grpc_gw, http_gw.rstrip("/"), key, tls


def _channel(address: str, tls: Tls | None) -> grpc.Channel:
    # One channel per gateway for the whole process, shared by every user, like a real client would.
    ch = _channels.get(address)
    if ch is None:
        ch = _channels[address] = open_sync_channel(address, tls)
    return ch


class FleetUser(User):
    """One simulated client of a scenario over a protocol (the subclasses); each request fires one event."""

    abstract = True
    protocol = ""
    scenario = ""
    wait_time = constant(0)

    def on_start(self) -> None:
        self.grpc_gateway, self.http_gateway, key, tls = targets(self.host)
        self.rng = random.Random(f"{SEED}:{self.protocol}:{self.scenario}:{next(_seq)}")
        self.grpc_metadata = (("authorization", f"Bearer {key}"),)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {key}"
        if tls is not None and tls.ca:
            self.http.verify = tls.ca
        self.conversation: Conversation | None = None
        self.requests_made = 0
        ch = _channel(self.grpc_gateway, tls)
        self.chat_stream = ch.unary_stream(
            "/fleetserve.inference.v1.InferenceService/Chat",
            request_serializer=pb.ChatRequest.SerializeToString,
            response_deserializer=pb.ChatResponse.FromString,
        )
        self.submit_batch = ch.unary_unary(
            "/fleetserve.inference.v1.InferenceService/SubmitBatch",
            request_serializer=pb.SubmitBatchRequest.SerializeToString,
            response_deserializer=pb.SubmitBatchResponse.FromString,
        )
        self.get_job = ch.unary_unary(
            "/fleetserve.inference.v1.InferenceService/GetJob",
            request_serializer=pb.GetJobRequest.SerializeToString,
            response_deserializer=pb.GetJobResponse.FromString,
        )

    def on_stop(self) -> None:
        self.http.close()

    # -- one request each -------------------------------------------------------------------------------

    def report(self, result: RequestResult) -> None:
        exc = None
        if not result.ok:
            exc = RequestFailed(" ".join(x for x in (result.error, result.reason, result.message) if x))
        self.environment.events.request.fire(
            request_type=self.protocol,
            name=self.scenario,
            response_time=result.e2e_s * 1000.0,
            response_length=result.output_tokens,
            exception=exc,
            context={},
        )
        LLM.record(self.protocol, self.scenario, result)
        self.requests_made += 1
        if REQUESTS_PER_USER and self.requests_made >= REQUESTS_PER_USER:
            raise StopUser()

    def messages(self) -> list[dict[str, str]]:
        if self.scenario != "multiturn":
            return chat_messages(self.rng, PROMPT_TOKENS)
        if self.conversation is None or self.conversation.done:
            self.conversation = Conversation.start(self.rng)
        return self.conversation.next_turn()

    def grpc_chat(self, messages: list[dict[str, str]]) -> tuple[RequestResult, str]:
        request = pb.ChatRequest(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, ignore_eos=True)
        clock = time.perf_counter
        meter = StreamMeter(clock())
        text: list[str] = []
        try:
            for resp in self.chat_stream(request, metadata=self.grpc_metadata, timeout=TIMEOUT_S):
                meter.on_chunk(resp.chunk, clock())
                text.append(resp.chunk.text)
            return meter.result(clock()), "".join(text)
        except grpc.RpcError as e:
            d = details_of(e)
            return meter.failed(clock(), e.code().name, d.reason, d.message), ""

    def http_chat(self, messages: list[dict[str, str]], *, stream: bool = True, tier: str = "") -> tuple:
        body = http_chat_body(MODEL, messages, MAX_TOKENS, stream=stream, service_tier=tier)
        clock = time.perf_counter
        start = clock()
        meter = SseMeter(start)
        try:
            with self.http.post(
                f"{self.http_gateway}/v1/chat/completions", json=body, stream=stream, timeout=TIMEOUT_S
            ) as resp:
                if resp.status_code != 200:
                    err = (resp.json() or {}).get("error") or {}
                    return RequestResult(
                        None,
                        clock() - start,
                        0,
                        str(resp.status_code),
                        str(err.get("code", "")),
                        err.get("message", ""),
                    ), ""
                if not stream:
                    whole = resp.json()
                    text = whole["choices"][0]["message"]["content"] or ""
                    return RequestResult(None, clock() - start, whole["usage"]["completion_tokens"]), text
                for line in resp.iter_lines():
                    meter.on_line(line, clock())
            return meter.result(clock()), meter.text
        except (requests.RequestException, ValueError) as e:
            return RequestResult(meter.ttft_s, clock() - start, 0, type(e).__name__, "", str(e)), ""

    def grpc_batch(self) -> RequestResult:
        """One job of BATCH_ITEMS items, from submit until every item finished (polled every 0.2 s)."""
        items = [
            pb.BatchItem(custom_id=str(i), messages=chat_messages(self.rng, PROMPT_TOKENS))
            for i in range(BATCH_ITEMS)
        ]
        request = pb.SubmitBatchRequest(
            model=MODEL,
            items=items,
            max_tokens=MAX_TOKENS,
            idempotency_key=f"locust-{SEED}-{self.rng.random()}",
        )
        clock = time.perf_counter
        start = clock()
        deadline = start + TIMEOUT_S
        try:
            job = self.submit_batch(request, metadata=self.grpc_metadata, timeout=30).job
            while job.succeeded + job.failed < job.total and clock() < deadline:
                time.sleep(0.2)  # gevent-patched: other users run meanwhile
                job = self.get_job(
                    pb.GetJobRequest(job_id=job.job_id), metadata=self.grpc_metadata, timeout=30
                ).job
        except grpc.RpcError as e:
            d = details_of(e)
            return RequestResult(None, clock() - start, 0, e.code().name, d.reason, d.message)
        e2e = clock() - start
        if job.failed or job.succeeded < job.total:
            return RequestResult(
                None, e2e, job.usage.completion_tokens, "BATCH_INCOMPLETE", "", f"{job.failed} failed"
            )
        return RequestResult(None, e2e, job.usage.completion_tokens)

    @task
    def one(self) -> None:
        if self.scenario == "batch":
            # Bulk work: a batch job over gRPC; over HTTP, whole (unstreamed) completions at batch priority.
            if self.protocol == "grpc":
                result = self.grpc_batch()
            else:
                result, _ = self.http_chat(chat_messages(self.rng, PROMPT_TOKENS), stream=False, tier="flex")
            self.report(result)
            return
        messages = self.messages()
        result, text = self.grpc_chat(messages) if self.protocol == "grpc" else self.http_chat(messages)
        if self.conversation is not None and self.scenario == "multiturn":
            if result.ok:
                self.conversation.reply(text)
            else:
                self.conversation = None  # a failed turn ends the conversation; the next starts afresh
        self.report(result)


def _user_class(protocol: str, scenario: str) -> type[FleetUser]:
    attrs = {"protocol": protocol, "scenario": scenario, "abstract": (protocol, scenario) not in SELECTED}
    if scenario == "bursty":
        attrs["wait_time"] = lambda self: burst_wait(time.time())
    name = f"{protocol.capitalize()}{scenario.capitalize()}User"
    attrs["__doc__"] = f"The {scenario} scenario over {protocol}."
    return type(name, (FleetUser,), attrs)


GrpcChatUser = _user_class("grpc", "chat")
GrpcMultiturnUser = _user_class("grpc", "multiturn")
GrpcBatchUser = _user_class("grpc", "batch")
GrpcBurstyUser = _user_class("grpc", "bursty")
HttpChatUser = _user_class("http", "chat")
HttpMultiturnUser = _user_class("http", "multiturn")
HttpBatchUser = _user_class("http", "batch")
HttpBurstyUser = _user_class("http", "bursty")


# -- the LLM metrics beside Locust's stats ----------------------------------------------------------------


@events.report_to_master.add_listener
def _send_llm_stats(client_id, data) -> None:
    data["fleetserve_llm"] = LLM.serialize_and_reset()


@events.worker_report.add_listener
def _merge_llm_stats(client_id, data) -> None:
    LLM.merge(data.get("fleetserve_llm", []))


@events.quit.add_listener
def _write_llm_report(exit_code, **kwargs) -> None:
    """After Locust wrote its CSVs and HTML report: <csv prefix>_llm.csv, and the LLM table in the report."""
    env = _ENV.get("environment")
    if env is None or isinstance(env.runner, WorkerRunner):
        return
    stats = env.runner.stats
    duration = max(0.0, (stats.last_request_timestamp or stats.start_time) - stats.start_time)
    options = env.parsed_options
    if prefix := getattr(options, "csv_prefix", None):
        # Locust rewrites <prefix>_stats.csv once a second and not at the end, so its last second would be
        # missing: write the final numbers (its own format) so the CSV matches the report.
        with open(f"{prefix}_stats.csv", "w", newline="") as f:
            locust_stats.StatsCSV(env, locust_stats.PERCENTILES_TO_REPORT).requests_csv(csv.writer(f))
        LLM.write_csv(Path(f"{prefix}_llm.csv"), duration)
    html_file = getattr(options, "html_file", None)
    if html_file and Path(html_file).exists():
        page = Path(html_file).read_text()
        table = LLM.html_table(duration)
        page = page.replace("</body>", table + "</body>", 1) if "</body>" in page else page + table
        Path(html_file).write_text(page)
    print(json.dumps({"llm": LLM.rows(duration)}), file=sys.stderr)


_ENV: dict = {}


@events.init.add_listener
def _keep_environment(environment, **kwargs) -> None:
    _ENV["environment"] = environment
    LLM.worker = isinstance(environment.runner, WorkerRunner)


@events.test_start.add_listener
def _end_when_every_user_is_done(environment, **kwargs) -> None:
    """With FLEETSERVE_REQUESTS_PER_USER, quit once every user of this process has made its requests (a worker
    that quits ends a distributed run when it was the last)."""
    runner = environment.runner
    if not REQUESTS_PER_USER or runner is None or environment.parsed_options.master:
        return

    def done() -> bool:
        # Running with no users is not enough in a worker: one slower than the master's 1 s wait for its report
        # hears "spawning complete" (which sets it running) before it has run the spawn sent just before (seen
        # under load: a distributed run that quit with 0 requests). So also: the last spawn it got has run.
        spawning = runner.spawning_greenlet is not None and not runner.spawning_greenlet.dead
        return runner.state == STATE_RUNNING and not spawning and runner.user_count == 0

    def watch() -> None:
        while not done():
            gevent.sleep(0.1)
        if isinstance(runner, WorkerRunner):
            runner._send_stats()  # the last samples reach the master before this worker says it quits
        runner.quit()

    gevent.spawn(watch)
