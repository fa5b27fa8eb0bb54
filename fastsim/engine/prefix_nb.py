"""Building blocks of an array-based prefix cache (vLLM's automatic prefix caching), for the engine.

A full KV block is identified by a 64-bit key chained from its parent's key and its own content,
so equal keys mean equal prefixes. Cached blocks are found through an open-addressing hash table
(linear probing, backward-shift deletion: no tombstones, so lookups never slow down); blocks no
request holds sit in an LRU free list, evicted from its head, returned to its tail.

Private blocks: most blocks hold content no other request has (ShareGPT's prompts, every answer
outside a conversation), which only their owner could find again, and only after a preemption.
So a block past its request's shareable tokens (shareable_tokens: what the workload gives some
other request too) gets no identity: its owner counts it, and lets go of its private blocks as
one free-list node, an extent (how many, how many named), which evictions eat from its head side.
A preempted request's private blocks get identities, names and hash-table entries then (publish),
and stay public when it runs again. Which blocks are evicted when, every count and every
lookup are as with a node per block; the work per private block is gone.

Deferred blocks: a conversation's turn decodes into blocks the next turn's prompt holds, but that
turn arrives only after this one finishes (running_shareable_tokens). Nobody can look them up
while it runs, so they are taken as private ones, and get their identities and names when it
finishes (or is preempted), as they would have had all along; its decode then costs what a
private request's does (fast mode's lazy form takes it in).

Every kernel here has a plain-Python twin in tests/test_prefix.py.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from fastsim.engine.batch_nb import div_pow2_nb

EMPTY = -1
ROOT_KEY = 0x2545F4914F6CDD1D  # the chain's seed: the "parent" of every first block
_MASK63 = (1 << 63) - 1


@njit(cache=True, error_model="numpy")
def mix_nb(a, b):
    """A 63-bit key from two integers (splitmix64 finaliser over their combination); never EMPTY."""
    x = (np.uint64(a) * np.uint64(0x9E3779B97F4A7C15)) ^ np.uint64(b)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return np.int64(x & np.uint64(_MASK63))


@njit(cache=True, error_model="numpy", inline="always")  # a call passing the arrays costs ~4x the work
def block_content_nb(req, m, block_size, content, source_tokens):
    """Content id of engine block m (tokens [m*bs, (m+1)*bs)) of request `req`; equal ids mean
    equal tokens. `content = (offsets, ids, prompt, seq, shared_len, shared_id)`, per request:

    - ids of consecutive `source_tokens`-token blocks of its prompt (Mooncake's hash_ids, 512
      tokens), ragged (offsets): an engine block inside the prompt is named by the source blocks it
      lies in and its offset, so equal source ids give equal engine blocks at any block size;
    - else, a block inside its first `shared_len` tokens (a client's system prompt) is the same for
      every request with its `shared_id`;
    - else the block belongs to its token sequence `seq`: the turns of one conversation share it
      (each turn's prompt extends the previous one's prompt and answer), other requests do not.
    """
    offsets, ids, prompt, seq = content.offsets, content.ids, content.prompt, content.seq
    shared_len, shared_id = content.shared_len, content.shared_id
    end = (m + 1) * block_size
    if source_tokens > 0 and end <= prompt[req]:
        lo = offsets[req]
        first = (m * block_size) // source_tokens
        last = (end - 1) // source_tokens
        if last < offsets[req + 1] - lo:
            within = (m * block_size) % source_tokens
            if first == last:  # (the usual case: one mix less on the hot path)
                return mix_nb(ids[lo + first], within)
            return mix_nb(mix_nb(ids[lo + first], ids[lo + last]), within)
    if end <= shared_len[req]:
        return mix_nb(mix_nb(0x27D4EB2F165667C5, shared_id[req]), m)
    return mix_nb(mix_nb(0x5BD1E995, seq[req]), m)


# -- hash table: key -> block ------------------------------------------------------------------
@njit(cache=True, error_model="numpy", inline="always")
def _probe(keys, key):
    """The slot holding `key`, or the empty slot that ends its probe run."""
    mask = keys.size - 1
    h = key & mask
    while keys[h] != EMPTY and keys[h] != key:
        h = (h + 1) & mask
    return h


@njit(cache=True, error_model="numpy", inline="always")
def ht_find_nb(keys, vals, key):
    h = _probe(keys, key)
    return vals[h] if keys[h] == key else EMPTY


@njit(cache=True, error_model="numpy", inline="always")
def ht_add_nb(keys, vals, key, val):
    """Insert `key` unless present (then its value stays). Returns whether it was inserted. The
    table must keep a free slot (size > number of keys)."""
    h = _probe(keys, key)
    if keys[h] == key:
        return False
    keys[h] = key
    vals[h] = val
    return True


@njit(cache=True, error_model="numpy", inline="always")
def ht_delete_nb(keys, vals, key):
    """Remove `key` if present, shifting later entries of its probe run back (no tombstones)."""
    h = _probe(keys, key)
    if keys[h] != key:
        return False
    mask = keys.size - 1
    hole = h
    j = h
    while True:
        j = (j + 1) & mask
        if keys[j] == EMPTY:
            break
        home = keys[j] & mask
        # Move j's entry into the hole unless its home lies cyclically in (hole, j].
        if (j > hole and (home <= hole or home > j)) or (j < hole and (home <= hole and home > j)):
            keys[hole] = keys[j]
            vals[hole] = vals[j]
            hole = j
    keys[hole] = EMPTY
    vals[hole] = EMPTY
    return True


# -- LRU free list of blocks (doubly linked through prev/next; ends[0] head, ends[1] tail) ------
@njit(cache=True, error_model="numpy")
def fl_init_nb(n):
    """All n blocks free, in order."""
    prev = np.arange(-1, n - 1, dtype=np.int64)
    nxt = np.arange(1, n + 1, dtype=np.int64)
    if n > 0:
        nxt[n - 1] = EMPTY
    ends = np.array([0 if n > 0 else EMPTY, n - 1 if n > 0 else EMPTY], np.int64)
    return prev, nxt, ends


@njit(cache=True, error_model="numpy", inline="always")
def fl_remove_nb(prev, nxt, ends, b):
    p, q = prev[b], nxt[b]
    if p == EMPTY:
        ends[0] = q
    else:
        nxt[p] = q
    if q == EMPTY:
        ends[1] = p
    else:
        prev[q] = p
    prev[b] = EMPTY
    nxt[b] = EMPTY


@njit(cache=True, error_model="numpy", inline="always")
def fl_push_tail_nb(prev, nxt, ends, b):
    prev[b] = ends[1]
    nxt[b] = EMPTY
    if ends[1] == EMPTY:
        ends[0] = b
    else:
        nxt[ends[1]] = b
    ends[1] = b


@njit(cache=True, error_model="numpy", inline="always")
def fl_pop_head_nb(prev, nxt, ends):
    b = ends[0]
    if b != EMPTY:
        fl_remove_nb(prev, nxt, ends, b)
    return b


# -- which blocks another request may share -------------------------------------------------------
SHARED_ALL = 1 << 62  # shareable tokens of a request all of whose blocks are public


@njit(cache=True, error_model="numpy")
def _prefix_chains_nb(offsets, ids):
    """Per source id, a key of the request's ids up to and including it (equal keys: equal prefixes)."""
    out = np.empty(ids.size, np.int64)
    for i in range(offsets.size - 1):
        key = ROOT_KEY
        for j in range(offsets[i], offsets[i + 1]):
            key = mix_nb(key, ids[j])
            out[j] = key
    return out


@njit(cache=True, error_model="numpy")
def _leading_shared_nb(offsets, shared):
    """Per request, how many of its first source ids are `shared` in a row."""
    out = np.zeros(offsets.size - 1, np.int64)
    for i in range(offsets.size - 1):
        j = offsets[i]
        while j < offsets[i + 1] and shared[j]:
            j += 1
        out[i] = j - offsets[i]
    return out


def shareable_tokens(content: tuple, source_tokens: int) -> np.ndarray:
    """Per request, a token count T such that no other request of the workload has the content of
    any block of it that ends past T (at any block size): its blocks beyond are private. It may be
    larger than the truth (a block counted shareable only costs the per-block work), never smaller.
    From block_content_nb's three sources: source-block ids (the longest prefix of ids another
    request has too), a client's system prompt (if another request of the client has it), a
    conversation's token sequence (every block of a turn: another turn has it)."""
    offsets, ids, prompt, seq = content.offsets, content.ids, content.prompt, content.seq
    shared_len, shared_id = content.shared_len, content.shared_id
    n = prompt.size
    out = np.zeros(n, np.int64)
    if n == 0:
        return out
    _, inv, counts = np.unique(seq, return_inverse=True, return_counts=True)
    out[counts[inv] >= 2] = SHARED_ALL
    has = shared_len > 0
    if has.any():
        _, inv, counts = np.unique(shared_id[has], return_inverse=True, return_counts=True)
        idx = np.flatnonzero(has)
        out[idx] = np.maximum(out[idx], np.where(counts[inv] >= 2, shared_len[idx], 0))
    if source_tokens > 0 and ids.size:
        chains = _prefix_chains_nb(offsets, ids)
        _, inv, counts = np.unique(chains, return_inverse=True, return_counts=True)
        lead = _leading_shared_nb(offsets, counts[inv] >= 2)
        out = np.maximum(out, np.minimum(lead * source_tokens, prompt))
    return out


def running_shareable_tokens(content: tuple, shareable: np.ndarray, session: np.ndarray,
                             output: np.ndarray) -> np.ndarray:
    """Per request, the part of its `shareable` tokens another request may look up, or hold a copy
    of, while it runs. Past its prompt and its client's system prompt a block's content is its token
    sequence's (block_content_nb), which only other requests of that sequence have. Where those are
    the turns of its own conversation (rows in turn order), each later turn arrives after it has
    finished; an earlier one may still have its blocks cached, up to its prompt and output. Past
    all of those, its blocks are shareable only once it has finished (or is preempted, when it may
    look them up itself), and nobody holds a copy meanwhile. Sequences shared otherwise keep all of
    `shareable`."""
    prompt, seq, shared_len = content.prompt, content.seq, content.shared_len
    out = shareable.copy()
    if prompt.size == 0:
        return out
    order = np.argsort(seq, kind="stable")  # (rows of a sequence stay in turn order)
    by_seq, their_session = seq[order], session[order]
    first = np.r_[True, by_seq[1:] != by_seq[:-1]]
    starts = np.flatnonzero(first)
    group = np.cumsum(first) - 1
    lo = np.minimum.reduceat(their_session, starts)[group]
    hi = np.maximum.reduceat(their_session, starts)[group]
    turns = np.empty(seq.size, np.bool_)
    turns[order] = (lo == hi) & (their_session >= 0)  # every request of its sequence: one conversation's
    # The longest of the earlier turns (prompt and output): a running maximum within each sequence,
    # made one running maximum by lifting each sequence above every earlier one (by group * step,
    # step > any length: at most ~10^7 groups x 10^7 tokens, far from overflow).
    length = (prompt + output)[order]
    step = int(length.max()) + 1
    running_max = np.maximum.accumulate(length + group * step) - group * step
    before = np.where(first, 0, np.r_[0, running_max[:-1]])
    earlier = np.empty(seq.size, np.int64)
    earlier[order] = before
    own = np.maximum(np.maximum(prompt, shared_len), earlier)
    out[turns] = np.minimum(shareable[turns], own[turns])
    return out


# -- a replica's prefix cache, as the engine holds it --------------------------------------------
# The engine passes one PrefixCache `apc` (below), whose fields are:
#   pool[row, node]    nodes of every replica's free list: blocks (global ids 0..B-1) and extents
#                      (B + a block id of the replica: as many as its blocks). A block: KEY (EMPTY =
#                      not cached), REF, MARK (stamp of the last lookup that hit it); an extent, in
#                      the rows of the first two: SIZE and NAMED blocks (at its tail side, the head
#                      side being its owner's last blocks); both: PREV/FNEXT links; STACK: per
#                      replica, unused block ids (at its blocks' columns) and unused extent nodes
#   table[0|1, h]      hash table keys / blocks, one power-of-two region per replica
#   rep[r, col]        BLK_BASE, HT_BASE, HT_SIZE, FL_HEAD, FL_TAIL, EVICTIONS, HIT_TOKENS,
#                      SOURCE_TOKENS, ROWS_FREE, the MEMO_* of the last lookup, EXT_BASE, and the
#                      sizes of the two stacks
#   slot[r, col, k]    per running slot: ROW of its block table, NBLK public blocks in it, HASHED
#                      full blocks named so far (private ones only counted), SKEY the key of the
#                      last public one named, PRIV private blocks held, SHARED its first blocks
#                      that may be public while it runs
#   content            the requests' block contents (see block_content_nb)
#   shareable_running  their tokens shareable while they run (a copy: a preemption extends its
#                      request's over what it named)
#   shareable_after    ... and those shareable once they have finished
#   rows[r, row, j]    block tables (a request's public blocks in order; shared ones in several)
#   free_rows[r, i]    a stack of unused block-table rows
KEY, REF, PREV, FNEXT, MARK, STACK = range(6)
SIZE, NAMED = KEY, REF  # an extent's
N_POOL_ROWS = 6
BLK_BASE, HT_BASE, HT_SIZE, FL_HEAD, FL_TAIL, EVICTIONS, HIT_TOKENS, SOURCE_TOKENS, ROWS_FREE = range(9)
MEMO_REQ, MEMO_HITS, MEMO_KEY, MEMO_STAMP = range(9, 13)  # the last lookup, to extend next time
EXT_BASE, IDS_FREE, EXTS_FREE = range(13, 16)
N_REP_COLS = 16
ROW, NBLK, HASHED, SKEY, PRIV, SHARED = range(6)
N_SLOT_COLS = 6


class PrefixCache(NamedTuple):
    """The prefix caches of a run's replicas (the layout above); fastsim.kernel_run builds it."""

    pool: np.ndarray
    table: np.ndarray
    rep: np.ndarray
    slot: np.ndarray
    content: tuple              # the requests' block contents (fastsim.workload.BlockSources)
    shareable_running: np.ndarray
    shareable_after: np.ndarray
    rows: np.ndarray
    free_rows: np.ndarray


@njit(cache=True, error_model="numpy")
def apc_init_nb(apc, r, num_blocks):
    """Replica r's blocks: all free (one extent, none named, no block with an identity yet), none
    cached; every block-table row unused."""
    pool, rep, free_rows = apc.pool, apc.rep, apc.free_rows
    base, ext = rep[r, BLK_BASE], rep[r, EXT_BASE]
    for j in range(num_blocks):
        for x in (base + j, ext + j):
            pool[KEY, x] = EMPTY
            pool[REF, x] = 0
            pool[PREV, x] = EMPTY
            pool[FNEXT, x] = EMPTY
            pool[MARK, x] = EMPTY
        pool[STACK, base + j] = base + num_blocks - 1 - j
        pool[STACK, ext + j] = ext + num_blocks - 1 - j
    rep[r, IDS_FREE] = num_blocks
    rep[r, EXTS_FREE] = num_blocks
    rep[r, FL_HEAD] = EMPTY
    rep[r, FL_TAIL] = EMPTY
    if num_blocks > 0:
        _push_extent(pool, rep, r, pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1], num_blocks, 0)
    n_rows = free_rows.shape[1]
    for i in range(n_rows):
        free_rows[r, i] = n_rows - 1 - i
    rep[r, ROWS_FREE] = n_rows
    rep[r, MEMO_REQ] = EMPTY


