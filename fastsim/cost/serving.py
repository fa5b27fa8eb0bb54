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

from fastsim.cost.profile import PRE_HOPPER, CostProfile, ElementwisePasses
from fastsim.frameworks import FRAMEWORKS


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
    fp8_attention: bool          # prefill attention in FP8 over an FP8 cache
    source: str

    def kernels(self, profile: CostProfile, gpu=None) -> CostProfile:
        """`profile` (fitted on the eager calibration layer) with this framework's kernels on `gpu`
        (a GpuSpec; None: Hopper). Its prefill attention's speed-up is over FlashAttention-2 on
        Hopper, whose kernels it is tuned for; before Hopper FlashAttention-2 is at its best."""
        prefill = self.prefill_attention_speed if gpu is None or gpu.architecture not in PRE_HOPPER else 1.0
        return profile.model_copy(update={
            "elementwise_kernels_per_layer": self.elementwise_kernels_per_layer,
            "elementwise_passes": self.elementwise_passes,
            "fp8_attention": self.fp8_attention,
            "attention_efficiency": min(profile.attention_efficiency * prefill, 1.0),
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

# Fitted by bench/fit_serving.py on the development set (173 points, 254 metric rows): the CPU, API
# and kernel terms of each profile on its own points, the all-reduce terms on every TP > 1 point.
VLLM = ServingProfile(
    # vLLM as its CI ran it late 2024 (V0 engine with chunked prefill and async output processing),
    # and V1 scheduling: vLLM CI's static batches, ShareGPT offline and online points (H100, H200,
    # A100; TP 1 and 4).
    "vllm", overhead_ms=1.96, per_seq_us=6.6, per_token_us=0.0, api_server_latency_ms=25.5,
    elementwise_kernels_per_layer=5, elementwise_passes=FUSED_VLLM, prefill_attention_speed=1.0,
    decode_attention_speed=1.0, uses_sliding_window=True, allreduce_latency_us=20.0, fp8_attention=False,
    source="vLLM CI, late 2024 (18 points)")

PROFILES = {
    "vllm": VLLM,
    # vLLM's V0 scheduler as of mid 2024: whole prefills first, output processing in series with the
    # GPU. Argonne's static batches (B 1-64, 128-2048 tokens) and batch prefills on H100, all on one
    # GPU: its API server and all-reduce are vLLM's.
    "vllm-v0": replace(VLLM, name="vllm-v0", overhead_ms=1.6, per_seq_us=43.9, per_token_us=3.1,
                       source="Argonne LLM-Inference-Bench, mid 2024 (21 points)"),
    "sglang": replace(VLLM, name="sglang", source="no SGLang point in the development set: vLLM's figures"),
    # TensorRT-LLM 0.14-0.17: NVIDIA's offline table (trtllm-bench; H100 FP8, A100 FP16; TP 1-8), its
    # Triton online table (H100 BF16) and Argonne's batch prefills. Context attention in FP8 over an
    # FP8 cache (its FP8 context FMHA), Hopper-tuned; decode attention (XQA) reads the cache faster
    # than SDPA; attention over the whole cache unless an engine is built with a max attention window.
    "trtllm": ServingProfile(
        "trtllm", overhead_ms=1.77, per_seq_us=4.78, per_token_us=0.45, api_server_latency_ms=5.4,
        elementwise_kernels_per_layer=4, elementwise_passes=FUSED_TRTLLM, prefill_attention_speed=1.55,
        decode_attention_speed=1.35, uses_sliding_window=False, allreduce_latency_us=30.6, fp8_attention=True,
        source="NVIDIA's TensorRT-LLM offline and Triton online tables, Argonne (134 points)"),
}
PROFILES["dynamo"] = VLLM  # Dynamo's workers are vLLM engines


def serving_profile(framework: str, scheduler: str = "v1") -> ServingProfile:
    """The profile of an engine's framework (vLLM's V0 scheduler has its own)."""
    if framework == "vllm" and scheduler == "v0":
        return PROFILES["vllm-v0"]
    return PROFILES[FRAMEWORKS[framework].serving]


def engine_serving(engine) -> ServingProfile:
    """The framework's profile with what the engine's arguments (fastsim.config.Engine) set instead."""
    base = serving_profile(engine.framework, engine.scheduler)
    given = {"overhead_ms": engine.framework_overhead_ms, "per_seq_us": engine.framework_overhead_per_seq_us,
             "per_token_us": engine.framework_overhead_per_token_us,
             "api_server_latency_ms": engine.api_server_latency_ms,
             "uses_sliding_window": None if engine.disable_sliding_window is None else not engine.disable_sliding_window}
    return replace(base, **{k: v for k, v in given.items() if v is not None})
