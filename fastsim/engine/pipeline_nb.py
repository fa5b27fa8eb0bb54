"""Pipeline parallelism's micro-batches: one launched through the stages, when the replica decides
next, and steady decoding stepped in O(P) per micro-batch (pp_decode_run_nb).

With P stages a replica keeps up to P batches in flight (vLLM's virtual engines), in a ring per
replica (fl_*): a request whose tokens are all in flight is skipped when the next batch is formed,
so the running requests split into groups that travel the pipeline one behind the other, each
scheduled again when its own batch completes (a waiting request joins the batch it is admitted
into). A group's batch changes only by counting between events, as a single replica's batch does:
pp_decode_run_nb keeps each group's size, context sum and block phases, and steps the decisions
exact mode would take — each completion, each launch, the max-plus recurrence over the stages, each
admission — in O(P) each instead of O(running requests); a finish scans its group.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from fastsim.engine import enums as E
from fastsim.engine import heap_nb as hp
from fastsim.engine.bundles import Batch, Slots
from fastsim.engine.batch_nb import (account_nb, add_to_batch_nb, arrived_kv_nb, ceil_div_pow2_nb, chunk_nb,
                                     itl_add_nb, mod_pow2_nb, move_slot_nb, reserved_blocks_nb, tally_gap_nb)
from fastsim.engine.cost_nb import cpu_overhead_nb, pp_send_time_nb, stage_time_nb
from fastsim.engine.lazy_nb import head_may_start_nb

INF = np.inf

# Rows of pp_decode_run_nb's integer scratch, a column per group (groups: the batches in flight
# when the run starts, then the requests ready at its start). A request's tokens and computed
# tokens stay as they were when it joined, less its group's completions and batches before that:
# its counts now are those plus the group's.
G_N = 0      # its running requests
G_MEAS = 1   # of which feed the ITL statistics
G_BASE = 2   # the sum of their computed tokens, each less the group's batches before it joined
G_SCHED = 3  # times the run scheduled it
G_DONE = 4   # times its batch completed in the run
G_FIN = 5    # the completion (counted as G_DONE) at which the next of its requests finishes
G_BID = 6    # its batch in flight
G_INDIV = 7  # of its requests, those whose next token has a gap of its own (see INDIV_*)
G_AT = 8     # (by ring position, not by group) the group whose batch is at that position of the ring
N_G = 9
# Per request (scratch `indiv`): its next completion is not a gap from the group's last token.
INDIV_FIRST = 1   # it brings the request's first token
INDIV_OWN = 2     # a request admitted again after a preemption: its gap runs from its own last token
# Rows of its float scratch.
G_LAST = 0   # when its requests' last token came
G_WORST = 1  # the longest gap since the run started or a request last joined (see the admission)



class PipelineScratch(NamedTuple):
    """pp_decode_run_nb's working arrays: a column per group (G_* rows, integer and float), each
    group's slots by block phase, and per slot its group and INDIV_* mark."""

    gi: np.ndarray
    gf: np.ndarray
    phase: np.ndarray
    label: np.ndarray
    indiv: np.ndarray


@njit(cache=True, error_model="numpy", inline="always")
def wrap_nb(i, m):
    """i mod m for 0 <= i < 2m: a position in a ring of m, without an integer division (~40 cycles,
    twice per batch)."""
    return i - m if i >= m else i


