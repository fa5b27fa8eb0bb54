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

from fastsim.engine.bundles import Batch

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
FRAMEWORK_OVERHEAD_S = 34  # CPU time of every engine iteration outside the forward pass (set by the engine)
PP_SEND_BYTES_PER_TOKEN = 35  # activation sent from one pipeline stage to the next, per token
ALLREDUCE_LATENCY_S = 36  # fixed cost of one all-reduce (launch and synchronisation)
ATTN_PREFILL_FLOPS_PER_PAIR = 37  # as ATTN_FLOPS_PER_PAIR for prefill chunks (MLA prefills unabsorbed)
MOE_LAYERS = 38         # MoE layers on this GPU (the ops table carries the others' dense MLP)
MOE_EP = 39             # expert-parallel group size: each GPU holds MOE_EXPERTS / MOE_EP whole experts
MOE_TOKEN_SCALE = 40    # tokens entering an MoE layer per token of this replica (DP ranks sharing experts)
MOE_SKEW = 41           # Zipf exponent of expert popularity (0: balanced routing)
A2A_BYTES_PER_TOKEN = 42  # bytes one token's routed activations send from this GPU, dispatch (= combine)
SPEC_TOKENS = 43        # draft tokens proposed per sequence per step (0: no speculative decoding)
SPEC_EXPECTED = 44      # expected tokens a decoding sequence gains per speculative step
SPEC_DRAFT_ATTN = 45    # one draft pass's decode attention as a fraction of the target's
CPU_PER_SEQ_S = 46      # CPU time of an iteration per scheduled sequence (inputs, sampling, outputs)
CPU_PER_TOKEN_S = 47    # CPU time of an iteration per scheduled token
CPU_OVERLAP = 48        # 1: the CPU prepares the next iteration while the GPU runs this one (async scheduling)
N_PARAMS = 49
ATTN_TILE = 128         # query rows per FlashAttention work tile

# -- columns of the ops table -------------------------------------------------------------------
OP_FLOPS_PER_TOKEN = 0
OP_WEIGHT_BYTES = 1
OP_ACT_BYTES_PER_TOKEN = 2
OP_LAYERS = 3           # layers on this GPU that run the op (DeepSeek's dense MLPs run in a few)
N_OP_COLS = 4


@njit(cache=True, error_model="numpy")
def roofline_nb(flops, nbytes, flop_rate, byte_rate, overlap):
    """Time of a kernel that does `flops` and moves `nbytes`: a soft maximum of the two bounds.

    Real kernels near the ridge point neither fully overlap compute with memory (max) nor fully
    serialise them (sum); the p-norm sits between, p fitted to measured GEMMs.
    """
    return soft_max_nb(flops / flop_rate, nbytes / byte_rate, overlap)


@njit(cache=True, error_model="numpy", inline="always")
def soft_max_nb(tc, tm, overlap):
    """roofline_nb from the two bounds' times."""
    if overlap == 4.0:
        # The default p: two square roots of tc^4 + tm^4, with no division by the larger bound
        # (fast mode's closed-form runs evaluate this in their chain of dependent arithmetic).
        # Kernel times lie far from where a fourth power under- or overflows (1e-77 .. 1e77 s).
        # (A binomial series where one bound is under a tenth of the other, one division instead
        # of the roots, measured no faster in interleaved runs: dropped.)
        tc2 = tc * tc
        tm2 = tm * tm
        return math.sqrt(math.sqrt(tc2 * tc2 + tm2 * tm2))
    hi = max(tc, tm)
    if hi <= 0.0:
        return 0.0
    r = min(tc, tm) / hi
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
def expert_gemm_time_nb(p, active, routed):
    """A grouped expert GEMM on one GPU: `routed` token-expert pairs over `active` experts' weights."""
    return p[GEMM_LATENCY_S] + roofline_nb(
        routed * p[MOE_FLOPS_PER_TOKEN], active * p[MOE_EXPERT_WEIGHT_BYTES] + routed * p[MOE_ACT_BYTES_PER_TOKEN],
        p[PEAK_FLOPS] * p[COMPUTE_EFF], p[MEM_BW] * p[BW_EFF], p[OVERLAP])


