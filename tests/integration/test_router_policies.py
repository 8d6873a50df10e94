"""Routing policies over real servers (registry, sim engines and router in this process, port 0): kv_aware follows
the engines' KV events and rebuilds after a router restart, cache_aware sends a conversation's next turn home,
and a model alias resolves to a small or a large model."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import structlog.testing
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.engine.v1 import engine_service_pb2_grpc as engine_grpc
from fleetserve.registry.v1 import registry_service_pb2 as reg_pb
from fleetserve.router.v1 import router_service_pb2 as router_pb

from services.router.config import RouterSettings
from services.router.policies import RouteRequest, cache_salt_for
from shared.errors import details_of
from tests.integration.test_router import (
    MODEL,
    closed_port_address,
    engine_app,
    engine_config,
    in_process_fleet,
    start_router,
)
from tests.support import assert_eventually
from tests.unit.router.policy_helpers import chat

pytestmark = pytest.mark.asyncio(loop_scope="function")

SYSTEM = (
    "You are the on-call assistant. Follow the runbook to the letter and say which section you used. " * 8
)


def chat_request(turns: list[str], tenant: str, model: str = MODEL, max_tokens: int = 32):
    """A chat with the shared system prompt and the turns so far (user and assistant alternating)."""
    return chat(*turns, tenant=tenant, model=model, system=SYSTEM, max_tokens=max_tokens)


async def generate(fleet, request) -> tuple[str, str, str]:
    """(replica, model, text) of one streamed generation through the router."""
    chunks = [r.chunk async for r in fleet.router_stub().Generate(request, timeout=30)]
    text = "".join(c.text for c in chunks)
    return chunks[0].served_by.replica_id, chunks[0].served_by.model, text


def route_spans(fleet, request_id: str) -> dict:
    """Attributes of the router span of request_id."""
    for s in fleet.spans.get_finished_spans():
        if s.name == "router.Generate" and s.attributes.get("fleetserve.request_id") == request_id:
            return dict(s.attributes)
    raise AssertionError(f"no router span for {request_id}")


def kv_policy(router):
    return router.servicer.policy.policy_for(MODEL)


async def _converse(fleet, tenant: str, questions: list[str]) -> list[tuple[str, dict]]:
    """Send the turns of a conversation, each with the history; (replica, route attributes) per turn."""
    turns: list[str] = []
    out = []
    for q in questions:
        turns.append(q)
        req = chat_request(turns, tenant)
        replica, _, text = await generate(fleet, req)
        out.append((replica, route_spans(fleet, req.request_id)))
        turns.append(text)
    return out


async def test_kv_aware_follows_kv_events_and_rebuilds_after_a_router_restart(tmp_path):
    """The router's kv_aware index learns each engine's blocks from its KV events: the next turn of a
    conversation goes where its prefix is cached (scored, with the reason on the span); another tenant's
    identical conversation matches nothing; a restarted router rebuilds the index from the engines' snapshots
    and still sends the conversation home."""
    async with in_process_fleet(tmp_path, engines=3, policy="kv_aware") as fleet:
        engines = sorted(fleet.engines)
        await assert_eventually(
            lambda: all(kv_policy(fleet.router).index.synced(e) for e in engines),
            timeout_s=10,
            message="kv_aware did not sync with every engine",
        )
        history = await _converse(
            fleet, "acme", ["How do I rotate the API keys?", "And the database password?"]
        )
        home = history[0][0]
        second = history[1][1]
        assert history[1][0] == home
        assert second["fleetserve.route.policy"] == "kv_aware"
        assert second["fleetserve.route.reason"] == "cached_prefix"
        assert second["fleetserve.route.matched_blocks"] > 0
        assert all(f"{e}=" in second["fleetserve.route.scores"] for e in engines)

        # The same words from another tenant: salted differently, nothing of acme's cache matches.
        other = chat_request(["How do I rotate the API keys?"], "globex")
        await generate(fleet, other)
        assert route_spans(fleet, other.request_id)["fleetserve.route.matched_blocks"] == 0

        # A new router process state: the index is rebuilt from each engine's snapshot.
        turns = ["How do I rotate the API keys?", "(reply)", "And the database password?"]
        hashes = RouteRequest.of(chat_request(turns[:1], "acme")).block_hashes
        await fleet.router.stop(0.5)
        fleet.router = await start_router(
            RouterSettings(registry_address=fleet.registry.address, policy="kv_aware"), fleet.telemetry
        )
        await assert_eventually(
            lambda: kv_policy(fleet.router).index.match(hashes, [home])[home] == len(hashes),
            timeout_s=10,
            message="restarted router did not rebuild the index from the snapshot",
        )
        again = await _converse(
            fleet, "acme", ["How do I rotate the API keys?", "And the database password?"]
        )
        assert [r for r, _ in again] == [home, home]
        assert again[0][1]["fleetserve.route.reason"] == "cached_prefix"


async def test_kv_aware_index_drops_blocks_the_engine_evicts(tmp_path):
    """Blocks an engine evicts (BlockRemoved events) leave the router's index, whoever sent the requests."""
    async with in_process_fleet(tmp_path, engines=1, policy="kv_aware") as fleet:
        fleet.engines["engine-small"] = await engine_app.start(
            engine_config.EngineSettings(
                registry_address=fleet.registry.address,
                replica_id="engine-small",
                model=MODEL,
                backend="sim",
                speed_factor=20.0,
                num_kv_blocks=64,
            ),
            fleet.telemetry,
        )
        index = kv_policy(fleet.router).index
        await assert_eventually(lambda: index.synced("engine-small"), timeout_s=10)
        engine = engine_grpc.EngineServiceStub(fleet.channel(fleet.engines["engine-small"].address))

        async def direct(req: router_pb.GenerateRequest) -> None:
            salted = engine_pb.GenerateRequest(
                request_id=req.request_id, spec=req.spec, cache_salt=cache_salt_for(req.routing.tenant_id)
            )
            async for _ in engine.Generate(salted, timeout=30):
                pass

        first = chat_request(["the first conversation"], "acme")
        hashes = RouteRequest.of(first).block_hashes
        await direct(first)
        await assert_eventually(lambda: index.match(hashes, ["engine-small"])["engine-small"] == len(hashes))
        # Other prompts fill the 64-block cache: the first one's blocks are evicted, and the index follows.
        for i in range(6):
            await direct(chat_request([f"filler {i} " * 60], f"tenant-{i}"))
        await assert_eventually(lambda: index.match(hashes, ["engine-small"])["engine-small"] < len(hashes))


