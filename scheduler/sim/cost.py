"""Step-time cost model of one SGLang engine, with presets calibrated to public figures.

Why this shape: prefill is compute-bound (time grows with the uncached tokens, plus an
attention term that grows with how far into the context they sit), decode is memory-bound
(every step reads all weights once, then the KV of every running sequence), and each forward
pass has a fixed launch/scheduling overhead. Four numbers per phase capture what a scheduler
needs: re-prefilling an evicted context is expensive, big batches amortise weight reads, long
contexts slow every decode step.

Sources (H100 SXM 80 GB; confidence in brackets):

- Hardware: NVIDIA H100 SXM datasheet: HBM3 3.35 TB/s, 989 TFLOPS dense BF16. [high]
- Llama-3.1-8B shape (config.json): 8.03 B params (16.1 GB in BF16), 32 layers, 8 KV heads of
  128 -> KV 128 KiB/token in BF16. Llama-3.1-70B: 70.6 B params (141 GB), 80 layers, 8 KV heads
  of 128 -> 320 KiB/token, 80 KiB/token per GPU at TP4. [high]
- NVIDIA NIM LLM benchmarking page (docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance),
  Llama-3.1-8B-Instruct, NIM 1.8.0, 1 GPU: ITL 4.63 ms at concurrency 1, 7.57 ms at 100,
  12.65 ms at 200; TTFT 10.3 ms at concurrency 1. That table is a TensorRT-LLM engine and the
  excerpt seen did not show its precision or lengths, so we read it as a lower bound for SGLang
  BF16 and set the batch-1 step to the bandwidth bound instead: 16.1 GB / (3.35 TB/s x 0.8)
  ~= 6.0 ms. [medium]
- Same page, Llama-3.3-70B FP8 TP2 (2 x H100): ITL 18.6 ms at concurrency 1, TTFT 407 ms for
  5,000 input tokens (~81 us/token prefill); Llama-3.1-70B (NIM 1.3.0): ITL 13.2 ms at
  concurrency 1. Our 70B BF16 TP4 preset (35 GB of weights per GPU, 13 ms at 80 % of bandwidth
  plus ~2 ms all-reduce) sits at 15 ms, between those. [medium]
- Prefill per token: 2 x params FLOPs at ~55 % MFU (8B: 16 GFLOP / 545 TFLOPS ~= 30 us; we use
  35 us to include norms/sampling); 70B TP4: 141 GFLOP / (4 x 989 x 0.45) ~= 79 us. The 70B
  FP8 TP2 figure above (81 us) is consistent with it. Attention adds 4 x layers x hidden FLOPs
  per (token, earlier token) pair. [medium]
- KV capacity: SGLang's default ``--mem-fraction-static`` (~0.88 on 80 GB) minus weights and
  activations: 8B ~= (70 - 16 - 4) GB / 128 KiB ~= 400 k tokens; 70B TP4 ~= 30 GB / 80 KiB ~=
  360 k tokens. [medium: the exact ``max_total_num_tokens`` depends on version and flags]
- ``chunked_prefill_size`` 8192: SGLang's default on 80 GB GPUs. [medium]
- ``smollm2-135m-cpu``: measured in this project on the real SGLang CPU server
  (../shared/sglang-cpu/README.md): decode ~20 tok/s for one request, ~83 tok/s aggregate for
  8, prefill of 2,690 tokens in 4.2 s, KV pool 16,384 tokens. [high for that machine]
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Iterable


@dataclass(frozen=True)
class CostModel:
    name: str
    description: str
    prefill_overhead_s: float
    prefill_per_token_s: float
    prefill_attn_per_pair_s: float
    decode_base_s: float
    decode_per_seq_s: float
    decode_per_context_token_s: float
    kv_capacity_tokens: int
    max_running_requests: int
    chunked_prefill_size: int
    context_length: int

    def prefill_time(self, chunks: Iterable[tuple[int, int]]) -> float:
        """One prefill forward over ``(new_tokens, tokens_already_in_kv)`` per request."""
        total = self.prefill_overhead_s
        for new, prefix in chunks:
            total += new * self.prefill_per_token_s
            total += new * (prefix + new / 2) * self.prefill_attn_per_pair_s
        return total

    def recompute_s_per_token(self, tokens: int = 1000) -> float:
        """What the scheduler is told a recomputed token costs (``BackendView.prefill_s_per_token``):
        one prefill of ``tokens`` new tokens, overhead and attention included, per token. The
        simulator's backends and ``bench/agentic_real.py``'s runtime on the real engine must be
        told the same figure, or their keep decisions differ for the same traces."""
        return self.prefill_time([(tokens, 0)]) / tokens

    def decode_step_time(self, batch_size: int, context_tokens: int) -> float:
        """One decode forward for ``batch_size`` sequences holding ``context_tokens`` KV in all."""
        return (self.decode_base_s + batch_size * self.decode_per_seq_s
                + context_tokens * self.decode_per_context_token_s)

    def decode_steps_time(self, batch_size: int, context_tokens: int, steps: int) -> float:
        """``steps`` consecutive decode steps; context grows by ``batch_size`` each step."""
        first = self.decode_step_time(batch_size, context_tokens)
        growth = batch_size * self.decode_per_context_token_s
        return steps * first + growth * steps * (steps - 1) / 2


_H100_BW = 3.35e12 * 0.8  # bytes/s achievable
_H100_FLOPS = 989e12

PRESETS: dict[str, CostModel] = {
    "llama-3.1-8b-h100": CostModel(
        name="llama-3.1-8b-h100",
        description="Llama-3.1-8B, BF16, 1 x H100 SXM 80 GB, SGLang defaults",
        prefill_overhead_s=4e-3,
        prefill_per_token_s=35e-6,
        prefill_attn_per_pair_s=4 * 32 * 4096 / (_H100_FLOPS * 0.5),
        decode_base_s=6.0e-3,
        decode_per_seq_s=10e-6,
        decode_per_context_token_s=128 * 1024 / _H100_BW,
        kv_capacity_tokens=400_000,
        max_running_requests=1024,
        chunked_prefill_size=8192,
        context_length=131_072,
    ),
    "llama-3.1-70b-h100-tp4": CostModel(
        name="llama-3.1-70b-h100-tp4",
        description="Llama-3.1-70B, BF16, 4 x H100 SXM 80 GB, tensor parallel 4, SGLang defaults",
        prefill_overhead_s=8e-3,
        prefill_per_token_s=79e-6,
        prefill_attn_per_pair_s=4 * 80 * 8192 / (4 * _H100_FLOPS * 0.45),
        decode_base_s=15e-3,
        decode_per_seq_s=20e-6,
        decode_per_context_token_s=80 * 1024 / _H100_BW,
        kv_capacity_tokens=360_000,
        max_running_requests=512,
        chunked_prefill_size=8192,
        context_length=131_072,
    ),
    "smollm2-135m-cpu": CostModel(
        name="smollm2-135m-cpu",
        description="SmolLM2-135M on 2 CPU cores (the project's real SGLang CPU server)",
        prefill_overhead_s=20e-3,
        prefill_per_token_s=1.55e-3,
        prefill_attn_per_pair_s=0.0,
        decode_base_s=50e-3,
        decode_per_seq_s=6.6e-3,
        decode_per_context_token_s=0.0,
        kv_capacity_tokens=16_384,
        max_running_requests=64,
        chunked_prefill_size=8192,
        context_length=8192,
    ),
}


def preset(name: str) -> CostModel:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
