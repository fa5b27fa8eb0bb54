"""Building blocks of an array-based prefix cache (vLLM's automatic prefix caching), for the engine.

A full KV block is identified by a 64-bit key chained from its parent's key and its own content,
so equal keys mean equal prefixes. Cached blocks are found through an open-addressing hash table
(linear probing, backward-shift deletion: no tombstones, so lookups never slow down); blocks no
request holds sit in an LRU free list, evicted from its head, returned to its tail.
Every kernel here has a plain-Python twin in tests/test_prefix.py.
"""
from __future__ import annotations

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
    offsets, ids, prompt, seq, shared_len, shared_id = content
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


# -- a replica's prefix cache, as the engine holds it --------------------------------------------
# The engine passes one tuple `apc = (pool, table, rep, slots, content, rows, free_rows)`:
#   pool[row, block]   for every replica's blocks (global ids): KEY (EMPTY = not cached), REF,
#                      PREV/FNEXT (free-list links), MARK (stamp of the last lookup that hit it)
#   table[0|1, h]      hash table keys / blocks, one power-of-two region per replica
#   rep[r, col]        BLK_BASE, HT_BASE, HT_SIZE, FL_HEAD, FL_TAIL, EVICTIONS, HIT_TOKENS,
#                      SOURCE_TOKENS, ROWS_FREE, and the MEMO_* of the last lookup
#   slots[r, col, k]   per running slot: ROW of its block table, NBLK blocks in it, HASHED full
#                      blocks named so far, SKEY the key of the last named one
#   content           the requests' block contents (see block_content_nb)
#   rows[r, row, j]    block tables (a request's blocks in order; shared blocks appear in several)
#   free_rows[r, i]    a stack of unused block-table rows
KEY, REF, PREV, FNEXT, MARK = 0, 1, 2, 3, 4
N_POOL_ROWS = 5
BLK_BASE, HT_BASE, HT_SIZE, FL_HEAD, FL_TAIL, EVICTIONS, HIT_TOKENS, SOURCE_TOKENS, ROWS_FREE = range(9)
MEMO_REQ, MEMO_HITS, MEMO_KEY, MEMO_STAMP = range(9, 13)  # the last lookup, to extend next time
N_REP_COLS = 13
ROW, NBLK, HASHED, SKEY = 0, 1, 2, 3
N_SLOT_COLS = 4


@njit(cache=True, error_model="numpy")
def apc_init_nb(apc, r, num_blocks):
    """Replica r's blocks: all free, in order, none cached; every block-table row unused."""
    pool, rep, free_rows = apc[0], apc[2], apc[6]
    base = rep[r, BLK_BASE]
    for j in range(num_blocks):
        b = base + j
        pool[KEY, b] = EMPTY
        pool[REF, b] = 0
        pool[PREV, b] = b - 1 if j > 0 else EMPTY
        pool[FNEXT, b] = b + 1 if j < num_blocks - 1 else EMPTY
        pool[MARK, b] = EMPTY
    rep[r, FL_HEAD] = base if num_blocks > 0 else EMPTY
    rep[r, FL_TAIL] = base + num_blocks - 1 if num_blocks > 0 else EMPTY
    n_rows = free_rows.shape[1]
    for i in range(n_rows):
        free_rows[r, i] = n_rows - 1 - i
    rep[r, ROWS_FREE] = n_rows
    rep[r, MEMO_REQ] = EMPTY


@njit(cache=True, error_model="numpy", inline="always")
def _table(apc, r):
    table, rep = apc[1], apc[2]
    lo = rep[r, HT_BASE]
    hi = lo + rep[r, HT_SIZE]
    return table[0, lo:hi], table[1, lo:hi]