@njit(cache=True, error_model="numpy", inline="always")
def _table(apc, r):
    table, rep = apc.table, apc.rep
    lo = rep[r, HT_BASE]
    hi = lo + rep[r, HT_SIZE]
    return table[0, lo:hi], table[1, lo:hi]


@njit(cache=True, error_model="numpy", inline="always")
def _shared_blocks(apc, req, block_size):
    """Request req's first blocks that may be public."""
    return div_pow2_nb(apc.shareable_running[req], block_size)


@njit(cache=True, error_model="numpy")
def apc_lookup_nb(apc, r, req, num_tokens, block_size, hit_buf):
    """vLLM's longest cached prefix of request `req`: full blocks only, and never all of its tokens
    (the last one is always computed). Returns (blocks hit, key of the last).

    A queue head that cannot be admitted is looked up again every iteration; unless one of the
    blocks it hit was evicted since (the only way a cached key disappears; eviction clears the
    memo then), that prefix still holds and the lookup resumes where it stopped. `hit_buf` is
    replica r's own. (Private blocks are nobody else's: the lookup ends before them.)
    """
    pool, rep, content = apc.pool, apc.rep, apc.content
    keys, vals = _table(apc, r)
    key = ROOT_KEY
    hits = 0
    if rep[r, MEMO_REQ] == req:
        hits, key = rep[r, MEMO_HITS], rep[r, MEMO_KEY]
    else:
        rep[r, MEMO_STAMP] += 1
    stamp = rep[r, MEMO_STAMP]
    last = min(div_pow2_nb(num_tokens - 1, block_size), _shared_blocks(apc, req, block_size))
    while hits < last:
        k = mix_nb(key, block_content_nb(req, hits, block_size, content, rep[r, SOURCE_TOKENS]))
        b = ht_find_nb(keys, vals, k)
        if b == EMPTY:
            break
        hit_buf[hits] = b
        pool[MARK, b] = stamp
        key = k
        hits += 1
    rep[r, MEMO_REQ], rep[r, MEMO_HITS], rep[r, MEMO_KEY] = req, hits, key
    return hits, key


