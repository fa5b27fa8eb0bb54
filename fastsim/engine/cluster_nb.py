"""A cluster of vLLM (or SGLang) replicas behind a router, advanced in one compiled event loop ordered
by time.

Each replica schedules as vLLM V1's `Scheduler.schedule()` does (scheduler="v1"):
  1. running requests in admission order, each its next tokens (one decode token, or the next chunk
     of an unfinished prefill) within the token budget; a request whose tokens are all in flight
     (pipeline parallelism) is skipped. If a request's KV blocks cannot be allocated, the most
     recently admitted running request is preempted (blocks freed, computed tokens dropped, put at
     the front of the waiting queue) until they can, or it is itself the one preempted;
  2. if nothing was preempted, waiting requests first-come-first-served while the budget, the
     max_num_seqs limit and free blocks allow, the last prefill chunked to fit the budget.
As in V1, a request's computed tokens advance when it is scheduled; it samples a token when the
batch holding its last prompt chunk (or its decode) completes. A preempted request keeps its
generated tokens and recomputes prompt + generated as a prefill. scheduler="v0" is V0's policy:
whole prefills first (never mixed with decodes), otherwise a decode step of every running request,
with a 1% free-block watermark on admission. framework="sglang" (RI_SGLANG) is SGLang's policy: a
prefill batch (the request being chunked, then waiting requests, longest cached prefix first with
RI_LPM, admitted while their prompt and clipped output fit beside a reserve for the running
requests' output) whenever one can be formed, otherwise a decode batch of every running request.

Later turns of conversations arrive when their previous turn finishes plus a think time: the loop
creates those arrivals as it goes (a heap beside the arrivals known in advance).

Time: a batch scheduled at t enters the first pipeline stage at t + its CPU time; stage s
starts when stage s-1 has finished it and stage s has finished the previous batch; tokens appear
when the last stage finishes. With pipeline_parallel_size P, up to P batches are in flight
(vLLM's virtual engines). Tensor parallelism lives inside the stage time (sharded GEMMs plus
all-reduces). Arrivals are routed when they arrive, to a replica chosen by the router policy
from the replicas' state at that moment.
"""
from __future__ import annotations


import numpy as np
from numba import njit

from fastsim.engine import enums as E
from fastsim.engine.bundles import (EMPTY_BATCH, REPLICA_STATS, Batch, ItlAcc, KernelOut, Replicas, Requests, Routing,
                                    Scratch, Slots, Tables, TimelineOut, Turns)
from fastsim.engine import heap_nb as hp
from fastsim.engine import prefix_nb as px
from fastsim.engine import lazy_nb as lz_nb
from fastsim.engine import pipeline_nb as pp
from fastsim.engine.routing_nb import route_nb
from fastsim.engine.batch_nb import (account_nb, add_to_batch_nb, arrived_kv_nb, blocks_needed_nb, ceil_div_pow2_nb,
                                     chunk_nb, div_pow2_nb, final_blocks_nb, itl_add_nb, mod_pow2_nb, move_slot_nb,
                                     reserved_blocks_nb, sort_by_key_nb, tally_gap_nb, timeline_row_nb)
from fastsim.engine.cost_nb import cpu_in_series_nb, cpu_overhead_nb, stage_time_nb

INF = np.inf


# -- the replicas' next event times: a tournament tree, so the earliest is found in O(1) -----------
@njit(cache=True, error_model="numpy")
def _tree_update(tree, leaves, r, t):
    i = leaves + r
    tree[i] = t
    i //= 2
    while i >= 1:
        tree[i] = min(tree[2 * i], tree[2 * i + 1])
        i //= 2


@njit(cache=True, error_model="numpy")
def _tree_argmin(tree, leaves):
    i = 1
    while i < leaves:
        # The right child when it is strictly earlier (ties go left), added as a 0/1 rather than
        # branched on: with many replicas which child is earlier is a coin flip at every level.
        i = 2 * i + (tree[2 * i + 1] < tree[2 * i])
    return i - leaves


