"""Arithmetic of one scheduled batch, shared by exact and fast mode: the KV blocks a request's new
tokens need, the aggregates the cost model takes, and where an inter-token gap goes in the ITL
histogram."""
from __future__ import annotations

import numpy as np
from numba import njit
from numba.core import config as numba_config
from numba.core import types
from numba.cpython.unsafe.numbers import trailing_zeros
from numba.core.extending import intrinsic

from fastsim.engine import enums as E
from fastsim.engine.bundles import Batch
from fastsim.engine.cost_nb import chunk_pairs_nb


# Block sizes are powers of two (the config allows 1 to 256 in powers of two), so dividing by one is
# a shift: the integer divisions these replace were ~10% of fast mode's time.
@njit(cache=True, error_model="numpy")
def ceil_div_pow2_nb(a, b):
    """ceil(a / b), b a power of two."""
    return (a + b - 1) >> trailing_zeros(b)


@njit(cache=True, error_model="numpy", inline="always")
def div_pow2_nb(a, b):
    """floor(a / b), b a power of two (as Python's //, for negative a too)."""
    return a >> trailing_zeros(b)


@njit(cache=True, error_model="numpy", inline="always")
def mod_pow2_nb(a, b):
    """a mod b in [0, b), b a power of two (as Python's %, for negative a too)."""
    return a & (b - 1)


@njit(cache=True, error_model="numpy")
def blocks_needed_nb(computed, new, blocks, block_size):
    """New blocks for `computed + new` KV slots; the common case (room in the last block) skips the division."""
    if computed + new <= blocks * block_size:
        return 0
    return ceil_div_pow2_nb(computed + new, block_size) - blocks


@njit(cache=True, error_model="numpy", inline="always")
def chunk_nb(remaining, threshold, left):
    """(tokens a request asks for in one step: its remaining ones, at most long_prefill_token_threshold
    (0: no cap); what it gets of the `left` budget). Without chunked prefill a request asking for
    more than it gets is not admitted."""
    wish = min(remaining, threshold) if threshold > 0 else remaining
    return wish, min(wish, left)


@njit(cache=True, error_model="numpy")
def add_to_batch_nb(agg, new, computed, prompt_len, window):
    """The batch `agg` (a bundles.Batch) with one more scheduled request: a decode (one new token
    after its whole prompt) or a prefill chunk of `new` tokens after `computed`."""
    if new == 1 and computed >= prompt_len:
        keys = min(computed + 1, window) if window > 0 else computed + 1
        return Batch(agg.n_decodes + 1, agg.decode_kv_tokens + keys, agg.n_prefills, agg.prefill_tokens,
                     agg.prefill_pairs, agg.prefill_kv_tokens)
    return Batch(agg.n_decodes, agg.decode_kv_tokens, agg.n_prefills + 1, agg.prefill_tokens + new,
                 agg.prefill_pairs + chunk_pairs_nb(new, computed, window),
                 agg.prefill_kv_tokens + (min(computed, window) if window > 0 else computed) + new)


@njit(cache=True, error_model="numpy")
def account_nb(rep_time, r, ri, tok_table, seq_table, agg, body, head, stages):
    """Add one batch's GPU time, split into compute and communication (TP all-reduces, logits)."""
    comm_layers = tok_table[1, ri[E.RI_TOK_OFF] + agg.n_decodes + agg.prefill_tokens]
    comm_head = seq_table[1, ri[E.RI_SEQ_OFF] + agg.n_decodes + agg.n_prefills]
    rep_time[r, 0] += stages * (body - comm_layers) + head - comm_head
    rep_time[r, 1] += stages * comm_layers + comm_head


