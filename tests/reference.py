"""Slow, obviously correct pure-Python twins of the compiled kernels.

Written from the model, GPU and profile objects directly (not from the kernels' parameter arrays),
so a wrong entry in those arrays shows up as a disagreement.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np

from fastsim.engine.prefix_nb import ROOT_KEY
from fastsim.engine.prefix_nb import mix_nb as mix


def soft_max(a: float, b: float, p: float) -> float:
    """(a^p + b^p)^(1/p): the soft roofline."""
    if a <= 0 and b <= 0:
        return 0.0
    return (a ** p + b ** p) ** (1.0 / p)


def forward_time(model, gpu, prof, decode_ctx, prefill_new, prefill_ctx, tp=1, dtype="bf16",
                 kv_dtype="bf16", layers=None):
    """(compute_s, comm_s) of one forward pass, op by op, token by token where it matters."""
    wb = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}[dtype]
    kvb = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}[kv_dtype]
    native_fp8 = dtype == "fp8" and gpu.fp8_tflops
    peak = (gpu.fp8_tflops if native_fp8 else gpu.bf16_tflops) * 1e12
    flop_rate = peak * (prof.fp8_compute_efficiency or prof.compute_efficiency if native_fp8 else prof.compute_efficiency)
    byte_rate = gpu.mem_bw_gb_s * 1e9 * prof.bandwidth_efficiency
    ew_rate = gpu.mem_bw_gb_s * 1e9 * prof.elementwise_bandwidth_efficiency
    fp8_attention = prof.fp8_attention and kv_dtype == "fp8" and gpu.fp8_tflops
    attn_flop_rate = (gpu.fp8_tflops if fp8_attention else gpu.bf16_tflops) * 1e12 * prof.attention_efficiency
    attn_byte_rate = gpu.mem_bw_gb_s * 1e9 * prof.attention_bandwidth_efficiency
    p = prof.overlap
    h = model.hidden_size
    hd = model.head_dim
    heads = model.num_attention_heads / tp
    kv_heads = max(model.num_key_value_heads / tp, 1)
    inter = model.intermediate_size / tp
    n_layers = layers or model.num_hidden_layers
    window = model.sliding_window

    prefill = [(n, c) for n, c in zip(prefill_new, prefill_ctx) if n > 0]
    tokens = len(decode_ctx) + sum(n for n, _ in prefill)
    seqs = len(decode_ctx) + len(prefill)
    if tokens == 0:
        return 0.0, 0.0

    clock = prof.reference_clock_mhz / gpu.boost_clock_mhz if prof.reference_clock_mhz else 1.0
    lat_gemm, lat_kernel, lat_attn = (x * 1e-6 * clock for x in (
        prof.gemm_latency_us, prof.kernel_latency_us, prof.attention_latency_us))

    def gemm(m, k, n, weight_bytes_per_param=wb):
        return lat_gemm + soft_max(
            2 * m * k * n / flop_rate, (k * n * weight_bytes_per_param + m * (k + n) * 2) / byte_rate, p)

    layer = gemm(tokens, h, (heads + 2 * kv_heads) * hd) + gemm(tokens, heads * hd, h)
    if model.is_moe:
        e, k = model.num_local_experts, model.num_experts_per_tok
        layer += gemm(tokens, h, e)
        ie = model.moe_intermediate_size / tp
        active = e * (1 - (1 - k / e) ** tokens)
        routed = tokens * k
        layer += lat_gemm + soft_max(
            routed * 6 * h * ie / flop_rate, (active * 3 * h * ie * wb + routed * (2 * h + 3 * ie) * 2) / byte_rate, p)
        inter = ie
    else:
        layer += gemm(tokens, h, 2 * inter) + gemm(tokens, inter, h)
    ew = prof.elementwise_passes
    layer += prof.elementwise_kernels_per_layer * lat_kernel
    layer += tokens * 2 * (ew.hidden * h + ew.q * heads * hd + ew.kv * kv_heads * hd + ew.intermediate * inter) / ew_rate

    kv_bytes = 2 * kv_heads * hd * kvb
    if decode_ctx:
        keys = sum(min(c + 1, window) if window else c + 1 for c in decode_ctx)
        layer += lat_attn + soft_max(
            keys * 4 * heads * hd / attn_flop_rate,
            (keys * kv_bytes + len(decode_ctx) * 4 * heads * hd) / attn_byte_rate, p)
    if prefill:
        pairs = 0
        for n, c in prefill:  # one query at a time
            for pos in range(c + 1, c + n + 1):
                pairs += min(pos, window) if window else pos
        read = sum((min(c, window) if window else c) + n for n, c in prefill)
        q_tokens = sum(n for n, _ in prefill)
        tiles = heads * (q_tokens / 128 + 0.5 * len(prefill))
        fill = tiles / (tiles + prof.attention_half_fill_tiles)
        layer += lat_attn + soft_max(
            pairs * 4 * heads * hd / fill / attn_flop_rate,
            (read * kv_bytes + q_tokens * 4 * heads * hd) / attn_byte_rate, p)

    vocab = model.vocab_size / tp
    head = lat_kernel + 2 * tokens * 2 * h / ew_rate + gemm(seqs, h, vocab, 2)
    compute = n_layers * layer + head

    comm = 0.0
    if tp > 1:
        link = gpu.link_gb_s * 1e9 * prof.link_efficiency
        lat = prof.link_latency_us * 1e-6
        allreduce = prof.allreduce_latency_us * 1e-6 + 2 * (tp - 1) * (tokens * 2 * h / tp / link + lat)
        comm = n_layers * 2 * allreduce + (tp - 1) / tp * seqs * model.vocab_size * 2 / link + (tp - 1) * lat
    return compute, comm


def expected_active_experts_by_simulation(num_experts, top_k, tokens, trials, rng):
    """Monte-Carlo count of distinct experts hit when each token picks top_k distinct experts."""
    hits = 0
    for _ in range(trials):
        seen = set()
        for _ in range(tokens):
            seen.update(rng.choice(num_experts, size=top_k, replace=False).tolist())
        hits += len(seen)
    return hits / trials


def isclose(a: float, b: float, rel: float = 1e-9) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


# ---------------------------------------------------------------------------------------------
# A slow scheduler, written for reading: one object per request, Python lists for the queues.
# It follows vLLM's V1 Scheduler.schedule() (and V0's prefill-first policy with scheduler="v0"),
# costing each iteration with CostModel.forward_time.
# ---------------------------------------------------------------------------------------------
class Req:
    def __init__(self, rid, arrival, prompt, output):
        self.id, self.arrival, self.prompt, self.output = rid, arrival, prompt, output
        self.computed = 0       # tokens whose KV is in the cache
        self.generated = 0      # output tokens produced
        self.blocks = 0
        self.preemptions = 0
        self.first_scheduled = None
        self.first_token = None
        self.last_token = None
        self.finish = None
        self.max_itl = 0.0
        self.itls = []
        self.cached = 0         # prompt tokens found in the prefix cache when first scheduled
        self.block_ids = []     # with prefix caching: the blocks it holds, in order
        self.hashed = 0
        self.key = 0

    @property
    def num_tokens(self):
        return self.prompt + self.generated


class PrefixCache:
    """vLLM's automatic prefix caching, written plainly: blocks with reference counts, a dict from
    chained block keys to cached blocks, and an LRU list of free blocks (evicted from the front)."""

    def __init__(self, num_blocks, block_size, content):
        self.free = OrderedDict((b, None) for b in range(num_blocks))
        self.ref = [0] * num_blocks
        self.key_of = {}
        self.table = {}
        self.bs = block_size
        self.content = content  # (request id, block index) -> content id
        self.evictions = 0

    def lookup(self, r):
        key, hits = ROOT_KEY, []
        for m in range((r.num_tokens - 1) // self.bs):
            k = int(mix(key, self.content(r.id, m)))
            if k not in self.table:
                break
            hits.append(self.table[k])
            key = k
        return hits, key

    def start(self, r, hits, key):
        for b in hits:
            if self.ref[b] == 0:
                del self.free[b]
            self.ref[b] += 1
        r.block_ids, r.hashed, r.key = list(hits), len(hits), key

    def allocate(self, r, count):
        for _ in range(count):
            b, _ = self.free.popitem(last=False)
            if b in self.key_of:
                del self.table[self.key_of.pop(b)]
                self.evictions += 1
            self.ref[b] = 1
            r.block_ids.append(b)

    def hash_full(self, r):
        while (r.hashed + 1) * self.bs <= r.computed:
            b = r.block_ids[r.hashed]
            k = int(mix(r.key, self.content(r.id, r.hashed)))
            if k not in self.table:
                self.table[k] = b
                self.key_of[b] = k
            r.key, r.hashed = k, r.hashed + 1

    def release(self, r):
        freed = 0
        for b in reversed(r.block_ids):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free[b] = None
                freed += 1
        r.block_ids = []
        return freed


def simulate_reference(cost_model, arrivals, prompts, outputs, *, max_num_seqs, max_num_batched_tokens,
                       block_size, num_blocks, chunked_prefill=True, long_prefill_token_threshold=0,
                       v0=False, overhead_s=0.0, per_seq_s=0.0, per_token_s=0.0, max_time_s=float("inf"),
                       content=None, turns=None,
                       sglang=False, lpm=False, no_evict=False, kv0=None, stats=None, async_scheduling=False,
                       num_scheduler_steps=1):
    """Per-request results (list of Req, by id) and the list of (start, used_blocks) per iteration.
    `content(request, block)`: with it, prefix caching is on, blocks named by that content.

    sglang=True: SGLang's scheduler — a prefill batch (the request being chunked, then new ones while
    their prompt and clipped output fit beside the running requests' reserve) when one can be formed,
    else a decode batch of every running request; lpm=True orders the queue by cached prefix.

    no_evict=True: TensorRT-LLM's GUARANTEED_NO_EVICT — a waiting request is admitted only if the
    blocks every running request and it need for prompt + output tokens fit the cache.

    kv0=(generated, last_token_s): a request with generated > 0 arrives with the KV of all but its
    last token computed elsewhere (a disaggregated decode instance): its first step is a decode.

    `turns = (next_turn, think_s)`: a request with think_s >= 0 arrives think_s after the one whose
    next_turn it is has finished (first turns of the same instant go first).

    `stats`: a dict, given the prefix cache's evictions at the end.

    Requests that could never fit (more blocks than the cache) must be left out by the caller.
    """
    reqs = [Req(i, a, p, o) for i, (a, p, o) in enumerate(zip(arrivals, prompts, outputs))]
    for r in reqs:
        r.preloaded = bool(kv0 and kv0[0][r.id] > 0)
        if r.preloaded:
            r.generated, r.last_token = int(kv0[0][r.id]), float(kv0[1][r.id])
    next_turn, think = turns if turns else ([-1] * len(reqs), [-1.0] * len(reqs))
    order = lambda r: (r.arrival, think[r.id] >= 0, r.id)  # noqa: E731
    pending = sorted((r for r in reqs if think[r.id] < 0), key=order)
    sent = {r.id for r in pending}  # a closed loop sends each of the rest when one of it finishes
    waiting, running = [], []
    free = num_blocks
    now = 0.0
    history = []
    watermark = int(0.01 * num_blocks) if v0 else 0
    steps_left = 0  # V0 multi-step: steps the decode batch still runs without the scheduler
    cache = PrefixCache(num_blocks, block_size, content) if content else None
    ratio = 0.7  # SGLang's new_token_ratio

    def blocks_needed(r, new):
        return -(-(r.computed + new) // block_size) - r.blocks

    def take_blocks(r, need):
        nonlocal free
        free -= need
        r.blocks += need
        if cache:
            cache.allocate(r, need)

    def preempt_last():
        nonlocal free
        victim = running.pop()
        free += cache.release(victim) if cache else victim.blocks
        victim.blocks = 0
        victim.computed = 0
        victim.preemptions += 1
        waiting.insert(0, victim)
        return victim

    while True:
        while pending and pending[0].arrival <= now:
            waiting.append(pending.pop(0))
        if not running and not waiting:
            if not pending:
                break
            now = max(now, pending[0].arrival)
            continue

        scheduled = []          # (request, new tokens)
        budget = max_num_batched_tokens
        preempted = False

        def schedule_running(threshold, prefill_only=False):
            """Running requests in order, each its next tokens, preempting the newest for blocks."""
            nonlocal free, budget, preempted
            i = 0
            while i < len(running) and budget > 0:
                r = running[i]
                new = r.num_tokens - r.computed
                if prefill_only and new == 1 and r.computed >= r.prompt:
                    i += 1
                    continue
                if threshold and new > threshold:
                    new = threshold
                new = min(new, budget)
                while blocks_needed(r, new) > free:
                    victim = preempt_last()
                    preempted = True
                    if victim is r:
                        return
                take_blocks(r, blocks_needed(r, new))
                scheduled.append((r, new, r.computed))
                r.computed += new
                if cache:
                    cache.hash_full(r)
                budget -= new
                i += 1

        reserve = 0.0
        multi = v0 and steps_left > 0 and bool(running)
        if sglang:
            schedule_running(0, prefill_only=True)
            reserve = ratio * sum(min(r.output - r.generated, 4096) for r in running)
        elif not v0:
            schedule_running(long_prefill_token_threshold)
        if (v0 or sglang or not preempted) and not multi:
            while waiting and budget > 0 and len(running) < max_num_seqs:
                pick = 0
                if lpm and cache and len(waiting) <= 128:  # longest cached prefix first, the first of equals
                    matched = [len(cache.lookup(r)[0]) for r in waiting]
                    pick = matched.index(max(matched))
                r = waiting[pick]
                hits, key = cache.lookup(r) if cache else ([], 0)
                done = len(hits) * block_size
                if r.preloaded and r.first_scheduled is None and not cache:
                    done = r.num_tokens - 1  # its KV came with it
                idle = sum(cache.ref[b] == 0 for b in hits) if cache else 0
                new = full = r.num_tokens - done
                if not v0 and not sglang and long_prefill_token_threshold and new > long_prefill_token_threshold:
                    new = long_prefill_token_threshold
                if (v0 or not chunked_prefill) and new > budget:
                    break
                new = min(new, budget)
                need = -(-(done + new) // block_size) - len(hits)
                if need + idle > free - watermark:
                    break
                if no_evict and sum(-(-(q.prompt + q.output) // block_size) for q in running + [r]) > num_blocks:
                    break
                if sglang:
                    claim = full + min(r.output - r.generated, 4096)
                    if claim >= (free - idle) * block_size - reserve:
                        break
                    reserve += claim
                waiting.pop(pick)
                if cache:
                    cache.start(r, hits, key)
                    free -= idle
                r.blocks = len(hits)
                r.computed = done
                take_blocks(r, need)
                running.append(r)
                if r.first_scheduled is None:
                    r.first_scheduled = now
                    r.cached = len(hits) * block_size
                scheduled.append((r, new, r.computed))
                r.computed += new
                if cache:
                    cache.hash_full(r)
                budget -= new
        if v0:  # a prefill step is one step; a decode batch runs num_scheduler_steps without scheduling
            steps_left = steps_left - 1 if multi else (num_scheduler_steps - 1 if not scheduled else 0)
        if (v0 or sglang) and not scheduled:
            schedule_running(0)  # no prefill admitted, so every running request decodes
            if sglang and scheduled:
                ratio = 0.7 if preempted else max(ratio - (0.7 - 0.1) / 600, 0.1)
        if not scheduled:  # nothing can run now: a later arrival may change that (LPM may pick it)
            if not pending:
                break
            now = max(now, pending[0].arrival)
            continue
        history.append((now, num_blocks - free))

        dec = [c for r, new, c in scheduled if new == 1 and c >= r.prompt]
        pre = [(new, c) for r, new, c in scheduled if not (new == 1 and c >= r.prompt)]
        t = cost_model.forward_time(np.array(dec, dtype=np.int64), np.array([n for n, _ in pre], dtype=np.int64),
                                    np.array([c for _, c in pre], dtype=np.int64)).total_s
        # CPU time before the pass: fixed, per scheduled sequence, per scheduled token
        cpu_s = overhead_s + per_seq_s * len(scheduled) + per_token_s * sum(new for _, new, _ in scheduled)
        if multi:  # the GPU advances a multi-step batch's inputs itself
            cpu_s = 0.0
        # async scheduling prepares this iteration while the GPU runs the one before: the longer counts
        end = now + (max(t, cpu_s) if async_scheduling else t + cpu_s)
        if end > max_time_s:
            break
        for r, new, _ in scheduled:
            if r.computed == r.num_tokens:
                r.generated += 1
                if r.generated == 1:
                    r.first_token = end
                else:
                    r.itls.append(end - r.last_token)
                    r.max_itl = max(r.max_itl, end - r.last_token)
                r.last_token = end
                if r.generated >= r.output:
                    r.finish = end
                    free += cache.release(r) if cache else r.blocks
                    r.blocks = 0
                    child = None
                    if next_turn[r.id] >= 0:
                        child = reqs[next_turn[r.id]]
                    elif next_turn[r.id] <= -2:  # a closed loop: its first request not yet sent
                        k = -2 - next_turn[r.id]
                        while k >= 0 and k in sent:
                            k = -2 - next_turn[k] if next_turn[k] <= -2 else -1
                        child = reqs[k] if k >= 0 else None
                    if child is not None:
                        sent.add(child.id)
                        child.arrival = end + think[child.id]
                        pending = sorted(pending + [child], key=order)
        running = [r for r in running if r.finish is None]
        now = end
    if stats is not None:
        stats["evictions"] = cache.evictions if cache else 0
    return reqs, history



def moe_layer_time(model, gpu, prof, tokens, tp=1, dp=1, expert_parallel=False, skew=0.0, dtype="bf16"):
    """One MoE layer's routed-expert GEMM on the busiest GPU, expert by expert: experts are spread
    whole over tp x dp GPUs under expert parallelism (each layer seeing every DP rank's tokens),
    else split by TP; expert e is in a token's top-k with probability min(1, k p_e), p_e Zipf(skew)."""
    wb = {"bf16": 2, "fp16": 2, "fp8": 1, "int8": 1, "int4": 0.5}[dtype]
    native_fp8 = dtype == "fp8" and gpu.fp8_tflops
    peak = (gpu.fp8_tflops if native_fp8 else gpu.bf16_tflops) * 1e12
    eff = prof.fp8_compute_efficiency or prof.compute_efficiency if native_fp8 else prof.compute_efficiency
    flop_rate, byte_rate = peak * eff, gpu.mem_bw_gb_s * 1e9 * prof.bandwidth_efficiency
    clock = prof.reference_clock_mhz / gpu.boost_clock_mhz if prof.reference_clock_mhz else 1.0
    e, k, h = model.num_local_experts, model.num_experts_per_tok, model.hidden_size
    ep = tp * dp if expert_parallel else 1
    inter = model.moe_intermediate_size / (1 if ep > 1 else tp)
    n = tokens * (dp if ep > 1 else 1)
    weights = [(j + 1.0) ** -skew for j in range(e)]
    total = sum(weights)
    worst = 0.0
    for g in range(ep):
        active = routed = 0.0
        for j in range(g * e // ep, (g + 1) * e // ep):
            q = min(1.0, k * weights[j] / total)
            active += 1 - (1 - q) ** n
            routed += n * q
        t = prof.gemm_latency_us * 1e-6 * clock + soft_max(
            routed * 6 * h * inter / flop_rate, (active * 3 * h * inter * wb + routed * (2 * h + 3 * inter) * 2) / byte_rate,
            prof.overlap)
        worst = max(worst, t)
    return worst


def verify_attention_time(model, gpu, prof, contexts, queries, tp=1, kv_dtype="bf16"):
    """One layer's attention for decodes each verifying `queries` tokens: query m of a sequence at
    context c sees c + m keys; the KV cache is read once per sequence."""
    kvb = {"bf16": 2, "fp16": 2, "fp8": 1}[kv_dtype]
    heads, hd = model.num_attention_heads / tp, model.head_dim
    kv_bytes = 2 * max(model.num_key_value_heads / tp, 1) * hd * kvb
    clock = prof.reference_clock_mhz / gpu.boost_clock_mhz if prof.reference_clock_mhz else 1.0
    if not contexts:
        return 0.0
    pairs = sum(c + m for c in contexts for m in range(1, queries + 1))
    read = sum(c + 1 for c in contexts)
    return prof.attention_latency_us * 1e-6 * clock + soft_max(
        pairs * 4 * heads * hd / (gpu.bf16_tflops * 1e12 * prof.attention_efficiency),
        (read * kv_bytes + len(contexts) * queries * 4 * heads * hd) / (gpu.mem_bw_gb_s * 1e9 * prof.attention_bandwidth_efficiency),
        prof.overlap)
