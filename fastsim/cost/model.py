"""The roofline cost model: one forward pass of a model on one GPU, per operation."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from fastsim.catalog import BYTES_PER_PARAM, GpuSpec, ModelSpec, load_gpu, load_model
from fastsim.catalog.models import auto_kv_cache_dtype
from fastsim.cost.profile import CostProfile, load_profile
from fastsim.engine import cost_nb as nb
from fastsim.errors import FastsimError

ACT_BYTES = 2.0  # activations stay 16-bit whatever the weight format


class ForwardTime(NamedTuple):
    compute_s: float
    comm_s: float
    total_s: float


@dataclass(frozen=True)
class CostModel:
    """Per-GPU forward-pass time of `model` on `gpu` with tensor parallelism `tp`.

    `params` and `ops` are the arrays the engine's compiled kernels evaluate (fastsim.engine.cost_nb).
    """

    model: ModelSpec
    gpu: GpuSpec
    profile: CostProfile
    tp: int
    dtype: str
    kv_cache_dtype: str
    params: np.ndarray
    ops: np.ndarray
    expert_parallel_size: int = 1

    @classmethod
    def create(cls, model: str | ModelSpec = "meta-llama/Meta-Llama-3-8B", gpu: str | GpuSpec = "H100-SXM",
               tp: int = 1, dtype: str = "bf16", profile: str | Path | CostProfile | None = None,
               kv_cache_dtype: str | None = None, layers: int | None = None, enable_expert_parallel: bool = False,
               dp: int = 1, expert_routing_skew: float = 0.0) -> CostModel:
        """`layers`: decoder layers on this GPU (a pipeline stage); default all of them.

        MoE models: with `enable_expert_parallel` the experts are spread whole over the tp x dp GPUs
        (vLLM's expert parallelism; attention stays data parallel across the dp replicas, whose
        tokens meet in every MoE layer, assumed equally loaded); without it every expert is sharded
        by TP. `expert_routing_skew`: Zipf exponent of expert popularity (0: balanced)."""
        spec = model if isinstance(model, ModelSpec) else load_model(model)
        hw = gpu if isinstance(gpu, GpuSpec) else load_gpu(gpu)
        prof = load_profile(profile, hw)
        kv_dtype = kv_cache_dtype or auto_kv_cache_dtype(dtype)
        for field, value in (("dtype", dtype), ("kv_cache_dtype", kv_dtype)):
            if value not in BYTES_PER_PARAM:
                raise FastsimError(f"{field}: {value!r} is not supported; use one of {', '.join(BYTES_PER_PARAM)}")
        if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
            raise FastsimError(f"tensor_parallel_size: {tp!r} must be a positive integer")
        for what, size in (("num_attention_heads", spec.num_attention_heads), ("vocab_size", spec.vocab_size)):
            if tp > 1 and size % tp:
                raise FastsimError(f"tensor_parallel_size: {tp} does not divide {spec.name}'s {what} "
                                   f"({size}); use a divisor of it")
        n_layers = spec.num_hidden_layers if layers is None else layers
        if not 1 <= n_layers <= spec.num_hidden_layers:
            raise FastsimError(f"layers: {layers} must be between 1 and {spec.num_hidden_layers}")
        if not isinstance(dp, int) or dp < 1:
            raise FastsimError(f"data_parallel_size: {dp!r} must be a positive integer")
        ep = tp * dp if enable_expert_parallel and spec.is_moe else 1
        spec.check_expert_split(ep)
        if not expert_routing_skew >= 0:
            raise FastsimError(f"expert_routing_skew: {expert_routing_skew!r} must be >= 0 (0: balanced routing)")
        params, ops = _build_arrays(spec, hw, prof, tp, dtype, kv_dtype, n_layers, ep, dp if ep > 1 else 1,
                                    float(expert_routing_skew))
        return cls(spec, hw, prof, tp, dtype, kv_dtype, params, ops, ep)

    def forward_time(self, decode_context_lens, prefill_new_tokens=(), prefill_context_lens=None) -> ForwardTime:
        """Seconds of one forward pass on one GPU: decoding sequences with `decode_context_lens`
        cached tokens each (they attend over those plus the new token), and prefill chunks of
        `prefill_new_tokens[j]` new tokens after `prefill_context_lens[j]` cached ones."""
        compute, comm = nb.forward_time_nb(self.params, self.ops, *self.batch_aggregates(
            decode_context_lens, prefill_new_tokens, prefill_context_lens))
        return ForwardTime(compute, comm, compute + comm)

    def attention_time(self, decode_context_lens, prefill_new_tokens=(), prefill_context_lens=None) -> float:
        """Seconds of one layer's attention for the same batch description as forward_time."""
        n_dec, dec_keys, n_pre, pre_tokens, pre_pairs, pre_keys = self.batch_aggregates(
            decode_context_lens, prefill_new_tokens, prefill_context_lens)
        return nb.attention_time_nb(self.params, n_dec, dec_keys, n_pre, pre_pairs, pre_keys, pre_tokens)

    def batch_aggregates(self, decode_context_lens, prefill_new_tokens=(), prefill_context_lens=None):
        """The sums the kernels cost a batch by: (num_decodes, decode_kv_tokens, num_prefills,
        prefill_tokens, prefill_pairs, prefill_kv_tokens), after validating the token counts."""
        dec = _token_counts(decode_context_lens, "decode_context_lens")
        new = _token_counts(prefill_new_tokens, "prefill_new_tokens")
        ctx = np.zeros_like(new) if prefill_context_lens is None else _token_counts(
            prefill_context_lens, "prefill_context_lens")
        if ctx.shape != new.shape:
            raise ValueError(f"prefill_context_lens has {ctx.size} entries but prefill_new_tokens has "
                             f"{new.size}; give one context length per prefill chunk")
        return nb.batch_aggregates_nb(dec, new, ctx, self.model.sliding_window or 0)

    def gemm_time(self, m: int, k: int, n: int) -> float:
        """Seconds for one 16-bit (m x k) @ (k x n) GEMM under this model's GPU and profile."""
        return nb.gemm_time_nb(self.params, m, 2.0 * k * n, 2.0 * k * n, 2.0 * (k + n))