@njit(cache=True, error_model="numpy")
def apc_match_nb(apc, r, req, num_tokens, block_size, hits=0, key=ROOT_KEY):
    """How many leading blocks of request `req` replica r's cache holds, as a lookup would find them,
    leaving no trace (a router asks every replica; SGLang's queue ordering every waiting request).
    Resumes from (hits, key) of an earlier match if no block was evicted since. Returns (hits, key)."""
    rep, content = apc.rep, apc.content
    keys, vals = _table(apc, r)
    last = min(div_pow2_nb(num_tokens - 1, block_size), _shared_blocks(apc, req, block_size))
    while hits < last:
        k = mix_nb(key, block_content_nb(req, hits, block_size, content, rep[r, SOURCE_TOKENS]))
        if keys[_probe(keys, k)] != k:
            break
        key = k
        hits += 1
    return hits, key


@njit(cache=True, error_model="numpy")
def apc_idle_nb(apc, hit_buf, hits):
    """How many of the blocks a lookup hit nobody holds: taking them shrinks the free list. (Apart
    from the lookup: an admission that fails without them never pays for the count.)"""
    pool = apc.pool
    idle = 0
    for j in range(hits):
        idle += pool[REF, hit_buf[j]] == 0
    return idle


@njit(cache=True, error_model="numpy")
def apc_start_nb(apc, r, k, req, block_size, hit_buf, hits, key):
    """Slot k takes a block-table row and the cached blocks of its prefix. Returns how many of
    those left the free list."""
    pool, rep, slots, rows, free_rows = apc.pool, apc.rep, apc.slot, apc.rows, apc.free_rows
    prev, nxt, ends = pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1]
    rep[r, ROWS_FREE] -= 1
    row = free_rows[r, rep[r, ROWS_FREE]]
    slots[r, ROW, k] = row
    slots[r, NBLK, k] = hits
    slots[r, HASHED, k] = hits
    slots[r, SKEY, k] = key
    slots[r, PRIV, k] = 0
    slots[r, SHARED, k] = _shared_blocks(apc, req, block_size)
    taken = 0
    for j in range(hits):
        b = hit_buf[j]
        if pool[REF, b] == 0:
            fl_remove_nb(prev, nxt, ends, b)
            taken += 1
        pool[REF, b] += 1
        rows[r, row, j] = b
    return taken


