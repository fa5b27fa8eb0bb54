"""Binary min-heaps in the rows of 2-D arrays (one heap per row, its size in h_n[row]): of (time, index),
popped in time order, ties by index so runs repeat exactly, for the arrivals the simulation creates
as it runs (the next turn of a conversation); and of distinct integer keys, for fast mode's
finishing decoders (iteration and slot in one int64: one comparison, one array).
Heaps are addressed by row, not passed as row views: a view costs an atomic reference count."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, error_model="numpy")
def _before(h_t, h_i, row, a, b):
    return h_t[row, a] < h_t[row, b] or (h_t[row, a] == h_t[row, b] and h_i[row, a] < h_i[row, b])


@njit(cache=True, error_model="numpy")
def _swap(h_t, h_i, row, a, b):
    h_t[row, a], h_t[row, b] = h_t[row, b], h_t[row, a]
    h_i[row, a], h_i[row, b] = h_i[row, b], h_i[row, a]


@njit(cache=True, error_model="numpy", inline="always")  # calls cost reference counts of its arrays
def heap_push_nb(h_t, h_i, h_n, row, t, i):
    """Add (t, i) to heap `row` (its capacity: the arrays' width)."""
    k = h_n[row]
    h_n[row] = k + 1
    h_t[row, k] = t
    h_i[row, k] = i
    while k > 0:
        parent = (k - 1) // 2
        if not _before(h_t, h_i, row, k, parent):
            break
        _swap(h_t, h_i, row, k, parent)
        k = parent


@njit(cache=True, error_model="numpy", inline="always")
def heap_pop_nb(h_t, h_i, h_n, row):
    """Remove and return the earliest (t, i) of heap `row`."""
    t, i = h_t[row, 0], h_i[row, 0]
    last = h_n[row] - 1
    h_n[row] = last
    h_t[row, 0], h_i[row, 0] = h_t[row, last], h_i[row, last]
    k = 0
    while True:
        c = 2 * k + 1
        if c >= last:
            break
        if c + 1 < last and _before(h_t, h_i, row, c + 1, c):
            c += 1
        if not _before(h_t, h_i, row, c, k):
            break
        _swap(h_t, h_i, row, k, c)
        k = c
    return t, i


_KEY_MAX = np.iinfo(np.int64).max


@njit(cache=True, error_model="numpy", inline="always")
def _key_rise(h, row, k, key):
    """Put `key` in the hole at k, or higher: larger parents move down into the hole."""
    while k > 0:
        parent = (k - 1) >> 1
        up = h[row, parent]
        if up < key:
            break
        h[row, k] = up
        k = parent
    h[row, k] = key


@njit(cache=True, error_model="numpy", inline="always")
def key_push_nb(h, h_n, row, key):
    """Add `key` (distinct from every key in it) to heap `row` of h: it rises from the bottom."""
    k = h_n[row]
    h_n[row] = k + 1
    _key_rise(h, row, k, key)


@njit(cache=True, error_model="numpy", inline="always")
def key_pop_nb(h, h_n, row):
    """Remove and return the smallest key of heap `row` of h."""
    top = h[row, 0]
    _key_take(h, h_n, row, 0)
    return top


@njit(cache=True, error_model="numpy")
def key_remove_nb(h, h_n, row, key):
    """Remove `key` from heap `row` of h (found by a scan: for the rare removal out of order).
    Returns whether it was there."""
    at = 0
    for k in range(h_n[row]):  # no exit at the match: the loop runs vectorised
        at = max(at, (k + 1) * (h[row, k] == key))
    if at == 0:
        return False
    _key_take(h, h_n, row, at - 1)
    return True


@njit(cache=True, error_model="numpy", inline="always")
def _key_take(h, h_n, row, k):
    """Remove the key at position k of heap `row`.

    Bottom-up: the hole at k sinks to a leaf along the smaller children (a select, not a branch:
    which child is smaller is a coin flip a predictor misses half the time), then the last key,
    itself from the bottom, rises from there (rarely more than a level; above k, if it is smaller
    than k's parents: the path from the root to the hole stays sorted)."""
    last = h_n[row] - 1
    h_n[row] = last
    key = h[row, last]
    h[row, last] = _KEY_MAX  # a missing right child is never the smaller one
    c = 2 * k + 1
    while c < last:
        c += h[row, c + 1] < h[row, c]
        h[row, k] = h[row, c]
        k = c
        c = 2 * k + 1
    _key_rise(h, row, k, key)


@njit(cache=True, error_model="numpy")
def _first_unsent_nb(next_turn, arrival, rejected, j):
    """From row j along a closed loop's pointers (-2 - row), the first request not yet sent (its
    arrival unknown, NaN) nor rejected; -1 if none. The rows passed are pointed at it, so later
    walks start there (each row is passed about once)."""
    start = j
    while j >= 0 and (not np.isnan(arrival[j]) or rejected[j]):
        j = -2 - next_turn[j] if next_turn[j] <= -2 else -1
    k = start
    while k >= 0 and k != j:
        nxt = -2 - next_turn[k] if next_turn[k] <= -2 else -1
        next_turn[k] = -2 - j if j >= 0 else -1
        k = nxt
    return j


@njit(cache=True, error_model="numpy", inline="always")  # a call in the completion loops slows them
def next_turn_due_nb(turns, i, end):
    """Request i finished at `end`: the next turn of its conversation arrives after its think time
    (never if it was rejected). Returns that arrival time (inf: none)."""
    next_turn, think_s, arrival, h_t = turns.next_turn, turns.think_s, turns.arrival, turns.h_t
    h_i, h_n, rejected = turns.h_i, turns.h_n, turns.rejected
    j = next_turn[i]
    if j <= -2:  # a closed loop: its first request not yet sent, whichever of its requests finished
        j = _first_unsent_nb(next_turn, arrival, rejected, -2 - j)
    if j < 0 or rejected[j]:
        return np.inf
    arrival[j] = end + think_s[j]
    heap_push_nb(h_t, h_i, h_n, 0, arrival[j], j)
    return arrival[j]
