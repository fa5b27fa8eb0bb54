"""Fast mode (simulation.mode: fast): a replica's steady decoders held lazily, so that an iteration
costs O(1) in the size of the running batch, and runs of decode-only iterations are summed in
closed form instead of stepped.

Why it is exact: a request that decodes every iteration changes only by counting — after d more
iterations its tokens, KV tokens and blocks follow from its state when it joined. So a replica in
"lazy form" keeps, for its steady decoders, only (tokens at join, iteration count at join) per slot
and the sums the cost model needs: how many decode, the sum of their context lengths, how many
need a new block at each iteration phase (mod block_size), and a heap of the iteration at which
each finishes (with a sliding window, also of the iteration at which it reaches the window, from
which on it counts apart: its decodes read the window's keys, no more). Slots that are not steady
decoders (a prefill in progress, a resumed request recomputing) stay explicit, as in exact mode,
and are few. A batch's aggregates are sums of integers, so a single lazily scheduled iteration
costs bit-for-bit what exact mode computes.

What is approximate: a run of k decode-only iterations with an unchanged batch is summed in closed
form. Each iteration's attention time is a smooth function of the batch's context tokens, which
grow by the batch size every step; it is interpolated by the quadratic through the run's first,
middle and last iterations (checked at a quarter point; a run whose check misses by more than
1e-13 relative is split), and its sums (time, ITL sum and sum of squares) are those of the
quadratic. Times therefore differ from exact mode's step-by-step sums by rounding (~1e-13
relative), an inter-token gap falling within rounding of an ITL histogram bin edge may land in the
neighbouring bin, and an arrival within rounding of an iteration's end may be seen one iteration
apart. Everything else — which requests run when, blocks, preemptions, finish order — is the
exact scheduler's.

A preemption is decided in lazy form too: exact mode preempts newest first, so the lazy form
preempts the request with the highest admission number (the top of a stack in admission order)
until the others' blocks fit, where exact form would touch every slot at each of the next several
decisions (an overloaded replica preempts every few iterations). Whenever the lazy form cannot
reproduce the scheduler's order of decisions (the token budget runs out at an explicit slot older
than some decoder) the replica is written back to exact form (slots in admission order) for that
decision, and returns to lazy form a few decisions later.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from fastsim.engine import enums as E
from fastsim.engine import heap_nb as hp
from fastsim.engine import prefix_nb as px
from fastsim.engine.bundles import EMPTY_BATCH, Batch
from fastsim.engine.batch_nb import (add_to_batch_nb, arrived_kv_nb, blocks_needed_nb, ceil_div_pow2_nb, chunk_nb,
                                     div_pow2_nb, final_blocks_nb, itl_add_nb, mod_pow2_nb, reserved_blocks_nb,
                                     sort_by_key_nb)
from fastsim.engine.closed_form_nb import (attention_coefs_nb, attention_nb, bin_run_nb, blocks_fit_nb, blocks_used_nb,
                                          elapsed_nb, fit_nb, gaps_nb, last_run_nb, power_sums_nb, timeline_rows_nb)
from fastsim.engine.cost_nb import decode_cpu_overhead_nb, decode_only_nb

# slot states in lazy form
FREE = 0
LAZY = 1
EXPLICIT = 2

# columns of the per-replica counters
C_ON = 0         # 1: the replica is in lazy form
C_D = 1          # iterations completed by the lazy decoders since the start (the lazy clock)
C_NDEC = 2       # lazy decoders
C_SUML = 3       # sum over lazy decoders short of the window of (tokens at join - clock at join)
C_NMEAS = 4      # lazy decoders whose gaps feed the ITL statistics
C_SEQ = 5        # admission counter: slot order in exact form is admission order
C_MAXDEC = 6     # an upper bound on the admission number of any lazy decoder
C_NFREE = 7      # free slots
C_NEX = 8        # explicit slots
C_STKN = 9       # max-gap stack size
C_COOL = 10      # decisions to wait before trying lazy form again
C_EXITS = 11     # times the replica went back to exact form to decide
C_ORDN = 12      # entries of the admission-order stack
C_PEND = 13      # prefix caching: blocks the lazy decoders took, not yet taken off the free list
C_SUMMED = 14    # iterations summed in closed form
C_NCAP = 15      # sliding window: lazy decoders that have reached it (each reads `window` keys)
C_WINDOW = 16    # the replica's sliding window (0: none)
C_STUCK = 17     # prefix caching: an explicit slot decodes into shareable blocks to its end (see stuck_nb)
N_C = 18
# A decode reads min(tokens, window) keys, so the lazy decoders' keys at clock D are
# SUML + (NDEC - NCAP) D + window NCAP: a decoder moves to the capped count at the clock it
# reaches the window, an event like a finish.

# The finish heap's keys: the clock at the event, then (a decoder reaching the window: CROSS) its
# slot (max_num_seqs <= 2^20).
SLOT_BITS = 20
CROSS = 1 << SLOT_BITS
STEP_SHIFT = SLOT_BITS + 1
NEVER = 1 << 42
STACK_CAP = 1024
COOLDOWN = 8


class LazyState(NamedTuple):
    """The lazy form of every replica, [replica, ...] (a token of it when fast mode is off)."""

    cnt: np.ndarray         # per-replica counters, columns C_*
    t_last: np.ndarray      # time of the lazy decoders' last token
    phase: np.ndarray       # [r, p]: lazy decoders that need a new block at clock phase p (mod block_size)
    s_stamp: np.ndarray     # [r, slot]: a lazy decoder's tokens at join - clock at join
    s_seq: np.ndarray       # [r, slot]: admission number
    s_state: np.ndarray     # [r, slot]: FREE, LAZY or EXPLICIT
    free_slots: np.ndarray  # [r, i]: a stack of free slots
    ex_slot: np.ndarray     # [r, i]: the explicit slots
    fh: np.ndarray          # [r, i]: the finish heap (a finish and a window's reach per decoder)
    fh_n: np.ndarray        # its size
    stk_d: np.ndarray       # [r, i]: the max-gap stack: clocks ...
    stk_g: np.ndarray       # ... and gaps
    ord_slot: np.ndarray    # [r, i]: the admission-order stack: slots ...
    ord_seq: np.ndarray     # ... and the admission numbers they were pushed for


@njit(cache=True, error_model="numpy")
def lazy_state_nb(n_rep, max_seqs, max_bs, on):
    """Room for the lazy form of n_rep replicas (a token of it when fast mode is off)."""
    if not on:
        n_rep, max_seqs, max_bs = 1, 1, 1
    cnt = np.zeros((n_rep, N_C), np.int64)
    t_last = np.zeros(n_rep)
    phase = np.zeros((n_rep, max_bs), np.int64)
    s_stamp = np.zeros((n_rep, max_seqs), np.int64)
    s_seq = np.zeros((n_rep, max_seqs), np.int64)
    s_state = np.zeros((n_rep, max_seqs), np.int64)
    free_slots = np.zeros((n_rep, max_seqs), np.int64)
    ex_slot = np.zeros((n_rep, max_seqs), np.int64)
    fh = np.zeros((n_rep, 2 * max_seqs), np.int64)  # a finish and a window's reach per decoder
    fh_n = np.zeros(n_rep, np.int64)
    stk_d = np.zeros((n_rep, STACK_CAP), np.int64)
    stk_g = np.zeros((n_rep, STACK_CAP))
    ord_slot = np.zeros((n_rep, 2 * max_seqs), np.int64)
    ord_seq = np.zeros((n_rep, 2 * max_seqs), np.int64)
    return LazyState(cnt, t_last, phase, s_stamp, s_seq, s_state, free_slots, ex_slot, fh, fh_n, stk_d, stk_g,
                     ord_slot, ord_seq)


# -- the newest running request: a stack of (slot, admission number) in admission order -------------
# An entry is current while its slot holds the request it was pushed for; finishes leave the rest
# behind, skipped when reached, and squeezed out when the stack fills (each squeeze frees at least
# max_num_seqs entries: O(1) a push, amortised).
@njit(cache=True, error_model="numpy", inline="always")
def _order_push(lz, r, k):
    """Slot k has just been admitted (or, going to lazy form, is taken in admission order)."""
    cnt, s_seq, s_state, ord_slot, ord_seq = lz.cnt, lz.s_seq, lz.s_state, lz.ord_slot, lz.ord_seq
    m = cnt[r, C_ORDN]
    if m == ord_slot.shape[1]:
        m = 0
        for x in range(ord_slot.shape[1]):
            j = ord_slot[r, x]
            if s_state[r, j] != FREE and s_seq[r, j] == ord_seq[r, x]:
                ord_slot[r, m] = j
                ord_seq[r, m] = ord_seq[r, x]
                m += 1
    ord_slot[r, m] = k
    ord_seq[r, m] = s_seq[r, k]
    cnt[r, C_ORDN] = m + 1


@njit(cache=True, error_model="numpy", inline="always")
def _order_pop_newest(lz, r):
    """The running slot admitted last, taken off the stack (there is one)."""
    cnt, s_seq, s_state, ord_slot, ord_seq = lz.cnt, lz.s_seq, lz.s_state, lz.ord_slot, lz.ord_seq
    m = cnt[r, C_ORDN] - 1
    while s_state[r, ord_slot[r, m]] == FREE or s_seq[r, ord_slot[r, m]] != ord_seq[r, m]:
        m -= 1
    cnt[r, C_ORDN] = m
    return ord_slot[r, m]


# -- per-request worst gap: a stack of (iteration, gap) with gaps falling from bottom to top --------
@njit(cache=True, error_model="numpy", inline="always")
def _stk_query(lz, r, lo):
    """The largest gap of the iterations after `lo` (0.0 if none)."""
    cnt, stk_d, stk_g = lz.cnt, lz.stk_d, lz.stk_g
    n = cnt[r, C_STKN]
    a, b = 0, n
    while a < b:  # first entry with iteration > lo; every later one is smaller
        m = (a + b) // 2
        if stk_d[r, m] > lo:
            b = m
        else:
            a = m + 1
    return stk_g[r, a] if a < n else 0.0


@njit(cache=True, error_model="numpy", inline="always")
def _stk_push(lz, r, d, g, slots, bs):
    """Iteration d (the latest) had gap g. A full stack is folded into the slots' own maxima."""
    cnt, stk_d, stk_g = lz.cnt, lz.stk_d, lz.stk_g
    n = cnt[r, C_STKN]
    while n > 0 and stk_g[r, n - 1] <= g:
        n -= 1
    if n == STACK_CAP:
        _rebase(lz, r, slots, bs, g)
        n = 0
    stk_d[r, n] = d
    stk_g[r, n] = g
    cnt[r, C_STKN] = n + 1