@njit(cache=True, error_model="numpy")
def apc_admit_nb(apc, r, k, req, block_size, hit_buf, hits, key, need, computed):
    """Request req admitted into slot k: the cached blocks of its prefix (`hits`, found by
    apc_lookup_nb) and `need` fresh ones, those its `computed` tokens fill named. Returns how many
    blocks left the free list."""
    taken = apc_start_nb(apc, r, k, req, block_size, hit_buf, hits, key)
    apc_allocate_nb(apc, r, k, need)
    apc_hash_full_nb(apc, r, k, req, computed, block_size)
    apc.rep[r, HIT_TOKENS] += hits * block_size
    return taken + need


# -- the free list's nodes ------------------------------------------------------------------------
# (They take the list's arrays, views made once by the caller: in a function compiled with
# reference counting, each view made in a loop costs atomic increments and decrements.)
@njit(cache=True, error_model="numpy", inline="always")
def _push_extent(pool, rep, r, prev, nxt, ends, size, named):
    """`size` blocks without identities, `named` of them cached, to the tail of the free list."""
    rep[r, EXTS_FREE] -= 1
    x = pool[STACK, rep[r, EXT_BASE] + rep[r, EXTS_FREE]]
    pool[SIZE, x] = size
    pool[NAMED, x] = named
    fl_push_tail_nb(prev, nxt, ends, x)


