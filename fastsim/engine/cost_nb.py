"""Per-iteration forward-pass time, evaluated inside compiled engine loops.

Kernels here and in replica_nb use error_model="numpy": divisions by zero give inf/nan instead of
raising, which removes a branch from every division in the hottest loops (no divisor can be zero
for a valid model, GPU and profile).

The cost model (fastsim.cost) folds model shape, GPU datasheet and efficiency profile into two
arrays: `params` (a float64 vector indexed by the constants below) and `ops` (one row per dense
GEMM of a decoder layer). Everything here is then a closed-form function of a batch's aggregates.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

# -- layout of the params vector ---------------------------------------------------------------
PEAK_FLOPS = 0          # dense tensor FLOP/s of the GEMM dtype, datasheet
MEM_BW = 1              # bytes/s, datasheet
COMPUTE_EFF = 2         # achieved fraction of PEAK_FLOPS by large GEMMs
BW_EFF = 3              # achieved fraction of MEM_BW by streaming GEMM operands
EW_BW_EFF = 4           # achieved fraction of MEM_BW by elementwise kernels (read + write)
ATTN_EFF = 5            # achieved fraction of PEAK_FLOPS (16-bit) by attention matmuls
ATTN_BW_EFF = 6         # achieved fraction of MEM_BW reading the KV cache
OVERLAP = 7             # p of the soft roofline (t_c^p + t_m^p)^(1/p); large p -> max()
GEMM_LATENCY_S = 8      # fixed cost of one GEMM: launch, pipeline fill, last wave
KERNEL_LATENCY_S = 9    # fixed cost of one small (elementwise / norm) kernel
ATTN_LATENCY_S = 10     # fixed cost of one attention kernel
LAYERS = 11             # decoder layers run by this GPU
EW_BYTES_PER_TOKEN = 12  # elementwise traffic of one token in one layer (norms, RoPE, residuals, act.)
EW_KERNELS = 13         # small kernels per layer
HIDDEN_BYTES = 14       # one token's hidden state, bytes (final norm traffic)
KV_BYTES_PER_TOKEN = 15  # K+V of one token in one layer on this GPU
ATTN_FLOPS_PER_PAIR = 16  # QK^T + PV FLOPs of one (query, key) pair in one layer on this GPU
Q_BYTES_PER_TOKEN = 17  # Q in + O out of one token in one layer (attention's own activation traffic)
ATTN_PEAK_FLOPS = 18    # 16-bit tensor FLOP/s (attention runs in 16 bits whatever the weights)
LM_FLOPS_PER_ROW = 19
LM_WEIGHT_BYTES = 20
LM_ACT_BYTES_PER_ROW = 21
TP = 22
LINK_BW = 23            # achieved per-direction link bytes/s
LINK_LATENCY_S = 24     # per ring step
ALLREDUCES_PER_LAYER = 25
MOE_EXPERTS = 26        # experts per layer (0: dense model)
MOE_TOP_K = 27
MOE_EXPERT_WEIGHT_BYTES = 28  # one expert's weights on this GPU
MOE_FLOPS_PER_TOKEN = 29      # FLOPs of one token through one expert on this GPU
MOE_ACT_BYTES_PER_TOKEN = 30  # activation traffic of one token through one expert
LM_GATHER_BYTES_PER_ROW = 31  # logits gathered across TP ranks, per sequence
ATTN_HALF_FILL_TILES = 32  # prefill attention tiles (head x 128 queries) at which it runs at half rate
Q_HEADS = 33            # query heads on this GPU
FRAMEWORK_OVERHEAD_S = 34  # CPU time per engine iteration, outside the forward pass (set by the engine)
PP_SEND_BYTES_PER_TOKEN = 35  # activation sent from one pipeline stage to the next, per token
ALLREDUCE_LATENCY_S = 36  # fixed cost of one all-reduce (launch and synchronisation)
N_PARAMS = 37
ATTN_TILE = 128         # query rows per FlashAttention work tile

# -- columns of the ops table -------------------------------------------------------------------
OP_FLOPS_PER_TOKEN = 0
OP_WEIGHT_BYTES = 1
OP_ACT_BYTES_PER_TOKEN = 2
N_OP_COLS = 3


@njit(cache=True, error_model="numpy")
def roofline_nb(flops, nbytes, flop_rate, byte_rate, overlap):
    """Time of a kernel that does `flops` and moves `nbytes`: a soft maximum of the two bounds.

    Real kernels near the ridge point neither fully overlap compute with memory (max) nor fully
    serialise them (sum); the p-norm sits between, p fitted to measured GEMMs.
    """
    tc = flops / flop_rate
    tm = nbytes / byte_rate
    hi = max(tc, tm)
    if hi <= 0.0:
        return 0.0
    r = min(tc, tm) / hi
    if overlap == 4.0:  # the default: two square roots instead of two pow calls, per iteration
        r2 = r * r
        return hi * math.sqrt(math.sqrt(1.0 + r2 * r2))
    return hi * (1.0 + r ** overlap) ** (1.0 / overlap)


@njit(cache=True, error_model="numpy")
def gemm_time_nb(p, rows, flops_per_row, weight_bytes, act_bytes_per_row):
    if rows <= 0:
        return 0.0
    return p[GEMM_LATENCY_S] + roofline_nb(rows * flops_per_row, weight_bytes + rows * act_bytes_per_row,
                                           p[PEAK_FLOPS] * p[COMPUTE_EFF], p[MEM_BW] * p[BW_EFF],
                                           p[OVERLAP])


@njit(cache=True, error_model="numpy")
def expected_active_experts_nb(num_experts, top_k, tokens):
    """Experts hit at least once when `tokens` tokens each pick top_k of num_experts uniformly."""
    if tokens <= 0:
        return 0.0
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


@njit(cache=True, error_model="numpy")
def dense_layer_time_nb(p, ops, tokens):
    """One decoder layer's GEMMs and elementwise kernels for `tokens` tokens (attention excluded)."""
    if tokens <= 0:
        return 0.0
    t = 0.0
    for i in range(ops.shape[0]):
        t += gemm_time_nb(p, tokens, ops[i, OP_FLOPS_PER_TOKEN], ops[i, OP_WEIGHT_BYTES],
                          ops[i, OP_ACT_BYTES_PER_TOKEN])
    if p[MOE_EXPERTS] > 0.0:
        # Grouped expert GEMM: reads the weights of every expert some token was routed to.
        active = expected_active_experts_nb(p[MOE_EXPERTS], p[MOE_TOP_K], tokens)
        routed = tokens * p[MOE_TOP_K]
        t += p[GEMM_LATENCY_S] + roofline_nb(
            routed * p[MOE_FLOPS_PER_TOKEN],
            active * p[MOE_EXPERT_WEIGHT_BYTES] + routed * p[MOE_ACT_BYTES_PER_TOKEN],
            p[PEAK_FLOPS] * p[COMPUTE_EFF], p[MEM_BW] * p[BW_EFF], p[OVERLAP])
    t += p[EW_KERNELS] * p[KERNEL_LATENCY_S] + tokens * p[EW_BYTES_PER_TOKEN] / (p[MEM_BW] * p[EW_BW_EFF])
    return t


