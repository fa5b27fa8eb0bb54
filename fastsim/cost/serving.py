"""What a serving framework adds to the GPU's forward passes, per framework.

The cost model (fastsim.cost.model) times a decoder layer as the calibration program runs it: an
eager PyTorch layer of 24 small kernels, in a CUDA graph, with nothing around it. A serving
framework differs in three ways, each kept here per framework:

- its kernels: fused RMSNorm + residual, rotary embedding, KV-cache write and SiLU-and-mul
  instead of the eager layer's ~24 elementwise kernels and passes, and its own attention kernels;
- CPU time per engine iteration, in series with the GPU (scheduling, preparing inputs, sampling,
  detokenizing and handing out tokens): a fixed part, a part per scheduled sequence and one per
  scheduled token;
- for online clients, the API server on the request's path (HTTP, tokenization, streaming), a
  near-constant latency added to TTFT and end-to-end latency.

The CPU and API figures are fitted on the development set of published measurements
(`python bench/fit_serving.py`, data in fastsim/validation/data); kernel counts are read from the
frameworks' model code (cited at each profile).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from fastsim.cost.profile import CostProfile, ElementwisePasses


@dataclass(frozen=True)
class ServingProfile:
    """One framework (and scheduler generation): its kernels, CPU time and API server."""

    name: str
    overhead_ms: float           # CPU time of every iteration
    per_seq_us: float            # ... and per scheduled sequence
    per_token_us: float          # ... and per scheduled token
    api_server_latency_ms: float  # online clients: added to TTFT and end-to-end latency
    elementwise_kernels_per_layer: float
    elementwise_passes: ElementwisePasses
    # Prefill attention's FLOP rate and decode attention's KV-read rate relative to the
    # calibration program's attention (PyTorch SDPA: FlashAttention-2).
    prefill_attention_speed: float
    decode_attention_speed: float
    uses_sliding_window: bool    # whether the engine restricts attention to a model's window
    allreduce_latency_us: float  # fixed cost of one tensor-parallel all-reduce with its kernels
    source: str

    def kernels(self, profile: CostProfile) -> CostProfile:
        """`profile` (fitted on the eager calibration layer) with this framework's kernels."""
        return profile.model_copy(update={
            "elementwise_kernels_per_layer": self.elementwise_kernels_per_layer,
            "elementwise_passes": self.elementwise_passes,
            "attention_efficiency": min(profile.attention_efficiency * self.prefill_attention_speed, 1.0),
            "attention_bandwidth_efficiency": min(profile.attention_bandwidth_efficiency
                                                  * self.decode_attention_speed, 1.0),
            "allreduce_latency_us": self.allreduce_latency_us,
        })


# vLLM's Llama layer (vllm/model_executor/models/llama.py, LlamaDecoderLayer.forward): two
# fused_add_rms_norm (read input and residual, write both: 4 hidden-size passes each), the
# in-place rotary embedding over Q and K (read + write), reshape_and_cache_flash (read K and V,
# write them to the cache) and silu_and_mul (read gate and up, write one): 5 small kernels.
FUSED_VLLM = ElementwisePasses(hidden=8.0, q=2.0, kv=6.0, intermediate=3.0)
# TensorRT-LLM's gpt_attention plugin applies RoPE and writes the KV cache in one preprocessing
# kernel (read Q, K, V; write Q and the cache); RMSNorm with the residual add, and SwiGLU: 4 kernels.
FUSED_TRTLLM = ElementwisePasses(hidden=8.0, q=2.0, kv=4.0, intermediate=3.0)

# Fitted by bench/fit_serving.py on the development set (173 points, 254 metric rows): the CPU and
# API terms of each profile from its own points, the all-reduce terms from every TP > 1 point.
PROFILES = {
    # vLLM as its CI ran it late 2024 (V0 engine with chunked prefill, async output processing),
    # and V1 scheduling: vLLM CI's static batches, ShareGPT offline and online points (H100, H200,
    # A100; TP 1 and 4).
    "vllm": ServingProfile("vllm", overhead_ms=0.84, per_seq_us=5.3, per_token_us=0.0, api_server_latency_ms=25.3,
                           elementwise_kernels_per_layer=5, elementwise_passes=FUSED_VLLM,
                           prefill_attention_speed=1.0, decode_attention_speed=1.0, uses_sliding_window=True,
                           allreduce_latency_us=21.6, source="vLLM CI, late 2024 (18 points)"),
    # vLLM's V0 scheduler as of mid 2024: whole prefills first, output processing in series with
    # the GPU. Argonne's static batches (B 1-64, 128-2048 tokens) and batch prefills on H100.
    "vllm-v0": ServingProfile("vllm-v0", overhead_ms=1.6, per_seq_us=43.9, per_token_us=3.1,
                              api_server_latency_ms=25.3, elementwise_kernels_per_layer=5,
                              elementwise_passes=FUSED_VLLM, prefill_attention_speed=1.0,
                              decode_attention_speed=1.0, uses_sliding_window=True, allreduce_latency_us=21.6,
                              source="Argonne LLM-Inference-Bench, mid 2024 (21 points; API latency: vLLM's)"),
    "sglang": ServingProfile("sglang", overhead_ms=0.84, per_seq_us=5.3, per_token_us=0.0, api_server_latency_ms=25.3,
                             elementwise_kernels_per_layer=5, elementwise_passes=FUSED_VLLM,
                             prefill_attention_speed=1.0, decode_attention_speed=1.0, uses_sliding_window=True,
                             allreduce_latency_us=21.6, source="no SGLang point in the development set: vLLM's figures"),
    # TensorRT-LLM 0.14-0.17: NVIDIA's offline table (trtllm-bench; H100 FP8, A100 FP16; TP 1-8),
    # its Triton online table (H100 BF16) and Argonne's batch prefills. Its context attention runs
    # ~2x the FLOP rate of FlashAttention-2 (Hopper-tuned FMHA, FP8 with an FP8 cache) and its
    # decode attention (XQA) reads the cache ~1.3x as fast as SDPA's. It attends over the whole
    # cache unless an engine is built with a max attention window.
    "trtllm": ServingProfile("trtllm", overhead_ms=1.52, per_seq_us=6.3, per_token_us=0.026,
                             api_server_latency_ms=6.0, elementwise_kernels_per_layer=4,
                             elementwise_passes=FUSED_TRTLLM, prefill_attention_speed=2.08,
                             decode_attention_speed=1.29, uses_sliding_window=False, allreduce_latency_us=21.6,
                             source="NVIDIA's TensorRT-LLM offline and Triton online tables, Argonne (134 points)"),
}
PROFILES["dynamo"] = PROFILES["vllm"]  # Dynamo's workers are vLLM engines


def serving_profile(framework: str, scheduler: str = "v1") -> ServingProfile:
    """The profile of an engine's framework (vLLM's V0 scheduler has its own)."""
    if framework == "vllm" and scheduler == "v0":
        return PROFILES["vllm-v0"]
    return PROFILES[framework]


def engine_serving(engine) -> ServingProfile:
    """The framework's profile with what the engine's arguments (fastsim.config.Engine) set instead."""
    base = serving_profile(engine.framework, engine.scheduler)
    given = {"overhead_ms": engine.framework_overhead_ms, "per_seq_us": engine.framework_overhead_per_seq_us,
             "per_token_us": engine.framework_overhead_per_token_us,
             "api_server_latency_ms": engine.api_server_latency_ms,
             "uses_sliding_window": None if engine.disable_sliding_window is None else not engine.disable_sliding_window}
    return replace(base, **{k: v for k, v in given.items() if v is not None})