@njit(cache=True, error_model="numpy", inline="always")
def _eat_extent(pool, rep, r, x, count):
    """`count` blocks off the head side of extent x: its unnamed ones first, then cached ones
    (evicted). (The caller takes an emptied extent off the list.)"""
    evicted = max(count - (pool[SIZE, x] - pool[NAMED, x]), 0)
    pool[NAMED, x] -= evicted
    pool[SIZE, x] -= count
    rep[r, EVICTIONS] += evicted


@njit(cache=True, error_model="numpy", inline="always")
def _take_from_extent(pool, rep, r, prev, nxt, ends, x, count):
    """`count` blocks off the head side of extent x, the free list's head (off the list if emptied)."""
    _eat_extent(pool, rep, r, x, count)
    if pool[SIZE, x] == 0:
        fl_pop_head_nb(prev, nxt, ends)
        pool[STACK, rep[r, EXT_BASE] + rep[r, EXTS_FREE]] = x
        rep[r, EXTS_FREE] += 1


@njit(cache=True, error_model="numpy", inline="always")
def _take_block(pool, rep, r, prev, nxt, ends, keys, vals, stamp):
    """The block at the free list's head, evicted if cached (the head is a block, not an extent: its
    node comes before the replica's extents')."""
    b = fl_pop_head_nb(prev, nxt, ends)
    if pool[KEY, b] != EMPTY:
        ht_delete_nb(keys, vals, pool[KEY, b])
        pool[KEY, b] = EMPTY
        rep[r, EVICTIONS] += 1
        if pool[MARK, b] == stamp:
            rep[r, MEMO_REQ] = EMPTY  # the remembered prefix lost a block: look it up afresh
    return b


