"""Where a GPU's memory goes: weights, activation workspace, KV cache; and whether a deployment fits."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from fastsim.catalog import BYTES_PER_PARAM, GpuSpec, ModelSpec
from fastsim.catalog.models import EMBEDDING_BYTES, auto_kv_cache_dtype
from fastsim.config import Engine
from fastsim.cost.speculative import drafter
from fastsim.errors import FastsimError

GB = 1e9
# CUDA context, NCCL buffers, CUDA graphs and the allocator's slack: memory vLLM's profiling run
# does not hand to the KV cache (vLLM logs 0.1-0.6 GiB for "non_torch_memory" and graphs).
RESERVED_BYTES = 0.5 * 2**30


@dataclass(frozen=True)
class MemoryPlan:
    """Per GPU, in bytes (and blocks)."""

    gpu_total_bytes: float
    budget_bytes: float          # gpu_memory_utilization x total
    weight_bytes: float
    activation_bytes: float
    reserved_bytes: float
    kv_cache_bytes: float
    kv_bytes_per_token: float    # this GPU's share of one token's K and V
    block_bytes: float
    num_gpu_blocks: int
    max_model_len: int

    @property
    def kv_tokens(self) -> int:
        return self.num_gpu_blocks * int(round(self.block_bytes / self.kv_bytes_per_token))

    def as_dict(self) -> dict:
        return asdict(self) | {"kv_tokens": self.kv_tokens}


def kv_dtype(engine: Engine) -> str:
    """vLLM's kv_cache_dtype 'auto' is the model's 16-bit type, also under weight quantization."""
    return engine.kv_cache_dtype if engine.kv_cache_dtype != "auto" else auto_kv_cache_dtype(engine.dtype)


def stage_layers(model: ModelSpec, pp: int) -> int:
    """Decoder layers on the fullest pipeline stage (vLLM splits them as evenly as it can)."""
    return -(-model.num_hidden_layers // pp)


def expert_parallel_size(model: ModelSpec, engine: Engine, tp: int | None = None) -> int:
    """GPUs an MoE model's experts are spread over: vLLM's EP group is TP x DP."""
    if not (engine.enable_expert_parallel and model.is_moe):
        return 1
    return (tp or engine.tensor_parallel_size) * engine.data_parallel_size


def _per_gpu(model: ModelSpec, engine: Engine, tp: int) -> tuple[float, float, float]:
    """(weight bytes, activation workspace bytes, KV bytes per token) on one GPU of the fullest
    pipeline stage at TP `tp`."""
    pp = engine.pipeline_parallel_size
    layers = stage_layers(model, pp)
    bpp = BYTES_PER_PARAM[engine.dtype]
    weights = model.weight_bytes(engine.dtype)
    if pp > 1:
        # A stage holds its layers, plus the embedding (first stage) or the LM head (last stage),
        # which are the same size; the LM head is the embedding itself when tied.
        end = model.embedding_params * EMBEDDING_BYTES
        body = weights - end - model.lm_head_params * EMBEDDING_BYTES
        weights = body * layers / model.num_hidden_layers + end
    # Expert parallelism spreads whole experts over the TP x DP GPUs; everything else is split by TP.
    experts = model.expert_params * bpp * layers / model.num_hidden_layers
    ep = expert_parallel_size(model, engine, tp)
    weights = (weights - experts) / tp + experts / (ep if ep > 1 else tp)
    h = model.hidden_size
    kv_width = model.kv_cache_width(tp)
    tokens = engine.max_num_batched_tokens
    # vLLM's profiling run pushes max_num_batched_tokens through the model: the peak holds the
    # residual stream and a few hidden-size buffers, QKV, and the gate/up output with its product,
    # plus float32 logits and probabilities for up to max_num_seqs sampled rows.
    inter = (model.moe_intermediate_size * model.num_experts_per_tok if model.is_moe
             else model.intermediate_size) / tp
    act = tokens * (4 * h + model.q_size / tp + kv_width + 3 * inter) * 2
    act += min(tokens, engine.max_num_seqs) * model.vocab_size * 4 * 2
    # A draft model or head is loaded beside the target, and its KV cache shares the target's blocks.
    draft = drafter(engine.speculative_config, model, tp)
    weights += draft.weight_bytes_per_gpu(engine.dtype)
    kv_tok = (kv_width * layers + draft.kv_width_layers()) * BYTES_PER_PARAM[kv_dtype(engine)]
    return weights, act, kv_tok


def memory_plan(model: ModelSpec, gpu: GpuSpec, engine: Engine) -> MemoryPlan:
    """The KV-cache size vLLM would allocate, or a FastsimError saying why the deployment cannot work."""
    tp = engine.tensor_parallel_size
    if model.num_attention_heads % tp:
        raise FastsimError(f"engine.tensor_parallel_size = {tp}: {model.name} has {model.num_attention_heads} "
                           "attention heads, which TP must divide; use a divisor of it")
    if engine.pipeline_parallel_size > model.num_hidden_layers:
        raise FastsimError(f"engine.pipeline_parallel_size = {engine.pipeline_parallel_size}: {model.name} has "
                           f"only {model.num_hidden_layers} layers to split; use at most that")
    model.check_expert_split(expert_parallel_size(model, engine))
    max_len = engine.max_model_len or model.max_position_embeddings
    total = gpu.memory_bytes
    budget = engine.gpu_memory_utilization * total
    weights, act, kv_tok = _per_gpu(model, engine, tp)
    free = budget - weights - act - RESERVED_BYTES
    if engine.framework == "trtllm":  # a fraction of what is left after loading the model
        budget = total
        free = engine.kv_cache_free_gpu_mem_fraction * (total - weights - act - RESERVED_BYTES)
    if free <= 0:
        split = tp * engine.pipeline_parallel_size
        raise FastsimError(
            f"{model.name} in {engine.dtype} needs {model.weight_bytes(engine.dtype) / GB:.1f} GB of weights"
            f"{f' ({weights / GB:.1f} GB per GPU at tensor_parallel_size {tp} x pipeline_parallel_size {engine.pipeline_parallel_size})' if split > 1 else ''}"
            f" plus {act / GB:.1f} GB of activations; one {gpu.name} has {total / GB:.1f} GB, "
            f"{budget / GB:.1f} GB at gpu_memory_utilization {engine.gpu_memory_utilization}"
            f"{smallest_tp_hint(model, gpu, engine)}")
    block = engine.block_size * kv_tok
    blocks = engine.num_gpu_blocks_override or int(free // block)
    plan = MemoryPlan(total, budget, weights, act, RESERVED_BYTES, blocks * block, kv_tok, block, blocks, max_len)
    if blocks * engine.block_size < max_len and engine.num_gpu_blocks_override:
        raise FastsimError(f"engine.num_gpu_blocks_override = {blocks} blocks of {engine.block_size} tokens hold "
                           f"{blocks * engine.block_size} tokens, less than max_model_len {max_len}; raise it "
                           "or lower engine.max_model_len")
    if blocks * engine.block_size < max_len:
        raise FastsimError(
            f"max_model_len {max_len} does not fit the KV cache: {free / GB:.2f} GB free for KV after "
            f"{weights / GB:.1f} GB of weights and {act / GB:.1f} GB of activations holds "
            f"{blocks * engine.block_size} tokens ({kv_tok / 1024:.0f} KiB each); lower engine.max_model_len, "
            f"raise gpu_memory_utilization{smallest_tp_hint(model, gpu, engine, max_len)}")
    return plan


def smallest_tp_hint(model: ModelSpec, gpu: GpuSpec, engine: Engine, need_tokens: int = 1) -> str:
    """'; tensor_parallel_size >= N fits' for the smallest TP (dividing the heads) that holds the
    weights and `need_tokens` of KV, or '' when none up to the head count does."""
    for tp in range(engine.tensor_parallel_size + 1, model.num_attention_heads + 1):
        if model.num_attention_heads % tp:
            continue
        weights, act, kv_tok = _per_gpu(model, engine, tp)
        free = engine.gpu_memory_utilization * gpu.memory_bytes - weights - act - RESERVED_BYTES
        if free >= need_tokens * kv_tok:
            return f"; tensor_parallel_size >= {tp} fits"
    return ""
