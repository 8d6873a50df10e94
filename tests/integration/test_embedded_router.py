"""gateway --embedded-router as processes (shared.cluster, no router process): each gateway worker's router
answers GetStatus on its own port and is registered as a router, its series are on the gateway's one /metrics,
each follows the registry's experiments, a conversation whose turns alternate the workers stays on one engine,
and a gateway worker SIGKILLed under load is restarted while its sibling serves, as a gateway worker without it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import grpc
import pytest
import pytest_asyncio
from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.inference.v1 import inference_service_pb2 as inf_pb
from fleetserve.inference.v1 import inference_service_pb2_grpc as inf_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.registry.v1 import registry_service_pb2_grpc as reg_grpc
from fleetserve.registry.v1 import rollout_service_pb2 as rollout_pb
from fleetserve.registry.v1 import rollout_service_pb2_grpc as rollout_grpc
from fleetserve.router.v1 import router_service_pb2 as router_pb
from fleetserve.router.v1 import router_service_pb2_grpc as router_grpc
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import running_cluster
from tests.support import assert_eventually, log_events

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fleet(tmp_path_factory):
    async with running_cluster(
        tmp_path_factory.mktemp("embedded"),
        engines=2,
        speed_factor=5.0,
        gateway_workers=2,
        embedded_router=True,
        extra_args={"router": ["--policy", "cache_aware"]},
        # An autoscaler that reads the workers' routers (found in the registry) and has nothing to change.
        autoscale_models=json.dumps({"sim-1b": {"min_replicas": 2, "max_replicas": 2}}),
        autoscale_interval_s=0.5,
    ) as cluster:
        yield cluster


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


async def generate(address: str, key: str, prompt: str, max_tokens: int = 4) -> list[inf_pb.GenerateResponse]:
    async with grpc.aio.insecure_channel(address) as ch:
        req = inf_pb.GenerateRequest(model="sim-1b", prompt=prompt, max_tokens=max_tokens, ignore_eos=True)
        return [
            r async for r in inf_grpc.InferenceServiceStub(ch).Generate(req, metadata=auth(key), timeout=30)
        ]


async def routers_registered(fleet) -> dict[str, str]:
    async with grpc.aio.insecure_channel(fleet.registry) as ch:
        resp = await reg_grpc.RegistryServiceStub(ch).ListReplicas(
            reg_pb.ListReplicasRequest(role=reg_pb.REPLICA_ROLE_ROUTER), timeout=5
        )
    return {r.replica_id: r.address for r in resp.replicas if r.state == reg_pb.REPLICA_STATE_SERVING}


async def test_no_router_process_and_each_worker_router_answers_and_is_registered(fleet):
    """No router process runs; each gateway worker's router answers GetStatus on its own port (arrivals counted
    there, as the autoscaler reads them), is registered as a router, and takes its flags (--policy) from the
    cluster's router flags."""
    assert fleet.router_names() == []
    routers = fleet.router_endpoints()
    assert len(routers) == 2 and len(set(routers)) == 2
    for i in range(6):
        chunks = await generate(fleet.gateway, fleet.api_key, f"status {i}")
        assert chunks[-1].chunk.usage.completion_tokens == 4
    arrivals = 0
    for address in routers:
        async with grpc.aio.insecure_channel(address) as ch:
            status = await router_grpc.RouterServiceStub(ch).GetStatus(
                router_pb.GetStatusRequest(), timeout=5
            )
        assert {r.replica_id for r in status.replicas} == set(fleet.engine_names())
        arrivals += sum(a.requests_total for a in status.arrivals)
    assert arrivals == 6
    assert set((await routers_registered(fleet)).values()) == set(routers)
    events = log_events(fleet, "gateway")
    configured = [e for e in events if e.get("event") == "gateway.embedded_router"]
    assert len(configured) == 2 and {e["policy"] for e in configured} == {"cache_aware"}

    # The gateway's and the router's canonical lines, both in the gateway's log, each with its request's id.
    # Both are written once the router's engine call has ended, after the client's stream (the gateway ends that
    # with the last chunk): read at once, the last request's lines were missing in 2 of 40 probes of this sequence.
    def canonical_ids(event: str) -> set:
        return {e.get("request_id") for e in log_events(fleet, "gateway") if e.get("event") == event}

    await assert_eventually(lambda: len(canonical_ids("gateway.request")) >= 6, timeout_s=10)
    await assert_eventually(lambda: len(canonical_ids("router.request")) >= 6, timeout_s=10)
    gateway_ids, router_ids = canonical_ids("gateway.request"), canonical_ids("router.request")
    assert len(gateway_ids) == 6 and None not in gateway_ids and gateway_ids == router_ids