@njit(cache=True, error_model="numpy")
def moe_layer_time_nb(p, tokens):
    """One MoE layer's routed-expert GEMMs for `tokens` tokens of this replica, on the busiest GPU of
    the expert-parallel group (every GPU waits for it at the combine).

    A grouped GEMM reads the weights of every local expert some token was routed to. Expert e is
    among a token's top-k with probability q_e = min(1, k p_e), p_e its popularity (Zipf with
    exponent MOE_SKEW over experts in id order; uniform at 0), so of n tokens it is hit at least
    once with probability 1 - (1 - q_e)^n and receives n q_e of them on average. Under expert
    parallelism GPU g holds experts [g E/ep, (g+1) E/ep) (vLLM's contiguous placement), so skew
    loads the first GPU most."""
    if tokens <= 0 or p[MOE_EXPERTS] <= 0.0:
        return 0.0
    n = tokens * p[MOE_TOKEN_SCALE]
    experts = p[MOE_EXPERTS]
    k = p[MOE_TOP_K]
    ep = p[MOE_EP]
    local = int(experts / ep)
    s = p[MOE_SKEW]
    if s == 0.0:
        q = k / experts
        return expert_gemm_time_nb(p, local * (1.0 - (1.0 - q) ** n), n * k / ep)
    norm = 0.0
    for e in range(int(experts)):
        norm += (e + 1.0) ** -s
    worst = 0.0
    for g in range(int(ep)):
        active = 0.0
        routed = 0.0
        for e in range(g * local, (g + 1) * local):
            q = min(1.0, k * (e + 1.0) ** -s / norm)
            active += 1.0 - (1.0 - q) ** n
            routed += n * q
        worst = max(worst, expert_gemm_time_nb(p, active, routed))
    return worst


@njit(cache=True, error_model="numpy")
def layers_time_nb(p, ops, tokens):
    """All decoder layers' GEMMs, routed experts and elementwise kernels on this GPU for `tokens`
    tokens (attention excluded)."""
    if tokens <= 0:
        return 0.0
    t = 0.0
    for i in range(ops.shape[0]):
        t += ops[i, OP_LAYERS] * gemm_time_nb(p, tokens, ops[i, OP_FLOPS_PER_TOKEN], ops[i, OP_WEIGHT_BYTES],
                                              ops[i, OP_ACT_BYTES_PER_TOKEN])
    t += p[MOE_LAYERS] * moe_layer_time_nb(p, tokens)
    t += p[LAYERS] * (p[EW_KERNELS] * p[KERNEL_LATENCY_S] + tokens * p[EW_BYTES_PER_TOKEN] / (p[MEM_BW] * p[EW_BW_EFF]))
    return t


@njit(cache=True, error_model="numpy", inline="always")
def cache_attention_coefs_nb(p):
    """What cache_attention_nb needs of the cost parameters: the latency, the seconds of compute per
    (query, key) pair, of reads per cached key and per query row, the overlap. The rates are
    inverted here, once: fast mode's closed-form runs take these once per run and evaluate decode
    attention ~4 times a segment, where a division would sit in every evaluation's chain."""
    flop_rate = p[ATTN_PEAK_FLOPS] * p[ATTN_EFF]
    byte_rate = p[MEM_BW] * p[ATTN_BW_EFF]
    return (p[ATTN_LATENCY_S], p[ATTN_FLOPS_PER_PAIR] / flop_rate, p[KV_BYTES_PER_TOKEN] / byte_rate,
            p[Q_BYTES_PER_TOKEN] / byte_rate, p[OVERLAP])


@njit(cache=True, error_model="numpy", inline="always")
def cache_attention_nb(c, pairs, kv_tokens, query_rows):
    """One layer's attention of query rows against KV caches read once: decodes (a row and a pair
    per key each) and speculative verification (several rows per decode). c: cache_attention_coefs_nb."""
    latency, flop_s, kv_s, q_s, overlap = c
    return latency + soft_max_nb(pairs * flop_s, kv_tokens * kv_s + query_rows * q_s, overlap)


@njit(cache=True, error_model="numpy")
def verify_attention_time_nb(p, num_decodes, decode_kv_tokens, queries):
    """One layer's attention for decodes that each verify `queries` tokens (speculative decoding:
    1 + draft tokens), each one key further than the one before, over a KV cache read once.
    decode_kv_tokens: keys of the first query of every decode (its context plus one)."""
    if num_decodes <= 0:
        return 0.0
    return verify_attention_nb(cache_attention_coefs_nb(p), num_decodes, decode_kv_tokens, queries)