async def test_kv_aware_warns_once_about_a_vllm_replica_without_kv_events_and_follows_it_once_restarted_with_them(
    tmp_path, monkeypatch
):
    """A vLLM replica started without --vllm-kv-events answers KV_EVENTS_OFF: a kv_aware router logs
    router.kv_events_off once (not once per retry), shows it as off (2) on fleetserve:router_kv_events_state,
    keeps routing to it by load with nothing cached in its index, and asks again slowly: once the engine is
    restarted with --vllm-kv-events at the same address (a crash and restart within its lease), the router
    follows its events (synced, 0) without the replica leaving the fleet and says so (router.kv_events_on), the
    crash seen in between (connecting) or not."""
    pytest.importorskip("zmq", reason="the vllm backend reads KV events with pyzmq")
    from infra.models.generate import main as generate_model
    from services.engine import vllm_backend
    from tests.fake_vllm import fake_api

    model_dir = str(tmp_path / "tiny")
    generate_model([model_dir, "--size", "tiny"])
    cores: list = []
    monkeypatch.setattr(vllm_backend, "load_vllm_api", lambda: fake_api(model_dir, cores, step_s=0.003))
    address = closed_port_address()

    async def start_vllm(kv_events: bool):
        # Not registered by the engine itself: the registry entry below outlives a crash, as a lease does.
        settings = engine_config.EngineSettings(
            replica_id="engine-vllm",
            model=MODEL,
            backend="vllm",
            vllm_args=f"--model {model_dir}",
            port=int(address.rsplit(":", 1)[1]),
            vllm_kv_events=kv_events,
        )
        return await engine_app.start(settings, fleet.telemetry)

    def state(replica: str):
        return fleet.router.metrics_registry.get_sample_value(
            "fleetserve:router_kv_events_state", {"replica": replica, "model_name": MODEL}
        )

    def events(logs: list[dict], name: str) -> list[dict]:
        return [e for e in logs if e["event"] == name and e.get("replica") == "engine-vllm"]

    async with in_process_fleet(tmp_path, engines=1, policy="kv_aware") as fleet:
        subs = kv_policy(fleet.router).subscriptions
        subs.backoff_max_s = 0.05  # "slowly" is seconds in a fleet; the test need not wait them
        vllm = await start_vllm(kv_events=False)
        try:
            with structlog.testing.capture_logs() as logs:
                await fleet.registry_stub().RegisterReplica(
                    reg_pb.RegisterReplicaRequest(
                        replica=reg_pb.Replica(
                            replica_id="engine-vllm", address=address, model=MODEL, backend="vllm"
                        )
                    ),
                    timeout=2,
                )
                await assert_eventually(lambda: state("engine-vllm") == 2, timeout_s=10)
                assert state("engine-1") == 0
                asked = subs.subscribed
                await assert_eventually(lambda: subs.subscribed >= asked + 5, timeout_s=10)
                warned = events(logs, "router.kv_events_off")
                assert len(warned) == 1 and warned[0]["log_level"] == "warning"
                assert "--vllm-kv-events" in warned[0]["fix"] and "load" in warned[0]["effect"]
                assert not events(logs, "router.kv_events_broken")  # no line per retry

                # Still routed, by load: scored beside the synced sim engine, nothing cached for it.
                req = chat_request(["a question for any replica"], "acme")
                await generate(fleet, req)
                assert "engine-vllm=" in route_spans(fleet, req.request_id)["fleetserve.route.scores"]
                assert kv_policy(fleet.router).index.blocks("engine-vllm") == 0

                # Restarted with KV events at the same address: picked up by the slow retry.
                await vllm.stop(0)
                # The retry finds it down first (connecting, as a crash looks): still "on" once it is back.
                await assert_eventually(lambda: state("engine-vllm") == 1, timeout_s=10)
                vllm = await start_vllm(kv_events=True)
                await assert_eventually(lambda: state("engine-vllm") == 0, timeout_s=10)
                assert kv_policy(fleet.router).index.synced("engine-vllm")
                assert len(events(logs, "router.kv_events_on")) == 1
                assert len(events(logs, "router.kv_events_off")) == 1
            await fleet.deregister("engine-vllm")
            await assert_eventually(lambda: state("engine-vllm") is None, timeout_s=5)
        finally:
            await vllm.stop(0)
            for core in cores:
                core.shutdown()