@njit(cache=True, error_model="numpy", inline="always")
def _new_id(pool, rep, r):
    """An identity for a block that had none (one left an extent, or a private block is published)."""
    rep[r, IDS_FREE] -= 1
    b = pool[STACK, rep[r, BLK_BASE] + rep[r, IDS_FREE]]
    pool[MARK, b] = EMPTY
    return b


@njit(cache=True, error_model="numpy", inline="always")
def apc_allocate_nb(apc, r, k, count):
    """`count` fresh blocks for slot k from the head of the free list, evicting cached ones: public
    ones (within its shareable blocks) each with an identity in its block table, private ones
    counted. Inlined is only the common case, private blocks all from the extent at the head:
    the whole of it inlined into the engine's loops measured ~50% slower where blocks are mostly
    public (the Mooncake conversation replay on Llama-3.1-8B), a call in every case ~85% slower
    where they are private (ShareGPT)."""
    pool, rep, slots = apc.pool, apc.rep, apc.slot
    x = rep[r, FL_HEAD]
    if slots[r, NBLK, k] + slots[r, PRIV, k] >= slots[r, SHARED, k] and x >= rep[r, EXT_BASE] \
            and pool[SIZE, x] > count:  # (the extent outlives it: the list is not touched)
        _eat_extent(pool, rep, r, x, count)
        slots[r, PRIV, k] += count
    else:
        _allocate_nb(apc, r, k, count)


