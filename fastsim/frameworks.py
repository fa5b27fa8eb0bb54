"""The serving frameworks fastsim models, one profile each: what a config's `framework:` changes.

Config validation, planning, memory sizing and the kernel's inputs read a framework's behaviour
from its profile here, not from string comparisons of its name; a vLLM-like framework is one more
entry. What the framework adds to each iteration's time (CPU, API server, kernels) is in
fastsim.cost.serving, under the profile's `serving` key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class FrameworkProfile:
    name: str
    # Engine arguments that differ from vLLM's defaults (given keys win over them).
    defaults: dict[str, Any] = field(default_factory=dict)
    # Scheduling: vLLM's scheduler (V1, V0 on request) or SGLang's (prefill batches apart, reserving
    # room for running requests' output, strict room for admission); TensorRT-LLM uses vLLM's
    # mixed batches with its own capacity policy.
    sglang_scheduler: bool = False
    queue_policies: tuple[str, ...] = ("fcfs",)
    v0_scheduler: bool = True            # scheduler: v0 can be asked for
    long_prefill_threshold: bool = True  # vLLM's long_prefill_token_threshold applies
    # vLLM refuses a step budget below max_num_seqs (a full batch of decodes would not fit)
    budget_at_least_batch: bool = True
    prefix_caching: bool = True          # KV reuse across requests can be modelled
    async_scheduling: bool = True
    trtllm_capacity: bool = False        # capacity_scheduler_policy, kv_cache_free_gpu_mem_fraction
    # Memory: TensorRT-LLM sizes its KV cache as a fraction of what the model leaves and keeps a fixed
    # workspace; vLLM as gpu_memory_utilization x the GPU less everything measured.
    trtllm_memory: bool = False
    v0_sampler: bool = False             # the sampler's logits on top of the forward pass (V0-like)
    fp8_where_the_gpu_has_it: bool = False  # weights and KV default to FP8 on FP8 GPUs
    sliding_window: bool = True          # attends within a model's window (else the whole cache)
    disaggregation: bool = True
    default_router: str | None = None    # when cluster.router is not given
    # A decode pool's engine keeps its cache off unless the pool asks (Dynamo's prefill workers cache)
    decode_pool_drops_prefix_cache: bool = False
    serving: str = "vllm"                # key of fastsim.cost.serving.PROFILES


FRAMEWORKS: dict[str, FrameworkProfile] = {
    "vllm": FrameworkProfile("vllm"),
    # SGLang's own defaults: page size 1 (token-granular radix cache), the radix cache on, and
    # longest-prefix-first queueing when it caches.
    "sglang": FrameworkProfile(
        "sglang", defaults={"block_size": 1, "enable_prefix_caching": True}, sglang_scheduler=True,
        queue_policies=("lpm", "fcfs"), v0_scheduler=False, long_prefill_threshold=False,
        budget_at_least_batch=False, disaggregation=False, serving="sglang"),
    # TensorRT-LLM's defaults (LLM API / trtllm-bench): max_batch_size 2048, max_num_tokens 8192,
    # tokens_per_block 32, GUARANTEED_NO_EVICT, free_gpu_memory_fraction 0.9, FP8 on Hopper and later
    # (NVIDIA's published throughput runs use FP8 checkpoints and FP8 KV). Chunked context is on here
    # so that prompts longer than max_num_tokens run at all.
    "trtllm": FrameworkProfile(
        "trtllm", defaults={"max_num_seqs": 2048, "max_num_batched_tokens": 8192, "block_size": 32,
                            "capacity_scheduler_policy": "guaranteed_no_evict",
                            "kv_cache_free_gpu_mem_fraction": 0.9, "enable_chunked_prefill": True},
        v0_scheduler=False, budget_at_least_batch=False, prefix_caching=False, async_scheduling=False,
        trtllm_capacity=True, trtllm_memory=True, v0_sampler=True, fp8_where_the_gpu_has_it=True,
        sliding_window=False, serving="trtllm"),
    # NVIDIA Dynamo over vLLM workers: vLLM's scheduling with prefix caching on (its KV router reads
    # the workers' caches; vLLM V1 turns them on by default), routed by its KV-aware router.
    "dynamo": FrameworkProfile(
        "dynamo", defaults={"enable_prefix_caching": True}, default_router="kv_aware",
        decode_pool_drops_prefix_cache=True, serving="dynamo"),
}
FRAMEWORK_NAMES = tuple(FRAMEWORKS)


def framework(name: str) -> FrameworkProfile:
    return FRAMEWORKS[name]