@njit(cache=True, error_model="numpy")
def _rebase(lz, r, slots, bs, g):
    """Move every lazy decoder's join to now (same tokens, same block phase), folding the gaps since
    its join, and g, into its own worst gap; the stack then starts empty."""
    s_state, s_max_itl = lz.s_state, slots.max_itl
    for k in range(s_state.shape[1]):
        if s_state[r, k] == LAZY:
            _write_out(lz, r, k, slots, bs)
            s_max_itl[r, k] = max(s_max_itl[r, k], g)
    lz.cnt[r, C_STKN] = 0


@njit(cache=True, error_model="numpy")
def _write_out(lz, r, k, slots, bs):
    """Lazy decoder k's tokens, blocks and worst gap as of the clock now, and its join moved to now
    (same context sum, same block phase: the decoder aggregates stay valid)."""
    cnt, s_stamp = lz.cnt, lz.s_stamp
    s_tokens, s_blocks, s_max_itl = slots.tokens, slots.blocks, slots.max_itl
    D = cnt[r, C_D]
    s_max_itl[r, k] = max(s_max_itl[r, k], _stk_query(lz, r, s_stamp[r, k]))
    s_tokens[r, k] += D - s_stamp[r, k]
    s_blocks[r, k] = max(s_blocks[r, k], ceil_div_pow2_nb(s_tokens[r, k] - 1, bs))
    s_stamp[r, k] = D


@njit(cache=True, error_model="numpy", inline="always")
def _phase(lz, r, k, slots, bs):
    """The step (mod block_size) at which lazy decoder k takes a new block: when the room left in its
    last block at its join, counted down one token a step, runs out."""
    return mod_pow2_nb(lz.s_stamp[r, k] + slots.blocks[r, k] * bs - (slots.tokens[r, k] - 1), bs)