@njit(cache=True, error_model="numpy")
def _allocate_nb(apc, r, k, count):
    """apc_allocate_nb, every case."""
    pool, rep, slots, rows = apc.pool, apc.rep, apc.slot, apc.rows
    prev, nxt, ends = pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1]
    keys, vals = _table(apc, r)
    stamp = rep[r, MEMO_STAMP]
    ext = rep[r, EXT_BASE]
    nblk = slots[r, NBLK, k]
    public = min(max(slots[r, SHARED, k] - nblk - slots[r, PRIV, k], 0), count)
    if public > 0:
        table_row = rows[r, slots[r, ROW, k]]
        for _ in range(public):
            x = ends[0]
            if x >= ext:
                _take_from_extent(pool, rep, r, prev, nxt, ends, x, 1)
                b = _new_id(pool, rep, r)
            else:
                b = _take_block(pool, rep, r, prev, nxt, ends, keys, vals, stamp)
            pool[REF, b] = 1
            table_row[nblk] = b
            nblk += 1
        slots[r, NBLK, k] = nblk
    slots[r, PRIV, k] += count - public
    apc_pop_nb(apc, r, count - public)


@njit(cache=True, error_model="numpy")
def apc_pop_nb(apc, r, count):
    """`count` blocks off the head of the free list into private use, evicting cached ones: only how
    many matters, not which (fast mode's lazy decoders take theirs so, as a count, later)."""
    pool, rep = apc.pool, apc.rep
    prev, nxt, ends = pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1]
    keys, vals = _table(apc, r)
    stamp = rep[r, MEMO_STAMP]
    ext = rep[r, EXT_BASE]
    while count > 0:
        x = ends[0]
        if x >= ext:
            t = min(count, pool[SIZE, x])
            _take_from_extent(pool, rep, r, prev, nxt, ends, x, t)
            count -= t
        else:
            b = _take_block(pool, rep, r, prev, nxt, ends, keys, vals, stamp)
            pool[STACK, rep[r, BLK_BASE] + rep[r, IDS_FREE]] = b  # its identity is not needed
            rep[r, IDS_FREE] += 1
            count -= 1


@njit(cache=True, error_model="numpy", inline="always")
def apc_private_from_here_nb(apc, r, k):
    """Whether every block slot k fills and takes from now on is private (its shareable ones are
    all named): then only how many it takes matters (apc_pop_nb, apc_sync_private_nb)."""
    return apc.slot[r, HASHED, k] >= apc.slot[r, SHARED, k]


@njit(cache=True, error_model="numpy", inline="always")
def apc_public_to_end_nb(apc, r, k, final_tokens, block_size):
    """Whether slot k's shareable blocks reach past the last block it fills, holding `final_tokens`
    at its end (its last token's KV is never computed): it never decodes into private blocks only
    (its client's system prompt is longer than all of it)."""
    return apc.slot[r, SHARED, k] > div_pow2_nb(final_tokens - 1, block_size)


@njit(cache=True, error_model="numpy", inline="always")
def apc_sync_private_nb(apc, r, k, blocks, computed, block_size):
    """Slot k (apc_private_from_here_nb), now holding `blocks` blocks with `computed` tokens in
    them, the new ones taken as a count: its columns as taking and naming them one by one leaves
    them."""
    slots = apc.slot
    slots[r, PRIV, k] = blocks - slots[r, NBLK, k]
    slots[r, HASHED, k] = max(slots[r, HASHED, k], div_pow2_nb(computed, block_size))


@njit(cache=True, error_model="numpy", inline="always")
def apc_hash_full_nb(apc, r, k, req, computed, block_size):
    """Name and cache slot k's blocks that `computed` tokens have filled (private ones: counted;
    public ones named by a call, as apc_allocate_nb says why)."""
    slots = apc.slot
    if slots[r, HASHED, k] >= slots[r, SHARED, k]:
        slots[r, HASHED, k] = max(slots[r, HASHED, k], div_pow2_nb(computed, block_size))
    else:
        _hash_full_nb(apc, r, k, req, computed, block_size)