@njit(cache=True, error_model="numpy", inline="always")
def launch_nb(p, r, t_r, body, head, tokens, cpu, stages, reps, max_stages):
    """Replica r's batch decided at t_r (body: one stage's time; head: the LM head's, on the last)
    into the pipeline: stage 0 at t_r + its CPU time `cpu`, stage s once stage s-1 has finished
    it and stage s the batch before, a send between stages. It joins the in-flight ring as batch
    batch_seq[r]; returns its end."""
    stage_free, fl_end, fl_id, fl_head = reps.stage_free, reps.fl_end, reps.fl_id, reps.fl_head
    fl_count, batch_seq = reps.fl_count, reps.batch_seq
    send = pp_send_time_nb(p, tokens) if stages > 1 else 0.0
    t = t_r + cpu
    for s in range(stages):
        start = max(t, stage_free[r, s])
        t = start + body + (head if s == stages - 1 else send)
        stage_free[r, s] = t
    pos = wrap_nb(fl_head[r] + fl_count[r], max_stages)
    fl_end[r, pos] = t
    fl_id[r, pos] = batch_seq[r]
    fl_count[r] += 1
    batch_seq[r] += 1
    return t


@njit(cache=True, error_model="numpy", inline="always")
def next_decision_nb(r, t_r, cpu, scheduled, stages, reps):
    """When replica r decides after its decision at t_r: the next micro-batch as soon as stage 0 is
    free while a virtual engine is and the CPU has prepared the batch just launched (`cpu`: its
    CPU time, if this decision launched one), else when its oldest batch completes; never (inf)
    with nothing in flight."""
    stage_free, fl_end, fl_head, fl_count = reps.stage_free, reps.fl_end, reps.fl_head, reps.fl_count
    if fl_count[r] == 0:
        return INF
    if fl_count[r] < stages and scheduled:
        return max(stage_free[r, 0], t_r + cpu)
    return fl_end[r, fl_head[r]]


@njit(cache=True, error_model="numpy")
def _groups(r, ri, row, nrun, reps, max_stages, gi, gf, phase, label, indiv):
    """Each running request's group (label), and the groups' sums; False when a request is not a
    steady decoder (a prefill to schedule or a chunk of one in flight), or a group's requests had
    their last tokens at different times (two batches merged; a recomputed request in flight). A
    request whose prompt's last chunk is in flight decodes from its first token on."""
    s_prompt, s_tokens, s_computed, s_output = row.prompt, row.tokens, row.computed, row.output
    s_blocks, s_last, s_measured, s_sample = row.blocks, row.last, row.measured, row.sample
    fl_id, fl_head, fl_count = reps.fl_id, reps.fl_head, reps.fl_count
    bs = ri[E.RI_BLOCK_SIZE]
    fc = fl_count[r]
    for g in range(fc + 1):
        for row in range(G_AT):
            gi[row, g] = 0
        gi[G_FIN, g] = 1 << 62
        gf[G_WORST, g] = 0.0
        phase[g, :bs] = 0
    bid0 = fl_id[r, fl_head[r]]
    for q in range(fc):
        pos = wrap_nb(fl_head[r] + q, max_stages)
        gi[G_BID, q] = fl_id[r, pos]
        gi[G_AT, pos] = q
    # The newest request first: a just-admitted prefill in flight fails here, before the scan.
    for x in range(nrun + 1):
        k = nrun - 1 if x == 0 else x - 1
        c, tok = s_computed[k], s_tokens[k]
        if tok - c == 1 and c >= s_prompt[k]:
            g = fc  # ready: it decodes at this decision
        elif tok == c and fc > 0:
            g = s_sample[k] - bid0  # in flight: its batch samples its next token
            if g < 0 or g >= fc or gi[G_BID, g] != s_sample[k]:
                return False
        else:
            return False
        if s_blocks[k] != ceil_div_pow2_nb(c, bs):
            return False
        if x == 0:
            continue
        indiv[k] = 0
        if tok == s_prompt[k]:  # its first token: no gap
            indiv[k] = INDIV_FIRST
            gi[G_INDIV, g] += 1
        elif gi[G_N, g] == gi[G_INDIV, g]:
            gf[G_LAST, g] = s_last[k]
        elif s_last[k] != gf[G_LAST, g]:
            return False
        label[k] = g
        gi[G_N, g] += 1
        gi[G_MEAS, g] += s_measured[k]
        gi[G_BASE, g] += c
        gi[G_FIN, g] = min(gi[G_FIN, g], s_output[k] - (tok - s_prompt[k]))
        # its j-th scheduling from here (j >= 1) takes a new block when j = this phase (mod bs)
        phase[g, mod_pow2_nb(s_blocks[k] * bs - c + 1, bs)] += 1
    return True


