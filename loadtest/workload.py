"""The benchmark workload: reproducible random prompts and the requests that carry them to a gateway or an engine."""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass

from fleetserve.common.v1 import common_pb2
from fleetserve.engine.v1 import engine_service_pb2 as engine_pb
from fleetserve.inference.v1 import inference_service_pb2 as inference_pb

# Short common words: the sim engine counts roughly one token per word, so N words make a prompt of about N
# tokens. Random draws from a few hundred words make any two prompts differ within the first KV block, so the
# prefix cache does not flatter the run.
_WORDS = (
    "the of and to in is was that for on with as by at from his her they this have had not are but which one "
    "you were all we she there been when their an who will more would if no out so said what up its about into "
    "than them can only other new some could time these two may then do first any my now such like our over man "
    "me even most made after also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year off come "
    "since against go came right used take three place small found part home water room mother area money story "
    "fact month lot study book eye job word business issue side kind head house service friend father power hour "
    "game line end member law car city community name president team minute idea kid body information school face "
    "others level office door health person art war history party result change morning reason research girl guy "
    "moment air teacher force education foot boy age policy music market sense nation plan college interest death "
    "experience effect class control care field development role effort rate heart drug show leader light voice "
    "wife police mind price report decision son view relationship town road arm difference value building action "
    "model season society tax director position player record paper space ground form event official matter center"
).split()


@dataclass(frozen=True)
class Workload:
    """What every request of a run asks for; prompts are a function of (seed, stream, index) only, so a run is
    reproducible whatever order its requests finish in."""

    model: str = "sim-1b"
    prompt_tokens: int = 128
    max_tokens: int = 256
    seed: int = 0
    ignore_eos: bool = True

    def prompt(self, index: int, stream: str = "") -> str:
        """The prompt of request `index` of `stream` (about prompt_tokens words)."""
        rng = random.Random(f"{self.seed}:{stream}:{index}")
        return " ".join(rng.choices(_WORDS, k=self.prompt_tokens))

    def sampling(self) -> common_pb2.SamplingParams:
        return common_pb2.SamplingParams(max_tokens=self.max_tokens, ignore_eos=self.ignore_eos)

    def mesh_request(self, index: int, stream: str = "mesh") -> inference_pb.GenerateRequest:
        """InferenceService/Generate request (through the gateway)."""
        return inference_pb.GenerateRequest(
            model=self.model,
            prompt=self.prompt(index, stream),
            max_tokens=self.max_tokens,
            ignore_eos=self.ignore_eos,
        )

    def engine_request(self, index: int, stream: str = "direct") -> engine_pb.GenerateRequest:
        """EngineService/Generate request (straight to one engine, as the router would send it)."""
        spec = common_pb2.GenerationSpec(
            model=self.model, prompt=self.prompt(index, stream), sampling=self.sampling()
        )
        return engine_pb.GenerateRequest(
            request_id=f"bench-{uuid.uuid4().hex}",
            spec=spec,
            tenant_id="bench",
            cache_salt="bench",
        )


# -- routing-policy workloads (loadtest/policy_bench.py) ---------------------------------------------------

WORKLOADS = ("multiturn", "mixed", "bursty")


@dataclass(frozen=True)
class Conversation:
    """One user's session with the fleet: a system prompt, user turns sent one after another (each request
    carries the whole history, the model's earlier replies included), starting `start_s` into the run (open
    loop) or when a conversation slot frees up (closed loop, start_s None)."""

    tenant: str
    session: str
    system: str
    turns: tuple[str, ...]
    max_tokens: int
    start_s: float | None = None


@dataclass(frozen=True)
class PolicyWorkload:
    """The conversations of one benchmark run, and how they arrive: `concurrency` conversations at a time
    (closed loop, multiturn) or at their start times (open loop, mixed and bursty)."""

    name: str
    conversations: tuple[Conversation, ...]
    concurrency: int | None = None
    # Closed loop: slot i starts i * ramp_s into the run, so the conversations do not all open in one instant
    # (a cold burst of first turns that would measure the warm-up, not the policy).
    ramp_s: float = 0.0

    @property
    def requests(self) -> int:
        return sum(len(c.turns) for c in self.conversations)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(_WORDS, k=n))


def multiturn(
    requests: int,
    seed: int,
    *,
    tenants: int = 4,
    system_words: int = 400,
    turns: tuple[int, int] = (6, 12),
    user_words: tuple[int, int] = (120, 240),
    max_tokens: int = 32,
    concurrency: int = 16,
    ramp_s: float = 0.0,
) -> PolicyWorkload:
    """Multi-turn chats: each tenant has one system prompt that all its conversations share; every turn adds
    a user message (and the previous reply) to a history that grows to a few thousand tokens."""
    rng = random.Random(f"multiturn:{seed}")
    systems = [f"tenant {t} policy: " + _words(rng, system_words) for t in range(tenants)]
    convs: list[Conversation] = []
    left = requests
    while left > 0:
        n = min(left, rng.randint(*turns))
        t = rng.randrange(tenants)
        msgs = tuple(_words(rng, rng.randint(*user_words)) for _ in range(n))
        convs.append(Conversation(f"tenant-{t}", f"conv-{seed}-{len(convs)}", systems[t], msgs, max_tokens))
        left -= n
    return PolicyWorkload("multiturn", tuple(convs), concurrency=concurrency, ramp_s=ramp_s)


def mixed(
    requests: int,
    seed: int,
    *,
    rate_per_s: float = 2.0,
    long_share: float = 0.15,
    short_words: tuple[int, int] = (60, 250),
    long_words: tuple[int, int] = (800, 1600),
    short_out: tuple[int, int] = (8, 32),
    long_out: tuple[int, int] = (64, 128),
    tenants: int = 4,
    bursts: bool = False,
) -> PolicyWorkload:
    """Independent requests, mostly short with some long ones, arriving as a Poisson process; with bursts,
    the rate alternates between 4x for 1 s and 0.4x for 3 s (same mean), so queues build and drain."""
    rng = random.Random(f"{'bursty' if bursts else 'mixed'}:{seed}")
    convs: list[Conversation] = []
    t = 0.0
    for i in range(requests):
        rate = rate_per_s
        if bursts:
            rate = rate_per_s * (4.0 if (t % 4.0) < 1.0 else 0.4)
        t += rng.expovariate(rate)
        long = rng.random() < long_share
        words = rng.randint(*(long_words if long else short_words))
        out = rng.randint(*(long_out if long else short_out))
        tenant = f"tenant-{rng.randrange(tenants)}"
        convs.append(Conversation(tenant, f"req-{seed}-{i}", "", (_words(rng, words),), out, start_s=t))
    return PolicyWorkload("bursty" if bursts else "mixed", tuple(convs))


def policy_workload(name: str, requests: int, seed: int, speed_factor: float = 0.05) -> PolicyWorkload:
    """The named workload (multiturn, mixed, bursty) of `requests` requests. Open-loop arrival rates are set
    for engines at speed factor 0.05 (40 requests/s of modelled GPU time) and scale with the speed factor, so
    the offered load is the same fraction of the fleet's capacity at any speed."""
    rate = 40.0 * speed_factor
    if name == "multiturn":
        # Conversations open over ~5 s at speed factor 0.05 (0.25 s of modelled GPU time).
        return multiturn(requests, seed, ramp_s=0.02 / speed_factor)
    if name == "mixed":
        return mixed(requests, seed, rate_per_s=rate)
    if name == "bursty":
        return mixed(requests, seed, rate_per_s=rate, bursts=True)
    raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