@njit(cache=True, error_model="numpy")
def apc_lookup_nb(apc, r, req, num_tokens, block_size, hit_buf):
    """vLLM's longest cached prefix of request `req`: full blocks only, and never all of its tokens
    (the last one is always computed). Returns (blocks hit, key of the last).

    A queue head that cannot be admitted is looked up again every iteration; unless one of the
    blocks it hit was evicted since (the only way a cached key disappears; eviction clears the
    memo then), that prefix still holds and the lookup resumes where it stopped. `hit_buf` is
    replica r's own.
    """
    pool, rep, content = apc[0], apc[2], apc[4]
    keys, vals = _table(apc, r)
    key = ROOT_KEY
    hits = 0
    if rep[r, MEMO_REQ] == req:
        hits, key = rep[r, MEMO_HITS], rep[r, MEMO_KEY]
    else:
        rep[r, MEMO_STAMP] += 1
    stamp = rep[r, MEMO_STAMP]
    while hits < div_pow2_nb(num_tokens - 1, block_size):
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
    rep, content = apc[2], apc[4]
    keys, vals = _table(apc, r)
    while hits < div_pow2_nb(num_tokens - 1, block_size):
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
    pool = apc[0]
    idle = 0
    for j in range(hits):
        idle += pool[REF, hit_buf[j]] == 0
    return idle


@njit(cache=True, error_model="numpy")
def apc_start_nb(apc, r, k, hit_buf, hits, key):
    """Slot k takes a block-table row and the cached blocks of its prefix. Returns how many of
    those left the free list."""
    pool, rep, slots, rows, free_rows = apc[0], apc[2], apc[3], apc[5], apc[6]
    prev, nxt, ends = pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1]
    rep[r, ROWS_FREE] -= 1
    row = free_rows[r, rep[r, ROWS_FREE]]
    slots[r, ROW, k] = row
    slots[r, NBLK, k] = hits
    slots[r, HASHED, k] = hits
    slots[r, SKEY, k] = key
    taken = 0
    for j in range(hits):
        b = hit_buf[j]
        if pool[REF, b] == 0:
            fl_remove_nb(prev, nxt, ends, b)
            taken += 1
        pool[REF, b] += 1
        rows[r, row, j] = b
    return taken


@njit(cache=True, error_model="numpy", inline="always")
def apc_allocate_nb(apc, r, k, count):
    """`count` fresh blocks for slot k from the head of the free list, evicting cached ones."""
    pool, rep, slots, rows = apc[0], apc[2], apc[3], apc[5]
    prev, nxt, ends = pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1]
    keys, vals = _table(apc, r)
    table_row = rows[r, slots[r, ROW, k]]
    nblk = slots[r, NBLK, k]
    stamp = rep[r, MEMO_STAMP]
    for _ in range(count):
        b = fl_pop_head_nb(prev, nxt, ends)
        if pool[KEY, b] != EMPTY:
            ht_delete_nb(keys, vals, pool[KEY, b])
            pool[KEY, b] = EMPTY
            rep[r, EVICTIONS] += 1
            if pool[MARK, b] == stamp:
                rep[r, MEMO_REQ] = EMPTY  # the remembered prefix lost a block: look it up afresh
        pool[REF, b] = 1
        table_row[nblk] = b
        nblk += 1
    slots[r, NBLK, k] = nblk


@njit(cache=True, error_model="numpy", inline="always")
def apc_hash_full_nb(apc, r, k, req, computed, block_size):
    """Name and cache slot k's blocks that `computed` tokens have filled."""
    pool, rep, slots, content, rows = apc[0], apc[2], apc[3], apc[4], apc[5]
    keys, vals = _table(apc, r)
    table_row = rows[r, slots[r, ROW, k]]
    source_tokens = rep[r, SOURCE_TOKENS]
    m = slots[r, HASHED, k]
    key = slots[r, SKEY, k]
    while (m + 1) * block_size <= computed:
        b = table_row[m]
        key = mix_nb(key, block_content_nb(req, m, block_size, content, source_tokens))
        if ht_add_nb(keys, vals, key, b):  # (an equal block cached already keeps the name)
            pool[KEY, b] = key
        m += 1
    slots[r, SKEY, k] = key
    slots[r, HASHED, k] = m


@njit(cache=True, error_model="numpy")
def apc_release_nb(apc, r, k):
    """Slot k's request lets go of its blocks, last first (so its tail is evicted first); blocks
    nobody holds go to the free list, still cached. Returns how many became free."""
    pool, rep, slots, rows, free_rows = apc[0], apc[2], apc[3], apc[5], apc[6]
    prev, nxt, ends = pool[PREV], pool[FNEXT], rep[r, FL_HEAD:FL_TAIL + 1]
    row = slots[r, ROW, k]
    freed = 0
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
    slots = apc[3]
    for c in range(N_SLOT_COLS):
        slots[r, c, dst] = slots[r, c, src]