@njit(cache=True, error_model="numpy", nogil=True)
def run_cluster_nb(arrival_s, prompt, output, rejected, measured, session, draw, policy, route_params,
                   rep_int, rep_params, tok_table, seq_table, max_time_s, record_timeline, progress,
                   apc, conv, fast_decode=True, lazy=False, kv0=None):
    """Simulate replicas (rows of rep_int / rep_params, see enums.RI_* and cost_nb) over requests
    sorted by arrival. `rejected` requests are never scheduled; `measured` ones feed the ITL
    histogram; `session` (-1: none) and `draw` (a pre-drawn replica per request) serve the router
    `policy` (enums.ROUTE_*; prefix_aware's thresholds in route_params, enums.RP_*).
    tok_table / seq_table hold every replica's per-stage time by token count / sequence count, at
    offsets rep_int[:, RI_TOK_OFF] / rep_int[:, RI_SEQ_OFF]: row 0 compute + communication, row 1
    communication alone (reported apart).

    Returns a bundles.KernelOut: per request its status, times, tokens and replica; per run the ITL
    histogram, the timeline and a bundles.REPLICA_STATS record per replica.
    `progress[1]` set non-zero by another thread stops the run between two events, as if max_time_s
    had been reached then (a wall-clock budget).
    `progress[0]` is kept at the number of requests done, for a progress bar polled from another
    thread (the kernel releases the GIL). `apc` is the prefix cache of the replicas that enable it
    (fastsim.engine.prefix_nb; rep_int[:, RI_APC]). `conv = (next_turn, think_s)`: a request with
    think_s >= 0 is a later turn of a conversation; it arrives think_s after the request whose
    next_turn it is finishes (its arrival_s is ignored), or never if that one does not finish.
    `kv0 = (generated, last_token_s)` per request, for a
    disaggregated decode pool: a request with generated > 0 arrives with the KV of all but its last
    token already computed (sent by a prefill instance), so its first step is a decode; its
    last_token_s is the time of its previous token. None: every request starts from nothing.
    `fast_decode` lets steady decoding stretches advance in O(1) per iteration (same iterations,
    same arithmetic; off: simulation.mode stepped, the reference that it changes nothing).
    `lazy` is fast mode (fastsim.engine.lazy_nb) for the replicas it applies to: vLLM V1's
    scheduler (TensorRT-LLM's and Dynamo's too), one pipeline stage.
    """
    n = arrival_s.size
    next_turn, think_s = conv
    next_turn = next_turn.copy()  # (a closed loop's pointers move as its requests are sent)
    arrival = arrival_s.copy()
    has_turns = False
    for i in range(n):
        if think_s[i] >= 0:
            arrival[i] = np.nan
            has_turns = True
    # Later turns wait in a heap from the moment their previous turn finishes.
    h_t = np.empty((1, n if has_turns else 1))
    h_i = np.empty((1, n if has_turns else 1), np.int64)
    h_n = np.zeros(1, np.int64)
    turns = Turns(next_turn, think_s, arrival, h_t, h_i, h_n, rejected)
    n_rep = rep_int.shape[0]
    max_seqs = 1
    max_stages = 1
    for r in range(n_rep):
        max_seqs = max(max_seqs, rep_int[r, E.RI_MAX_SEQS])
        max_stages = max(max_stages, rep_int[r, E.RI_STAGES])

    status = np.zeros(n, np.int8)
    first_sched = np.full(n, np.nan)
    first_tok = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    last_tok = np.zeros(n) if kv0 is None else kv0[1].copy()
    max_itl = np.zeros(n)
    gen0 = np.zeros(n, np.int64) if kv0 is None else kv0[0]
    generated = gen0.copy()
    preempts = np.zeros(n, np.int64)
    replica = np.full(n, -1, np.int32)
    cached = np.zeros(n, np.int64)      # prompt tokens found in the prefix cache when first scheduled
    max_blocks = 1
    for r in range(n_rep):
        if rep_int[r, E.RI_APC]:
            max_blocks = max(max_blocks, rep_int[r, E.RI_NUM_BLOCKS])
    hit_bufs = np.empty((n_rep, max_blocks), np.int64)  # each replica's last prefix lookup
    for r in range(n_rep):
        if rep_int[r, E.RI_APC]:
            px.apc_init_nb(apc, r, rep_int[r, E.RI_NUM_BLOCKS])
    q_next = np.full(n, -1, np.int64)  # waiting queues as linked lists through the requests
    nt_ratio = np.full(n_rep, E.SGL_INIT_NEW_TOKEN_RATIO)  # SGLang replicas' new_token_ratio
    # SGLang's longest-prefix-first ordering: each waiting request's last match, resumed while
    # nothing was evicted since ([hits, key, evictions then]).
    any_lpm = False
    for r in range(n_rep):
        any_lpm = any_lpm or (rep_int[r, E.RI_LPM] != 0 and rep_int[r, E.RI_APC] != 0)
    lpm_memo = np.full((n if any_lpm else 1, 3), -1, np.int64)

    # Running requests live in slots 0..n_running-1 of their replica's row, in admission order,
    # with their hot state in slot arrays: an iteration walks a few contiguous cache lines.
    # A request's entries in the per-request arrays are written back when it leaves its slot.
    s_req = np.empty((n_rep, max_seqs), np.int64)
    s_prompt = np.empty((n_rep, max_seqs), np.int64)
    s_tokens = np.empty((n_rep, max_seqs), np.int64)    # prompt + generated
    s_computed = np.empty((n_rep, max_seqs), np.int64)  # KV computed or being computed
    s_output = np.empty((n_rep, max_seqs), np.int64)
    s_blocks = np.empty((n_rep, max_seqs), np.int64)
    s_last = np.empty((n_rep, max_seqs))                # time of the last token
    s_max_itl = np.empty((n_rep, max_seqs))
    s_measured = np.empty((n_rep, max_seqs), np.bool_)
    s_sample = np.empty((n_rep, max_seqs), np.int64)    # batch whose completion samples a token, or -1

    n_running = np.zeros(n_rep, np.int64)
    free = rep_int[:, E.RI_NUM_BLOCKS].copy()
    q_head = np.full(n_rep, -1, np.int64)
    q_tail = np.full(n_rep, -1, np.int64)
    n_waiting = np.zeros(n_rep, np.int64)
    outstanding = np.zeros(n_rep, np.int64)
    stage_free = np.zeros((n_rep, max_stages))
    fl_end = np.empty((n_rep, max_stages))              # in-flight batches: a FIFO ring per replica
    fl_id = np.empty((n_rep, max_stages), np.int64)
    fl_head = np.zeros(n_rep, np.int64)
    fl_count = np.zeros(n_rep, np.int64)
    batch_seq = np.zeros(n_rep, np.int64)
    rep_iters = np.zeros(n_rep, np.int64)
    rep_peak = np.zeros(n_rep, np.int64)
    rep_preempts = np.zeros(n_rep, np.int64)
    rep_requests = np.zeros(n_rep, np.int64)
    rep_stretched = np.zeros(n_rep, np.int64)
    rep_time = np.zeros((n_rep, 2))  # GPU-seconds of forward passes: [compute, communication]

    n_sessions = 0
    for i in range(n):
        n_sessions = max(n_sessions, session[i] + 1)
    session_replica = np.full(max(n_sessions, 1), -1, np.int64)

    leaves = 1
    while leaves < n_rep:
        leaves *= 2
    tree = np.full(2 * leaves, INF)  # next decision time per replica; INF = idle

    itl_hist = np.zeros(E.ITL_BINS, np.int64)
    itl = np.zeros(3)  # count, sum, sum of squares

    tl_cap = 1024 if record_timeline else 1
    timeline = np.empty((tl_cap, len(E.TL_COLUMNS)))
    n_tl = 0

    n_left = 0
    for i in range(n):
        if rejected[i]:
            status[i] = E.REJECTED
        else:
            n_left += 1
    a = 0  # the next arrival known in advance (first turns), in order
    while a < n and think_s[a] >= 0:
        a += 1
    rr_next = 0
    if n_rep == 1:
        # Every router sends everything to the one replica; one that reads the replicas' state
        # (their prefix caches) would keep fast mode from holding that state lazily for nothing.
        policy = E.ROUTE_ROUND_ROBIN
    # Round-robin and random routing do not depend on the replicas' state: route every request up
    # front, so a replica knows its own next arrival and can step steady decodes up to it (unless
    # conversations create arrivals as they go).
    stateless = (policy == E.ROUTE_ROUND_ROBIN or policy == E.ROUTE_RANDOM) and not has_turns
    dest = np.full(n, -1, np.int64)
    next_same = np.full(n, -1, np.int64)   # the next request routed to the same replica
    own_next = np.full(n_rep, -1, np.int64)  # each replica's next request still to arrive
    if stateless:
        last_for = np.full(n_rep, -1, np.int64)
        for i in range(n):
            if rejected[i] or think_s[i] >= 0:
                continue
            d = rr_next % n_rep if policy == E.ROUTE_ROUND_ROBIN else draw[i]  # (route_nb's rule, without its call)
            rr_next += 1
            dest[i] = d
            if last_for[d] < 0:
                own_next[d] = i
            else:
                next_same[last_for[d]] = i
            last_for[d] = i
    # The event loop's arguments, bundled (a function of more than 30 arguments cannot be inlined).
    tables = Tables(tok_table, seq_table)
    slots = Slots(s_req, s_prompt, s_tokens, s_computed, s_output, s_blocks, s_last, s_max_itl, s_measured, s_sample)
    itl_acc = ItlAcc(itl_hist, itl)
    # Fast mode's lazy form, where it applies.
    lz_ok = np.zeros(n_rep, np.bool_)
    max_bs = 1
    for r in range(n_rep):
        lz_ok[r] = (lazy and rep_int[r, E.RI_STAGES] == 1
                    and not rep_int[r, E.RI_V0] and not rep_int[r, E.RI_SGLANG])
        max_bs = max(max_bs, rep_int[r, E.RI_BLOCK_SIZE])
    lz = lz_nb.lazy_state_nb(n_rep, max_seqs, max_bs, lz_ok.any())
    for r in range(n_rep):
        if lz_ok[r]:
            lz.cnt[r, lz_nb.C_WINDOW] = rep_int[r, E.RI_WINDOW]
    # Working arrays of to_exact_nb (the first three), _decode_run, and pipeline_nb.pp_decode_run_nb
    # (a column per group of requests that travel the pipeline together, at most one per stage).
    scratch = Scratch(np.empty(max_seqs, np.int64), np.empty(max_seqs, np.int64), np.empty(max_seqs),
                      np.empty(max_bs + 1, np.int64), np.empty(max_bs + 1, np.int64), np.empty(max_bs + 1, np.int64),
                      pp.PipelineScratch(np.empty((pp.N_G, max_stages), np.int64), np.empty((2, max_stages)),
                                         np.empty((max_stages, max_bs), np.int64), np.empty(max_seqs, np.int64),
                                         np.empty(max_seqs, np.int64)))
    reqs = Requests(arrival, think_s, rejected, session, draw, prompt, output, measured, last_tok, max_itl, generated,
                    preempts, status, first_sched, first_tok, finish, replica, cached, q_next, lpm_memo, gen0)
    reps = Replicas(n_running, free, q_head, q_tail, n_waiting, outstanding, stage_free, fl_end, fl_id, fl_head,
                    fl_count, batch_seq, nt_ratio, hit_bufs, session_replica, tree, np.zeros(n_rep, np.int64),
                    rep_iters, rep_peak, rep_preempts, rep_requests, rep_stretched, rep_time)
    routing = Routing(policy, route_params, dest, next_same, own_next)
    # Flags and integer settings go in an array: in a tuple Numba types some as literals and
    # compiles the loop twice (once per typing), doubling the longest compilation.
    limits = np.array([record_timeline, fast_decode, leaves, max_stages, max_seqs, stateless, has_turns], np.int64)
    loop_state = np.array([n_left, a, rr_next, n_tl], np.int64)
    # The event loop runs without reference counting (see _events_nb); it returns when the
    # timeline needs room, which only an allocating caller can make.
    while _events_nb(reqs, reps, routing, max_time_s, limits, rep_int, rep_params, tables, slots, itl_acc,
                     turns, apc, lz, lz_ok, scratch, progress, timeline, loop_state):
        grown = np.empty((timeline.shape[0] * 2, timeline.shape[1]))
        grown[: timeline.shape[0]] = timeline
        timeline = grown
    n_tl = loop_state[3]

    # Requests still in a slot when the run stops: write their progress back.
    for r in range(n_rep):
        if lz_ok[r] and lz.cnt[r, lz_nb.C_ON]:
            lz_nb.to_exact_nb(lz, r, slots, n_running, rep_int[r, E.RI_BLOCK_SIZE], scratch, apc,
                              rep_int[r, E.RI_APC] != 0)
        for k in range(n_running[r]):
            i = s_req[r, k]
            generated[i] = s_tokens[r, k] - s_prompt[r, k]
            max_itl[i] = s_max_itl[r, k]
    for i in range(n):
        if status[i] == E.PENDING or status[i] == E.RUNNING:
            status[i] = E.UNFINISHED
    stats = np.zeros(n_rep, REPLICA_STATS)
    for r in range(n_rep):
        st = stats[r]  # (a view: fields set by name, as NumPy sets them when run uncompiled)
        st["iterations"] = rep_iters[r]
        st["peak_kv_blocks_used"] = rep_peak[r]
        st["free_blocks_at_end"] = free[r]
        st["preemptions"] = rep_preempts[r]
        st["requests"] = rep_requests[r]
        st["stretched_iterations"] = rep_stretched[r]
        if rep_int[r, E.RI_APC]:
            st["prefix_cache_evictions"] = apc.rep[r, px.EVICTIONS]
            st["prefix_cache_hit_tokens"] = apc.rep[r, px.HIT_TOKENS]
        if lz_ok[r]:
            st["lazy_exits"] = lz.cnt[r, lz_nb.C_EXITS]
            st["closed_form_iterations"] = lz.cnt[r, lz_nb.C_SUMMED]
        st["compute_time_s"] = rep_time[r, 0]
        st["comm_time_s"] = rep_time[r, 1]
    return KernelOut(status, first_sched, first_tok, finish, generated, preempts, max_itl, replica, cached, arrival,
                     itl_hist, itl, _by_start(timeline[:n_tl]), stats)