# -- joining and leaving the lazy decoders --------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _join(lz, r, k, slots, bs):
    """Slot k has just sampled a token and decodes from now on (its KV is one token behind)."""
    cnt, phase, s_stamp, s_seq, s_state = lz.cnt, lz.phase, lz.s_stamp, lz.s_seq, lz.s_state
    s_tokens, s_measured = slots.tokens, slots.measured
    D = cnt[r, C_D]
    tokens = s_tokens[r, k]
    s_state[r, k] = LAZY
    s_stamp[r, k] = D
    cnt[r, C_NDEC] += 1
    window = cnt[r, C_WINDOW]
    if window > 0 and tokens >= window:
        cnt[r, C_NCAP] += 1
    else:
        cnt[r, C_SUML] += tokens - D
    cnt[r, C_NMEAS] += s_measured[r, k]
    cnt[r, C_MAXDEC] = max(cnt[r, C_MAXDEC], s_seq[r, k])
    phase[r, _phase(lz, r, k, slots, bs)] += 1
    hp.key_push_nb(lz.fh, lz.fh_n, r, _finish_key(lz, r, k, slots))
    cross = _cross_at(lz, r, k, slots)
    if cross != NEVER:
        hp.key_push_nb(lz.fh, lz.fh_n, r, (cross << STEP_SHIFT) | CROSS | k)


@njit(cache=True, error_model="numpy", inline="always")
def _finish_key(lz, r, k, slots):
    """Lazy decoder k's key in the finish heap: the clock at its last token, then its slot."""
    s_prompt, s_tokens, s_output = slots.prompt, slots.tokens, slots.output
    return ((lz.s_stamp[r, k] + s_output[r, k] - (s_tokens[r, k] - s_prompt[r, k])) << STEP_SHIFT) | k


@njit(cache=True, error_model="numpy", inline="always")
def _cross_at(lz, r, k, slots):
    """The clock from which lazy decoder k reads the whole window (tokens = window), if that comes
    after its join and before it finishes (then the finish heap holds it); else NEVER."""
    window = lz.cnt[r, C_WINDOW]
    if window == 0:
        return NEVER
    stamp = lz.s_stamp[r, k]
    at = window - slots.tokens[r, k] + stamp
    return at if stamp < at < _finish_key(lz, r, k, slots) >> STEP_SHIFT else NEVER


@njit(cache=True, error_model="numpy", inline="always")
def _keys(cnt, r):
    """Keys the lazy decoders' decodes read at the lazy clock."""
    capped = cnt[r, C_NCAP]
    return float(cnt[r, C_SUML] + (cnt[r, C_NDEC] - capped) * cnt[r, C_D] + cnt[r, C_WINDOW] * capped)


@njit(cache=True, error_model="numpy", inline="always")
def _release_slot(lz, r, k):
    """Slot k's request has left (finished or preempted): the slot is free for the next admission."""
    cnt, s_state, free_slots = lz.cnt, lz.s_state, lz.free_slots
    s_state[r, k] = FREE
    free_slots[r, cnt[r, C_NFREE]] = k
    cnt[r, C_NFREE] += 1


# -- prefix caching -------------------------------------------------------------------------------
# A lazy decoder's blocks are all private (it joins only once its shared blocks are full and
# named), so which blocks it takes does not matter, only how many: the count builds up (C_PEND) and
# leaves the head of the free list when the list is next read or taken from other than by a
# return to its tail (a lookup, the replica's own or a router's; an admission's or a prefill's
# blocks, a preemption). Taking blocks later changes nothing: the list is first in, first out,
# and those blocks were there before anything returned since.
@njit(cache=True, error_model="numpy", inline="always")
def apc_flush_nb(lz, r, apc):
    """The blocks the lazy decoders took, off the free list now."""
    c = lz.cnt[r, C_PEND]
    if c > 0:
        px.apc_pop_nb(apc, r, c)
        lz.cnt[r, C_PEND] = 0


@njit(cache=True, error_model="numpy", inline="always")
def _apc_joins(apc, apc_on, r, k):
    """Whether slot k may decode lazily as far as the prefix cache goes: every block it fills and
    takes from now on is private."""
    return not apc_on or px.apc_private_from_here_nb(apc, r, k)


@njit(cache=True, error_model="numpy", inline="always")
def _decodes_public(apc, apc_on, r, k, slots, bs):
    """Slot k, a decoder, cannot join the lazy decoders before it finishes."""
    final_tokens = slots.prompt[r, k] + slots.output[r, k]  # prompt + output
    return not _apc_joins(apc, apc_on, r, k) and px.apc_public_to_end_nb(apc, r, k, final_tokens, bs)


@njit(cache=True, error_model="numpy", inline="always")
def _apc_sync(apc, r, k, slots, bs):
    """Lazy decoder k, just written out: its private blocks and named blocks in the cache's slot."""
    px.apc_sync_private_nb(apc, r, k, slots.blocks[r, k], slots.tokens[r, k] - 1, bs)


@njit(cache=True, error_model="numpy")
def _apc_release_left(lz, r, apc, start, s_req, bs):
    """The requests that left at one completion (the slots freed since the free-slot stack's entry
    `start`) let go of their blocks in admission order, as exact mode's slot order has them: the
    order in which they join the free list is the order of their eviction. Returns the blocks freed."""
    cnt, s_seq, free_slots = lz.cnt, lz.s_seq, lz.free_slots
    end = cnt[r, C_NFREE]
    for x in range(start + 1, end):  # (insertion sort: one or a few)
        k = free_slots[r, x]
        y = x
        while y > start and s_seq[r, free_slots[r, y - 1]] > s_seq[r, k]:
            free_slots[r, y] = free_slots[r, y - 1]
            y -= 1
        free_slots[r, y] = k
    freed = 0
    for x in range(start, end):
        k = free_slots[r, x]
        if px.apc_deferred_nb(apc, s_req[r, k]):
            apc_flush_nb(lz, r, apc)  # (its deferred blocks take identities, which the pending ones still hold)
        freed += px.apc_finish_nb(apc, r, k, s_req[r, k], bs)
    return freed


@njit(cache=True, error_model="numpy", inline="always")
def _leave(lz, r, k, slots, bs, apc, apc_on):
    """Lazy decoder k leaves at the current clock, finished or preempted: (its blocks, returned; its
    worst gap). With prefix caching its blocks are the cache's to return (they are counted in its
    slot there)."""
    cnt, phase, s_stamp = lz.cnt, lz.phase, lz.s_stamp
    s_tokens, s_blocks, s_max_itl, s_measured = slots.tokens, slots.blocks, slots.max_itl, slots.measured
    phase[r, _phase(lz, r, k, slots, bs)] -= 1
    cnt[r, C_NDEC] -= 1
    window = cnt[r, C_WINDOW]
    if window > 0 and (s_tokens[r, k] >= window or cnt[r, C_D] >= _cross_at(lz, r, k, slots)):
        cnt[r, C_NCAP] -= 1  # (at its join, or since)
    else:
        cnt[r, C_SUML] -= s_tokens[r, k] - s_stamp[r, k]
    cnt[r, C_NMEAS] -= s_measured[r, k]
    _release_slot(lz, r, k)
    _write_out(lz, r, k, slots, bs)
    if apc_on:
        _apc_sync(apc, r, k, slots, bs)
    return s_blocks[r, k], s_max_itl[r, k]