@njit(cache=True, error_model="numpy")
def _hash_full_nb(apc, r, k, req, computed, block_size):
    """apc_hash_full_nb, every case."""
    pool, rep, slots, content, rows = apc.pool, apc.rep, apc.slot, apc.content, apc.rows
    m = slots[r, HASHED, k]
    shared = slots[r, SHARED, k]
    if m < shared and (m + 1) * block_size <= computed:
        keys, vals = _table(apc, r)
        table_row = rows[r, slots[r, ROW, k]]
        source_tokens = rep[r, SOURCE_TOKENS]
        key = slots[r, SKEY, k]
        while m < shared and (m + 1) * block_size <= computed:
            b = table_row[m]
            key = mix_nb(key, block_content_nb(req, m, block_size, content, source_tokens))
            if ht_add_nb(keys, vals, key, b):  # (an equal block cached already keeps the name)
                pool[KEY, b] = key
            m += 1
        slots[r, SKEY, k] = key
    if m >= shared:
        m = max(m, div_pow2_nb(computed, block_size))
    slots[r, HASHED, k] = m


@njit(cache=True, error_model="numpy")
def apc_publish_nb(apc, r, k, req, block_size):
    """Slot k's request is preempted: it may look its own blocks up again, so its private blocks
    become public (identities, names in the hash table, as they would have had all along), and so
    do, when it runs again, those up to its last named one (it may name them again; anything past
    them nobody has had yet)."""
    pool, rep, slots, content, rows = apc.pool, apc.rep, apc.slot, apc.content, apc.rows
    shareable = apc.shareable_running
    shareable[req] = max(shareable[req], slots[r, HASHED, k] * block_size)
    if slots[r, PRIV, k] == 0:
        return
    keys, vals = _table(apc, r)
    table_row = rows[r, slots[r, ROW, k]]
    source_tokens = rep[r, SOURCE_TOKENS]
    nblk = slots[r, NBLK, k]
    named = slots[r, HASHED, k]
    key = slots[r, SKEY, k]
    for _ in range(slots[r, PRIV, k]):
        b = _new_id(pool, rep, r)
        pool[REF, b] = 1
        table_row[nblk] = b
        if nblk < named:
            key = mix_nb(key, block_content_nb(req, nblk, block_size, content, source_tokens))
            if ht_add_nb(keys, vals, key, b):
                pool[KEY, b] = key
        nblk += 1
    slots[r, NBLK, k] = nblk
    slots[r, SKEY, k] = key
    slots[r, PRIV, k] = 0


@njit(cache=True, error_model="numpy", inline="always")
def apc_deferred_nb(apc, req):
    """Whether request `req` has blocks shareable once it has finished, not while it runs (see the
    module's docstring): they are named when it finishes."""
    return apc.shareable_after[req] > apc.shareable_running[req]


@njit(cache=True, error_model="numpy")
def apc_finish_nb(apc, r, k, req, block_size):
    """Slot k's request `req` has finished: its deferred blocks get their identities and names,
    then it lets go of its blocks. Returns how many became free. (Fast mode's lazy form first takes
    off the free list the blocks its decoders took: identities are as many as blocks.)"""
    if apc_deferred_nb(apc, req):
        apc_publish_nb(apc, r, k, req, block_size)
    return apc_release_nb(apc, r, k)


@njit(cache=True, error_model="numpy")
def apc_release_nb(apc, r, k):
    """Slot k's request lets go of its blocks, last first (so its tail is evicted first): its private
    ones as one extent, then public ones nobody else holds; all to the free list, still cached.
    Returns how many became free."""
    pool, rep, slots, rows, free_rows = apc.pool, apc.rep, apc.slot, apc.rows, apc.free_rows
    prev, nxt, ends = pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1]
    row = slots[r, ROW, k]
    freed = slots[r, PRIV, k]
    if freed > 0:
        named = min(max(slots[r, HASHED, k] - slots[r, NBLK, k], 0), freed)
        _push_extent(pool, rep, r, prev, nxt, ends, freed, named)
        slots[r, PRIV, k] = 0
    for j in range(slots[r, NBLK, k] - 1, -1, -1):
        b = rows[r, row, j]
        pool[REF, b] -= 1
        if pool[REF, b] == 0:
            fl_push_tail_nb(prev, nxt, ends, b)
            freed += 1
    free_rows[r, rep[r, ROWS_FREE]] = row
    rep[r, ROWS_FREE] += 1
    slots[r, NBLK, k] = 0
    return freed


@njit(cache=True, error_model="numpy")
def apc_move_slot_nb(apc, r, src, dst):
    slots = apc.slot
    for c in range(N_SLOT_COLS):
        slots[r, c, dst] = slots[r, c, src]