def _without_refcounts(fn):
    """njit without Numba's reference counting (`_nrt=False`, a private option Numba has long had);
    should a Numba lack it, the loop still runs, with reference counts (~2.5x slower)."""
    from numba.core.cpu import CPUTargetOptions

    flags = {"_nrt": False} if hasattr(CPUTargetOptions, "_nrt") else {}
    return njit(cache=True, error_model="numpy", nogil=True, **flags)(fn)


@_without_refcounts
def _events_nb(reqs, reps, routing, max_time_s, limits, rep_int, rep_params, tables, slots, itl_acc, turns,
               apc, lz, lz_ok, scratch, progress, timeline, loop_state):
    """run_cluster_nb's event loop, from the state it was left in (loop_state: requests left, next
    arrival known in advance, router turn, timeline rows; limits: record_timeline, fast_decode, tree
    leaves, max stages, max slots, stateless routing, conversations). Returns True when the timeline is full
    (the caller grows it and calls again), False when the run is over.

    Compiled without Numba's reference counting (`_nrt=False`: it allocates nothing, and nor does
    anything it calls): in this loop the atomic reference-count pairs around every array taken from
    a tuple or a row cost more than the simulation itself (gdb samples: over half in NRT_incref /
    NRT_decref)."""
    arrival, think_s, rejected, session = reqs.arrival, reqs.think_s, reqs.rejected, reqs.session
    draw, prompt, output, measured = reqs.draw, reqs.prompt, reqs.output, reqs.measured
    last_tok, max_itl, generated, preempts = reqs.last_tok, reqs.max_itl, reqs.generated, reqs.preempts
    status, first_sched, first_tok, finish = reqs.status, reqs.first_sched, reqs.first_tok, reqs.finish
    replica, cached, q_next, lpm_memo, gen0 = reqs.replica, reqs.cached, reqs.q_next, reqs.lpm_memo, reqs.gen0
    n_running, free, q_head, q_tail = reps.n_running, reps.free, reps.q_head, reps.q_tail
    n_waiting, outstanding = reps.n_waiting, reps.outstanding
    fl_end, fl_id, fl_head, fl_count = reps.fl_end, reps.fl_id, reps.fl_head, reps.fl_count
    batch_seq, nt_ratio, hit_bufs = reps.batch_seq, reps.nt_ratio, reps.hit_bufs
    session_replica, tree, steps_left = reps.session_replica, reps.tree, reps.steps_left
    rep_iters, rep_peak, rep_preempts = reps.rep_iters, reps.rep_peak, reps.rep_preempts
    rep_requests, rep_stretched, rep_time = reps.rep_requests, reps.rep_stretched, reps.rep_time
    policy, route_params, dest, next_same, own_next = routing.policy, routing.params, routing.dest, routing.next_same, \
        routing.own_next
    record_timeline, fast_decode = limits[0] != 0, limits[1] != 0
    leaves, max_stages, max_seqs = limits[2], limits[3], limits[4]
    stateless, has_turns = limits[5] != 0, limits[6] != 0
    reads_caches = policy == E.ROUTE_PREFIX_AWARE or policy == E.ROUTE_KV_AWARE
    tok_table, seq_table = tables.tok, tables.seq
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_output, s_blocks, s_last, s_max_itl = slots.output, slots.blocks, slots.last, slots.max_itl
    s_measured, s_sample = slots.measured, slots.sample
    h_t, h_i, h_n = turns.h_t, turns.h_i, turns.h_n
    n = arrival.size
    n_rep = rep_int.shape[0]
    n_left, a, rr_next, n_tl = loop_state[0], loop_state[1], loop_state[2], loop_state[3]
    chain_t = -1.0  # >= 0: replica r decides again at this time without going through the tree
    while n_left > 0:
        if progress[1] != 0:
            break  # the caller's wall-clock budget ran out: the rest stays unfinished
        if chain_t >= 0.0:  # the same replica decides again: nothing else can happen before
            t_r, chain_t = chain_t, -1.0
        else:
            if record_timeline and n_tl >= timeline.shape[0]:
                loop_state[0], loop_state[1], loop_state[2], loop_state[3] = n_left, a, rr_next, n_tl
                return True
            while a < n and replica[a] >= 0:  # already taken in at its replica's decision (see below)
                a += 1
            t_arr = arrival[a] if a < n else INF
            ai = a
            if h_n[0] > 0 and h_t[0, 0] < t_arr:
                t_arr = h_t[0, 0]
                ai = h_i[0, 0]
            r = _tree_argmin(tree, leaves)
            t_r = tree[leaves + r]
            if t_arr == INF and t_r == INF:
                break  # nothing can move: the rest stays unfinished
            if t_arr <= t_r:  # an arrival at the very time of a decision is seen by it
                if t_arr > max_time_s:
                    break
                if ai == a:
                    a += 1
                    while a < n and think_s[a] >= 0:
                        a += 1
                else:
                    hp.heap_pop_nb(h_t, h_i, h_n, 0)
                if not rejected[ai]:
                    if stateless:
                        dst = dest[ai]
                        own_next[dst] = next_same[ai]
                    else:
                        if reads_caches:
                            # The lazy form leaves its decoders' blocks on the free list until the
                            # list is next read: the router reads it now.
                            for rr in range(n_rep):
                                if lz_ok[rr]:
                                    lz_nb.apc_flush_nb(lz, rr, apc)
                        dst = route_nb(policy, route_params, ai, n_rep, rr_next, draw, session, session_replica,
                                     outstanding, free, apc, rep_int, prompt)
                        rr_next += 1
                    _enqueue(ai, dst, session, session_replica, replica, rep_requests, outstanding, q_head, q_tail,
                             q_next, n_waiting)
                    if tree[leaves + dst] == INF:
                        _tree_update(tree, leaves, dst, t_arr)
                continue
            if t_r > max_time_s:
                break

        # ---- replica r's decision at time t_r ------------------------------------------------
        ri = rep_int[r]
        p = rep_params[r]
        stages = ri[E.RI_STAGES]
        block_size = ri[E.RI_BLOCK_SIZE]
        window = ri[E.RI_WINDOW]
        v0 = ri[E.RI_V0] != 0
        lazy_r = lz_ok[r]
        on = lazy_r and lz.cnt[r, lz_nb.C_ON] != 0
        # Fast mode, a lone replica under stateless routing: nothing else can happen, so it takes in
        # its own arrivals and decides in a chain, never through the tree. (With more replicas a
        # chain must yield to any replica deciding earlier; 64 replicas measured slower that way
        # than through the tree, so they go through it.)
        own = stateless and lazy_r and n_rep == 1 and not record_timeline  # (a chain skips the timeline's room check)
        if own:
            # Routing reads no state, so this replica's arrivals concern no one else: it takes in
            # those due by now itself (as the loop would have, just before this decision), and the
            # loop's pointer skips them.
            while own_next[r] >= 0 and arrival[own_next[r]] <= t_r:
                ai = own_next[r]
                own_next[r] = next_same[ai]
                _enqueue(ai, r, session, session_replica, replica, rep_requests, outstanding, q_head, q_tail,
                         q_next, n_waiting)
        # 1. batches that have completed by now deliver their tokens
        while fl_count[r] > 0 and fl_end[r, fl_head[r]] <= t_r:
            end = fl_end[r, fl_head[r]]
            if on:
                done, freed = lz_nb.complete_nb(lz, r, fl_id[r, fl_head[r]], end, slots, n_running, block_size,
                                                reqs, itl_acc, turns, apc, ri[E.RI_APC] != 0)
            else:
                done, freed = _complete(r, fl_id[r, fl_head[r]], end, n_running, s_req, s_prompt, s_tokens,
                                        s_computed, s_output, s_blocks, s_last, s_max_itl, s_measured, s_sample,
                                        status, finish, first_tok, generated, max_itl, itl_acc,
                                        apc, ri[E.RI_APC] != 0, turns, block_size)
            free[r] += freed
            outstanding[r] -= done
            n_left -= done
            progress[0] += done
            fl_head[r] = pp.wrap_nb(fl_head[r] + 1, max_stages)
            fl_count[r] -= 1
        if h_n[0] > 0 and h_t[0, 0] <= t_r:
            # A next turn due now (no think time) is an arrival at this decision: let it arrive first.
            _tree_update(tree, leaves, r, t_r)
            continue

        # Fast mode: a replica in exact form with nothing in flight goes (back) to lazy form, unless
        # a request would decode there as an explicit slot (lz_nb.stuck_nb); in lazy form, one that
        # has come to do so sends it back.
        if on and lz.cnt[r, lz_nb.C_STUCK] != 0:
            lz_nb.to_exact_nb(lz, r, slots, n_running, block_size, scratch, apc, ri[E.RI_APC] != 0)
            lz.cnt[r, lz_nb.C_EXITS] += 1
            on = False
        elif lazy_r and not on and fl_count[r] == 0:
            if lz.cnt[r, lz_nb.C_COOL] > 0:
                lz.cnt[r, lz_nb.C_COOL] -= 1
            elif lz_nb.stuck_nb(slots, r, n_running[r], block_size, apc, ri[E.RI_APC] != 0):
                lz.cnt[r, lz_nb.C_COOL] = lz_nb.COOLDOWN
            else:
                lz_nb.to_lazy_nb(lz, r, t_r, slots, n_running, max_seqs, block_size, apc, ri[E.RI_APC] != 0)
                on = True

        # 1b. steady decoding: step every iteration up to the next event in O(1) each (fast mode:
        # the same iterations summed in closed form; with pipeline stages, each micro-batch in O(P))
        # (The pipeline stretch writes no timeline rows.)
        if (on or fast_decode) and n_running[r] > 0 and (stages == 1 and fl_count[r] == 0
                                                         or stages > 1 and not record_timeline):
            t_next_arrival, finish_by = _outside_events(r, t_r, stateless, arrival, own_next, a, n, h_t, h_n, has_turns,
                                                        n_rep, policy, tree, leaves)
            if stages > 1:
                k_iters, t_end, done, peak = pp.pp_decode_run_nb(
                    r, t_r, t_next_arrival, max_time_s, ri, p, tables, reqs, slots, reps, max_stages, itl_acc, turns,
                    scratch.pipeline, apc, hit_bufs[r])
            elif on:
                loop_state[E.LS_ROWS] = n_tl
                k_iters, t_end, done, peak = lz_nb.run_nb(
                    lz, r, t_r, t_next_arrival, finish_by, max_time_s, ri, p, tables, slots, reps, reqs, itl_acc, turns,
                    apc, hit_bufs[r], TimelineOut(timeline, loop_state, record_timeline))
                n_tl = loop_state[E.LS_ROWS]
            else:
                loop_state[E.LS_ROWS] = n_tl
                k_iters, t_end, done, peak = _decode_run(
                    r, t_r, t_next_arrival, finish_by, max_time_s, ri, p, tables, v0, reqs, slots, reps, itl_acc, turns,
                    apc, ri[E.RI_APC] != 0, scratch,
                    TimelineOut(timeline, loop_state, record_timeline))
                n_tl = loop_state[E.LS_ROWS]
            if k_iters > 0:
                rep_iters[r] += k_iters
                rep_stretched[r] += k_iters
                if stages == 1:
                    batch_seq[r] += k_iters  # (pp_decode_run_nb numbers the batches it puts in flight)
                outstanding[r] -= done
                n_left -= done
                progress[0] += done
                rep_peak[r] = max(rep_peak[r], peak)
                # Busy until the last stepped iteration ends, even if every request has left (with
                # pipeline stages: t_end is the replica's next decision).
                if own and on and t_end <= max_time_s:
                    chain_t = t_end
                else:
                    _tree_update(tree, leaves, r, t_end)
                continue

        # 2. a new batch, if a virtual engine is free
        n_sched = 0
        step_preempts = 0
        agg = EMPTY_BATCH
        cpu = 0.0
        bid = batch_seq[r]
        handled = False
        if on:
            handled, n_sched, agg, step_preempts = lz_nb.schedule_nb(lz, r, bid, t_r, ri, slots, reps, reqs, apc,
                                                                     hit_bufs[r])
            if not handled:  # the order of admission matters: exact mode decides
                lz_nb.to_exact_nb(lz, r, slots, n_running, block_size, scratch, apc, ri[E.RI_APC] != 0)
                lz.cnt[r, lz_nb.C_EXITS] += 1
        # vLLM V0 multi-step: a decode batch's later steps run without the scheduler, so nothing is
        # admitted and no CPU time is spent between them (the GPU advances the inputs itself).
        multi = v0 and steps_left[r] > 0 and n_running[r] > 0
        if not handled and fl_count[r] < stages:
            budget = ri[E.RI_MAX_TOKENS]
            sg = ri[E.RI_SGLANG] != 0
            reserve = 0.0  # SGLang: tokens held back for the running requests' coming output
            if not v0:
                # V1: every running request; SGLang: a prefill batch, first the request being chunked.
                step_preempts, n_sched, budget, agg = _schedule_running(
                    r, bid, budget, 0 if sg else ri[E.RI_THRESHOLD], block_size, window, n_running, free, q_head,
                    q_tail, q_next, n_waiting, s_req, s_prompt, s_tokens, s_computed, s_blocks, s_last, s_max_itl,
                    s_sample, generated, last_tok, max_itl, preempts, apc, ri[E.RI_APC] != 0, sg)
            if sg:
                for k in range(n_running[r]):
                    reserve += min(s_output[r, k] - (s_tokens[r, k] - s_prompt[r, k]), E.SGL_CLIP_MAX_NEW_TOKENS)
                reserve *= nt_ratio[r]
            if (v0 or sg or step_preempts == 0) and not multi:
                watermark = int(0.01 * ri[E.RI_NUM_BLOCKS]) if v0 else 0
                no_evict = ri[E.RI_NO_EVICT] != 0
                reserved = reserved_blocks_nb(s_prompt[r], s_output[r], s_prompt[r], n_running[r], False,
                                              block_size) if no_evict and n_waiting[r] > 0 else 0
                while n_waiting[r] > 0 and budget > 0 and n_running[r] < ri[E.RI_MAX_SEQS]:
                    i, before = q_head[r], -1
                    # (A lone waiting request is the longest prefix: no need to match it, a walk
                    # of its every cached token at page size 1.)
                    if ri[E.RI_LPM] and ri[E.RI_APC] and 1 < n_waiting[r] <= E.SGL_LPM_MAX_QUEUE:
                        i, before = _longest_prefix_first(apc, r, q_head[r], q_next, prompt, generated, block_size,
                                                          lpm_memo)
                    hits, hit_key = 0, px.ROOT_KEY
                    if ri[E.RI_APC]:  # the longest cached prefix is not computed again
                        hits, hit_key = px.apc_lookup_nb(apc, r, i, prompt[i] + generated[i], block_size, hit_bufs[r])
                    done_tok = hits * block_size if ri[E.RI_APC] else arrived_kv_nb(gen0, first_sched, i,
                                                                                     prompt[i] + generated[i])
                    full = prompt[i] + generated[i] - done_tok
                    wish, new = chunk_nb(full, 0 if v0 or sg else ri[E.RI_THRESHOLD], budget)
                    if (v0 or ri[E.RI_CHUNKED] == 0) and wish > budget:
                        break
                    need = ceil_div_pow2_nb(done_tok + new, block_size) - hits
                    if need > free[r] - watermark:
                        break
                    idle_hits = px.apc_idle_nb(apc, hit_bufs[r], hits) if ri[E.RI_APC] else 0
                    if need + idle_hits > free[r] - watermark:
                        break
                    final = final_blocks_nb(prompt[i], output[i], block_size)
                    if no_evict and reserved + final > ri[E.RI_NUM_BLOCKS]:
                        break
                    reserved += final
                    if sg:
                        # SGLang admits only while its whole prompt and its (clipped) output fit
                        # beside what the running requests are expected to need.
                        claim = full + min(output[i] - generated[i], E.SGL_CLIP_MAX_NEW_TOKENS)
                        if claim >= (free[r] - idle_hits) * block_size - reserve:
                            break
                        reserve += claim
                    if before < 0:
                        q_head[r] = q_next[i]
                    else:
                        q_next[before] = q_next[i]
                    if q_tail[r] == i:
                        q_tail[r] = before
                    n_waiting[r] -= 1
                    k = n_running[r]
                    n_running[r] += 1
                    if ri[E.RI_APC]:
                        free[r] -= px.apc_admit_nb(apc, r, k, i, block_size, hit_bufs[r], hits, hit_key, need,
                                                   done_tok + new)
                    else:
                        free[r] -= need
                    s_req[r, k] = i
                    s_prompt[r, k] = prompt[i]
                    s_tokens[r, k] = prompt[i] + generated[i]
                    s_computed[r, k] = done_tok + new
                    s_output[r, k] = output[i]
                    s_blocks[r, k] = hits + need
                    s_last[r, k] = last_tok[i]
                    s_max_itl[r, k] = max_itl[i]
                    s_measured[r, k] = measured[i]
                    s_sample[r, k] = bid if s_computed[r, k] == s_tokens[r, k] else -1
                    status[i] = E.RUNNING
                    if np.isnan(first_sched[i]):
                        first_sched[i] = t_r
                        cached[i] = hits * block_size
                    agg = add_to_batch_nb(agg, new, done_tok, prompt[i], window)
                    n_sched += 1
                    budget -= new
            if v0:  # a prefill step is one step; a decode batch runs num_scheduler_steps
                steps_left[r] = steps_left[r] - 1 if multi else (ri[E.RI_SCHED_STEPS] - 1 if n_sched == 0 else 0)
            if (v0 or sg) and n_sched == 0:
                # No prefill admitted: a step of every running request (each a decode).
                more_preempts, n_sched, budget, agg = _schedule_running(
                    r, bid, budget, 0, block_size, window, n_running, free, q_head, q_tail, q_next, n_waiting,
                    s_req, s_prompt, s_tokens, s_computed, s_blocks, s_last, s_max_itl, s_sample,
                    generated, last_tok, max_itl, preempts, apc, ri[E.RI_APC] != 0, False)
                step_preempts += more_preempts
                if sg and n_sched > 0:
                    _sgl_decoded(nt_ratio, r, 1, step_preempts > 0)
        rep_preempts[r] += step_preempts

        if n_sched > 0:
            tokens = agg.n_decodes + agg.prefill_tokens
            body, head = stage_time_nb(p, tok_table, seq_table, ri[E.RI_TOK_OFF], ri[E.RI_SEQ_OFF], agg)
            account_nb(rep_time, r, ri, tok_table, seq_table, agg, body, head, stages)
            cpu = 0.0 if multi else cpu_in_series_nb(p, cpu_overhead_nb(p, agg), body + head)
            t = pp.launch_nb(p, r, t_r, body, head, tokens, cpu, stages, reps, max_stages)
            rep_iters[r] += 1
            used = ri[E.RI_NUM_BLOCKS] - free[r]
            if used > rep_peak[r]:
                rep_peak[r] = used
            if record_timeline and t <= max_time_s:
                timeline_row_nb(timeline, n_tl, t_r, t - t_r, agg, used, n_waiting[r], n_running[r], step_preempts, r)
                n_tl += 1

        # 3. when this replica decides next
        nxt = pp.next_decision_nb(r, t_r, cpu, n_sched > 0, stages, reps)
        if own and nxt == INF and own_next[r] >= 0:
            nxt = arrival[own_next[r]]  # idle: its own next arrival wakes it
        may_chain = (lazy_r and lz.cnt[r, lz_nb.C_ON] != 0 and stages == 1 and not record_timeline
                     and nxt <= max_time_s and nxt < INF)
        if may_chain and (own or n_sched > 0 and nxt < _outside_events(r, nxt, stateless, arrival, own_next, a, n,
                                                                       h_t, h_n, has_turns, n_rep, policy, tree,
                                                                       leaves)[0]):
            # Fast mode: nothing can arrive before this batch ends (or what arrives is a lone
            # replica's own, taken in at its decision) and nothing else reads this replica, so it
            # decides next straight away (the tree keeps its old time until the chain ends).
            chain_t = nxt
        else:
            _tree_update(tree, leaves, r, nxt)

    loop_state[0], loop_state[1], loop_state[2], loop_state[3] = n_left, a, rr_next, n_tl
    return False