async def test_the_autoscaler_reads_arrivals_from_the_routers_it_finds_in_the_registry(fleet):
    """The cluster gives the autoscaler --router-discovery and no router addresses: the arrival rate it reports
    comes from the workers' routers (with none to read it would fall back to the metrics service's)."""
    args = fleet.procs["autoscaler"].args
    assert "--router-discovery" in args and "--router-addresses" not in args

    async def from_routers() -> bool:
        await generate(fleet.gateway, fleet.api_key, "count me")
        async with grpc.aio.insecure_channel(fleet.registry) as ch:
            resp = await reg_grpc.RegistryServiceStub(ch).GetScaling(
                reg_pb.GetScalingRequest(model="sim-1b"), timeout=3
            )
        return (
            bool(resp.models)
            and resp.models[0].arrival_source == "routers"
            and resp.models[0].arrival_rate > 0
        )

    await assert_eventually(from_routers, timeout_s=30, interval_s=0.3)
    # min_replicas 2 with the fleet's 2 engines registered: its rounds (every 0.5 s since before the gateways
    # started) started no engine of its own.
    async with grpc.aio.insecure_channel(fleet.registry) as ch:
        resp = await reg_grpc.RegistryServiceStub(ch).GetScaling(
            reg_pb.GetScalingRequest(model="sim-1b"), timeout=3
        )
        listed = await reg_grpc.RegistryServiceStub(ch).ListReplicas(reg_pb.ListReplicasRequest(), timeout=3)
    assert resp.models[0].desired == 2 and resp.models[0].starting == 0
    assert {r.replica_id for r in listed.replicas} == set(fleet.engine_names())
    assert not list((fleet.config.data_dir / "logs").glob("sim-1b-*.log"))  # the local provisioner's engines


async def test_router_series_are_on_the_gateway_metrics_page(fleet):
    """The gateway's one /metrics has the embedded routers' series (router requests by code) beside its own."""
    await generate(fleet.gateway, fleet.api_key, "metrics please")

    async def families() -> dict:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://{fleet.procs['gateway'].metrics_address}/metrics") as resp:
                return {f.name: f for f in text_string_to_metric_families(await resp.text())}

    def router_ok(fams: dict) -> float:
        return sum(
            x.value
            for x in fams["fleetserve:router_requests"].samples
            if x.name.endswith("_total") and x.labels.get("code") == "OK"
        )

    # The router counts a request once its engine call has ended, after the client's stream has (the gateway
    # ends that with the last chunk): run alone, this test's one request was not counted yet at once.
    async def counted() -> dict | None:
        fams = await families()
        return fams if "fleetserve:router_requests" in fams and router_ok(fams) >= 1 else None

    fams = await assert_eventually(counted, timeout_s=10)
    assert "fleetserve:requests" in fams  # the gateway's own


async def _arrivals_by_router(fleet) -> dict[str, int]:
    out = {}
    for address in fleet.router_endpoints():
        async with grpc.aio.insecure_channel(address) as ch:
            status = await router_grpc.RouterServiceStub(ch).GetStatus(
                router_pb.GetStatusRequest(), timeout=5
            )
        out[address] = sum(a.requests_total for a in status.arrivals)
    return out