@njit(cache=True, error_model="numpy", inline="always")
def _finish_due(lz, r, end, slots, bs, finish, status, generated, max_itl, turns, apc, apc_on):
    """Lazy decoders whose last token came at `end` (the clock now) leave. Returns (requests finished,
    blocks freed, the earliest next turn they make due); with prefix caching no blocks yet: the
    caller returns them (_apc_release_left), with any other request leaving at this completion."""
    cnt, fh, fh_n = lz.cnt, lz.fh, lz.fh_n
    s_req, s_output = slots.req, slots.output
    D = cnt[r, C_D]
    done, freed, due = 0, 0, np.inf
    while fh_n[r] > 0 and fh[r, 0] >> STEP_SHIFT <= D:
        key = hp.key_pop_nb(fh, fh_n, r)
        k = key & ((1 << SLOT_BITS) - 1)
        if key & CROSS:  # it reaches the window
            cnt[r, C_SUML] -= slots.tokens[r, k] - lz.s_stamp[r, k]
            cnt[r, C_NCAP] += 1
            continue
        blocks, worst = _leave(lz, r, k, slots, bs, apc, apc_on)
        i = s_req[r, k]
        finish[i] = end
        status[i] = E.FINISHED
        generated[i] = s_output[r, k]
        max_itl[i] = worst
        if not apc_on:
            freed += blocks
        done += 1
        if turns.next_turn[i] != -1:  # (a next turn, or a closed loop to refill)
            due = min(due, hp.next_turn_due_nb(turns, i, end))
    return done, freed, due


# -- conversions ------------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def to_lazy_nb(lz, r, t_r, slots, n_running, max_seqs, bs, apc, apc_on):
    """Replica r, at a decision with nothing in flight, in exact form (slots 0..n-1 in admission
    order): take its steady decoders into lazy form, the rest as explicit slots."""
    cnt, t_last, phase, s_seq = lz.cnt, lz.t_last, lz.phase, lz.s_seq
    s_state, free_slots, ex_slot = lz.s_state, lz.free_slots, lz.ex_slot
    s_prompt, s_tokens, s_computed = slots.prompt, slots.tokens, slots.computed
    s_blocks, s_last = slots.blocks, slots.last
    n = n_running[r]
    for f in range(bs):
        phase[r, f] = 0
    for c in (C_NDEC, C_SUML, C_NMEAS, C_NEX, C_STKN, C_PEND, C_NCAP, C_STUCK):
        cnt[r, c] = 0
    lz.fh_n[r] = 0
    cnt[r, C_MAXDEC] = -1
    t_last[r] = t_r
    for k in range(n):
        s_seq[r, k] = k
        room = s_blocks[r, k] * bs - s_computed[r, k]
        if (s_tokens[r, k] - s_computed[r, k] == 1 and s_computed[r, k] >= s_prompt[r, k]
                and s_last[r, k] == t_r and 0 <= room < bs and _apc_joins(apc, apc_on, r, k)):
            _join(lz, r, k, slots, bs)
        else:
            s_state[r, k] = EXPLICIT
            ex_slot[r, cnt[r, C_NEX]] = k
            cnt[r, C_NEX] += 1
    cnt[r, C_SEQ] = n
    cnt[r, C_ORDN] = 0
    for k in range(n):
        _order_push(lz, r, k)
    m = 0
    for k in range(max_seqs - 1, n - 1, -1):  # popped from the end: the lowest slot first
        free_slots[r, m] = k
        s_state[r, k] = FREE
        m += 1
    cnt[r, C_NFREE] = m
    cnt[r, C_ON] = 1


@njit(cache=True, error_model="numpy")
def stuck_nb(slots, r, n, bs, apc, apc_on):
    """Whether one of replica r's n running slots (exact form) decodes into blocks that may be
    shared while it runs, up to its last token (a system prompt longer than the whole request; a
    conversation's turn names its answer's blocks only once it finishes: prefix_nb's deferred
    blocks). It would decode as an explicit slot to its end, and while one does, the lazy form
    sums no run and schedules every iteration in full, where exact mode's decode stretch steps
    them in O(1) each. (One shareable only for a while, under a system prompt longer than its own
    prompt, joins the lazy decoders once past it.)"""
    if not apc_on:
        return False
    s_prompt, s_tokens, s_computed = slots.prompt, slots.tokens, slots.computed
    for k in range(n):
        if (s_tokens[r, k] - s_computed[r, k] == 1 and s_computed[r, k] >= s_prompt[r, k]
                and _decodes_public(apc, apc_on, r, k, slots, bs)):
            return True
    return False


@njit(cache=True, error_model="numpy")
def to_exact_nb(lz, r, slots, n_running, bs, scratch, apc, apc_on):
    """Write replica r's lazy decoders out and put its slots back in admission order. `scratch`
    starts with two int64 and one float64 array of max_num_seqs entries (nothing is allocated here)."""
    cnt, t_last, s_seq, s_state = lz.cnt, lz.t_last, lz.s_seq, lz.s_state
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_output, s_blocks, s_last, s_max_itl = slots.output, slots.blocks, slots.last, slots.max_itl
    s_measured, s_sample = slots.measured, slots.sample
    used, seqs, tmp = scratch.slot_a, scratch.slot_b, scratch.slot_f
    if apc_on:
        apc_flush_nb(lz, r, apc)
    m = 0
    for k in range(s_state.shape[1]):
        st = s_state[r, k]
        if st == FREE:
            continue
        if st == LAZY:
            _write_out(lz, r, k, slots, bs)
            if apc_on:
                _apc_sync(apc, r, k, slots, bs)
            s_computed[r, k] = s_tokens[r, k] - 1
            s_last[r, k] = t_last[r]
            s_sample[r, k] = -1
        used[m] = k
        seqs[m] = s_seq[r, k]
        m += 1
        s_state[r, k] = FREE
    sort_by_key_nb(seqs, used, m)
    _permute(s_req[r], used, m, seqs)
    _permute(s_prompt[r], used, m, seqs)
    _permute(s_tokens[r], used, m, seqs)
    _permute(s_computed[r], used, m, seqs)
    _permute(s_output[r], used, m, seqs)
    _permute(s_blocks[r], used, m, seqs)
    _permute(s_sample[r], used, m, seqs)
    _permute(s_last[r], used, m, tmp)
    _permute(s_max_itl[r], used, m, tmp)
    if apc_on:
        for c in range(px.N_SLOT_COLS):
            _permute(apc.slot[r, c], used, m, seqs)
    for j in range(m):
        seqs[j] = s_measured[r, used[j]]
    for j in range(m):
        s_measured[r, j] = seqs[j] != 0
    cnt[r, C_ON] = 0
    cnt[r, C_COOL] = COOLDOWN