# Called, not inlined (nor _complete, _decode_run): _events_nb calls without reference counts, so a
# call is cheap, and inlining these exact-mode paths too costs ~1 min of compilation.
@njit(cache=True, error_model="numpy")
def _schedule_running(r, bid, budget, threshold, block_size, window, n_running, free, q_head, q_tail, q_next,
                      n_waiting, s_req, s_prompt, s_tokens, s_computed, s_blocks, s_last, s_max_itl, s_sample,
                      generated, last_tok, max_itl, preempts, apc, on, prefill_only):
    """Schedule replica r's running slots from the first while the budget lasts, each its next tokens
    (none while all of them are in flight; with prefill_only, none for a slot that would decode);
    when a slot's blocks cannot be allocated, preempt the newest running request until they can, or
    until the slot itself was the one preempted.

    Returns (preemptions, scheduled, budget left, batch aggregates).
    """
    # apc: the prefix cache; on: whether this replica uses it
    # Row views: one replica's slots, contiguous.
    s_req, s_prompt, s_tokens, s_computed = s_req[r], s_prompt[r], s_tokens[r], s_computed[r]
    s_blocks, s_last, s_max_itl, s_sample = s_blocks[r], s_last[r], s_max_itl[r], s_sample[r]
    # Scalars in locals for the loop (array elements would be reloaded on every pass).
    running, free_r, head, tail, waiting = n_running[r], free[r], q_head[r], q_tail[r], n_waiting[r]
    agg = EMPTY_BATCH
    preempted = 0
    n_sched = 0
    k = 0
    while k < running and budget > 0:
        new = s_tokens[k] - s_computed[k]
        if new == 0 or (prefill_only and new == 1 and s_computed[k] >= s_prompt[k]):
            k += 1  # its last tokens are still in the pipeline, or it would decode
            continue
        _, new = chunk_nb(new, threshold, budget)
        need = blocks_needed_nb(s_computed[k], new, s_blocks[k], block_size)
        while need > free_r and running > k:
            running -= 1
            v = running
            i = s_req[v]
            generated[i] = s_tokens[v] - s_prompt[v]
            last_tok[i] = s_last[v]
            max_itl[i] = s_max_itl[v]
            preempts[i] += 1
            if on:
                px.apc_publish_nb(apc, r, v, i, block_size)
            free_r += px.apc_release_nb(apc, r, v) if on else s_blocks[v]
            preempted += 1
            q_next[i] = head  # to the front of the waiting queue
            head = i
            if tail < 0:
                tail = i
            waiting += 1
        if running == k:  # it was itself the newest, and is now preempted
            break
        free_r -= need
        s_blocks[k] += need
        agg = add_to_batch_nb(agg, new, s_computed[k], s_prompt[k], window)
        s_computed[k] += new
        if on:  # calls only when blocks are taken or filled: most decode steps do neither
            if need > 0:
                px.apc_allocate_nb(apc, r, k, need)
            if div_pow2_nb(s_computed[k], block_size) > div_pow2_nb(s_computed[k] - new, block_size):
                px.apc_hash_full_nb(apc, r, k, s_req[k], s_computed[k], block_size)
        if s_computed[k] == s_tokens[k]:
            s_sample[k] = bid
        n_sched += 1
        budget -= new
        k += 1
    n_running[r], free[r], q_head[r], q_tail[r], n_waiting[r] = running, free_r, head, tail, waiting
    return preempted, n_sched, budget, agg