@njit(cache=True, error_model="numpy")
def attention_time_nb(p, num_decodes, decode_kv_tokens, num_prefills, prefill_pairs,
                      prefill_kv_tokens, prefill_tokens):
    """One layer's attention: decodes read their KV cache; prefill chunks are causal matmuls.

    decode_kv_tokens: keys attended by all decodes (each its context plus its new token);
    prefill_pairs: (query, key) pairs of all prefill chunks, causal; prefill_kv_tokens: keys they read.
    """
    t = 0.0
    flop_rate = p[ATTN_PEAK_FLOPS] * p[ATTN_EFF]
    byte_rate = p[MEM_BW] * p[ATTN_BW_EFF]
    if num_decodes > 0:
        t += p[ATTN_LATENCY_S] + roofline_nb(
            decode_kv_tokens * p[ATTN_FLOPS_PER_PAIR],
            decode_kv_tokens * p[KV_BYTES_PER_TOKEN] + num_decodes * p[Q_BYTES_PER_TOKEN],
            flop_rate, byte_rate, p[OVERLAP])
    if num_prefills > 0:
        # FlashAttention parallelises over (sequence, head, 128-query tile); too few tiles leave
        # SMs idle. Each chunk's last tile is on average half full, hence + num_prefills / 2.
        tiles = p[Q_HEADS] * (prefill_tokens / ATTN_TILE + 0.5 * num_prefills)
        fill = tiles / (tiles + p[ATTN_HALF_FILL_TILES])
        t += p[ATTN_LATENCY_S] + roofline_nb(
            prefill_pairs * p[ATTN_FLOPS_PER_PAIR] / fill,
            prefill_kv_tokens * p[KV_BYTES_PER_TOKEN] + prefill_tokens * p[Q_BYTES_PER_TOKEN],
            flop_rate, byte_rate, p[OVERLAP])
    return t