@njit(cache=True, error_model="numpy", inline="always")
def _individual_tokens(g, end, nphys, row, label, indiv, first_tok, gf, itl_acc):
    """Group g's batch completed at `end` while some of its requests' tokens have gaps of their own
    (or none: a first token): every request's token as exact mode's completion gives it, in slot
    order, with its binning of gaps — one shared gap counted once, the others one by one."""
    s_req, s_last, s_max_itl, s_measured, s_blocks = row.req, row.last, row.max_itl, row.measured, row.blocks
    ref_last = -1.0
    n_ref = 0
    for k in range(nphys):
        if label[k] != g or s_blocks[k] < 0:
            continue
        if indiv[k] == INDIV_FIRST:
            first_tok[s_req[k]] = end
        else:
            last = s_last[k] if indiv[k] == INDIV_OWN else gf[G_LAST, g]
            gap = end - last
            s_max_itl[k] = max(s_max_itl[k], gap)
            if s_measured[k]:
                ref_last, n_ref = tally_gap_nb(itl_acc, last, gap, ref_last, n_ref)
        indiv[k] = 0
    if n_ref > 0:
        itl_add_nb(itl_acc, end - ref_last, n_ref)


@njit(cache=True, error_model="numpy", inline="always")
def _compact(nphys, row, label, indiv):
    """Move the running requests down over the finished ones (s_blocks < 0), in order; returns
    their count."""
    s_blocks = row.blocks
    m = 0
    for k in range(nphys):
        if s_blocks[k] < 0:
            continue
        if m != k:
            move_slot_nb(row, k, m)
            label[m] = label[k]
            indiv[m] = indiv[k]
        m += 1
    return m


