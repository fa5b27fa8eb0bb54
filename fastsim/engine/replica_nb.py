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


@njit(cache=True, error_model="numpy")
def _ceil_div(a, b):
    return (a + b - 1) // b


@njit(cache=True, error_model="numpy")
def _blocks_needed(computed, new, blocks, block_size):
    """New blocks for `computed + new` KV slots; the common case (room in the last block) skips the division."""
    if computed + new <= blocks * block_size:
        return 0
    return _ceil_div(computed + new, block_size) - blocks


@njit(cache=True, error_model="numpy")
def _add_to_batch(agg, new, computed, prompt_len, window):
    """Add one scheduled request to the batch aggregates the cost model needs:
    agg = (num_decodes, decode_kv_tokens, num_prefills, prefill_tokens, prefill_pairs, prefill_kv_tokens)."""
    n_dec, dec_keys, n_pre, pre_tokens, pairs, pre_keys = agg
    if new == 1 and computed >= prompt_len:
        return (n_dec + 1, dec_keys + (min(computed + 1, window) if window > 0 else computed + 1),
                n_pre, pre_tokens, pairs, pre_keys)
    return (n_dec, dec_keys, n_pre + 1, pre_tokens + new, pairs + chunk_pairs_nb(new, computed, window),
            pre_keys + (min(computed, window) if window > 0 else computed) + new)


@njit(cache=True, error_model="numpy")
def _itl_bin(itl_s, log_min, inv_log_step, nbins):
    if itl_s <= 0.0:
        return 0
    i = int((math.log(itl_s) - log_min) * inv_log_step)
    return min(max(i, 0), nbins - 1)


