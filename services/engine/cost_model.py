"""How long one engine step takes on the GPU, and how the engine process's front end (one serial server)
delays requests before the scheduler sees them: a linear cost model whose terms come from a GPU profile
(services/engine/profile.py)."""

from __future__ import annotations

from dataclasses import dataclass

# Calibration of the defaults (= infra/profiles/h100-llama-1b.toml): fitted on the virtual-clock harness
# (services/engine/calibration.py --fit) to our own measurements of vLLM 0.25.0 behind one engine worker over
# gRPC on one H100 (docs/benchmarks/sim_fidelity.json `vllm` records, gpu_mesh_overhead.json `direct`
# records): closed loops at c = 1 / 32 / 128 / 256, 256 output tokens, ~160-token and mixed (35-1,310 token)
# prompts, and a shared ~1,270-token prefix. What the fit gives and misses: docs/benchmarks/sim_calibration.md.
#
# GPU side: a step costs a fixed part (kernel launches, CUDA-graph replay, sampling, scheduler), a part per
# decoding sequence, a part per context token those sequences attend over (their KV is read every step), a
# part per context token of the longest of them (at small batches the attention kernel's time is set by its
# longest sequence, not by the KV bytes: measured, +0.43 ms per token at c=1 for a 1,400-token context over a
# 290-token one, where KV bandwidth alone would give 0.01 ms) and a part per prompt token computed (cached
# prefix blocks cost nothing).
#
# Front end: the worker's one Python process tokenizes each request, hands it to the engine core and turns
# every output token into a streamed message. It is modelled as one serial server beside the GPU: a request
# costs frontend_request_ms + per_prompt_token_overhead_ms x prompt tokens of its time, every output token
# per_output_token_overhead_ms. A request reaches the scheduler when the front end has done its work, after
# everything queued before it, plus request_overhead_ms of latency that occupies nothing (gRPC hop, IPC to
# the engine core); so a burst of arrivals, or a front end busy streaming the running requests' tokens, delays
# admission (TTFT), and a front end saturated by per-token work throttles admission and with it throughput.
# Output reaches the client without waiting for it (vLLM's engine core runs on).


@dataclass(frozen=True)
class CostModel:
    """Step time in milliseconds of GPU time for a batch, and the front end's work per request and per output
    token (milliseconds of front-end time)."""

    base_ms: float = 2.2
    per_decode_seq_ms: float = 0.0185
    per_context_token_ms: float = 0.000007
    per_max_context_token_ms: float = 0.0004
    per_prefill_token_ms: float = 0.0105
    request_overhead_ms: float = 9.0
    frontend_request_ms: float = 1.0
    per_prompt_token_overhead_ms: float = 0.008
    per_output_token_overhead_ms: float = 0.032

    def step_ms(
        self, decode_seqs: int, prefill_tokens: int, context_tokens: int = 0, max_context: int = 0
    ) -> float:
        """GPU time of one step that decodes decode_seqs sequences (attending over context_tokens tokens in all,
        max_context the longest one's) and prefills prefill_tokens tokens."""
        return (
            self.base_ms
            + self.per_decode_seq_ms * decode_seqs
            + self.per_context_token_ms * context_tokens
            + self.per_max_context_token_ms * max_context
            + self.per_prefill_token_ms * prefill_tokens
        )

    def frontend_ms(self, prompt_tokens: int) -> float:
        """Front-end time of one request before the scheduler can see it, on an idle front end."""
        return self.request_overhead_ms + self.frontend_work_ms(prompt_tokens)

    def frontend_work_ms(self, prompt_tokens: int) -> float:
        """The part of frontend_ms that occupies the (serial) front end."""
        return self.frontend_request_ms + self.per_prompt_token_overhead_ms * prompt_tokens

    def decode_tokens_per_s(self, batch: int, context_per_seq: int = 0) -> float:
        """Steady-state output tokens/s with batch sequences decoding (one token each per step)."""
        return batch * 1000.0 / self.step_ms(batch, 0, batch * context_per_seq, context_per_seq)


class FrontEnd:
    """The engine process's front end as one FIFO server, in milliseconds of modelled time on any clock: each
    job starts when the previous one ends (or when it arrives, if the server is idle)."""

    __slots__ = ("cost", "free_at", "busy_ms")

    def __init__(self, cost: CostModel) -> None:
        self.cost = cost
        self.free_at = 0.0
        self.busy_ms = 0.0

    def admit(self, now_ms: float, prompt_tokens: int) -> float:
        """Queue a new request's work; when the scheduler may see it."""
        work = self.cost.frontend_work_ms(prompt_tokens)
        self.free_at = max(self.free_at, now_ms) + work
        self.busy_ms += work
        return self.free_at + self.cost.request_overhead_ms

    def outputs(self, now_ms: float, tokens: int) -> None:
        """Queue the streaming work of `tokens` output tokens a step produced at now_ms."""
        work = self.cost.per_output_token_overhead_ms * tokens
        if work > 0:
            self.free_at = max(self.free_at, now_ms) + work
            self.busy_ms += work