@njit(cache=True, error_model="numpy")
def pp_decode_run_nb(r, t_r, t_arrival, max_time_s, ri, p, tables, reqs, slots, reps, max_stages, itl_acc, turns,
                     scratch, apc, hit_buf):
    """Replica r (P > 1 stages) at its decision t_r, its completed batches taken in, every running
    request a steady decoder (ready now, or in a batch in flight): take the decisions exact mode
    would take up to the next event — each batch's completion (its requests' tokens; those done
    leave), the same group's next batch launched at once, and the queue's head admitted into it
    where exact mode would (it joins the group) — each in O(P) but for finishes (a scan of the
    group). Stops before the first decision at or after the next arrival (or, where a finish makes
    a conversation's next turn due by then, within that decision, its completed batch taken in:
    the plain path lets the turn arrive there and goes on with that decision), past max_time_s,
    where two batches complete together (their requests then form one batch), where a group's next
    blocks may not fit (a preemption), after admitting a prompt in chunks, and, with requests
    waiting, at a decision without a completed batch where the head might start, or within one
    whose group has just left (either way the head would form a group of its own). Under
    guaranteed_no_evict (whose promised blocks a finish changes) it stops before a finish while
    requests wait instead of admitting.

    Every batch costs the tabulated arithmetic of the plain path, its aggregates sums of integers,
    so the results are bit-identical. Returns (batches launched, the decision at which the plain
    path resumes, requests finished, peak blocks used), or (0, t_r, 0, 0) when this does not apply
    (nothing changed)."""
    tok_table, seq_table = tables.tok, tables.seq
    prompt, generated, status, finish = reqs.prompt, reqs.generated, reqs.status, reqs.finish
    max_itl, output, gen0, first_sched = reqs.max_itl, reqs.output, reqs.gen0, reqs.first_sched
    last_tok, measured, cached, first_tok = reqs.last_tok, reqs.measured, reqs.cached, reqs.first_tok
    q_next = reqs.q_next
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_output, s_blocks, s_last, s_max_itl = slots.output, slots.blocks, slots.last, slots.max_itl
    s_measured, s_sample = slots.measured, slots.sample
    s_req, s_prompt, s_tokens, s_computed, s_output = s_req[r], s_prompt[r], s_tokens[r], s_computed[r], s_output[r]
    s_blocks, s_last, s_max_itl, s_measured, s_sample = s_blocks[r], s_last[r], s_max_itl[r], s_measured[r], s_sample[r]
    row = Slots(s_req, s_prompt, s_tokens, s_computed, s_output, s_blocks, s_last, s_max_itl, s_measured, s_sample)
    n_running, free, n_waiting = reps.n_running, reps.free, reps.n_waiting
    rep_time, q_head, q_tail, fl_end = reps.rep_time, reps.q_head, reps.q_tail, reps.fl_end
    fl_head, fl_count, batch_seq = reps.fl_head, reps.fl_count, reps.batch_seq
    gi, gf, phase, label, indiv = scratch.gi, scratch.gf, scratch.phase, scratch.label, scratch.indiv
    nrun = n_running[r]
    bs = ri[E.RI_BLOCK_SIZE]
    stages = ri[E.RI_STAGES]
    fc = fl_count[r]
    if (nrun == 0 or nrun > ri[E.RI_MAX_TOKENS] or fc >= stages or ri[E.RI_V0] != 0 or ri[E.RI_SGLANG] != 0
            or ri[E.RI_APC] != 0 or ri[E.RI_WINDOW] > 0):
        return 0, t_r, 0, 0
    if not _groups(r, ri, row, nrun, reps, max_stages, gi, gf, phase, label, indiv):
        return 0, t_r, 0, 0
    free_r = free[r]
    need = phase[fc, mod_pow2_nb(1, bs)]
    if gi[G_N, fc] == 0 or need > free_r:
        return 0, t_r, 0, 0  # nothing to launch now, or a preemption: the plain path decides
    no_evict = ri[E.RI_NO_EVICT] != 0
    reserved = 0
    if n_waiting[r] > 0:
        if no_evict:
            reserved = reserved_blocks_nb(s_prompt, s_output, s_prompt, nrun, False, bs)
        if head_may_start_nb(apc, False, r, q_head[r], ri, nrun, gi[G_N, fc], need, free_r, reserved, prompt, output,
                             generated, gen0, first_sched, hit_buf):
            return 0, t_r, 0, 0
    tok_off, seq_off = ri[E.RI_TOK_OFF], ri[E.RI_SEQ_OFF]
    thr = ri[E.RI_THRESHOLD]
    nphys = nrun  # slots in use, finished ones (s_blocks < 0) among them until compacted
    alive = nrun
    d = t_r
    ready = fc  # the group this decision launches (-1: none)
    batches, done, peak = 0, 0, 0
    stop = False
    cpu = 0.0
    while True:
        if ready >= 0:  # (a virtual engine is free: one batch has just completed)
            g = ready
            j = gi[G_SCHED, g] + 1
            gi[G_SCHED, g] = j
            n_g = gi[G_N, g]
            agg = Batch(n_g, float(gi[G_BASE, g] + j * n_g), 0, 0, 0.0, 0.0)
            free_r -= phase[g, mod_pow2_nb(j, bs)]
            # The queue's head joins the batch as in exact mode's admission (V1: first come, first
            # served, while the token budget, max_num_seqs and the free blocks allow). Its tokens
            # and computed tokens are kept relative to the group's counts, as the others' are.
            budget = ri[E.RI_MAX_TOKENS] - n_g
            while n_waiting[r] > 0 and not no_evict and budget > 0 and alive < ri[E.RI_MAX_SEQS]:
                i = q_head[r]
                tokens = prompt[i] + generated[i]
                done_tok = arrived_kv_nb(gen0, first_sched, i, tokens)
                wish, new = chunk_nb(tokens - done_tok, thr, budget)
                if ri[E.RI_CHUNKED] == 0 and wish > budget:
                    break
                blocks = ceil_div_pow2_nb(done_tok + new, bs)
                if blocks > free_r:
                    break
                if gf[G_WORST, g] > 0.0:
                    # The group's longest gap so far is its members', not the newcomer's: it goes
                    # to each of them now, and the group's count starts again.
                    for x in range(nphys):
                        if label[x] == g and s_blocks[x] >= 0 and indiv[x] == 0:
                            s_max_itl[x] = max(s_max_itl[x], gf[G_WORST, g])
                    gf[G_WORST, g] = 0.0
                q_head[r] = q_next[i]
                if q_tail[r] == i:
                    q_tail[r] = -1
                n_waiting[r] -= 1
                free_r -= blocks
                if nphys == s_req.shape[0]:
                    nphys = _compact(nphys, row, label, indiv)
                k = nphys
                nphys += 1
                alive += 1
                s_req[k] = i
                s_prompt[k] = prompt[i]
                s_output[k] = output[i]
                s_blocks[k] = blocks
                s_last[k] = last_tok[i]
                s_max_itl[k] = max_itl[i]
                s_measured[k] = measured[i]
                status[i] = E.RUNNING
                if np.isnan(first_sched[i]):
                    first_sched[i] = d
                    cached[i] = 0
                agg = add_to_batch_nb(agg, new, done_tok, prompt[i], 0)
                budget -= new
                if done_tok + new < tokens:  # the prompt in chunks: the plain path goes on after this batch
                    label[k] = -1
                    indiv[k] = 0
                    s_tokens[k] = tokens
                    s_computed[k] = done_tok + new
                    s_sample[k] = -1
                    stop = True
                    continue
                c = done_tok + new - j  # (relative: the group's j-th batch brings it to done_tok + new)
                label[k] = g
                indiv[k] = INDIV_FIRST if generated[i] == 0 else INDIV_OWN
                s_tokens[k] = tokens - gi[G_DONE, g]
                s_computed[k] = c
                gi[G_N, g] += 1
                gi[G_INDIV, g] += 1
                gi[G_MEAS, g] += measured[i]
                gi[G_BASE, g] += c
                gi[G_FIN, g] = min(gi[G_FIN, g], output[i] - (s_tokens[k] - prompt[i]))
                phase[g, mod_pow2_nb(1 - c, bs)] += 1
            body, head = stage_time_nb(p, tok_table, seq_table, tok_off, seq_off, agg)
            account_nb(rep_time, r, ri, tok_table, seq_table, agg, body, head, stages)
            gi[G_AT, wrap_nb(fl_head[r] + fl_count[r], max_stages)] = g
            gi[G_BID, g] = batch_seq[r]
            cpu = cpu_overhead_nb(p, agg)
            launch_nb(p, r, d, body, head, agg.n_decodes + agg.prefill_tokens, cpu, stages, reps, max_stages)
            peak = max(peak, ri[E.RI_NUM_BLOCKS] - free_r)
            batches += 1
        d_next = next_decision_nb(r, d, cpu, ready >= 0, stages, reps)
        if stop or d_next == INF or d_next >= t_arrival or d_next > max_time_s:
            break
        # the decision at d_next: is a batch complete by then?
        ready = -1
        head_pos = fl_head[r]
        if fl_end[r, head_pos] > d_next:  # no: only the queue's head might start
            if n_waiting[r] > 0 and head_may_start_nb(apc, False, r, q_head[r], ri, alive, 0, 0, free_r, reserved,
                                                      prompt, output, generated, gen0, first_sched, hit_buf):
                break
        else:
            if fl_count[r] > 1 and fl_end[r, wrap_nb(head_pos + 1, max_stages)] <= d_next:
                break  # two batches complete at once: their requests form one batch
            g = gi[G_AT, head_pos]
            # (the blocks the group's finishers free are not counted: stopping early is safe)
            need = phase[g, mod_pow2_nb(gi[G_SCHED, g] + 1, bs)] if gi[G_N, g] > 0 else 0
            if need > free_r:
                break
            if no_evict and n_waiting[r] > 0 and (gi[G_DONE, g] + 1 == gi[G_FIN, g] or head_may_start_nb(
                    apc, False, r, q_head[r], ri, alive, gi[G_N, g], need, free_r, reserved, prompt, output,
                    generated, gen0, first_sched, hit_buf)):
                break
            end = fl_end[r, head_pos]
            fl_head[r] = wrap_nb(head_pos + 1, max_stages)
            fl_count[r] -= 1
            m = gi[G_DONE, g] + 1
            gi[G_DONE, g] = m
            if gi[G_N, g] > 0:
                if gi[G_INDIV, g] > 0:
                    _individual_tokens(g, end, nphys, row, label, indiv,
                                       first_tok, gf, itl_acc)
                    gi[G_INDIV, g] = 0
                else:
                    gap = end - gf[G_LAST, g]
                    if gap > gf[G_WORST, g]:
                        gf[G_WORST, g] = gap
                    if gi[G_MEAS, g] > 0:
                        itl_add_nb(itl_acc, gap, gi[G_MEAS, g])
                gf[G_LAST, g] = end
                if m == gi[G_FIN, g]:  # requests whose last token this was leave
                    next_fin = 1 << 62
                    for k in range(nphys):
                        if label[k] != g or s_blocks[k] < 0:
                            continue
                        left = s_output[k] - (s_tokens[k] - s_prompt[k])
                        if left == m:
                            i = s_req[k]
                            free_r += max(s_blocks[k], ceil_div_pow2_nb(s_computed[k] + gi[G_SCHED, g], bs))
                            gi[G_N, g] -= 1
                            gi[G_MEAS, g] -= s_measured[k]
                            gi[G_BASE, g] -= s_computed[k]
                            phase[g, mod_pow2_nb(1 - s_computed[k], bs)] -= 1
                            finish[i] = end
                            status[i] = E.FINISHED
                            generated[i] = s_output[k]
                            max_itl[i] = max(s_max_itl[k], gf[G_WORST, g])
                            s_blocks[k] = -1  # marks the slot for removal
                            done += 1
                            alive -= 1
                            if turns.next_turn[i] != -1:  # (a next turn, or a closed loop to refill)
                                t_arrival = min(t_arrival, hp.next_turn_due_nb(turns, i, end))
                        elif left > m:
                            next_fin = min(next_fin, left)
                    gi[G_FIN, g] = next_fin
                if gi[G_N, g] > 0:
                    ready = g
            if t_arrival <= d_next:
                break  # a turn made due by now: it arrives before this decision goes on (the plain path's order)
            if ready < 0 and n_waiting[r] > 0:
                break  # the group has left: what the head starts is a group of its own (the plain path's)
        d = d_next
    free[r] = free_r
    # Back to absolute counts. Every group left is in flight (its requests' tokens and computed
    # tokens level again), but the one whose completion made a turn due, which the rest of that
    # decision schedules; a prompt admitted in chunks (label -1) is kept as it is.
    for k in range(nphys):
        g = label[k]
        if s_blocks[k] < 0 or g < 0:
            continue
        s_computed[k] += gi[G_SCHED, g]
        s_tokens[k] += gi[G_DONE, g]
        s_blocks[k] = max(s_blocks[k], ceil_div_pow2_nb(s_computed[k], bs))
        if gi[G_DONE, g] > 0 and indiv[k] == 0:  # (one admitted in the run keeps its own until then)
            s_last[k] = gf[G_LAST, g]
        s_max_itl[k] = max(s_max_itl[k], gf[G_WORST, g])
        s_sample[k] = gi[G_BID, g] if s_tokens[k] == s_computed[k] else -1
    n_running[r] = _compact(nphys, row, label, indiv)
    return batches, d_next, done, peak