@njit(cache=True, error_model="numpy")
def _complete(r, bid, end, n_running, s_req, s_prompt, s_tokens, s_computed, s_output, s_blocks, s_last,
              s_max_itl, s_measured, s_sample, status, finish, first_tok, generated, max_itl, itl_acc,
              apc, on, turns, block_size):
    """Batch `bid` of replica r completed at `end`: each request it sampled for gets a token; finished
    requests leave their slots (and their conversation's next turn is due). Returns (requests
    finished, blocks freed)."""
    # Most tokens share one inter-token gap (their previous token came from the same batch): they
    # are counted against the first one's previous-token time and binned together at the end.
    s_req, s_prompt, s_tokens, s_computed, s_output = s_req[r], s_prompt[r], s_tokens[r], s_computed[r], s_output[r]
    s_blocks, s_last, s_max_itl, s_measured, s_sample = s_blocks[r], s_last[r], s_max_itl[r], s_measured[r], s_sample[r]
    ref_last = -1.0
    n_ref = 0
    done = 0
    freed = 0
    running = n_running[r]
    for k in range(running):
        if s_sample[k] != bid:
            continue
        s_sample[k] = -1
        s_tokens[k] += 1
        gen = s_tokens[k] - s_prompt[k]
        i = s_req[k]
        if gen == 1:
            first_tok[i] = end
        else:
            gap = end - s_last[k]
            if gap > s_max_itl[k]:
                s_max_itl[k] = gap
            if s_measured[k]:
                ref_last, n_ref = tally_gap_nb(itl_acc, s_last[k], gap, ref_last, n_ref)
        s_last[k] = end
        if gen >= s_output[k]:
            finish[i] = end
            status[i] = E.FINISHED
            generated[i] = gen
            max_itl[i] = s_max_itl[k]
            freed += px.apc_finish_nb(apc, r, k, i, block_size) if on else s_blocks[k]
            s_blocks[k] = -1  # marks the slot for removal
            done += 1
            if turns.next_turn[i] != -1:  # (a next turn, or a closed loop to refill)
                hp.next_turn_due_nb(turns, i, end)
    if n_ref > 0:
        itl_add_nb(itl_acc, end - ref_last, n_ref)
    if done > 0:
        row = Slots(s_req, s_prompt, s_tokens, s_computed, s_output, s_blocks, s_last, s_max_itl, s_measured, s_sample)
        m = 0
        for k in range(running):
            if s_blocks[k] >= 0:
                if m != k:
                    move_slot_nb(row, k, m)
                    if on:
                        px.apc_move_slot_nb(apc, r, k, m)
                m += 1
        n_running[r] = m
    return done, freed


