"""One vLLM replica's continuous-batching loop, iteration by iteration, as a compiled kernel.

Scheduling follows vLLM V1's `Scheduler.schedule()` (scheduler="v1"):
  1. running requests in admission order, each its next tokens (one decode token, or the next chunk
     of an unfinished prefill) within the token budget; if its KV blocks cannot be allocated, the
     most recently admitted running request is preempted (blocks freed, computed tokens dropped,
     pushed to the front of the waiting queue) until they can, or it is itself the one preempted;
  2. if nothing was preempted, waiting requests first-come-first-served while the budget, the
     max_num_seqs limit and free blocks allow, the last prefill chunked to fit the budget.
A preempted request keeps its generated tokens and recomputes prompt + generated as a prefill.
scheduler="v0" is vLLM V0's default: whole prefills first (never mixed with decodes), otherwise
one decode step of every running request, preempting the newest when a block is missing, and a
1% free-block watermark on admission.

Time: an iteration scheduled at `now` ends at now + forward pass + framework overhead; tokens
appear at its end. An idle replica jumps to the next arrival.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit

from fastsim.engine import enums as E
from fastsim.engine.cost_nb import chunk_pairs_nb, forward_time_tabled_nb


@njit(cache=True)
def _ceil_div(a, b):
    return (a + b - 1) // b


@njit(cache=True)
def _itl_bin(itl_s, log_min, inv_log_step, nbins):
    if itl_s <= 0.0:
        return 0
    i = int((math.log(itl_s) - log_min) * inv_log_step)
    return min(max(i, 0), nbins - 1)


@njit(cache=True)
def run_replica_nb(arrival_s, prompt, output, rejected, measured, p, tok_compute, seq_compute, tok_comm, seq_comm,
                   max_num_seqs, max_num_batched_tokens, block_size, num_blocks, chunked_prefill,
                   long_prefill_threshold, v0, overhead_s, max_time_s, window, record_timeline):
    """Simulate one replica over requests sorted by arrival. `rejected` ones are never scheduled;
    only `measured` ones (inside the warm-up/cool-down window) feed the ITL histogram.

    Returns per-request (status, first_scheduled_s, first_token_s, finish_s, generated, preemptions,
    max_itl_s), then (itl_hist, itl_stats=[count, sum, sum of squares], timeline, counters=[iterations,
    peak_blocks_used, free_blocks_at_end, total_preemptions]).
    """
    n = arrival_s.size
    status = np.zeros(n, np.int8)
    first_sched = np.full(n, np.nan)
    first_tok = np.full(n, np.nan)
    finish = np.full(n, np.nan)
    last_tok = np.zeros(n)
    max_itl = np.zeros(n)
    computed = np.zeros(n, np.int64)
    generated = np.zeros(n, np.int64)
    blocks = np.zeros(n, np.int64)
    preempts = np.zeros(n, np.int64)

    itl_hist = np.zeros(E.ITL_BINS, np.int64)
    log_min = math.log(E.ITL_MIN_S)
    inv_log_step = E.ITL_BINS / (math.log(E.ITL_MAX_S) - log_min)
    itl_count = 0.0
    itl_sum = 0.0
    itl_sumsq = 0.0

    running = np.empty(max_num_seqs, np.int64)
    n_running = 0
    pstack = np.empty(n, np.int64)  # preempted requests; the top is the front of the waiting queue
    n_pstack = 0
    fifo_head = 0                   # never-admitted requests are indices fifo_head..arrived-1
    arrived = 0
    n_waiting = 0

    sched_req = np.empty(max_num_seqs, np.int64)
    sched_new = np.empty(max_num_seqs, np.int64)

    tl_cap = 1024 if record_timeline else 1
    timeline = np.empty((tl_cap, len(E.TL_COLUMNS)))
    n_iter = 0
    free = num_blocks
    peak_used = 0
    total_preempts = 0
    watermark = int(0.01 * num_blocks) if v0 else 0
    now = 0.0
    n_left = 0
    for i in range(n):
        if rejected[i]:
            status[i] = E.REJECTED
        else:
            n_left += 1

    while n_left > 0:
        while arrived < n and arrival_s[arrived] <= now:
            if not rejected[arrived]:
                n_waiting += 1
            arrived += 1
        while fifo_head < arrived and rejected[fifo_head]:
            fifo_head += 1
        if n_running == 0 and n_waiting == 0:
            if arrived >= n:
                break
            now = max(now, arrival_s[arrived])
            continue

        # ---- schedule ---------------------------------------------------------------------
        budget = max_num_batched_tokens
        n_sched = 0
        step_preempts = 0
        if not v0:
            i = 0
            while i < n_running and budget > 0:
                r = running[i]
                new = prompt[r] + generated[r] - computed[r]
                if long_prefill_threshold > 0 and new > long_prefill_threshold:
                    new = long_prefill_threshold
                new = min(new, budget)
                need = _ceil_div(computed[r] + new, block_size) - blocks[r]
                ok = True
                while need > free:
                    n_running -= 1
                    victim = running[n_running]
                    free += blocks[victim]
                    blocks[victim] = 0
                    computed[victim] = 0
                    preempts[victim] += 1
                    step_preempts += 1
                    pstack[n_pstack] = victim
                    n_pstack += 1
                    n_waiting += 1
                    if victim == r:
                        ok = False
                        break
                if not ok:
                    break
                if need > 0:
                    free -= need
                    blocks[r] += need
                sched_req[n_sched] = r
                sched_new[n_sched] = new
                n_sched += 1
                budget -= new
                i += 1
        if (not v0 and step_preempts == 0) or v0:
            while n_waiting > 0 and budget > 0 and n_running < max_num_seqs:
                r = pstack[n_pstack - 1] if n_pstack > 0 else fifo_head
                new = prompt[r] + generated[r] - computed[r]
                if not v0 and long_prefill_threshold > 0 and new > long_prefill_threshold:
                    new = long_prefill_threshold
                if (v0 or not chunked_prefill) and new > budget:
                    break
                new = min(new, budget)
                need = _ceil_div(computed[r] + new, block_size) - blocks[r]
                if need > free - watermark:
                    break
                if n_pstack > 0:
                    n_pstack -= 1
                else:
                    fifo_head += 1
                    while fifo_head < arrived and rejected[fifo_head]:
                        fifo_head += 1
                n_waiting -= 1
                free -= need
                blocks[r] += need
                running[n_running] = r
                n_running += 1
                status[r] = E.RUNNING
                if np.isnan(first_sched[r]):
                    first_sched[r] = now
                sched_req[n_sched] = r
                sched_new[n_sched] = new
                n_sched += 1
                budget -= new
        if v0 and n_sched == 0:
            # No prefill could be admitted: one decode step of every running request.
            i = 0
            while i < n_running:
                r = running[i]
                need = _ceil_div(computed[r] + 1, block_size) - blocks[r]
                ok = True
                while need > free:
                    n_running -= 1
                    victim = running[n_running]
                    free += blocks[victim]
                    blocks[victim] = 0
                    computed[victim] = 0
                    preempts[victim] += 1
                    step_preempts += 1
                    pstack[n_pstack] = victim
                    n_pstack += 1
                    n_waiting += 1
                    if victim == r:
                        ok = False
                        break
                if not ok:
                    break
                if need > 0:
                    free -= need
                    blocks[r] += need
                sched_req[n_sched] = r
                sched_new[n_sched] = 1
                n_sched += 1
                i += 1

        total_preempts += step_preempts
        if n_sched == 0:
            # Nothing fits and nothing runs: no progress is possible (requests that can never fit
            # are rejected before simulation, so this is a safety stop, not an expected state).
            break
        used = num_blocks - free
        if used > peak_used:
            peak_used = used

        # ---- cost -------------------------------------------------------------------------
        n_dec = 0
        dec_keys = 0.0
        n_pre = 0
        pre_tokens = 0
        pairs = 0.0
        pre_keys = 0.0
        for j in range(n_sched):
            r = sched_req[j]
            new = sched_new[j]
            c = computed[r]
            if new == 1 and c >= prompt[r]:
                n_dec += 1
                dec_keys += min(c + 1, window) if window > 0 else c + 1
            else:
                n_pre += 1
                pre_tokens += new
                pairs += chunk_pairs_nb(new, c, window)
                pre_keys += (min(c, window) if window > 0 else c) + new
        compute, comm = forward_time_tabled_nb(p, tok_compute, seq_compute, tok_comm, seq_comm, n_dec,
                                               dec_keys, n_pre, pre_tokens, pairs, pre_keys)
        end = now + compute + comm + overhead_s
        if end > max_time_s:
            break

        if record_timeline:
            if n_iter >= timeline.shape[0]:
                grown = np.empty((timeline.shape[0] * 2, timeline.shape[1]))
                grown[: timeline.shape[0]] = timeline
                timeline = grown
            row = timeline[n_iter]
            row[E.TL_START_S] = now
            row[E.TL_DURATION_S] = end - now
            row[E.TL_NUM_SEQS] = n_sched
            row[E.TL_NUM_TOKENS] = n_dec + pre_tokens
            row[E.TL_PREFILL_TOKENS] = pre_tokens
            row[E.TL_NUM_DECODES] = n_dec
            row[E.TL_KV_BLOCKS_USED] = used
            row[E.TL_NUM_WAITING] = n_waiting
            row[E.TL_NUM_RUNNING] = n_running
            row[E.TL_PREEMPTIONS] = step_preempts
        n_iter += 1

        # ---- apply ------------------------------------------------------------------------
        any_done = False
        for j in range(n_sched):
            r = sched_req[j]
            computed[r] += sched_new[j]
            if computed[r] == prompt[r] + generated[r]:
                generated[r] += 1
                if np.isnan(first_tok[r]):
                    first_tok[r] = end
                else:
                    itl = end - last_tok[r]
                    if itl > max_itl[r]:
                        max_itl[r] = itl
                    if measured[r]:
                        itl_hist[_itl_bin(itl, log_min, inv_log_step, E.ITL_BINS)] += 1
                        itl_count += 1.0
                        itl_sum += itl
                        itl_sumsq += itl * itl
                last_tok[r] = end
                if generated[r] >= output[r]:
                    finish[r] = end
                    status[r] = E.FINISHED
                    free += blocks[r]
                    blocks[r] = 0
                    n_left -= 1
                    any_done = True
        if any_done:
            k = 0
            for i in range(n_running):
                r = running[i]
                if status[r] != E.FINISHED:
                    running[k] = r
                    k += 1
            n_running = k
        now = end

    for i in range(n):
        if status[i] == E.PENDING or status[i] == E.RUNNING:
            status[i] = E.UNFINISHED
    counters = np.array([n_iter, peak_used, free, total_preempts], np.int64)
    itl_stats = np.array([itl_count, itl_sum, itl_sumsq])
    return (status, first_sched, first_tok, finish, generated, preempts, max_itl,
            itl_hist, itl_stats, timeline[:n_iter].copy() if record_timeline else timeline[:0].copy(),
            counters)