@njit(cache=True, error_model="numpy", inline="always")
def _permute(row, order, m, buf):
    """row[:m] = row[order[:m]] through buf."""
    for j in range(m):
        buf[j] = row[order[j]]
    for j in range(m):
        row[j] = buf[j]


# -- a completed batch -----------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def complete_nb(lz, r, bid, end, slots, n_running, bs, reqs, itl_acc, turns, apc, apc_on):
    """Batch `bid` of lazy replica r completed at `end`: the lazy decoders (all in it) each gain a
    token, those at their last leave; explicit slots it sampled for gain theirs, and join the lazy
    decoders unless finished. Returns (requests finished, blocks freed)."""
    cnt, t_last, ex_slot = lz.cnt, lz.t_last, lz.ex_slot
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_output, s_blocks, s_last, s_max_itl = slots.output, slots.blocks, slots.last, slots.max_itl
    s_measured, s_sample = slots.measured, slots.sample
    generated, status, finish, max_itl = reqs.generated, reqs.status, reqs.finish, reqs.max_itl
    first_tok = reqs.first_tok
    done = 0
    freed = 0
    left_from = cnt[r, C_NFREE]
    if cnt[r, C_NDEC] > 0:
        cnt[r, C_D] += 1
        D = cnt[r, C_D]
        gap = end - t_last[r]
        nm = cnt[r, C_NMEAS]
        if nm > 0:
            itl_add_nb(itl_acc, gap, nm)
        _stk_push(lz, r, D, gap, slots, bs)
        done, freed, _ = _finish_due(lz, r, end, slots, bs, finish, status, generated, max_itl, turns, apc, apc_on)
    t_last[r] = end
    m = 0
    for x in range(cnt[r, C_NEX]):
        k = ex_slot[r, x]
        if s_sample[r, k] != bid:
            ex_slot[r, m] = k
            m += 1
            continue
        s_sample[r, k] = -1
        s_tokens[r, k] += 1
        gen = s_tokens[r, k] - s_prompt[r, k]
        i = s_req[r, k]
        if gen == 1:
            first_tok[i] = end
        else:
            gap = end - s_last[r, k]
            if gap > s_max_itl[r, k]:
                s_max_itl[r, k] = gap
            if s_measured[r, k]:
                itl_add_nb(itl_acc, gap, 1)
        s_last[r, k] = end
        if gen >= s_output[r, k]:
            finish[i] = end
            status[i] = E.FINISHED
            generated[i] = gen
            max_itl[i] = s_max_itl[r, k]
            if not apc_on:
                freed += s_blocks[r, k]
            _release_slot(lz, r, k)
            done += 1
            if turns.next_turn[i] != -1:  # (a next turn, or a closed loop to refill)
                hp.next_turn_due_nb(turns, i, end)
        elif 0 <= s_blocks[r, k] * bs - s_computed[r, k] < bs and _apc_joins(apc, apc_on, r, k):
            _join(lz, r, k, slots, bs)
        else:
            if s_computed[r, k] >= s_prompt[r, k] and _decodes_public(apc, apc_on, r, k, slots, bs):
                cnt[r, C_STUCK] = 1
            ex_slot[r, m] = k
            m += 1
    cnt[r, C_NEX] = m
    n_running[r] -= done
    if apc_on and done > 0:
        freed = _apc_release_left(lz, r, apc, left_from, slots.req, bs)
    return done, freed