@njit(cache=True, error_model="numpy")
def _longest_prefix_first(apc, r, head, q_next, prompt, generated, block_size, lpm_memo):
    """SGLang's lpm policy: the waiting request with the longest cached prefix (the first of equals),
    and the one before it in the queue (-1: it is the head)."""
    evictions = apc.rep[r, px.EVICTIONS]
    best, best_before, best_hits = head, -1, -1
    before = -1
    i = head
    while i >= 0:
        hits, key = 0, px.ROOT_KEY
        if lpm_memo[i, 2] == evictions:  # nothing evicted since its last match: it can only have grown
            hits, key = lpm_memo[i, 0], lpm_memo[i, 1]
        hits, key = px.apc_match_nb(apc, r, i, prompt[i] + generated[i], block_size, hits, key)
        lpm_memo[i, 0], lpm_memo[i, 1], lpm_memo[i, 2] = hits, key, evictions
        if hits > best_hits:
            best, best_before, best_hits = i, before, hits
        before = i
        i = q_next[i]
    return best, best_before


@njit(cache=True, error_model="numpy", inline="always")
def _enqueue(i, r, session, session_replica, replica, rep_requests, outstanding, q_head, q_tail, q_next, n_waiting):
    """Request i, arrived, joins the back of replica r's waiting queue."""
    if session[i] >= 0 and session_replica[session[i]] < 0:
        session_replica[session[i]] = r
    replica[i] = r
    rep_requests[r] += 1
    outstanding[r] += 1
    if q_tail[r] < 0:
        q_head[r] = i
    else:
        q_next[q_tail[r]] = i
    q_tail[r] = i
    n_waiting[r] += 1