@njit(cache=True, error_model="numpy", inline="always")
def verify_attention_nb(c, num_decodes, decode_kv_tokens, queries):
    """verify_attention_time_nb with the coefficients taken (c: cache_attention_coefs_nb)."""
    pairs = queries * decode_kv_tokens + num_decodes * queries * (queries - 1.0) * 0.5
    return cache_attention_nb(c, pairs, decode_kv_tokens, num_decodes * queries)


@njit(cache=True, error_model="numpy", inline="always")
def spec_decode_attention_nb(c, layers, spec_tokens, draft_attn, num_decodes, decode_kv_tokens):
    """All layers' attention of the decodes in one speculative step: the target verifying
    spec_tokens + 1 queries per decode, and the drafter's spec_tokens passes, each reading
    draft_attn (SPEC_DRAFT_ATTN) of the target's decode attention. c: cache_attention_coefs_nb."""
    return layers * (verify_attention_nb(c, num_decodes, decode_kv_tokens, spec_tokens + 1.0)
                     + spec_tokens * draft_attn * cache_attention_nb(c, decode_kv_tokens, decode_kv_tokens,
                                                                     num_decodes))


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
        t += cache_attention_nb(cache_attention_coefs_nb(p), decode_kv_tokens, decode_kv_tokens, num_decodes)
    if num_prefills > 0:
        # FlashAttention parallelises over (sequence, head, 128-query tile); too few tiles leave
        # SMs idle. Each chunk's last tile is on average half full, hence + num_prefills / 2.
        tiles = p[Q_HEADS] * (prefill_tokens / ATTN_TILE + 0.5 * num_prefills)
        fill = tiles / (tiles + p[ATTN_HALF_FILL_TILES])
        t += p[ATTN_LATENCY_S] + roofline_nb(
            prefill_pairs * p[ATTN_PREFILL_FLOPS_PER_PAIR] / fill,
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
    return layers_time_nb(p, ops, tokens) + norm


@njit(cache=True, error_model="numpy")
def seq_compute_nb(p, num_seqs):
    """The LM head on one token per sequence."""
    return gemm_time_nb(p, num_seqs, p[LM_FLOPS_PER_ROW], p[LM_WEIGHT_BYTES], p[LM_ACT_BYTES_PER_ROW])


@njit(cache=True, error_model="numpy")
def token_comm_nb(p, tokens):
    """Every layer's all-reduces of the hidden states, and under expert parallelism each MoE
    layer's all-to-all dispatch and combine (each GPU sends its share of the routed activations
    to the others over its link)."""
    t = p[LAYERS] * p[ALLREDUCES_PER_LAYER] * allreduce_time_nb(p, tokens * p[HIDDEN_BYTES])
    if p[MOE_EP] > 1.0 and tokens > 0:
        t += p[MOE_LAYERS] * 2.0 * (p[ALLREDUCE_LATENCY_S] + tokens * p[A2A_BYTES_PER_TOKEN] / p[LINK_BW])
    return t


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
    gather). Row 0 holds compute + communication, row 1 communication alone (reported apart); the
    sequence table's row 2 holds a speculative step's draft passes by sequence count (the caller
    fills it; zero without speculation)."""
    tok = np.empty((2, max_tokens + 1))
    for t in range(max_tokens + 1):
        tok[1, t] = token_comm_nb(p, t)
        tok[0, t] = token_compute_nb(p, ops, t) + tok[1, t]
    seq = np.zeros((3, max_seqs + 1))
    for n in range(max_seqs + 1):
        seq[1, n] = seq_comm_nb(p, n)
        seq[0, n] = seq_compute_nb(p, n) + seq[1, n]
    return tok, seq


@njit(cache=True, error_model="numpy")
def stage_time_nb(p, tok_table, seq_table, tok_off, seq_off, agg):
    """(layers' time, LM head's time) of one batch on one pipeline stage, from its aggregates
    `agg` (a bundles.Batch), with the tables of build_tables_nb placed at offsets tok_off / seq_off:
    what engine loops call. body + head equals forward_time_nb's compute + comm for one stage.

    Speculative decoding (SPEC_TOKENS = k > 0): the engine advances each decode one token per
    iteration, so an iteration stands for 1/E of a speculative step (E = SPEC_EXPECTED tokens
    gained per step): the step verifies k + 1 tokens per decode in one pass with the prefill chunks
    and runs the drafter; the iteration costs the prefill chunks' own pass plus 1/E of what the
    decodes add to it."""
    n_dec, dec_keys, n_pre, pre_tokens = agg.n_decodes, agg.decode_kv_tokens, agg.n_prefills, agg.prefill_tokens
    pairs, pre_keys = agg.prefill_pairs, agg.prefill_kv_tokens
    body = tok_table[0, tok_off + n_dec + pre_tokens] + p[LAYERS] * attention_time_nb(
        p, n_dec, dec_keys, n_pre, pairs, pre_keys, pre_tokens)
    head = seq_table[0, seq_off + n_dec + n_pre]
    if p[SPEC_TOKENS] > 0.0 and n_dec > 0:
        verify = int(n_dec * (p[SPEC_TOKENS] + 1.0))
        pre_attn = p[LAYERS] * attention_time_nb(p, 0, 0.0, n_pre, pairs, pre_keys, pre_tokens)
        pre_body = tok_table[0, tok_off + pre_tokens] + pre_attn if pre_tokens > 0 else 0.0
        pre_head = seq_table[0, seq_off + n_pre]
        step_body = (tok_table[0, tok_off + verify + pre_tokens] + seq_table[2, seq_off + n_dec] + pre_attn
                     + spec_decode_attention_nb(cache_attention_coefs_nb(p), p[LAYERS], p[SPEC_TOKENS],
                                                p[SPEC_DRAFT_ATTN], n_dec, dec_keys))
        body = pre_body + (step_body - pre_body) / p[SPEC_EXPECTED]
        head = pre_head + (seq_table[0, seq_off + verify + n_pre] - pre_head) / p[SPEC_EXPECTED]
    return body, head


@njit(cache=True, error_model="numpy", inline="always")
def decode_only_nb(p, tok_table, seq_table, tok_off, seq_off, n_dec):
    """(time, communication) of an iteration of n_dec decodes and nothing else, apart from their
    attention: what stage_time_nb charges for it beside p[LAYERS] x cache_attention_nb (or, with
    speculation, spec_decode_attention_nb / E). Fast mode's closed-form runs sum the two apart."""
    comm = tok_table[1, tok_off + n_dec] + seq_table[1, seq_off + n_dec]  # (account_nb's split)
    if p[SPEC_TOKENS] > 0.0:
        verify = int(n_dec * (p[SPEC_TOKENS] + 1.0))
        pre_head = seq_table[0, seq_off]
        return ((tok_table[0, tok_off + verify] + seq_table[2, seq_off + n_dec]) / p[SPEC_EXPECTED] + pre_head
                + (seq_table[0, seq_off + verify] - pre_head) / p[SPEC_EXPECTED]), comm
    return tok_table[0, tok_off + n_dec] + seq_table[0, seq_off + n_dec], comm