# -- one iteration ------------------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def schedule_nb(lz, r, bid, t_r, ri, slots, reps, reqs, apc, hit_buf):
    """Replica r's next batch as exact mode's vLLM V1 scheduler forms it: every lazy decoder one
    token, explicit slots their next chunk, then waiting requests first come first served (with
    prefix caching, each prefilling only what the cache does not hold). Returns (True, scheduled,
    batch aggregates, preemptions), or (False, 0, _, 0) when exact mode must decide: the budget runs
    out at an explicit slot older than some decoder (the lazy form takes decoders first; exact mode
    takes admission order)."""
    cnt, phase, s_seq, s_state, free_slots, ex_slot = lz.cnt, lz.phase, lz.s_seq, lz.s_state, lz.free_slots, lz.ex_slot
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_output, s_blocks, s_last, s_max_itl = slots.output, slots.blocks, slots.last, slots.max_itl
    s_measured, s_sample = slots.measured, slots.sample
    n_running, free, q_head, q_tail = reps.n_running, reps.free, reps.q_head, reps.q_tail
    n_waiting = reps.n_waiting
    q_next, prompt, output, generated = reqs.q_next, reqs.prompt, reqs.output, reqs.generated
    last_tok, max_itl, measured, status = reqs.last_tok, reqs.max_itl, reqs.measured, reqs.status
    first_sched, cached, gen0 = reqs.first_sched, reqs.cached, reqs.gen0
    bs = ri[E.RI_BLOCK_SIZE]
    thr = ri[E.RI_THRESHOLD]
    apc_on = ri[E.RI_APC] != 0
    n = cnt[r, C_NDEC]
    D = cnt[r, C_D]
    agg = EMPTY_BATCH
    left0 = ri[E.RI_MAX_TOKENS] - n  # the budget left after the decoders
    left = left0
    if left < 0:
        return False, 0, agg, 0
    need = phase[r, mod_pow2_nb(D, bs)] if n > 0 else 0
    for x in range(cnt[r, C_NEX]):
        k = ex_slot[r, x]
        wish, new = chunk_nb(s_tokens[r, k] - s_computed[r, k], thr, left)
        if new < wish and s_seq[r, k] < cnt[r, C_MAXDEC]:
            return False, 0, agg, 0
        if new > 0:
            need += blocks_needed_nb(s_computed[r, k], new, s_blocks[r, k], bs)
            left -= new
    n_preempted = 0
    if need > free[r]:
        # Exact mode, taking the slots in admission order, preempts the newest running request
        # while the slot at hand cannot get its blocks, until it can or is itself the newest. As
        # the blocks needed up to a slot only grow, that leaves the longest run of the oldest slots
        # whose needs fit in the free blocks plus those of the newer ones: preempt from the newest
        # until the needs of the rest fit. (What the rest are given of the budget is unchanged:
        # only newer slots, all preempted, came after them.)
        while need > free[r]:
            need -= _preempt_newest(lz, r, slots, bs, reps, reqs, thr, left0, apc, apc_on)
            n_preempted += 1
        n = cnt[r, C_NDEC]
    # Apply.
    free[r] -= need
    # Prefix caching: this step's decoders take their blocks, in exact mode, among the explicit
    # slots' in admission order; the order matters only where an explicit slot names a shared
    # block (a decoder's block may evict a cached copy of it first), so the decoders older than
    # such a slot take theirs before it names (_older_decoders), the rest after every slot.
    dec_now = phase[r, mod_pow2_nb(D, bs)] if n > 0 else 0
    taken_now = 0
    if apc_on and (cnt[r, C_NEX] > 0 or n_waiting[r] > 0):
        apc_flush_nb(lz, r, apc)
    agg = Batch(n, _keys(cnt, r), 0, 0, 0.0, 0.0)
    n_sched = n
    left = ri[E.RI_MAX_TOKENS] - n
    for x in range(cnt[r, C_NEX]):
        k = ex_slot[r, x]
        _, new = chunk_nb(s_tokens[r, k] - s_computed[r, k], thr, left)
        if new <= 0:
            continue
        more = blocks_needed_nb(s_computed[r, k], new, s_blocks[r, k], bs)
        s_blocks[r, k] += more
        agg = add_to_batch_nb(agg, new, s_computed[r, k], s_prompt[r, k], ri[E.RI_WINDOW])
        s_computed[r, k] += new
        if apc_on:
            taken_now = _apc_chunk(lz, r, k, apc, slots, bs, more, new, dec_now, taken_now)
        if s_computed[r, k] == s_tokens[r, k]:
            s_sample[r, k] = bid
        n_sched += 1
        left -= new
    if apc_on:
        cnt[r, C_PEND] += dec_now - taken_now
        if n_waiting[r] > 0:
            apc_flush_nb(lz, r, apc)
    if n_preempted > 0:  # (vLLM admits no waiting request in a step that preempted)
        return True, n_sched, agg, n_preempted
    no_evict = ri[E.RI_NO_EVICT] != 0
    reserved = reserved_blocks_nb(s_prompt[r], s_output[r], s_state[r], s_state.shape[1], True, bs) \
        if no_evict and n_waiting[r] > 0 else 0
    while n_waiting[r] > 0 and left > 0 and n_running[r] < ri[E.RI_MAX_SEQS]:
        i = q_head[r]
        hits, hit_key = 0, px.ROOT_KEY
        if apc_on:  # the longest cached prefix is not computed again
            hits, hit_key = px.apc_lookup_nb(apc, r, i, prompt[i] + generated[i], bs, hit_buf)
            done = hits * bs
        else:
            done = arrived_kv_nb(gen0, first_sched, i, prompt[i] + generated[i])
        wish, new = chunk_nb(prompt[i] + generated[i] - done, thr, left)
        if ri[E.RI_CHUNKED] == 0 and wish > left:
            break
        need = ceil_div_pow2_nb(done + new, bs) - hits
        if need > free[r]:
            break
        idle_hits = px.apc_idle_nb(apc, hit_buf, hits) if apc_on else 0
        if need + idle_hits > free[r]:
            break
        final = final_blocks_nb(prompt[i], output[i], bs)
        if no_evict and reserved + final > ri[E.RI_NUM_BLOCKS]:
            break
        reserved += final
        q_head[r] = q_next[i]
        if q_tail[r] == i:
            q_tail[r] = -1
        n_waiting[r] -= 1
        cnt[r, C_NFREE] -= 1
        k = free_slots[r, cnt[r, C_NFREE]]
        n_running[r] += 1
        if apc_on:
            free[r] -= px.apc_admit_nb(apc, r, k, i, bs, hit_buf, hits, hit_key, need, done + new)
        else:
            free[r] -= need
        s_req[r, k] = i
        s_prompt[r, k] = prompt[i]
        s_tokens[r, k] = prompt[i] + generated[i]
        s_computed[r, k] = done + new
        s_output[r, k] = output[i]
        s_blocks[r, k] = hits + need
        s_last[r, k] = last_tok[i]
        s_max_itl[r, k] = max_itl[i]
        s_measured[r, k] = measured[i]
        s_sample[r, k] = bid if done + new == s_tokens[r, k] else -1
        s_seq[r, k] = cnt[r, C_SEQ]
        cnt[r, C_SEQ] += 1
        s_state[r, k] = EXPLICIT
        _order_push(lz, r, k)
        ex_slot[r, cnt[r, C_NEX]] = k
        cnt[r, C_NEX] += 1
        status[i] = E.RUNNING
        if np.isnan(first_sched[i]):
            first_sched[i] = t_r
            cached[i] = hits * bs
        agg = add_to_batch_nb(agg, new, done, prompt[i], ri[E.RI_WINDOW])
        n_sched += 1
        left -= new
    return True, n_sched, agg, 0


# (Called, not inlined: schedule_nb is inlined into the event loop, and runs without prefix
# caching need none of this code there; so is apc_admit_nb.)
@njit(cache=True, error_model="numpy")
def _apc_chunk(lz, r, k, apc, slots, bs, more, new, dec_now, taken_now):
    """Explicit slot k's chunk of `new` tokens: `more` blocks from the cache, the full ones named
    (after the decoders admitted before it took theirs, if it names a shared block). Returns how
    many of this step's `dec_now` decoder blocks have been taken."""
    computed = slots.computed[r, k]
    if more > 0:
        px.apc_allocate_nb(apc, r, k, more)
    if div_pow2_nb(computed, bs) > div_pow2_nb(computed - new, bs):
        if dec_now > taken_now and apc.slot[r, px.HASHED, k] < apc.slot[r, px.SHARED, k]:
            older = _older_decoders(lz, r, k, slots, bs)
            if older > taken_now:
                px.apc_pop_nb(apc, r, older - taken_now)
                taken_now = older
        px.apc_hash_full_nb(apc, r, k, slots.req[r, k], computed, bs)
    return taken_now


