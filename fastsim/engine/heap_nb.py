"""A binary min-heap of (time, request) in arrays: arrivals the simulation creates as it runs (the
next turn of a conversation), popped in time order, ties by request index so runs repeat exactly."""
from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, error_model="numpy")
def _before(h_t, h_i, a, b):
    return h_t[a] < h_t[b] or (h_t[a] == h_t[b] and h_i[a] < h_i[b])


@njit(cache=True, error_model="numpy")
def _swap(h_t, h_i, a, b):
    h_t[a], h_t[b] = h_t[b], h_t[a]
    h_i[a], h_i[b] = h_i[b], h_i[a]


@njit(cache=True, error_model="numpy")
def heap_push_nb(h_t, h_i, h_n, t, i):
    """Add (t, i); h_n[0] is the heap's size, the arrays its capacity."""
    k = h_n[0]
    h_n[0] = k + 1
    h_t[k] = t
    h_i[k] = i
    while k > 0:
        parent = (k - 1) // 2
        if not _before(h_t, h_i, k, parent):
            break
        _swap(h_t, h_i, k, parent)
        k = parent


@njit(cache=True, error_model="numpy")
def heap_pop_nb(h_t, h_i, h_n):
    """Remove and return the earliest (t, i)."""
    t, i = h_t[0], h_i[0]
    last = h_n[0] - 1
    h_n[0] = last
    h_t[0], h_i[0] = h_t[last], h_i[last]
    k = 0
    while True:
        c = 2 * k + 1
        if c >= last:
            break
        if c + 1 < last and _before(h_t, h_i, c + 1, c):
            c += 1
        if not _before(h_t, h_i, c, k):
            break
        _swap(h_t, h_i, k, c)
        k = c
    return t, i


@njit(cache=True, error_model="numpy", inline="always")  # a call in the completion loops slows them
def next_turn_due_nb(turns, i, end):
    """Request i finished at `end`: the next turn of its conversation arrives after its think time
    (never if it was rejected). Returns that arrival time (inf: none)."""
    next_turn, think_s, arrival, h_t, h_i, h_n, rejected = turns
    j = next_turn[i]
    if j < 0 or rejected[j]:
        return np.inf
    arrival[j] = end + think_s[j]
    heap_push_nb(h_t, h_i, h_n, arrival[j], j)
    return arrival[j]
