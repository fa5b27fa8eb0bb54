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


@njit(cache=True, error_model="numpy")
def block_content_nb(req, m, block_size, offsets, ids, source_tokens):
    """Content id of engine block m (tokens [m*bs, (m+1)*bs)) of request `req`.

    Requests may carry ids of consecutive `source_tokens`-token blocks (Mooncake's hash_ids, 512
    tokens): an engine block is named by the source blocks it lies in and its offset, so equal
    source ids give equal engine blocks at any block size. Tokens the ids do not cover (and
    requests without ids) get content unique to the request.
    """
    lo = offsets[req]
    n_ids = offsets[req + 1] - lo
    if source_tokens > 0:
        first = (m * block_size) // source_tokens
        last = ((m + 1) * block_size - 1) // source_tokens
        if last < n_ids:
            return mix_nb(mix_nb(ids[lo + first], ids[lo + last]), (m * block_size) % source_tokens)
    return mix_nb(mix_nb(0x5BD1E995, req), m) ^ 1  # ^1: never equal to a shared block's form


# -- hash table: key -> block ------------------------------------------------------------------
@njit(cache=True, error_model="numpy")
def ht_find_nb(keys, vals, key):
    mask = keys.size - 1
    h = key & mask
    while keys[h] != EMPTY:
        if keys[h] == key:
            return vals[h]
        h = (h + 1) & mask
    return EMPTY


@njit(cache=True, error_model="numpy")
def ht_insert_nb(keys, vals, key, val):
    """Insert or overwrite. The table must keep a free slot (size > number of keys)."""
    mask = keys.size - 1
    h = key & mask
    while keys[h] != EMPTY and keys[h] != key:
        h = (h + 1) & mask
    keys[h] = key
    vals[h] = val


@njit(cache=True, error_model="numpy")
def ht_delete_nb(keys, vals, key):
    """Remove `key` if present, shifting later entries of its probe run back (no tombstones)."""
    mask = keys.size - 1
    h = key & mask
    while keys[h] != key:
        if keys[h] == EMPTY:
            return False
        h = (h + 1) & mask
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


@njit(cache=True, error_model="numpy")
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


@njit(cache=True, error_model="numpy")
def fl_push_tail_nb(prev, nxt, ends, b):
    prev[b] = ends[1]
    nxt[b] = EMPTY
    if ends[1] == EMPTY:
        ends[0] = b
    else:
        nxt[ends[1]] = b
    ends[1] = b


@njit(cache=True, error_model="numpy")
def fl_pop_head_nb(prev, nxt, ends):
    b = ends[0]
    if b != EMPTY:
        fl_remove_nb(prev, nxt, ends, b)
    return b
