"""How long one engine step takes on the GPU, and how long a request spends in the front end before its first
step: a linear cost model whose terms come from a GPU profile (services/engine/profile.py)."""

from __future__ import annotations

from dataclasses import dataclass

# Calibration of the defaults (= infra/profiles/h100-llama-1b.toml; DESIGN.md, AsyncLLM in one process,
# Llama-shaped 1B model on one H100, closed loop with c requests in flight, 128-token prompts, 256 output
# tokens): 430 / 8,896 / 17,174 / 19,225 tok/s at c = 1 / 32 / 128 / 256, TTFT p50 10 ms at c = 1, and a
# ~1,700-token prompt's TTFT 37 ms cold, 21 ms warm.
#
# A decode step costs a fixed part (kernel launches, CUDA-graph replay, sampling, scheduler) plus a part per
# sequence in the batch; prefill costs per prompt token computed. base and per_decode_seq are fitted so that
# the closed loop, prefill included (tests/unit/engine/test_calibration.py drives the real scheduler on a
# virtual clock), reproduces the table: see docs/benchmarks/sim_calibration.md.
#
# The prefix-cache pair fixes the rest: cold - warm = 16 ms is the prefill of the ~1,700 tokens the cache
# saved (-> 0.0094 ms per prefill token). That leaves ~19 ms of a warm 1,700-token TTFT and ~7.5 ms of a
# 128-token TTFT that no GPU step explains: front-end time (tokenizing, hashing blocks, engine-core IPC) that
# grows with the prompt. Two front-end terms fit both: 5.5 ms per request + 0.0077 ms per prompt token. The
# front end runs beside the GPU, so it delays a request's admission and costs no step time.


@dataclass(frozen=True)
class CostModel:
    """Step time in milliseconds of GPU time for a batch of decoding sequences and prefill tokens, and the
    front-end delay of a request before it reaches the scheduler."""

    base_ms: float = 2.283
    per_decode_seq_ms: float = 0.0384
    per_prefill_token_ms: float = 0.0094
    request_overhead_ms: float = 5.5
    per_prompt_token_overhead_ms: float = 0.0077

    def step_ms(self, decode_seqs: int, prefill_tokens: int) -> float:
        """GPU time of one step that decodes decode_seqs sequences and prefills prefill_tokens tokens."""
        return (
            self.base_ms + self.per_decode_seq_ms * decode_seqs + self.per_prefill_token_ms * prefill_tokens
        )

    def frontend_ms(self, prompt_tokens: int) -> float:
        """Time from a request's arrival until the scheduler can see it."""
        return self.request_overhead_ms + self.per_prompt_token_overhead_ms * prompt_tokens

    def decode_tokens_per_s(self, batch: int) -> float:
        """Steady-state output tokens/s with batch sequences decoding (one token each per step)."""
        return batch * 1000.0 / self.step_ms(batch, 0)