@njit(cache=True, error_model="numpy")
def _older_decoders(lz, r, k, slots, bs):
    """How many lazy decoders admitted before slot k take a block at this step. (A scan: only when a
    slot names a shared block while decoders take blocks.)"""
    cnt, s_seq, s_state = lz.cnt, lz.s_seq, lz.s_state
    f = mod_pow2_nb(cnt[r, C_D], bs)
    older = 0
    for j in range(s_state.shape[1]):
        if s_state[r, j] == LAZY and s_seq[r, j] < s_seq[r, k] and _phase(lz, r, j, slots, bs) == f:
            older += 1
    return older


@njit(cache=True, error_model="numpy", inline="always")
def _preempt_newest(lz, r, slots, bs, reps, reqs, thr, left0, apc, apc_on):
    """Preempt replica r's newest running request (the highest admission number), as exact mode
    does: its progress written back, its blocks freed, itself to the front of the waiting queue.
    Returns the blocks it needed this step (a lazy decoder: one, at its block phase; an explicit
    slot: its chunk's, as schedule_nb gave out the budget, `left0` after the decoders)."""
    cnt, t_last, s_state, ex_slot = lz.cnt, lz.t_last, lz.s_state, lz.ex_slot
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_blocks, s_last, s_max_itl = slots.blocks, slots.last, slots.max_itl
    n_running, free, q_head, q_tail = reps.n_running, reps.free, reps.q_head, reps.q_tail
    n_waiting = reps.n_waiting
    q_next, generated, last_tok, max_itl = reqs.q_next, reqs.generated, reqs.last_tok, reqs.max_itl
    preempts = reqs.preempts
    v = _order_pop_newest(lz, r)
    if s_state[r, v] == LAZY:
        D = cnt[r, C_D]
        need = 1 if _phase(lz, r, v, slots, bs) == mod_pow2_nb(D, bs) else 0
        hp.key_remove_nb(lz.fh, lz.fh_n, r, _finish_key(lz, r, v, slots))
        cross = _cross_at(lz, r, v, slots)
        if cross != NEVER and D < cross:  # (not reached yet)
            hp.key_remove_nb(lz.fh, lz.fh_n, r, (cross << STEP_SHIFT) | CROSS | v)
        _leave(lz, r, v, slots, bs, apc, apc_on)
        s_last[r, v] = t_last[r]
    else:
        left, need, m = left0, 0, 0
        for x in range(cnt[r, C_NEX]):  # in admission order, as the budget was given out
            k = ex_slot[r, x]
            _, new = chunk_nb(s_tokens[r, k] - s_computed[r, k], thr, left)
            left -= new
            if k == v:
                need = blocks_needed_nb(s_computed[r, k], new, s_blocks[r, k], bs) if new > 0 else 0
            else:
                ex_slot[r, m] = k
                m += 1
        cnt[r, C_NEX] = m
        _release_slot(lz, r, v)
    i = s_req[r, v]
    generated[i] = s_tokens[r, v] - s_prompt[r, v]
    last_tok[i] = s_last[r, v]
    max_itl[i] = s_max_itl[r, v]
    preempts[i] += 1
    if apc_on:  # it may find its own blocks again: they become public (see prefix_nb)
        apc_flush_nb(lz, r, apc)
        px.apc_publish_nb(apc, r, v, i, bs)
        free[r] += px.apc_release_nb(apc, r, v)
    else:
        free[r] += s_blocks[r, v]
    n_running[r] -= 1
    q_next[i] = q_head[r]  # to the front of the waiting queue
    q_head[r] = i
    if q_tail[r] < 0:
        q_tail[r] = i
    n_waiting[r] += 1
    return need


@njit(cache=True, error_model="numpy", inline="always")
def head_may_start_nb(apc, apc_on, r, i, ri, running, decoding, dec_need, free_r, reserved, prompt, output, generated,
                      gen0, first_sched, hit_buf):
    """Whether the queue's head i could be admitted at the next iteration beside `running` requests,
    `decoding` of which decode in it taking `dec_need` blocks (all of them, but with pipeline stages
    one group), or might be once its idle cached blocks are evicted: then a run of decode-only
    iterations must not start (fast mode's run_nb, exact mode's decode stretches). `reserved`: the
    blocks guaranteed_no_evict has promised (read only then)."""
    bs = ri[E.RI_BLOCK_SIZE]
    room = ri[E.RI_MAX_TOKENS] - decoding
    if running >= ri[E.RI_MAX_SEQS] or room <= 0:
        return False
    hits, idle = 0, 0
    if apc_on:  # (the first iteration's blocks can only evict its hits: this errs toward not starting)
        hits, _ = px.apc_lookup_nb(apc, r, i, prompt[i] + generated[i], bs, hit_buf)
        idle = px.apc_idle_nb(apc, hit_buf, hits)
        done = hits * bs
    else:
        done = arrived_kv_nb(gen0, first_sched, i, prompt[i] + generated[i])
    thr = ri[E.RI_THRESHOLD]
    wish, new = chunk_nb(prompt[i] + generated[i] - done, thr, room)
    chunk_ok = ri[E.RI_CHUNKED] != 0 or wish <= room
    reserved_ok = ri[E.RI_NO_EVICT] == 0 or reserved + final_blocks_nb(prompt[i], output[i], bs) <= ri[E.RI_NUM_BLOCKS]
    if chunk_ok and reserved_ok and ceil_div_pow2_nb(done + new, bs) - hits + idle <= free_r - dec_need:
        return True
    # Evicting its idle hits could leave a chunk cut to the budget needing less than now.
    return idle > 0 and prompt[i] + generated[i] > (room if thr <= 0 else min(thr, room))