@intrinsic
def _float_bits(typingctx, x):
    """The IEEE 754 bits of a float64, as an int64 (a register move)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.int64))
    return types.int64(types.float64), codegen


@intrinsic
def _bits_float(typingctx, bits):
    """The float64 whose IEEE 754 bits are these (_float_bits's inverse)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float64))
    return types.float64(types.int64), codegen


if numba_config.DISABLE_JIT:
    # The kernels run as plain Python (NUMBA_DISABLE_JIT=1, so that coverage sees their bodies):
    # what the compiled intrinsics mean, in Python.
    def trailing_zeros(b):  # noqa: F811
        return (int(b) & -int(b)).bit_length() - 1

    def _float_bits(x):  # noqa: F811
        return np.float64(x).view(np.int64)

    def _bits_float(bits):  # noqa: F811
        return np.int64(bits).view(np.float64)


# A positive double's bits >> (52 - ITL_OCTAVE_BITS) are its biased exponent followed by its leading
# mantissa bits: the bin counted from 2^0, shifted here to count from 2^ITL_MIN_EXP.
_BIN_SHIFT = 52 - E.ITL_OCTAVE_BITS
_BIN_BASE = (1023 + E.ITL_MIN_EXP) << E.ITL_OCTAVE_BITS


@njit(cache=True, error_model="numpy")
def itl_bin_nb(itl_s):
    """The ITL histogram bin of a gap (see enums.ITL_OCTAVE_BITS): a logarithm's bin without the
    logarithm, which cost ~10% of fast mode's time. Zero and negative gaps (sign bit set: a negative
    integer) land in bin 0 through the clamp, without a branch."""
    i = (_float_bits(itl_s) >> _BIN_SHIFT) - _BIN_BASE
    return min(max(i, 0), E.ITL_BINS - 1)


@njit(cache=True, error_model="numpy", inline="always")
def itl_bin_low_nb(i):
    """The smallest gap in ITL bin i (1 <= i < ITL_BINS): the float of itl_bin_nb's bits."""
    return _bits_float((i + _BIN_BASE) << _BIN_SHIFT)


@njit(cache=True, error_model="numpy")
def itl_add_nb(itl_acc, gap, count):
    """`count` tokens each `gap` after their previous one: histogram, count, sum, sum of squares."""
    itl_hist, itl = itl_acc.hist, itl_acc.stats
    itl_hist[itl_bin_nb(gap)] += count
    itl[0] += count
    itl[1] += count * gap
    itl[2] += count * gap * gap


@njit(cache=True, error_model="numpy", inline="always")
def tally_gap_nb(itl_acc, last, gap, ref_last, n_ref):
    """A measured token `gap` after its request's previous one (at `last`), as a batch's completion
    bins its tokens: those whose previous token came when the first one's did (ref_last) are counted
    together afterwards (n_ref of them, one gap), any other at once. Returns (ref_last, n_ref)."""
    if last == ref_last:
        return ref_last, n_ref + 1
    if n_ref == 0:
        return last, 1
    itl_add_nb(itl_acc, gap, 1)
    return ref_last, n_ref


@njit(cache=True, error_model="numpy", inline="always")
def move_slot_nb(slots, k, m):
    """The request in slot k into slot m (slots: a bundles.Slots of one replica's rows)."""
    s_req, s_prompt, s_tokens, s_computed = slots.req, slots.prompt, slots.tokens, slots.computed
    s_output, s_blocks, s_last, s_max_itl = slots.output, slots.blocks, slots.last, slots.max_itl
    s_measured, s_sample = slots.measured, slots.sample
    s_req[m] = s_req[k]
    s_prompt[m] = s_prompt[k]
    s_tokens[m] = s_tokens[k]
    s_computed[m] = s_computed[k]
    s_output[m] = s_output[k]
    s_blocks[m] = s_blocks[k]
    s_last[m] = s_last[k]
    s_max_itl[m] = s_max_itl[k]
    s_measured[m] = s_measured[k]
    s_sample[m] = s_sample[k]


@njit(cache=True, error_model="numpy", inline="always")
def _sift_down(keys, vals, root, end):
    while True:
        child = 2 * root + 1
        if child >= end:
            return
        if child + 1 < end and keys[child + 1] > keys[child]:
            child += 1
        if keys[root] >= keys[child]:
            return
        keys[root], keys[child] = keys[child], keys[root]
        vals[root], vals[child] = vals[child], vals[root]
        root = child


@njit(cache=True, error_model="numpy")
def sort_by_key_nb(keys, vals, m):
    """Sort keys[:m] ascending in place, carrying vals[:m] along (heapsort: the event loop runs
    without Numba's allocator, so np.argsort is not available there)."""
    for root in range(m // 2 - 1, -1, -1):
        _sift_down(keys, vals, root, m)
    for end in range(m - 1, 0, -1):
        keys[0], keys[end] = keys[end], keys[0]
        vals[0], vals[end] = vals[end], vals[0]
        _sift_down(keys, vals, 0, end)


@njit(cache=True, error_model="numpy", inline="always")
def arrived_kv_nb(gen0, first_sched, i, tokens):
    """Tokens whose KV request i brings to its first admission: all but its last when a prefill
    instance computed them (kv0: it arrives with generated > 0), else none."""
    return tokens - 1 if gen0[i] > 0 and np.isnan(first_sched[i]) else 0


@njit(cache=True, error_model="numpy")
def final_blocks_nb(prompt_len, output_len, block_size):
    """Blocks a request holds at its last token: what TensorRT-LLM's GUARANTEED_NO_EVICT reserves."""
    return ceil_div_pow2_nb(prompt_len + output_len, block_size)


@njit(cache=True, error_model="numpy")
def reserved_blocks_nb(s_prompt, s_output, s_state, n_slots, lazy, block_size):
    """TensorRT-LLM GUARANTEED_NO_EVICT: blocks the running requests of one replica (slots 0..n_slots-1;
    in fast mode's lazy form, the slots whose state is not 0 = free) hold or will hold by their last
    token, ceil((prompt + output) / block_size) each. A request is admitted only if this plus its own
    such count fits the cache, so no running request ever has to be evicted."""
    total = 0
    for k in range(n_slots):
        if lazy and s_state[k] == 0:
            continue
        total += final_blocks_nb(s_prompt[k], s_output[k], block_size)
    return total


@njit(cache=True, error_model="numpy", inline="always")
def timeline_row_nb(timeline, i, start, duration, agg, used, waiting, running, preempts, r):
    """Row i of the timeline: an iteration of replica r from `start`, its batch `agg` (see
    add_to_batch_nb), the blocks in use once it has taken its own, the requests waiting and running."""
    n_dec, n_pre, pre_tokens = agg.n_decodes, agg.n_prefills, agg.prefill_tokens
    row = timeline[i]
    row[E.TL_START_S] = start
    row[E.TL_DURATION_S] = duration
    row[E.TL_NUM_SEQS] = n_dec + n_pre
    row[E.TL_NUM_TOKENS] = n_dec + pre_tokens
    row[E.TL_PREFILL_TOKENS] = pre_tokens
    row[E.TL_NUM_DECODES] = n_dec
    row[E.TL_KV_BLOCKS_USED] = used
    row[E.TL_NUM_WAITING] = waiting
    row[E.TL_NUM_RUNNING] = running
    row[E.TL_PREEMPTIONS] = preempts
    row[E.TL_REPLICA] = r