@njit(cache=True, error_model="numpy")
def _by_start(timeline):
    """The timeline's rows in order of start, then replica. A decode stretch (or fast mode's
    summed run) writes a replica's iterations at once, ahead of other replicas' rows between; and
    where two replicas start an iteration at the same time, the order they decided in depends on
    the path taken. With one replica they are in order already."""
    start, rep = timeline[:, E.TL_START_S], timeline[:, E.TL_REPLICA]
    for i in range(1, start.size):
        if start[i] < start[i - 1] or (start[i] == start[i - 1] and rep[i] < rep[i - 1]):
            by_rep = np.argsort(rep, kind="mergesort")  # two stable sorts: by start, then replica
            return timeline[by_rep[np.argsort(start[by_rep], kind="mergesort")]]
    return timeline.copy()


@njit(cache=True, error_model="numpy", inline="always")
def _sgl_decoded(nt_ratio, r, steps, retracted):
    """SGLang replica r's new-token ratio after `steps` decode steps: back to its start after a
    retraction (expect more output again), else lowered by the decay each step down to its floor
    (step by step: the plain path's rounding)."""
    if retracted:
        nt_ratio[r] = E.SGL_INIT_NEW_TOKEN_RATIO
        return
    for _ in range(steps):
        if nt_ratio[r] <= E.SGL_MIN_NEW_TOKEN_RATIO:
            break
        nt_ratio[r] = max(nt_ratio[r] - E.SGL_NEW_TOKEN_RATIO_DECAY, E.SGL_MIN_NEW_TOKEN_RATIO)


@njit(cache=True, error_model="numpy", inline="always")
def _outside_events(r, t_r, stateless, arrival, own_next, a, n, h_t, h_n, has_turns, n_rep, policy, tree, leaves):
    """(the next arrival that could change what replica r does, the time before which a request may
    finish in a decode stretch). With stateless routing only r's own next arrival matters;
    otherwise a router that reads the replicas' state must not see a request finish before it does."""
    if stateless:
        return arrival[own_next[r]] if own_next[r] >= 0 else INF, INF
    t_next = arrival[a] if a < n else INF
    if h_n[0] > 0:
        t_next = min(t_next, h_t[0, 0])
    if has_turns and n_rep > 1 and policy != E.ROUTE_SESSION_AFFINITY:
        # Another replica's next decision may finish a turn whose next turn comes here (session
        # affinity keeps every turn where its conversation started).
        _tree_update(tree, leaves, r, INF)
        t_next = min(t_next, tree[1])
        _tree_update(tree, leaves, r, t_r)
    return t_next, t_next


@njit(cache=True, error_model="numpy")
def _stretch_blocks(apc, r, it, bs, by_phase, start, s_req, s_computed, s_blocks):
    """Iteration `it` of a decode stretch with prefix caching: in slot order, as the plain path
    goes, slots at phase it-1 take a new block and slots at phase it name the block they fill."""
    fa, fh = mod_pow2_nb(it - 1, bs), mod_pow2_nb(it, bs)
    a, a_end = start[fa], start[fa + 1]
    h, h_end = start[fh], start[fh + 1]
    if bs == 1:  # one phase: every slot takes a block and fills it
        h = h_end
    while a < a_end or h < h_end:
        if h >= h_end or (a < a_end and by_phase[a] < by_phase[h]):
            k = by_phase[a]
            a += 1
            if s_blocks[k] >= 0:
                px.apc_allocate_nb(apc, r, k, 1)
                s_blocks[k] += 1
                if bs == 1:
                    px.apc_hash_full_nb(apc, r, k, s_req[k], s_computed[k] + it, bs)
        else:
            k = by_phase[h]
            h += 1
            if s_blocks[k] >= 0:
                px.apc_hash_full_nb(apc, r, k, s_req[k], s_computed[k] + it, bs)