async def test_every_worker_router_follows_an_experiment_set_in_the_registry(fleet):
    """An A/B experiment created in the registry reaches each gateway worker's router by its own watch: answers
    through both workers (fresh connections, spread by SO_REUSEPORT; each worker's arrivals counted on its own
    port) all carry the experiment and an arm, both arms serve; once it is stopped no answer carries it."""
    spec = rollout_pb.ExperimentSpec(
        name="embedded-arms", model="sim-1b", primary_metric="ttft_ms", samples_per_arm=1000,
        population=rollout_pb.Population(percent=100),
        arms=[
            rollout_pb.Arm(name="control", variant=rollout_pb.Variant(routing_policy="least_load")),
            rollout_pb.Arm(name="rr", variant=rollout_pb.Variant(routing_policy="round_robin")),
        ],
    )  # fmt: skip
    arms: dict[str, int] = {}

    async def batch_tagged_on_both_workers(experiment_id: str) -> bool:
        before = await _arrivals_by_router(fleet)
        firsts = [
            (await generate(fleet.gateway, fleet.api_key, f"arm {i}", max_tokens=2))[0] for i in range(8)
        ]
        after = await _arrivals_by_router(fleet)
        if not all(after[a] > before[a] for a in before):
            return False  # all 8 connections went to one worker: try another batch
        if not all(c.chunk.served_by.experiment == experiment_id for c in firsts):
            return False  # a worker's router has not seen the experiment yet
        for c in firsts:
            arms[c.chunk.served_by.arm] = arms.get(c.chunk.served_by.arm, 0) + 1
        return True

    async with grpc.aio.insecure_channel(fleet.registry) as ch:
        stub = rollout_grpc.RolloutServiceStub(ch)
        created = await stub.CreateExperiment(rollout_pb.CreateExperimentRequest(spec=spec), timeout=5)
        experiment_id = created.experiment.experiment_id
        try:
            await assert_eventually(
                lambda: batch_tagged_on_both_workers(experiment_id), timeout_s=30, interval_s=0.2
            )
            await assert_eventually(
                lambda: batch_tagged_on_both_workers(experiment_id) if len(arms) < 2 else True, timeout_s=30
            )
            assert set(arms) == {"control", "rr"}
        finally:
            await stub.StopExperiment(
                rollout_pb.StopExperimentRequest(experiment_id=experiment_id), timeout=5
            )

    async def untagged() -> bool:
        firsts = [
            (await generate(fleet.gateway, fleet.api_key, f"after {i}", max_tokens=2))[0] for i in range(8)
        ]
        return all(c.chunk.served_by.experiment == "" for c in firsts)

    await assert_eventually(untagged, timeout_s=30, interval_s=0.2)


async def _routers_idle(fleet) -> bool:
    """Every worker's router holds nothing in flight and sees every engine idle (their load reports came in)."""
    for address in fleet.router_endpoints():
        async with grpc.aio.insecure_channel(address) as ch:
            status = await router_grpc.RouterServiceStub(ch).GetStatus(
                router_pb.GetStatusRequest(), timeout=5
            )
        if any(r.in_flight or r.load.running or r.load.waiting for r in status.replicas):
            return False
    return True