@njit(cache=True, error_model="numpy", nogil=True)
def run_replica_nb(arrival_s, prompt, output, rejected, measured, p, tok_compute, seq_compute, tok_comm, seq_comm,
                   max_num_seqs, max_num_batched_tokens, block_size, num_blocks, chunked_prefill,
                   long_prefill_threshold, v0, overhead_s, max_time_s, window, record_timeline, progress):
    """Simulate one replica over requests sorted by arrival. `rejected` ones are never scheduled;
    only `measured` ones (inside the warm-up/cool-down window) feed the ITL histogram.
    `progress[0]` is kept at the number of requests done, for a progress bar polled from another
    thread (the kernel releases the GIL).

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
    generated = np.zeros(n, np.int64)
    preempts = np.zeros(n, np.int64)

    # Running requests live in slots 0..n_running-1, in admission order, with their hot state in
    # slot arrays: each iteration then walks a few contiguous cache lines, not scattered requests.
    # A request's entries in the per-request arrays are written back when it leaves its slot.
    s_req = np.empty(max_num_seqs, np.int64)
    s_prompt = np.empty(max_num_seqs, np.int64)
    s_tokens = np.empty(max_num_seqs, np.int64)    # prompt + generated
    s_computed = np.empty(max_num_seqs, np.int64)  # tokens whose KV is cached
    s_output = np.empty(max_num_seqs, np.int64)
    s_blocks = np.empty(max_num_seqs, np.int64)
    s_last = np.empty(max_num_seqs)                # time of the last token
    s_max_itl = np.empty(max_num_seqs)
    s_measured = np.empty(max_num_seqs, np.bool_)
    n_running = 0

    itl_hist = np.zeros(E.ITL_BINS, np.int64)
    log_min = math.log(E.ITL_MIN_S)
    inv_log_step = E.ITL_BINS / (math.log(E.ITL_MAX_S) - log_min)
    itl_count = 0.0
    itl_sum = 0.0
    itl_sumsq = 0.0

    pstack = np.empty(n, np.int64)  # preempted requests; the top is the front of the waiting queue
    n_pstack = 0
    fifo_head = 0                   # never-admitted requests are indices fifo_head..arrived-1
    arrived = 0
    n_waiting = 0

    # This iteration's new tokens per slot. The scheduled slots are always one contiguous range:
    # V1 schedules running slots from the first and admits (appends) only if it got through all of
    # them; V0 runs either only the slots it just admitted, or every running slot.
    s_new = np.empty(max_num_seqs, np.int64)

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
        sched_lo = 0
        step_preempts = 0
        agg = (0, 0.0, 0, 0, 0.0, 0.0)
        # V1: running requests first. V0 runs them only when no prefill is admitted (below).
        if not v0:
            n_running, free, n_pstack, n_waiting, step_preempts, n_sched, budget, agg = _schedule_running(
                n_running, free, n_pstack, n_waiting, budget, long_prefill_threshold, block_size, window,
                s_req, s_prompt, s_tokens, s_computed, s_blocks, s_last, s_max_itl, s_new,
                generated, last_tok, max_itl, preempts, pstack)
        if v0 or step_preempts == 0:
            if v0:
                sched_lo = n_running  # V0 runs only the prefills it admits now
            while n_waiting > 0 and budget > 0 and n_running < max_num_seqs:
                r = pstack[n_pstack - 1] if n_pstack > 0 else fifo_head
                new = prompt[r] + generated[r]  # nothing of a waiting request is cached
                if not v0 and long_prefill_threshold > 0 and new > long_prefill_threshold:
                    new = long_prefill_threshold
                if (v0 or not chunked_prefill) and new > budget:
                    break
                new = min(new, budget)
                need = _ceil_div(new, block_size)
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
                k = n_running
                n_running += 1
                s_req[k] = r
                s_prompt[k] = prompt[r]
                s_tokens[k] = prompt[r] + generated[r]
                s_computed[k] = 0
                s_output[k] = output[r]
                s_blocks[k] = need
                s_last[k] = last_tok[r]
                s_max_itl[k] = max_itl[r]
                s_measured[k] = measured[r]
                status[r] = E.RUNNING
                if np.isnan(first_sched[r]):
                    first_sched[r] = now
                agg = _add_to_batch(agg, new, 0, s_prompt[k], window)
                s_new[k] = new
                n_sched += 1
                budget -= new
        if v0 and n_sched == 0:
            # No prefill could be admitted: one step of every running request (each a decode).
            sched_lo = 0
            n_running, free, n_pstack, n_waiting, step_preempts, n_sched, budget, agg = _schedule_running(
                n_running, free, n_pstack, n_waiting, budget, 0, block_size, window,
                s_req, s_prompt, s_tokens, s_computed, s_blocks, s_last, s_max_itl, s_new,
                generated, last_tok, max_itl, preempts, pstack)

        total_preempts += step_preempts
        if n_sched == 0:
            # Nothing fits and nothing runs: no progress is possible (requests that can never fit
            # are rejected before simulation, so this is a safety stop, not an expected state).
            break
        used = num_blocks - free
        if used > peak_used:
            peak_used = used

        # ---- cost -------------------------------------------------------------------------
        n_dec, dec_keys, n_pre, pre_tokens, pairs, pre_keys = agg
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
        # Most tokens follow one made at the end of the previous iteration: one ITL, one bin.
        n_common = 0
        n_done = 0
        for k in range(sched_lo, sched_lo + n_sched):
            s_computed[k] += s_new[k]
            if s_computed[k] < s_tokens[k]:
                continue  # a prefill chunk that does not finish the prompt samples nothing
            s_tokens[k] += 1
            gen = s_tokens[k] - s_prompt[k]
            if gen == 1:
                first_tok[s_req[k]] = end
            else:
                itl = end - s_last[k]
                if itl > s_max_itl[k]:
                    s_max_itl[k] = itl
                if s_measured[k]:
                    if s_last[k] == now:
                        n_common += 1
                    else:
                        itl_hist[_itl_bin(itl, log_min, inv_log_step, E.ITL_BINS)] += 1
                        itl_count += 1.0
                        itl_sum += itl
                        itl_sumsq += itl * itl
            s_last[k] = end
            if gen >= s_output[k]:
                r = s_req[k]
                finish[r] = end
                status[r] = E.FINISHED
                generated[r] = gen
                max_itl[r] = s_max_itl[k]
                free += s_blocks[k]
                s_blocks[k] = -1  # marks the slot for removal
                n_left -= 1
                n_done += 1
        progress[0] += n_done
        if n_common > 0:
            common_itl = end - now
            itl_hist[_itl_bin(common_itl, log_min, inv_log_step, E.ITL_BINS)] += n_common
            itl_count += n_common
            itl_sum += n_common * common_itl
            itl_sumsq += n_common * common_itl * common_itl
        if n_done > 0:
            m = 0
            for k in range(n_running):
                if s_blocks[k] >= 0:
                    if m != k:
                        _move_slot(k, m, s_req, s_prompt, s_tokens, s_computed, s_output, s_blocks, s_last,
                                   s_max_itl, s_measured)
                    m += 1
            n_running = m
        now = end

    # Requests still in a slot when the run stops: write their progress back.
    for k in range(n_running):
        r = s_req[k]
        generated[r] = s_tokens[k] - s_prompt[k]
        max_itl[r] = s_max_itl[k]
    for i in range(n):
        if status[i] == E.PENDING or status[i] == E.RUNNING:
            status[i] = E.UNFINISHED
    counters = np.array([n_iter, peak_used, free, total_preempts], np.int64)
    itl_stats = np.array([itl_count, itl_sum, itl_sumsq])
    return (status, first_sched, first_tok, finish, generated, preempts, max_itl,
            itl_hist, itl_stats, timeline[:n_iter].copy() if record_timeline else timeline[:0].copy(),
            counters)


@njit(cache=True, error_model="numpy")
def _schedule_running(n_running, free, n_pstack, n_waiting, budget, long_prefill_threshold, block_size, window,
                      s_req, s_prompt, s_tokens, s_computed, s_blocks, s_last, s_max_itl, s_new,
                      generated, last_tok, max_itl, preempts, pstack):
    """Schedule running slots from the first while the budget lasts, each its next tokens; when a
    slot's blocks cannot be allocated, preempt the newest running request until they can, or until
    the slot itself was the one preempted. Scheduled slots are 0..n_sched-1.

    Returns (n_running, free, n_pstack, n_waiting, preemptions, n_sched, budget, batch aggregates).
    """
    agg = (0, 0.0, 0, 0, 0.0, 0.0)
    preempted = 0
    k = 0
    while k < n_running and budget > 0:
        new = s_tokens[k] - s_computed[k]
        if long_prefill_threshold > 0 and new > long_prefill_threshold:
            new = long_prefill_threshold
        new = min(new, budget)
        need = _blocks_needed(s_computed[k], new, s_blocks[k], block_size)
        while need > free and n_running > k:
            n_running -= 1
            free += _preempt(n_running, s_req, s_prompt, s_tokens, s_blocks, s_last, s_max_itl,
                             generated, last_tok, max_itl, preempts)
            preempted += 1
            pstack[n_pstack] = s_req[n_running]
            n_pstack += 1
            n_waiting += 1
        if n_running == k:  # it was itself the newest, and is now preempted
            break
        free -= need
        s_blocks[k] += need
        agg = _add_to_batch(agg, new, s_computed[k], s_prompt[k], window)
        s_new[k] = new
        budget -= new
        k += 1
    return n_running, free, n_pstack, n_waiting, preempted, k, budget, agg


@njit(cache=True, error_model="numpy")
def _preempt(k, s_req, s_prompt, s_tokens, s_blocks, s_last, s_max_itl, generated, last_tok, max_itl, preempts):
    """Recompute-preempt the request in slot k: keep its generated tokens, drop its KV.
    Returns the blocks freed."""
    r = s_req[k]
    generated[r] = s_tokens[k] - s_prompt[k]
    last_tok[r] = s_last[k]
    max_itl[r] = s_max_itl[k]
    preempts[r] += 1
    freed = s_blocks[k]
    s_blocks[k] = 0
    return freed


@njit(cache=True, error_model="numpy")
def _move_slot(src, dst, s_req, s_prompt, s_tokens, s_computed, s_output, s_blocks, s_last, s_max_itl, s_measured):
    s_req[dst] = s_req[src]
    s_prompt[dst] = s_prompt[src]
    s_tokens[dst] = s_tokens[src]
    s_computed[dst] = s_computed[src]
    s_output[dst] = s_output[src]
    s_blocks[dst] = s_blocks[src]
    s_last[dst] = s_last[src]
    s_max_itl[dst] = s_max_itl[src]
    s_measured[dst] = s_measured[src]