@njit(cache=True, error_model="numpy")
def allreduce_time_nb(p, nbytes):
    """Ring all-reduce across TP ranks: a fixed cost per collective, then 2(n-1) steps that each move
    1/n of the data over a link and pay the link's latency."""
    n = p[TP]
    if n <= 1.0 or nbytes <= 0.0:
        return 0.0
    return p[ALLREDUCE_LATENCY_S] + 2.0 * (n - 1.0) * (nbytes / n / p[LINK_BW] + p[LINK_LATENCY_S])


@njit(cache=True, error_model="numpy")
def pp_send_time_nb(p, tokens):
    """Hidden states of `tokens` tokens from one pipeline stage to the next: one point-to-point send."""
    return p[LINK_LATENCY_S] + tokens * p[PP_SEND_BYTES_PER_TOKEN] / p[LINK_BW]


@njit(cache=True, error_model="numpy")
def token_compute_nb(p, ops, tokens):
    """Compute that depends only on the batch's token count: every layer's GEMMs and elementwise
    kernels, and the final norm."""
    if tokens <= 0:
        return 0.0
    norm = p[KERNEL_LATENCY_S] + 2.0 * tokens * p[HIDDEN_BYTES] / (p[MEM_BW] * p[EW_BW_EFF])
    return p[LAYERS] * dense_layer_time_nb(p, ops, tokens) + norm


@njit(cache=True, error_model="numpy")
def seq_compute_nb(p, num_seqs):
    """The LM head on one token per sequence."""
    return gemm_time_nb(p, num_seqs, p[LM_FLOPS_PER_ROW], p[LM_WEIGHT_BYTES], p[LM_ACT_BYTES_PER_ROW])


@njit(cache=True, error_model="numpy")
def token_comm_nb(p, tokens):
    """Every layer's all-reduces of the hidden states."""
    return p[LAYERS] * p[ALLREDUCES_PER_LAYER] * allreduce_time_nb(p, tokens * p[HIDDEN_BYTES])


@njit(cache=True, error_model="numpy")
def seq_comm_nb(p, num_seqs):
    """Gathering the vocabulary-sharded logits of each sequence across TP ranks."""
    if p[TP] <= 1.0 or num_seqs <= 0:
        return 0.0
    n = p[TP]
    return (n - 1.0) / n * num_seqs * p[LM_GATHER_BYTES_PER_ROW] / p[LINK_BW] + (n - 1.0) * p[LINK_LATENCY_S]