async def test_cache_aware_sends_each_conversations_next_turn_home(tmp_path):
    """With cache_aware, every turn of a conversation goes to the replica that served its first turn, and
    conversations running at the same time spread over replicas although they share a system prompt."""
    async with in_process_fleet(tmp_path, engines=3, policy="cache_aware") as fleet:
        conversations = await asyncio.gather(
            *(
                _converse(
                    fleet,
                    "acme",
                    [f"conversation {c} question {i} about service {c} " * 25 for i in range(4)],
                )
                for c in range(3)
            )
        )
        homes = []
        for turns in conversations:
            replicas = [r for r, _ in turns]
            assert len(set(replicas)) == 1, replicas
            assert [a["fleetserve.route.reason"] for _, a in turns[1:]] == ["prefix_match"] * 3
            homes.append(replicas[0])
        assert len(set(homes)) > 1, homes


async def test_model_alias_resolves_to_the_small_or_the_large_model(tmp_path):
    """`auto` goes to the small model for a short easy prompt and to the large one for a hard one; the span
    records the alias, the pool and why."""
    async with in_process_fleet(tmp_path, engines=1, model_aliases=f"auto={MODEL}|sim-8b") as fleet:
        fleet.engines["engine-8b"] = await engine_app.start(
            engine_config.EngineSettings(
                registry_address=fleet.registry.address,
                replica_id="engine-8b",
                model="sim-8b",
                backend="sim",
                speed_factor=20.0,
            ),
            fleet.telemetry,
        )
        await assert_eventually(lambda: fleet.router.membership.routable("sim-8b"), timeout_s=10)
        # The alias is a model to callers: ListModels lists it with its pools' replicas (the gateway checks
        # request models against this list).
        listed = await fleet.router_stub().ListModels(router_pb.ListModelsRequest(), timeout=2)
        assert {m.model: m.replicas for m in listed.models} == {MODEL: 1, "sim-8b": 1, "auto": 2}
        easy = chat_request(["What time is it in Paris?"], "acme", model="auto")
        replica, model, _ = await generate(fleet, easy)
        assert (replica, model) == ("engine-1", MODEL)
        attrs = route_spans(fleet, easy.request_id)
        assert attrs["fleetserve.model_alias"] == "auto" and attrs["fleetserve.model_pool"] == "small"
        hard = chat_request(
            ["Prove that the retry budget bounds the load step by step."], "acme", model="auto"
        )
        replica, model, _ = await generate(fleet, hard)
        assert (replica, model) == ("engine-8b", "sim-8b")
        attrs = route_spans(fleet, hard.request_id)
        assert attrs["fleetserve.model_pool"] == "large" and "prove" in attrs["fleetserve.model_route_reason"]
        # Unknown names are still an error, not an alias.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(fleet, chat_request(["hi"], "acme", model="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        # With every replica of both pools gone for now (restarting), the alias stays listed and is UNAVAILABLE
        # with a retry delay, as its models are: not NOT_FOUND.
        for name in ("engine-1", "engine-8b"):
            await fleet.engines[name].stop(0)
        await assert_eventually(lambda: not fleet.router.membership.routable(MODEL), timeout_s=10)
        await assert_eventually(lambda: not fleet.router.membership.routable("sim-8b"), timeout_s=10)
        listed = await fleet.router_stub().ListModels(router_pb.ListModelsRequest(), timeout=2)
        assert {m.model: m.replicas for m in listed.models} == {MODEL: 0, "sim-8b": 0, "auto": 0}
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await generate(fleet, chat_request(["hi"], "acme", model="auto"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert details_of(err.value).reason == "NO_HEALTHY_REPLICA"
