"""The heaps against heapq on random pushes and pops."""
import heapq

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from fastsim.engine import heap_nb as hp


@given(st.lists(st.tuples(st.sampled_from([0.0, 0.5, 1.0, 2.5]), st.booleans()), max_size=60))
def test_heap_pops_in_time_then_index_order_like_heapq(ops):
    n = len(ops)
    h_t, h_i, h_n = np.empty((2, max(n, 1))), np.empty((2, max(n, 1)), np.int64), np.zeros(2, np.int64)
    ref = []
    for i, (t, pop) in enumerate(ops):
        if pop and ref:
            assert hp.heap_pop_nb(h_t, h_i, h_n, 1) == heapq.heappop(ref)
        else:
            hp.heap_push_nb(h_t, h_i, h_n, 1, t, i)
            heapq.heappush(ref, (t, i))
        assert h_n[1] == len(ref) and h_n[0] == 0
    while ref:
        assert hp.heap_pop_nb(h_t, h_i, h_n, 1) == heapq.heappop(ref)


@given(st.lists(st.tuples(st.integers(0, 40), st.booleans()), max_size=80))
def test_key_heap_pops_its_smallest_key_like_heapq(ops):
    """Fast mode's finish heap: distinct int64 keys (iteration, then slot, packed)."""
    n = len(ops)
    h, h_n = np.zeros((2, max(n, 1)), np.int64), np.zeros(2, np.int64)
    ref = []
    for i, (v, pop) in enumerate(ops):
        if pop and ref:
            assert hp.key_pop_nb(h, h_n, 1) == heapq.heappop(ref)
        else:
            key = (v << 20) | i
            hp.key_push_nb(h, h_n, 1, key)
            heapq.heappush(ref, key)
        assert h_n[1] == len(ref) and h_n[0] == 0
    while ref:
        assert hp.key_pop_nb(h, h_n, 1) == heapq.heappop(ref)


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(0, 2)), max_size=80))
def test_key_heap_removes_any_key_and_still_pops_in_order(ops):
    """Fast mode takes a preempted decoder's key out from anywhere in the heap: pushes, pops and
    removals (of a key chosen by the op's value among those held) against a sorted list."""
    n = len(ops)
    h, h_n = np.zeros((2, max(n, 1)), np.int64), np.zeros(2, np.int64)
    ref = []
    for i, (v, op) in enumerate(ops):
        if op == 1 and ref:
            assert hp.key_pop_nb(h, h_n, 1) == ref.pop(0)
        elif op == 2 and ref:
            key = ref.pop(v % len(ref))
            assert hp.key_remove_nb(h, h_n, 1, key)
            assert not hp.key_remove_nb(h, h_n, 1, key)  # gone: not found again
        else:
            key = (v << 20) | i
            hp.key_push_nb(h, h_n, 1, key)
            ref = sorted(ref + [key])
        assert h_n[1] == len(ref) and h_n[0] == 0
        assert sorted(h[1, :h_n[1]].tolist()) == ref
    while ref:
        assert hp.key_pop_nb(h, h_n, 1) == ref.pop(0)
