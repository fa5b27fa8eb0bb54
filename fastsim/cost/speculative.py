"""Speculative decoding: what a draft-and-verify step costs and gains, folded into the cost tables.

A step drafts k tokens per decoding sequence (k passes of a draft model, or of a one-layer draft
head for EAGLE/MTP, or a CPU prompt lookup for n-gram), then the target verifies the k drafts and
one token of its own in a single pass: k + 1 query tokens per sequence, attending over its KV cache.
The accepted prefix plus that token are kept: E = 1 + sum_i prod_{j<=i} a_j tokens per step on
average. The engine steps one token per decode per iteration, so an iteration is charged 1/E of a
step (fastsim.engine.cost_nb.stage_time_nb).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fastsim.catalog import ModelSpec, load_model
from fastsim.config import SpeculativeConfig
from fastsim.cost.model import CostModel
from fastsim.engine import cost_nb as nb
from fastsim.engine.bundles import Batch

ONE_LAYER_DRAFTS = ("eagle", "eagle3", "mtp")


@dataclass(frozen=True)
class Drafter:
    """The proposer's shape: its own model (draft_model), one target layer (EAGLE/MTP), or none."""

    model: ModelSpec | None
    layers: int
    tp: int

    def weight_bytes_per_gpu(self, dtype: str) -> float:
        """A draft model whole; a one-layer head a layer's share (its LM head is the target's own)."""
        if self.model is None:
            return 0.0
        return self.model.weight_bytes(dtype) * self.layers / self.model.num_hidden_layers / self.tp

    def kv_width_layers(self) -> float:
        """Values the drafter caches per token, over its layers, per GPU."""
        if self.model is None:
            return 0.0
        return self.model.kv_cache_width(self.tp) * self.layers


def drafter(sc: SpeculativeConfig | None, target: ModelSpec, tp: int) -> Drafter:
    if sc is None or sc.draft_method == "ngram":
        return Drafter(None, 0, tp)
    if sc.draft_method in ONE_LAYER_DRAFTS:
        return Drafter(target, 1, tp)
    draft = load_model(sc.model)
    return Drafter(draft, draft.num_hidden_layers, sc.draft_tensor_parallel_size or tp)


def apply_speculation(target: CostModel, params: np.ndarray, seq_table: np.ndarray, sc: SpeculativeConfig,
                      max_num_seqs: int) -> None:
    """Set the speculative entries of `params` and the draft row of `seq_table` (in place)."""
    k = sc.num_speculative_tokens
    params[nb.SPEC_TOKENS] = k
    params[nb.SPEC_EXPECTED] = sc.expected_tokens_per_step
    d = drafter(sc, target.model, target.tp)
    if d.model is None:
        return
    draft = CostModel.create(d.model, target.gpu, tp=d.tp, dtype=target.dtype, profile=target.profile,
                             kv_cache_dtype=target.kv_cache_dtype, layers=d.layers)
    tok, seq = nb.build_tables_nb(draft.params, draft.ops, max_num_seqs, max_num_seqs)
    seq_table[2, :max_num_seqs + 1] = k * (tok[0] + seq[0])
    # Decode attention reads the KV cache: the drafter's costs what its cache holds per token
    # relative to the target's (stage_time_nb scales the target's attention by this).
    params[nb.SPEC_DRAFT_ATTN] = (draft.params[nb.KV_BYTES_PER_TOKEN] * draft.params[nb.LAYERS]
                                  / (target.params[nb.KV_BYTES_PER_TOKEN] * target.params[nb.LAYERS]))


def speculative_cost_model(target: CostModel, sc: SpeculativeConfig | None, max_num_seqs: int,
                           max_num_batched_tokens: int, overhead_s: float, per_seq_s: float = 0.0,
                           per_token_s: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(params, token table, sequence table) for the engine, with speculation folded in when given.
    The engine charges CPU time per engine step, `overhead_s` plus `per_seq_s` per scheduled
    sequence and `per_token_s` per scheduled token, each iteration; under speculation an iteration
    is 1/E of a step and carries 1/E of it."""
    params = target.params.copy()
    per_step = sc.expected_tokens_per_step if sc is not None else 1.0
    params[nb.FRAMEWORK_OVERHEAD_S] = overhead_s / per_step
    params[nb.CPU_PER_SEQ_S] = per_seq_s / per_step
    params[nb.CPU_PER_TOKEN_S] = per_token_s / per_step
    extra = sc.num_speculative_tokens if sc is not None else 0
    tok, seq = nb.build_tables_nb(params, target.ops, max_num_batched_tokens + max_num_seqs * extra,
                                  max_num_seqs * (1 + extra))
    if sc is not None:
        apply_speculation(target, params, seq, sc, max_num_seqs)
    return params, tok, seq


def decode_step_s(params: np.ndarray, tok: np.ndarray, seq: np.ndarray, batch: int, context: int) -> float:
    """Seconds per generated token for each of `batch` sequences decoding at `context` tokens,
    with the tables of speculative_cost_model (the per-iteration overhead in params included)."""
    agg = Batch(batch, float(batch * (context + 1)), 0, 0, 0.0, 0.0)
    body, head = nb.stage_time_nb(params, tok, seq, 0, 0, agg)
    return body + head + nb.cpu_overhead_nb(params, agg)
