"""How long one engine step takes on the GPU: a linear cost model calibrated on vLLM measured on an H100."""

from __future__ import annotations

from dataclasses import dataclass

# Calibration (DESIGN.md, AsyncLLM in one process, Llama-shaped 1B model on one H100, closed loop with c
# requests in flight, 128-token prompts, 256 output tokens):
#
#     c      measured tok/s   TPOT
#     1           430         2.4 ms
#     32        8,896
#     128      17,174
#     256      19,225
#
# A decode step costs a fixed part (kernel launches, CUDA-graph replay, sampling, scheduler) plus a part per
# sequence in the batch (attention over its KV, its share of the GEMMs). At steady state every one of the c
# sequences gets one token per step, so tokens/s = c / step(c) with step(c) = base + per_decode_seq * c:
#
#     c = 1:    2.3 + 0.043 *   1 =  2.343 ms ->    427 tok/s  (measured 430, TPOT 2.4 ms)
#     c = 32:   2.3 + 0.043 *  32 =  3.676 ms ->  8,705 tok/s  (measured 8,896)
#     c = 128:  2.3 + 0.043 * 128 =  7.804 ms -> 16,402 tok/s  (measured 17,174)
#     c = 256:  2.3 + 0.043 * 256 = 13.308 ms -> 19,237 tok/s  (measured 19,225)
#
# Two points (c = 1 and c = 256) fix base and per_decode_seq; 32 and 128 land within 5%. Prefill is priced
# per prompt token from the prefix-cache measurement (~1,700-token prompt: 37 ms cold vs 21 ms warm TTFT,
# i.e. ~16 ms for ~1,700 tokens -> ~0.0094 ms per token). Counting that prefill too (128 prompt tokens per
# 256 output tokens, 0.6 ms per step at c = 256) the closed loop runs ~8% under the table at c = 256: the
# table's decode throughput is what the two fitted points reproduce.


@dataclass(frozen=True)
class CostModel:
    """Step time in milliseconds of GPU time for a batch of decoding sequences and prefill tokens."""

    base_ms: float = 2.3
    per_decode_seq_ms: float = 0.043
    per_prefill_token_ms: float = 0.0094

    def step_ms(self, decode_seqs: int, prefill_tokens: int) -> float:
        """GPU time of one step that decodes decode_seqs sequences and prefills prefill_tokens tokens."""
        return (
            self.base_ms + self.per_decode_seq_ms * decode_seqs + self.per_prefill_token_ms * prefill_tokens
        )

    def decode_tokens_per_s(self, batch: int) -> float:
        """Steady-state output tokens/s with batch sequences decoding (one token each per step)."""
        return batch * 1000.0 / self.step_ms(batch, 0)