@njit(cache=True, error_model="numpy", inline="always")
def cpu_overhead_nb(p, agg):
    """The CPU time an iteration adds before its forward pass: a fixed part, and parts per scheduled
    sequence and per scheduled token (agg: the batch's aggregates, as stage_time_nb takes them).
    cpu_in_series_nb says how much of it the iteration waits for."""
    return (p[FRAMEWORK_OVERHEAD_S] + p[CPU_PER_SEQ_S] * (agg.n_decodes + agg.n_prefills)
            + p[CPU_PER_TOKEN_S] * (agg.n_decodes + agg.prefill_tokens))


@njit(cache=True, error_model="numpy", inline="always")
def cpu_in_series_nb(p, cpu, gpu):
    """The part of an iteration's CPU time `cpu` that its GPU time `gpu` does not hide. vLLM's
    scheduler loop runs them in series; with async scheduling (and SGLang's overlap scheduler) the
    CPU prepares an iteration while the GPU runs the one before, so iterations take max(cpu, gpu)
    (this iteration's GPU time standing in for the previous one's, which a steady batch matches)."""
    if p[CPU_OVERLAP] != 0.0:
        return max(cpu - gpu, 0.0)
    return cpu


@njit(cache=True, error_model="numpy", inline="always")
def decode_cpu_overhead_nb(p, n_dec):
    """cpu_overhead_nb of an iteration of n_dec decodes and nothing else."""
    return p[FRAMEWORK_OVERHEAD_S] + (p[CPU_PER_SEQ_S] + p[CPU_PER_TOKEN_S]) * n_dec


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
    """The bundles.Batch of decodes over `decode_ctx` cached tokens and prefill chunks."""
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
    return Batch(decode_ctx.size, dec_keys, n_pre, pre_tokens, pairs, pre_keys)