@njit(cache=True, error_model="numpy")
def _decode_run(r, t_r, t_arrival, finish_by, max_time_s, ri, p, tables, v0, reqs, slots, reps, itl_acc,
                turns, apc, on, scratch, tl):
    """Replica r at t_r has every running request ready to decode, nothing in flight: step the
    decode iterations that the normal path would run before anything else can happen (an arrival,
    a preemption, an admission; a request finishing too, unless nothing waits) in O(1) each, and
    apply them. Requests that finish on the way leave as the normal path would let them, but not
    after `finish_by` (the next arrival, when the router reads the replicas' state); a next turn
    they make due is such an arrival.

    Each iteration is what the normal path computes: every slot decodes one token, the batch costs
    the same tabulated arithmetic, KV blocks are allocated at the same iterations (with prefix
    caching: taken from the cache's free list and named when full, slot by slot in the same order,
    touching only the slots whose turn it is). Returns
    (iterations run, end of the last, requests finished, peak blocks used), or (0, t_r, 0, 0) when
    the stretch does not apply.

    SGLang: with nothing waiting, its scheduler's step is a decode of every running request, as
    V1's is, and each such step lowers its new-token ratio (nt_ratio) by the decay; with requests
    waiting, its admission rule (memory held back for the running requests' expected output, which
    shrinks every step) is decided by the plain path.

    tl (a bundles.TimelineOut): the normal path's row for each iteration, while the timeline has room (the stretch ends there; the caller makes room).
    """
    timeline, tl_state, record = tl.timeline, tl.loop_state, tl.record
    tok_table, seq_table = tables.tok, tables.seq
    hit_buf, nt_ratio = reps.hit_bufs[r], reps.nt_ratio
    prompt, generated, status, finish = reqs.prompt, reqs.generated, reqs.status, reqs.finish
    max_itl, output, gen0, first_sched = reqs.max_itl, reqs.output, reqs.gen0, reqs.first_sched
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_output, s_blocks, s_last, s_max_itl = slots.output, slots.blocks, slots.last, slots.max_itl
    s_measured, s_sample = slots.measured, slots.sample
    n_running, free, q_head, n_waiting = reps.n_running, reps.free, reps.q_head, reps.n_waiting
    stage_free, rep_time = reps.stage_free, reps.rep_time
    s_req, s_prompt, s_tokens, s_computed, s_output = s_req[r], s_prompt[r], s_tokens[r], s_computed[r], s_output[r]
    s_blocks, s_last, s_max_itl, s_measured, s_sample = s_blocks[r], s_last[r], s_max_itl[r], s_measured[r], s_sample[r]
    nrun = n_running[r]
    bs = ri[E.RI_BLOCK_SIZE]
    budget = ri[E.RI_MAX_TOKENS]
    sg = ri[E.RI_SGLANG] != 0
    if nrun > budget or v0 or (sg and n_waiting[r] > 0):  # V0 tries a prefill before decoding
        return 0, t_r, 0, 0
    # Every slot: one token ready to decode, sampled at this very completion.
    base = 0       # sum of the active slots' computed tokens at the start (short of the window)
    n_meas = 0
    next_fin = 1 << 62  # iteration (1-based) at which the next request finishes
    phase = scratch.phase_a  # slots needing a new block at iterations j with j % bs == index
    phase[:bs] = 0
    for k in range(nrun):
        if s_tokens[k] - s_computed[k] != 1 or s_last[k] != t_r or s_computed[k] < s_prompt[k]:
            return 0, t_r, 0, 0
        base += s_computed[k]
        n_meas += s_measured[k]
        next_fin = min(next_fin, s_output[k] - (s_tokens[k] - s_prompt[k]))
        phase[mod_pow2_nb(s_blocks[k] * bs - s_computed[k] + 1, bs)] += 1
    # Sliding window: at iteration j (from 0) slot k reads min(computed + j + 1, window) keys, so it
    # is counted apart from iteration window - 1 - computed on, the slots in the order they get there
    # (keys: that iteration; order: slot indices). Without a window every slot stays in `base`.
    window = ri[E.RI_WINDOW]
    n_cap, n_cross, next_cross = 0, 0, 0  # slots at the window; slots short of it, in `order`
    reach, order = scratch.slot_f, scratch.slot_b
    if window > 0:
        for k in range(nrun):
            if s_computed[k] + 1 >= window:
                n_cap += 1
                base -= s_computed[k]
            else:
                reach[n_cross] = window - 1 - s_computed[k]
                order[n_cross] = k
                n_cross += 1
        sort_by_key_nb(reach, order, n_cross)
    free_r = free[r]
    # With requests waiting, a finish frees room the normal path would admit into: stop before it.
    # (Free blocks only shrink otherwise, so a head blocked now stays blocked.)
    last_iter = 1 << 62
    if n_waiting[r] > 0:
        last_iter = next_fin - 1
        if last_iter <= 0:
            return 0, t_r, 0, 0
        reserved = reserved_blocks_nb(s_prompt, s_output, s_prompt, nrun, False, bs) if ri[E.RI_NO_EVICT] else 0
        if lz_nb.head_may_start_nb(apc, on, r, q_head[r], ri, nrun, nrun, phase[mod_pow2_nb(1, bs)], free_r, reserved,
                                   prompt, output, generated, gen0, first_sched, hit_buf):
            return 0, t_r, 0, 0  # the plain path decides
    # With prefix caching, when every slot's blocks from here on are private, only how many blocks
    # the stretch takes matters: they leave the head of the free list as a count, before anything
    # returns to it (pend; fast mode's lazy form takes them so too). Otherwise, slot by slot.
    by_count = on
    if on:
        for k in range(nrun):
            by_count = by_count and px.apc_private_from_here_nb(apc, r, k)
    pend = 0
    if on and not by_count:
        # Slots by the iteration phase at which they fill a block (computed % bs == 0): a slot
        # fills one at phase f and takes a new one at f + 1. Counting sort keeps slot order.
        by_phase, start, fill = scratch.slot_a, scratch.phase_b, scratch.phase_c
        start[: bs + 1] = 0
        for k in range(nrun):
            start[mod_pow2_nb(-s_computed[k], bs) + 1] += 1
        for f in range(bs):
            start[f + 1] += start[f]
        for f in range(bs):
            fill[f] = start[f]
        for k in range(nrun):
            f = mod_pow2_nb(-s_computed[k], bs)
            by_phase[fill[f]] = k
            fill[f] += 1
    t = t_r
    n_act = nrun
    worst_gap = 0.0
    done = 0
    peak = 0
    j = 0  # iterations done
    while j < last_iter and n_act > 0:
        if j > 0 and t >= t_arrival:  # the next iteration would start at or after an arrival
            break
        if record and tl_state[E.LS_ROWS] == timeline.shape[0]:
            break
        need = phase[mod_pow2_nb(j + 1, bs)]
        if need > free_r:  # a preemption: the normal path decides it
            break
        while next_cross < n_cross and reach[next_cross] <= j:
            k = order[next_cross]
            next_cross += 1
            if s_blocks[k] >= 0:  # (not finished)
                n_cap += 1
                base -= s_computed[k]
        agg = Batch(n_act, float(base + (j + 1) * (n_act - n_cap) + window * n_cap), 0, 0, 0.0, 0.0)
        body, head = stage_time_nb(p, tok_table, seq_table, ri[E.RI_TOK_OFF], ri[E.RI_SEQ_OFF], agg)
        end = max(t + cpu_in_series_nb(p, cpu_overhead_nb(p, agg), body + head), stage_free[r, 0]) + body + head
        if end > max_time_s or (j + 1 == next_fin and end >= finish_by):  # ties: the arrival first
            break
        account_nb(rep_time, r, ri, tok_table, seq_table, agg, body, head, 1)
        free_r -= need
        pend += need
        if on and not by_count:
            _stretch_blocks(apc, r, j + 1, bs, by_phase, start, s_req, s_computed, s_blocks)
        peak = max(peak, ri[E.RI_NUM_BLOCKS] - free_r)
        if record:
            timeline_row_nb(timeline, tl_state[E.LS_ROWS], t, end - t, agg, ri[E.RI_NUM_BLOCKS] - free_r,
                            n_waiting[r], n_act, 0, r)
            tl_state[E.LS_ROWS] += 1
        gap = end - t
        if gap > worst_gap:
            worst_gap = gap
        if n_meas > 0:
            itl_add_nb(itl_acc, gap, n_meas)
        stage_free[r, 0] = end
        t = end
        j += 1
        if j == next_fin:  # requests whose last token this was leave, as after a normal completion
            next_fin = 1 << 62
            for k in range(nrun):
                if s_blocks[k] < 0:
                    continue
                left = s_output[k] - (s_tokens[k] - s_prompt[k])
                if left == j:
                    i = s_req[k]
                    held = max(s_blocks[k], ceil_div_pow2_nb(s_computed[k] + j, bs))
                    if by_count:
                        px.apc_pop_nb(apc, r, pend)
                        pend = 0
                        px.apc_sync_private_nb(apc, r, k, held, s_computed[k] + j, bs)
                    free_r += px.apc_finish_nb(apc, r, k, i, bs) if on else held
                    if window > 0 and s_computed[k] + j >= window:  # (at its last iteration, j - 1)
                        n_cap -= 1
                    else:
                        base -= s_computed[k]
                    n_act -= 1
                    n_meas -= s_measured[k]
                    phase[mod_pow2_nb(s_blocks[k] * bs - s_computed[k] + 1, bs)] -= 1
                    finish[i] = end
                    status[i] = E.FINISHED
                    generated[i] = s_output[k]
                    max_itl[i] = max(s_max_itl[k], worst_gap)
                    s_blocks[k] = -1  # marks the slot for removal
                    done += 1
                    if turns.next_turn[i] != -1:  # (a next turn, or a closed loop to refill)
                        due = hp.next_turn_due_nb(turns, i, end)
                        t_arrival = min(t_arrival, due)
                        finish_by = min(finish_by, due)
                elif left > j:
                    next_fin = min(next_fin, left)
    if j == 0:
        return 0, t_r, 0, 0
    free[r] = free_r
    if by_count:
        px.apc_pop_nb(apc, r, pend)
    if sg:
        _sgl_decoded(nt_ratio, r, j, False)
    m = 0
    for k in range(nrun):
        if s_blocks[k] < 0:
            continue
        if on and m != k:
            px.apc_move_slot_nb(apc, r, k, m)
        s_req[m] = s_req[k]
        s_prompt[m] = s_prompt[k]
        s_output[m] = s_output[k]
        s_measured[m] = s_measured[k]
        s_computed[m] = s_computed[k] + j
        s_tokens[m] = s_tokens[k] + j
        s_blocks[m] = max(s_blocks[k], ceil_div_pow2_nb(s_computed[m], bs))
        if by_count:
            px.apc_sync_private_nb(apc, r, m, s_blocks[m], s_computed[m], bs)
        s_last[m] = t
        s_sample[m] = -1
        s_max_itl[m] = max(s_max_itl[k], worst_gap)
        m += 1
    n_running[r] = m
    return j, t, done, peak
