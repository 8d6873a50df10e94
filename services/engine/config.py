"""Engine settings: the replica's identity, where it registers, its backend and the sim's scheduler and timing."""

from __future__ import annotations

import dataclasses
import secrets
from typing import Literal

from pydantic import Field, model_validator

from services.engine import sim_behaviour
from services.engine.cost_model import CostModel
from services.engine.profile import DEFAULT_PROFILE, GpuProfile, load_profile
from services.engine.sim_behaviour import Behaviour
from shared.settings import WorkerSettings, advertised_address, service_config


class EngineSettings(WorkerSettings):
    """Settings of an engine replica (flags --kebab-case, env FLEETSERVE_ENGINE_<FIELD>)."""

    model_config = service_config("engine")

    # A replica is one engine: it is recycled (--max-requests-per-worker), never split over workers.
    workers: int = Field(1, ge=1, le=1, description="An engine replica is one worker process (always 1).")
    max_requests_per_worker: int = Field(
        0,
        ge=0,
        description="Sim: the replica's process drains and is replaced by a fresh one (same port, same replica "
        "id) after this many requests (0: never), bounding what one process can accumulate (grpc.aio leaks "
        "natively on cancelled streams); routers send elsewhere meanwhile. Run 2+ replicas per model.",
    )

    registry_address: str = Field(
        "", description="host:port of the registry to register with; empty: do not register (tests)."
    )
    model: str = Field("sim-1b", min_length=1, description="Name of the model this replica serves.")
    model_version: str = Field(
        "v1",
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._+-]*$",
        description="Version of the model this replica serves (rollouts and experiments move traffic between "
        "versions; clients may pin one).",
    )
    replica_id: str = Field(
        default_factory=lambda: f"engine-{secrets.token_hex(3)}",
        min_length=1,
        max_length=256,
        description="Unique id of this replica in the fleet; default: engine-<6 random hex digits>.",
    )
    backend: Literal["sim", "vllm"] = Field(
        "sim", description="Engine backend: sim (simulated, CPU) or vllm (vLLM's AsyncLLM on a GPU)."
    )
    vllm_args: str = Field(
        "",
        description="vllm backend: vLLM engine flags (AsyncEngineArgs, shell-quoted), e.g. "
        "'--model DIR --load-format dummy'; --max-num-seqs/--max-num-batched-tokens default to this replica's; "
        "prefix caching is always on.",
    )
    # Off by default: vLLM's publisher cost the engine core ~9% of its tokens/s at 128 streams on an H200
    # (docs/benchmarks/gpu_vs_vllm_serve.md), and only the kv_aware router policy reads the events.
    vllm_kv_events: bool = Field(
        False,
        description="vllm backend: the engine core publishes its KV-cache events (--vllm-kv-events), the kv_aware "
        "router policy's exact view of this replica's prefix cache. Off (the default) spares the engine core that "
        "work: SubscribeKvEvents then answers FAILED_PRECONDITION KV_EVENTS_OFF, and kv_aware routers score this "
        "replica by load alone. The sim engine always publishes.",
    )
    vllm_detokenize: bool = Field(
        True,
        description="vllm backend: vLLM detokenizes outputs into chunk text (--no-vllm-detokenize streams token "
        "ids only, less per-token work in the worker; requests with stop strings are detokenized anyway).",
    )
    frontends: int = Field(
        0,
        ge=0,
        le=64,
        description="vllm backend: front-end processes sharing the one engine core (as vllm serve "
        "--api-server-count N), each serving EngineService on its own port (--port P: P, P+1, ...); the replica "
        "registers once with all of them as endpoints. 0: a quarter of this host's cores, 1 to 8. The sim engine "
        "always runs in one process.",
    )
    speed_factor: float = Field(
        1.0, gt=0, le=100_000, description="Sim: run the modelled GPU this many times faster than real time."
    )
    seed: int = Field(0, ge=0, lt=2**64, description="Sim: sampling seed for requests that carry none.")
    max_num_seqs: int = Field(
        256, ge=1, le=65_536, description="Most sequences in a batch (running requests)."
    )
    max_num_batched_tokens: int = Field(
        2048, ge=1, description="Token budget of one step (decode tokens plus prefill chunks)."
    )
    profile: str = Field(
        DEFAULT_PROFILE,
        min_length=1,
        description="Sim: GPU profile, a name in infra/profiles/ (h100-llama-1b, h100-llama-8b, l4-llama-1b) "
        "or a path to a .toml file of that shape: KV blocks, context length and cost-model terms.",
    )
    startup_s: float | None = Field(
        None,
        ge=0,
        le=86_400,
        description="Sim: modelled cold start (weights onto the GPU, compilation) before the replica serves and "
        "registers, in seconds at speed factor 1 (it waits startup_s / speed_factor); default: the GPU "
        "profile's startup_s.",
    )
    num_kv_blocks: int | None = Field(
        None, ge=1, description="Sim: KV-cache blocks of 16 tokens each; default: the profile's."
    )
    max_model_len: int | None = Field(
        None, ge=1, description="Sim: longest prompt plus max_tokens accepted; default: the profile's."
    )
    enable_prefix_caching: bool = Field(
        True, description="Sim: reuse cached KV blocks of a shared prompt prefix (per tenant cache salt)."
    )
    step_base_ms: float | None = Field(
        None, ge=0, description="Sim cost model: fixed GPU time of a step, in ms; default: the profile's."
    )
    step_per_decode_seq_ms: float | None = Field(
        None,
        ge=0,
        description="Sim cost model: GPU time per decoding sequence, in ms; default: the profile's.",
    )
    step_per_prefill_token_ms: float | None = Field(
        None, ge=0, description="Sim cost model: GPU time per prefill token, in ms; default: the profile's."
    )
    sim_behaviour: str = Field(
        "",
        description="Sim: planted behaviour per model version, 'VERSION:key=value,...;...' with keys slowdown "
        "(step time factor), error_rate, length_factor (answers cut to this fraction of max_tokens), "
        "refusal_rate; VERSION '*' for any version (tests plant regressions in a rollout's candidate).",
    )
    kv_events_max_pending: int = Field(
        1024, ge=1, description="KV-event batches queued per subscriber before the oldest are dropped."
    )
    advertise_host: str = Field(
        "",
        description="Host other services reach this replica at (registered as advertise-host:port); default: "
        "--host, or this machine's hostname when --host is a wildcard.",
    )
    register_retry_base_s: float = Field(
        0.1, gt=0, description="First delay before retrying registration (full jitter, doubling)."
    )
    register_retry_max_s: float = Field(
        5.0,
        gt=0,
        description="Longest delay between registration attempts while the registry is unreachable.",
    )
    registry_timeout_s: float = Field(2.0, gt=0, description="Timeout of each unary call to the registry.")

    @model_validator(mode="after")
    def _check(self) -> EngineSettings:
        # As in vLLM: every running sequence must be able to get its one decode token in a step.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}), or a full batch could not decode in one step"
            )
        if self.backend == "vllm" and "--model" not in self.vllm_args:
            raise ValueError("backend vllm needs --vllm-args with --model DIR (a local model directory)")
        if self.backend == "sim":
            self.gpu_profile  # noqa: B018 - a missing or malformed profile fails here, at start
            self.behaviour  # noqa: B018 - so does a malformed --sim-behaviour
        if self.backend == "sim" and self.frontends > 1:
            raise ValueError("--frontends applies to the vllm backend; the sim engine runs in one process")
        if self.max_requests_per_worker and self.backend != "sim":
            # A fresh vLLM process would load and compile the model again (33-48 s), and its front ends share
            # one engine core: recycling applies to the sim only.
            raise ValueError("--max-requests-per-worker applies to the sim backend")
        if self.register_retry_base_s > self.register_retry_max_s:
            raise ValueError("register_retry_base_s must not exceed register_retry_max_s")
        return self

    @property
    def behaviour(self) -> Behaviour:
        """This replica's planted sim behaviour (its version's entry of --sim-behaviour)."""
        try:
            return sim_behaviour.for_version(sim_behaviour.parse(self.sim_behaviour), self.model_version)
        except ValueError as e:
            raise ValueError(f"sim_behaviour: {e}") from None

    @property
    def frontend_count(self) -> int:
        """Front-end processes this replica runs (1 for the sim; --frontends, or chosen from the cores)."""
        if self.backend != "vllm":
            return 1
        from services.engine.frontends import auto_frontends

        return self.frontends or auto_frontends()

    @property
    def gpu_profile(self) -> GpuProfile:
        return load_profile(self.profile)

    @property
    def startup_delay_s(self) -> float:
        """How long this replica waits before serving, in real seconds (0 for vLLM: its start is real)."""
        if self.backend != "sim":
            return 0.0
        modelled = self.gpu_profile.startup_s if self.startup_s is None else self.startup_s
        return modelled / self.speed_factor

    @property
    def cost_model(self) -> CostModel:
        """The profile's cost model with the step_* flags that are set replacing its terms."""
        cost = self.gpu_profile.cost
        overrides = {
            "base_ms": self.step_base_ms,
            "per_decode_seq_ms": self.step_per_decode_seq_ms,
            "per_prefill_token_ms": self.step_per_prefill_token_ms,
        }
        return dataclasses.replace(cost, **{k: v for k, v in overrides.items() if v is not None})

    def advertised_address(self, port: int) -> str:
        """The host:port to register for a server bound on port."""
        return advertised_address(self.host, self.advertise_host, port)