def _token_counts(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.size == 0:
        return np.zeros(0, dtype=np.int64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of token counts, got shape {a.shape}")
    if a.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integers (token counts), got dtype {a.dtype}")
    if a.min() < 0:
        raise ValueError(f"{name} has a negative token count ({a.min()}); counts must be >= 0")
    return a.astype(np.int64, copy=False)


def _build_arrays(spec: ModelSpec, hw: GpuSpec, prof: CostProfile, tp: int, dtype: str,
                  kv_dtype: str, n_layers: int, ep: int = 1, token_scale: int = 1,
                  skew: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    h = spec.hidden_size
    wb = BYTES_PER_PARAM[dtype]
    q = spec.q_size / tp
    kv = spec.kv_cache_width(tp) / 2  # width of K (or V) on this GPU
    inter = spec.intermediate_size / tp
    # A pipeline stage is costed as the model's last n_layers layers: the MoE-heaviest stage.
    moe_layers = min(spec.moe_layers, n_layers)
    dense_layers = n_layers - moe_layers

    ops = []

    def gemm(k_dim: float, n_dim: float, layers: int = n_layers):
        if layers:
            ops.append((2.0 * k_dim * n_dim, k_dim * n_dim * wb, (k_dim + n_dim) * ACT_BYTES, layers))

    if spec.is_mla:
        for k_dim, n_dim, split in spec.mla_projections():
            gemm(k_dim / (tp if split == "in" else 1), n_dim / (tp if split == "out" else 1))
    else:
        gemm(h, q + 2 * kv)   # fused QKV projection
        gemm(q, h)            # output projection
    gemm(h, 2 * inter, dense_layers)  # fused gate/up
    gemm(inter, h, dense_layers)      # down
    if spec.is_moe:
        gemm(h, spec.num_local_experts, moe_layers)  # router, replicated
        if spec.shared_expert_intermediate_size:
            gemm(h, 2 * spec.shared_expert_intermediate_size / tp, moe_layers)
            gemm(spec.shared_expert_intermediate_size / tp, h, moe_layers)
        # Expert parallelism keeps experts whole on one GPU; otherwise TP shards every expert.
        expert_inter = spec.moe_intermediate_size / (1 if ep > 1 else tp)
        # Elementwise traffic (the activation) is costed at one expert's width per MoE layer.
        inter = (dense_layers * inter + moe_layers * spec.moe_intermediate_size / tp) / n_layers

    p = np.zeros(nb.N_PARAMS)
    p[nb.PEAK_FLOPS] = hw.compute_tflops(dtype) * 1e12
    # Attention runs in 16 bits, or in FP8 where the framework's kernels do so over an FP8 cache.
    fp8 = prof.fp8_attention and kv_dtype == "fp8" and hw.fp8_tflops
    p[nb.ATTN_PEAK_FLOPS] = (hw.fp8_tflops if fp8 else hw.bf16_tflops) * 1e12
    p[nb.MEM_BW] = hw.mem_bw_gb_s * 1e9
    native_fp8 = dtype == "fp8" and hw.fp8_tflops and prof.fp8_compute_efficiency is not None
    p[nb.COMPUTE_EFF] = prof.fp8_compute_efficiency if native_fp8 else prof.compute_efficiency
    p[nb.BW_EFF] = prof.bandwidth_efficiency
    p[nb.EW_BW_EFF] = prof.elementwise_bandwidth_efficiency
    p[nb.ATTN_EFF] = prof.attention_efficiency
    p[nb.ATTN_BW_EFF] = prof.attention_bandwidth_efficiency
    p[nb.OVERLAP] = prof.overlap
    clock = prof.reference_clock_mhz / hw.boost_clock_mhz if prof.reference_clock_mhz and hw.boost_clock_mhz else 1.0
    p[nb.GEMM_LATENCY_S] = prof.gemm_latency_us * 1e-6 * clock
    p[nb.KERNEL_LATENCY_S] = prof.kernel_latency_us * 1e-6 * clock
    p[nb.ATTN_LATENCY_S] = prof.attention_latency_us * 1e-6 * clock
    p[nb.LAYERS] = n_layers
    ew = prof.elementwise_passes
    p[nb.EW_BYTES_PER_TOKEN] = ACT_BYTES * (ew.hidden * h + ew.q * q + ew.kv * kv + ew.intermediate * inter)
    p[nb.EW_KERNELS] = prof.elementwise_kernels_per_layer
    p[nb.HIDDEN_BYTES] = ACT_BYTES * h
    p[nb.KV_BYTES_PER_TOKEN] = spec.kv_cache_width(tp) * BYTES_PER_PARAM[kv_dtype]
    p[nb.ATTN_FLOPS_PER_PAIR] = spec.attention_flops_per_pair(prefill=False) / tp
    p[nb.ATTN_PREFILL_FLOPS_PER_PAIR] = spec.attention_flops_per_pair(prefill=True) / tp
    p[nb.Q_HEADS] = spec.num_attention_heads / tp
    p[nb.ATTN_HALF_FILL_TILES] = prof.attention_half_fill_tiles
    p[nb.Q_BYTES_PER_TOKEN] = 2 * q * ACT_BYTES
    vocab = spec.vocab_size / tp
    p[nb.LM_FLOPS_PER_ROW] = 2.0 * h * vocab
    # Quantized checkpoints keep the LM head in 16 bits.
    p[nb.LM_WEIGHT_BYTES] = h * vocab * ACT_BYTES
    p[nb.LM_ACT_BYTES_PER_ROW] = (h + vocab) * ACT_BYTES
    p[nb.LM_GATHER_BYTES_PER_ROW] = spec.vocab_size * ACT_BYTES
    p[nb.TP] = tp
    p[nb.LINK_BW] = hw.link_gb_s * 1e9 * prof.link_efficiency
    p[nb.LINK_LATENCY_S] = prof.link_latency_us * 1e-6
    p[nb.ALLREDUCE_LATENCY_S] = prof.allreduce_latency_us * 1e-6
    p[nb.PP_SEND_BYTES_PER_TOKEN] = ACT_BYTES * h
    # Attention's output projection and the MLP each end in an all-reduce across TP ranks; under
    # expert parallelism an MoE layer's combine replaces the MLP's.
    p[nb.ALLREDUCES_PER_LAYER] = (2.0 - (moe_layers / n_layers if ep > 1 else 0.0)) if tp > 1 else 0.0
    p[nb.MOE_EP] = ep
    p[nb.MOE_TOKEN_SCALE] = token_scale
    if spec.is_moe:
        p[nb.MOE_LAYERS] = moe_layers
        p[nb.MOE_EXPERTS] = spec.num_local_experts
        p[nb.MOE_TOP_K] = spec.num_experts_per_tok
        p[nb.MOE_SKEW] = skew
        p[nb.MOE_EXPERT_WEIGHT_BYTES] = 3 * h * expert_inter * wb
        p[nb.MOE_FLOPS_PER_TOKEN] = 6.0 * h * expert_inter
        p[nb.MOE_ACT_BYTES_PER_TOKEN] = (2 * h + 3 * expert_inter) * ACT_BYTES
        # TP ranks hold the same tokens, so each dispatches its 1/tp of them; (ep-1)/ep of the
        # routed copies go to other GPUs.
        p[nb.A2A_BYTES_PER_TOKEN] = spec.num_experts_per_tok * h * ACT_BYTES * (ep - 1) / ep / tp
    return p, np.asarray(ops, dtype=np.float64).reshape(-1, nb.N_OP_COLS)