@njit(cache=True, error_model="numpy")
def forward_time_nb(p, ops, num_decodes, decode_kv_tokens, num_prefills, prefill_tokens,
                    prefill_pairs, prefill_kv_tokens):
    """(compute_s, comm_s) of one forward pass on one GPU, from the batch's aggregates."""
    tokens = num_decodes + prefill_tokens
    num_seqs = num_decodes + num_prefills
    attn = p[LAYERS] * attention_time_nb(p, num_decodes, decode_kv_tokens, num_prefills, prefill_pairs,
                                         prefill_kv_tokens, prefill_tokens)
    compute = token_compute_nb(p, ops, tokens) + seq_compute_nb(p, num_seqs) + attn
    return compute, token_comm_nb(p, tokens) + seq_comm_nb(p, num_seqs)


@njit(cache=True, error_model="numpy")
def build_tables_nb(p, ops, max_tokens, max_seqs):
    """The parts of forward_time_nb that depend on one integer, tabulated once per run: by token
    count (the layers' dense work and all-reduces) and by sequence count (the LM head and its
    gather). Row 0 holds compute + communication, row 1 communication alone (reported apart)."""
    tok = np.empty((2, max_tokens + 1))
    for t in range(max_tokens + 1):
        tok[1, t] = token_comm_nb(p, t)
        tok[0, t] = token_compute_nb(p, ops, t) + tok[1, t]
    seq = np.empty((2, max_seqs + 1))
    for n in range(max_seqs + 1):
        seq[1, n] = seq_comm_nb(p, n)
        seq[0, n] = seq_compute_nb(p, n) + seq[1, n]
    return tok, seq


@njit(cache=True, error_model="numpy")
def stage_time_nb(p, tok_table, seq_table, tok_off, seq_off, agg):
    """(layers' time, LM head's time) of one batch on one pipeline stage, from its aggregates
    agg = (num_decodes, decode_kv_tokens, num_prefills, prefill_tokens, prefill_pairs,
    prefill_kv_tokens), with the tables of build_tables_nb placed at offsets tok_off / seq_off:
    what engine loops call. body + head equals forward_time_nb's compute + comm for one stage."""
    n_dec, dec_keys, n_pre, pre_tokens, pairs, pre_keys = agg
    body = tok_table[0, tok_off + n_dec + pre_tokens] + p[LAYERS] * attention_time_nb(
        p, n_dec, dec_keys, n_pre, pairs, pre_keys, pre_tokens)
    return body, seq_table[0, seq_off + n_dec + n_pre]


@njit(cache=True, error_model="numpy")
def chunk_pairs_nb(new, ctx, window):
    """Causal (query, key) pairs of a chunk of `new` queries after `ctx` cached tokens: the query at
    position m (1-based) sees min(m, window) keys (window 0: no window)."""
    a = ctx + 1.0
    b = ctx + float(new)
    if window <= 0 or b <= window:
        return (a + b) * (b - a + 1.0) / 2.0
    w = float(window)
    ramp_n = max(min(b, w) - a + 1.0, 0.0)
    ramp = (a + min(b, w)) * ramp_n / 2.0 if ramp_n > 0 else 0.0
    return ramp + w * (new - ramp_n)


@njit(cache=True, error_model="numpy")
def batch_aggregates_nb(decode_ctx, prefill_new, prefill_ctx, window):
    """(num_decodes, decode_kv_tokens, num_prefills, prefill_tokens, prefill_pairs, prefill_kv_tokens)."""
    dec_keys = 0.0
    for c in decode_ctx:
        dec_keys += min(c + 1, window) if window > 0 else c + 1
    n_pre = 0
    pre_tokens = 0
    pairs = 0.0
    pre_keys = 0.0
    for j in range(prefill_new.size):
        n = prefill_new[j]
        if n <= 0:
            continue
        c = prefill_ctx[j]
        n_pre += 1
        pre_tokens += n
        pairs += chunk_pairs_nb(n, c, window)
        pre_keys += (min(c, window) if window > 0 else c) + n
    return decode_ctx.size, dec_keys, n_pre, pre_tokens, pairs, pre_keys
