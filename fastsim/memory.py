"""Where a GPU's memory goes: weights, activation workspace, KV cache; and whether a deployment fits."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from fastsim.catalog import BYTES_PER_PARAM, GpuSpec, ModelSpec
from fastsim.catalog.models import EMBEDDING_BYTES, auto_kv_cache_dtype
from fastsim.config import Engine
from fastsim.cost.speculative import drafter
from fastsim.errors import FastsimError
from fastsim.frameworks import FRAMEWORKS

GB = 1e9
GIB = 2**30
# Memory the engine holds outside PyTorch's allocator once its profiling run is done (CUDA and cuBLAS
# workspaces): vLLM 0.19 logs 0.24-0.27 GiB of "non-torch" memory on one H100, vLLM 0.6-0.8 0.20-0.35
# GiB on RTX 3090/4090 (docs/validation.md, "KV-cache capacity", cites each log).
NON_TORCH_BYTES = 0.25 * GIB
# With TP > 1 over NVLink, NCCL's and vLLM's custom all-reduce buffers: vLLM's non-torch memory is
# 2.06-2.21 GiB per H100 at TP 2 and 4 (0.19) against 0.25 GiB at TP 1, and 3.58 against 1.79 GiB at
# TP 2 (0.6.5). NCCL does not use the switch's reduction (NVLS) at TP 2 (vLLM issue 9699), so this
# is NVLink's, not NVLS's. PCIe GPUs log none: 0.25 GiB on two RTX 4090s, 0.20 on four RTX 3090s.
NVLINK_NCCL_BUFFER_BYTES = 1.85 * GIB
# vLLM V1 profiles its sampler on max_num_seqs rows of float32 logits after the forward pass; its peak
# holds about four float32 copies of them (logits, scaled logits, probabilities, sorted values):
# 15.2-16.2 bytes per row and vocabulary entry in vLLM 0.19's logs of six dense models of four vendors.
V1_SAMPLER_BYTES_PER_LOGIT = 16
# vLLM's V0 engine sampled inside its profiling step: float32 logits and probabilities on top of the
# forward pass's peak. TensorRT-LLM's runtime likewise keeps logits buffers for max_batch_size rows
# beside its engine's activation buffers.
V0_SAMPLER_BYTES_PER_LOGIT = 8
# TensorRT-LLM's memory outside its KV pool and engine buffers: no log of its breakdown was found;
# 0.5 GiB at any TP keeps NVIDIA's memory-bound rows of the development set (Llama-3.1-70B FP16 at
# TP 2 on A100 80GB) within 7%, where vLLM's NVLink buffers would put them 18-25% low.
TRTLLM_NON_TORCH_BYTES = 0.5 * GIB


@dataclass(frozen=True)
class MemoryPlan:
    """Per GPU, in bytes (and blocks)."""

    gpu_total_bytes: float       # what CUDA reports (GpuSpec.cuda_memory_bytes)
    budget_bytes: float          # gpu_memory_utilization x total
    weight_bytes: float
    activation_bytes: float
    non_torch_bytes: float       # CUDA workspaces and NCCL buffers outside PyTorch's allocator
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
    act = activation_bytes(model, engine, tp)
    # A draft model or head is loaded beside the target, and its KV cache shares the target's blocks.
    draft = drafter(engine.speculative_config, model, tp)
    weights += draft.weight_bytes_per_gpu(engine.dtype)
    kv_tok = (model.kv_cache_width(tp) * layers + draft.kv_width_layers()) * BYTES_PER_PARAM[kv_dtype(engine)]
    return weights, act, kv_tok


def activation_bytes(model: ModelSpec, engine: Engine, tp: int) -> float:
    """Peak of vLLM's profiling run beyond the weights, on one GPU at TP `tp`.

    The run pushes max_num_batched_tokens through the model, then samples max_num_seqs rows. The
    forward pass peaks in the MLP: the residual stream and the normed input (2 x hidden) beside
    the gate/up output and its activated half (3 x intermediate / TP); an MoE layer's fused-kernel
    buffers hold, per token and chosen expert, its gate/up, activated and down outputs.
    """
    tokens = engine.max_num_batched_tokens
    h = model.hidden_size
    rows = min(tokens, engine.max_num_seqs) * model.vocab_size
    persistent, inter = 0.0, model.intermediate_size
    if model.is_moe:
        # The fused-MoE workspace outlives the forward pass (vLLM keeps it for the next step), so the
        # sampler's peak comes on top of it: vLLM 0.19 logs 1.21-2.68 GiB for Mixtral, Qwen-MoE and
        # DeepSeek-V2-Lite, 0.2-0.4 GiB over their samplers'.
        persistent = tokens * model.num_experts_per_tok * (3 * model.moe_intermediate_size / tp + h) * 2
        inter = model.shared_expert_intermediate_size
    forward = tokens * (2 * h + 3 * inter / tp) * 2
    if FRAMEWORKS[engine.framework].v0_sampler or engine.scheduler == "v0":  # V0 adds the sampler's logits
        return persistent + forward + rows * V0_SAMPLER_BYTES_PER_LOGIT
    return persistent + max(forward, rows * V1_SAMPLER_BYTES_PER_LOGIT)


def non_torch_bytes(gpu: GpuSpec, engine: Engine, tp: int) -> float:
    """Memory outside PyTorch's allocator per GPU: CUDA workspaces, and NCCL's buffers under TP."""
    if FRAMEWORKS[engine.framework].trtllm_memory:
        return TRTLLM_NON_TORCH_BYTES
    if tp > 1 and gpu.interconnect == "nvlink":
        return NON_TORCH_BYTES + NVLINK_NCCL_BUFFER_BYTES
    return NON_TORCH_BYTES


def _kv_room(model: ModelSpec, gpu: GpuSpec, engine: Engine, tp: int) -> tuple:
    """(total, budget, weights, activations, non-torch, KV bytes per token, bytes left for KV) on one
    GPU at TP `tp`: vLLM's budget is gpu_memory_utilization x what CUDA reports; TensorRT-LLM's KV
    cache is a fraction of what the model leaves."""
    total = gpu.cuda_memory_bytes
    weights, act, kv_tok = _per_gpu(model, engine, tp)
    other = non_torch_bytes(gpu, engine, tp)
    if FRAMEWORKS[engine.framework].trtllm_memory:
        return total, total, weights, act, other, kv_tok, \
            engine.kv_cache_free_gpu_mem_fraction * (total - weights - act - other)
    budget = engine.gpu_memory_utilization * total
    return total, budget, weights, act, other, kv_tok, budget - weights - act - other


def memory_plan(model: ModelSpec, gpu: GpuSpec, engine: Engine, check_context: bool = True) -> MemoryPlan:
    """The KV-cache size vLLM would allocate, or a FastsimError saying why the deployment cannot work
    (with `check_context` False, also a cache that cannot hold one max_model_len request)."""
    tp = engine.tensor_parallel_size
    if model.num_attention_heads % tp:
        raise FastsimError(f"engine.tensor_parallel_size = {tp}: {model.name} has {model.num_attention_heads} "
                           "attention heads, which TP must divide; use a divisor of it")
    if engine.pipeline_parallel_size > model.num_hidden_layers:
        raise FastsimError(f"engine.pipeline_parallel_size = {engine.pipeline_parallel_size}: {model.name} has "
                           f"only {model.num_hidden_layers} layers to split; use at most that")
    model.check_expert_split(expert_parallel_size(model, engine))
    max_len = engine.max_model_len or model.max_position_embeddings
    total, budget, weights, act, other, kv_tok, free = _kv_room(model, gpu, engine, tp)
    if free <= 0:
        split = tp * engine.pipeline_parallel_size
        raise FastsimError(
            f"{model.name} in {engine.dtype} needs {model.weight_bytes(engine.dtype) / GB:.1f} GB of weights"
            f"{f' ({weights / GB:.1f} GB per GPU at tensor_parallel_size {tp} x pipeline_parallel_size {engine.pipeline_parallel_size})' if split > 1 else ''}"
            f" plus {act / GB:.1f} GB of activations and {other / GB:.1f} GB of CUDA and NCCL buffers; one "
            f"{gpu.name} has {total / GB:.1f} GB, "
            f"{budget / GB:.1f} GB at gpu_memory_utilization {engine.gpu_memory_utilization}"
            f"{smallest_tp_hint(model, gpu, engine)}")
    block = engine.block_size * kv_tok
    blocks = engine.num_gpu_blocks_override or int(free // block)
    plan = MemoryPlan(total, budget, weights, act, other, blocks * block, kv_tok, block, blocks, max_len)
    if not check_context:
        return plan
    if blocks * engine.block_size < max_len and engine.num_gpu_blocks_override:
        raise FastsimError(f"engine.num_gpu_blocks_override = {blocks} blocks of {engine.block_size} tokens hold "
                           f"{blocks * engine.block_size} tokens, less than max_model_len {max_len}; raise it "
                           "or lower engine.max_model_len")
    if blocks * engine.block_size < max_len:
        raise FastsimError(
            f"max_model_len {max_len} does not fit the KV cache: {free / GB:.2f} GB free for KV after "
            f"{weights / GB:.1f} GB of weights, {act / GB:.1f} GB of activations and {other / GB:.1f} GB of CUDA "
            f"and NCCL buffers holds "
            f"{blocks * engine.block_size} tokens ({kv_tok / 1024:.0f} KiB each); lower engine.max_model_len, "
            f"raise gpu_memory_utilization{smallest_tp_hint(model, gpu, engine, max_len)}")
    return plan


def smallest_tp_hint(model: ModelSpec, gpu: GpuSpec, engine: Engine, need_tokens: int = 1) -> str:
    """'; tensor_parallel_size >= N fits' for the smallest TP (dividing the heads) that holds the
    weights and `need_tokens` of KV, or '' when none up to the head count does."""
    for tp in range(engine.tensor_parallel_size + 1, model.num_attention_heads + 1):
        if model.num_attention_heads % tp:
            continue
        *_, kv_tok, free = _kv_room(model, gpu, engine, tp)
        if free >= need_tokens * kv_tok:
            return f"; tensor_parallel_size >= {tp} fits"
    return ""