@njit(cache=True, error_model="numpy", inline="always")
def run_nb(lz, r, t_r, t_arrival, finish_by, max_time_s, ri, p, tables, slots, reps, reqs, itl_acc,
           turns, apc, hit_buf, tl):
    """Lazy replica r at t_r, nothing in flight, only lazy decoders running: the decode iterations
    exact mode would run before anything else can happen (the same stopping rules as its decode
    stretch: an arrival, a due preemption, a finish while requests wait or after `finish_by`, the
    time limit), summed in closed form between the finishes on the way. Returns
    (iterations, end of the last, requests finished, peak blocks used), or (0, t_r, 0, 0).
    tl (a bundles.TimelineOut): a row per iteration, as many as the
    timeline has room for (the run ends there; the caller makes room)."""
    cnt, phase, fh = lz.cnt, lz.phase, lz.fh
    tok_table, seq_table = tables.tok, tables.seq
    n_running, free, stage_free, rep_time = reps.n_running, reps.free, reps.stage_free, reps.rep_time
    q_head, n_waiting = reps.q_head, reps.n_waiting
    prompt, output, generated, status = reqs.prompt, reqs.output, reqs.generated, reqs.status
    finish, max_itl, gen0, first_sched = reqs.finish, reqs.max_itl, reqs.gen0, reqs.first_sched
    s_prompt, s_output = slots.prompt, slots.output
    itl = itl_acc.stats
    bs = ri[E.RI_BLOCK_SIZE]
    budget = ri[E.RI_MAX_TOKENS]
    apc_on = ri[E.RI_APC] != 0
    n = cnt[r, C_NDEC]
    if n == 0 or cnt[r, C_NEX] > 0 or n > budget:
        return 0, t_r, 0, 0
    D = cnt[r, C_D]
    free_r = free[r]
    last_iter = 1 << 62
    if n_waiting[r] > 0:
        # A finish frees room the scheduler would admit into: stop before it (or before a decoder
        # reaches the window, the heap's other event: needlessly, and rarely while requests wait).
        # A head blocked now stays blocked until then (free blocks only shrink, the batch is
        # unchanged).
        last_iter = (fh[r, 0] >> STEP_SHIFT) - D - 1
        if last_iter <= 0:
            return 0, t_r, 0, 0
        if apc_on:
            apc_flush_nb(lz, r, apc)  # (the head's lookup reads the free list)
        reserved = reserved_blocks_nb(s_prompt[r], s_output[r], lz.s_state[r], lz.s_state.shape[1], True, bs) \
            if ri[E.RI_NO_EVICT] != 0 else 0
        if head_may_start_nb(apc, apc_on, r, q_head[r], ri, n, n, phase[r, mod_pow2_nb(D, bs)], free_r, reserved,
                             prompt, output, generated, gen0, first_sched, hit_buf):
            return 0, t_r, 0, 0
    coefs = attention_coefs_nb(p)
    tok_off, seq_off = ri[E.RI_TOK_OFF], ri[E.RI_SEQ_OFF]
    timeline, tl_state, record = tl.timeline, tl.loop_state, tl.record
    t = t_r
    total = 0
    done = 0
    peak = 0
    while n > 0:
        next_fin = (fh[r, 0] >> STEP_SHIFT) - D  # (or a decoder reaching the window)
        kmax = blocks_fit_nb(phase, r, D, bs, n, free_r, min(next_fin, last_iter - total))
        if kmax <= 0:
            break
        keys0 = _keys(cnt, r)
        grow = n - cnt[r, C_NCAP]  # keys added per iteration
        N = kmax - 1
        g0 = attention_nb(coefs, n, keys0)
        while True:
            a1, a2, ok = fit_nb(coefs, n, keys0, grow, g0, N)
            if ok:
                break
            N //= 2
        kmax = N + 1
        dense, comm = decode_only_nb(p, tok_table, seq_table, tok_off, seq_off, n)
        # The gaps between iterations: b0 + t1 u + t2 u^2 (u = 0..kmax-1), the GPU's time growing
        # with the context as g0 + a1 u + a2 u^2 does.
        kmax, b0, t1, t2 = gaps_nb(p, decode_cpu_overhead_nb(p, n), dense + g0, a1, a2, kmax)
        k = last_run_nb(t, b0, t1, t2, kmax, total, t_arrival, max_time_s)
        stop = k < kmax
        if k == next_fin and finish_by < np.inf and t + elapsed_nb(b0, t1, t2, k) >= finish_by:  # ties: arrival first
            k -= 1
            stop = True
        if record and k > timeline.shape[0] - tl_state[E.LS_ROWS]:
            k = timeline.shape[0] - tl_state[E.LS_ROWS]
            stop = True
        if k == 0:
            break
        if record:
            timeline_rows_nb(timeline, tl_state, r, t, b0, t1, t2, k, n, phase, D, bs, ri[E.RI_NUM_BLOCKS] - free_r,
                           n_waiting[r], n_running[r])
        m = k - 1
        p0, p1, p2, p3, p4 = power_sums_nb(m)
        s1 = b0 * p0 + t1 * p1 + t2 * p2
        nm = cnt[r, C_NMEAS]
        if nm > 0:
            s2 = b0 * b0 * p0 + 2.0 * b0 * t1 * p1 + (t1 * t1 + 2.0 * b0 * t2) * p2 + 2.0 * t1 * t2 * p3 + t2 * t2 * p4
            bin_run_nb(itl_acc, b0, t1, t2, k, nm)
            itl[0] += nm * k
            itl[1] += nm * s1
            itl[2] += nm * s2
        attn = g0 * p0 + a1 * p1 + a2 * p2
        rep_time[r, 0] += k * (dense - comm) + attn
        rep_time[r, 1] += k * comm
        used = blocks_used_nb(phase, r, D, bs, n, k)
        free_r -= used
        if apc_on:
            cnt[r, C_PEND] += used
        peak = max(peak, ri[E.RI_NUM_BLOCKS] - free_r)
        D += k
        cnt[r, C_D] = D
        _stk_push(lz, r, D, max(b0, b0 + t1 * m + t2 * m * m), slots, bs)
        t = t + s1
        total += k
        if stop:
            break
        if k < next_fin:  # a shorter fit, or the blocks or the waiting requests end the run here
            continue
        left_from = cnt[r, C_NFREE]
        left, freed, due = _finish_due(lz, r, t, slots, bs, finish, status, generated, max_itl, turns, apc, apc_on)
        if apc_on:
            freed = _apc_release_left(lz, r, apc, left_from, slots.req, bs)
        free_r += freed
        n_running[r] -= left
        done += left
        t_arrival = min(t_arrival, due)
        finish_by = min(finish_by, due)
        n = cnt[r, C_NDEC]
    if total == 0:
        return 0, t_r, 0, 0
    free[r] = free_r
    stage_free[r, 0] = t
    lz.t_last[r] = t  # the lazy decoders' last token
    cnt[r, C_SUMMED] += total
    return total, t, done, peak