@pytest.mark.parametrize("session", ["", "conversation"])
async def test_a_conversation_whose_turns_alternate_gateway_workers_stays_on_one_replica(fleet, session):
    """Each turn of a conversation on a fresh connection to the other gateway worker (its own port: so every
    turn meets the router that did not route the previous one): all its turns reach one engine, which serves
    each later turn's history from its prefix cache; with a session id and without one."""
    workers = fleet.ready_info("gateway")["worker_addresses"]
    assert len(workers) == 2
    for c in range(5):
        # A system prompt of its own per conversation: no other request's blocks match it.
        messages = [
            {"role": "system", "content": f"You are helper {c} of {session or 'no'} session desk {c}. " * 12}
        ]
        replicas, cached = [], []
        for i in range(3):
            messages.append(
                {"role": "user", "content": f"question {i} of conversation {c}: how is {c}-{i} done?"}
            )
            req = inf_pb.GenerateRequest(
                model="sim-1b",
                messages=[common_pb2.ChatMessage(**m) for m in messages],
                max_tokens=4,
                ignore_eos=True,
                session_id=f"{session}-{c}" if session else "",
            )
            # Both routers see the engines idle first, so the turn is routed by prefix and ties, not by a load
            # report taken while the previous turn ran.
            await assert_eventually(lambda: _routers_idle(fleet), timeout_s=20, interval_s=0.2)
            async with grpc.aio.insecure_channel(workers[(c + i) % 2]) as ch:
                chunks = [
                    r
                    async for r in inf_grpc.InferenceServiceStub(ch).Generate(
                        req, metadata=auth(fleet.api_key), timeout=30
                    )
                ]
            replicas.append(chunks[0].chunk.served_by.replica_id)
            cached.append(chunks[-1].chunk.usage.cached_tokens)
            messages.append({"role": "assistant", "content": "".join(r.chunk.text for r in chunks)})
        assert len(set(replicas)) == 1, (c, replicas)
        assert all(n > 0 for n in cached[1:]), (c, cached)


async def _engine_busy(fleet) -> int:
    busy = 0
    for name in fleet.engine_names():
        async with grpc.aio.insecure_channel(fleet.procs[name].address) as ch:
            load = (
                await engine_grpc.EngineServiceStub(ch).GetLoad(engine_pb.GetLoadRequest(), timeout=2)
            ).load
        busy += load.running + load.waiting
    return busy


async def test_a_gateway_worker_killed_under_load_is_restarted_and_its_sibling_serves(fleet):
    """SIGKILL of one gateway worker while streams run through both: streams on the killed worker end UNAVAILABLE
    (its connection broke: the client retries, as with any gateway worker), those on its sibling finish; the
    supervisor restarts the worker, whose new router registers on a new port; requests succeed throughout and
    the engines end idle (the dead worker's engine calls were aborted with its connections)."""
    pids = fleet.ready_info("gateway")["worker_pids"]
    before = await routers_registered(fleet)
    ok: list[float] = []
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                # A fresh channel each time: the kernel spreads connections over the gateway workers.
                chunks = await generate(
                    fleet.gateway, fleet.api_key, f"client {n} request {i}", max_tokens=60
                )
                assert chunks[-1].chunk.usage.completion_tokens == 60
                ok.append(time.monotonic())
            except grpc.aio.AioRpcError as e:
                errors.append(e.code().name)
                await asyncio.sleep(0.1)

    clients = [asyncio.create_task(client(n)) for n in range(6)]
    await asyncio.sleep(2.0)
    os.kill(pids[0], signal.SIGKILL)
    killed_at = time.monotonic()
    await asyncio.sleep(6.0)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*clients), 60)

    assert set(errors) <= {"UNAVAILABLE"}, errors
    assert sum(t > killed_at for t in ok) >= 6, (len(ok), errors)
    exits = [e for e in log_events(fleet, "gateway") if e.get("event") == "gateway.worker_exited"]
    assert [e["exitcode"] for e in exits] == [-signal.SIGKILL]
    assert fleet.procs["gateway"].alive
    await assert_eventually(lambda: _engine_busy_is(fleet, 0), timeout_s=15)

    async def reregistered() -> bool:
        now = await routers_registered(fleet)
        return len(now) == 2 and now.keys() == before.keys() and now != before

    await assert_eventually(reregistered, timeout_s=20)
    # And the restarted worker serves: every request of a burst over fresh connections succeeds.
    for i in range(8):
        chunks = await generate(fleet.gateway, fleet.api_key, f"after the restart {i}")
        assert chunks[-1].chunk.usage.completion_tokens == 4


async def _engine_busy_is(fleet, n: int) -> bool:
    return await _engine_busy(fleet) == n
